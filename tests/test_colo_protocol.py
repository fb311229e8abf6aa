"""The COLO receiver against a scripted primary: message order, RAM, device state, errors.

The bytes are those QEMU 11.1 sends (migration/colo.c), scripted so that every message
order and error can be checked; tests/test_colo.py runs the real thing on QEMU 11, and
the initial migration part is a real QEMU stream in test_stream.py.
"""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest

from vmckpt.errors import StreamError
from vmckpt.mechanisms import colo_refusal
from vmckpt.ram import PAGE_SIZE, RamBlock
from vmckpt.stream import StreamEnvelope
from vmckpt.stream import format as fmt
from vmckpt.stream.colo import ColoReceiver
from vmckpt.stream.reader import SparseBlock

SECTION_ID = 2


def be32(value: int) -> bytes:
    return struct.pack(">I", value)


def checkpoint_bytes(pages: dict[int, bytes], zero: list[int], device: bytes) -> bytes:
    """What the primary sends after CHECKPOINT_REPLY: VMSTATE_SEND, ram END, EOF, size, state."""
    out = bytearray(be32(fmt.COLO_VMSTATE_SEND))
    out += bytes([fmt.SECTION_END]) + be32(SECTION_ID)
    first = True
    for offset, data in sorted(pages.items()):
        flags = fmt.RAM_FLAG_PAGE | (0 if first else fmt.RAM_FLAG_CONTINUE)
        out += struct.pack(">Q", offset | flags)
        if first:
            out += bytes([6]) + b"pc.ram"
            first = False
        out += data
    for offset in zero:
        out += struct.pack(">Q", offset | fmt.RAM_FLAG_ZERO | fmt.RAM_FLAG_CONTINUE) + b"\0"
    out += struct.pack(">Q", fmt.RAM_FLAG_EOS)
    out += bytes([fmt.SECTION_FOOTER]) + be32(SECTION_ID)
    out += bytes([fmt.SECTION_EOF])
    out += be32(fmt.COLO_VMSTATE_SIZE) + struct.pack(">Q", len(device)) + device
    return bytes(out)


def receiver_after_opening() -> tuple[ColoReceiver, socket.socket]:
    """A receiver as it is after the opening migration: block layout known, pages sparse."""
    ours, primary = socket.socketpair()
    receiver = ColoReceiver(ours)
    receiver.blocks = [RamBlock("pc.ram", 64 * PAGE_SIZE)]
    receiver.envelope = StreamEnvelope(b"", "pc", SECTION_ID, 0, 4, b"")
    return receiver, primary


def test_checkpoint_keeps_only_the_pages_sent_and_the_device_state() -> None:
    receiver, primary = receiver_after_opening()
    page3 = bytes(range(256)) * 16
    page5 = b"\xab" * PAGE_SIZE
    device = b"\x04device-sections\x00"
    payload = be32(fmt.COLO_CHECKPOINT_REQUEST) + checkpoint_bytes(
        {3 * PAGE_SIZE: page3, 5 * PAGE_SIZE: page5}, [9 * PAGE_SIZE], device
    )
    replies: list[bytes] = []

    def primary_side() -> None:
        primary.sendall(payload)
        replies.append(primary.recv(4))  # CHECKPOINT_REPLY comes before the state is read
        rest = b""
        while len(rest) < 8:
            rest += primary.recv(8 - len(rest))
        replies.append(rest)

    thread = threading.Thread(target=primary_side)
    thread.start()
    receiver.wait_request()
    taken = receiver.receive_checkpoint()
    receiver.acknowledge()
    thread.join(5)
    assert replies[0] == be32(fmt.COLO_CHECKPOINT_REPLY)
    assert replies[1] == be32(fmt.COLO_VMSTATE_RECEIVED) + be32(fmt.COLO_VMSTATE_LOADED)
    assert taken.device_state == device
    pages = taken.pages
    assert list(pages.stored["pc.ram"]) == [3, 5]
    assert list(pages.zeroed["pc.ram"]) == [9]
    assert pages.rows["pc.ram"][0].tobytes() == page3
    assert pages.rows["pc.ram"][1].tobytes() == page5
    out = np.empty((1, PAGE_SIZE), dtype=np.uint8)
    pages.take("pc.ram", np.array([5], dtype=np.uint32), out)
    assert out.tobytes() == page5
    with pytest.raises(KeyError):
        pages.take("pc.ram", np.array([4], dtype=np.uint32), out)
    receiver.close()
    primary.close()


def test_a_page_sent_twice_keeps_its_last_copy() -> None:
    block = SparseBlock("pc.ram", 16 * PAGE_SIZE)
    block.page(2 * PAGE_SIZE)[:] = b"\x01" * PAGE_SIZE
    block.zero(7 * PAGE_SIZE)
    block.page(7 * PAGE_SIZE)[:] = b"\x07" * PAGE_SIZE
    block.page(2 * PAGE_SIZE)[:] = b"\x02" * PAGE_SIZE
    block.zero(4 * PAGE_SIZE)
    stored, rows, zeroed = block.result()
    assert list(stored) == [2, 7] and list(zeroed) == [4]
    assert rows[0].tobytes() == b"\x02" * PAGE_SIZE and rows[1].tobytes() == b"\x07" * PAGE_SIZE


def test_return_path_is_ended_with_pongs_and_shut() -> None:
    receiver, primary = receiver_after_opening()
    receiver.reader.pings = [1]
    receiver.end_return_path()
    data = primary.recv(64)
    assert data == bytes.fromhex("0002 0004 00000001 0001 0004 00000000".replace(" ", ""))
    receiver.close()
    primary.close()


def test_unexpected_message_is_an_error() -> None:
    receiver, primary = receiver_after_opening()
    primary.sendall(be32(fmt.COLO_VMSTATE_SIZE))
    with pytest.raises(
        StreamError, match=r"expected COLO message CHECKPOINT_REQUEST.*VMSTATE_SIZE"
    ):
        receiver.expect(fmt.COLO_CHECKPOINT_REQUEST)
    receiver.close()
    primary.close()


def test_primary_that_hangs_up_midway_is_an_error() -> None:
    receiver, primary = receiver_after_opening()
    whole = checkpoint_bytes({0: b"\x01" * PAGE_SIZE}, [], b"state\x00")
    primary.sendall(whole[: len(whole) // 2])
    primary.shutdown(socket.SHUT_WR)
    with pytest.raises(StreamError, match="truncated"):
        receiver.receive_checkpoint()
    receiver.close()
    primary.close()


def test_colo_refused_on_qemu_7() -> None:
    assert colo_refusal("7.2.22", "tcg") is not None
    assert colo_refusal("10.0.13", "tcg") is not None
    assert colo_refusal("10.2.2", "tcg") is not None
    assert colo_refusal("11.1.3", "tcg") is None
    assert colo_refusal("10.0.6", "kvm") is not None
    assert colo_refusal("10.0.7", "kvm") is None
