"""The COLO receiver against a scripted primary: message order, RAM, device state, errors.

QEMU's own COLO cannot run on the QEMU versions here (see README), so the
protocol side is checked byte for byte against what QEMU's migration/colo.c
sends; the initial migration part is a real QEMU stream in test_stream.py.
"""

from __future__ import annotations

import socket
import struct
import threading

import numpy as np
import pytest

from vmckpt.errors import StreamError
from vmckpt.mechanisms import colo_refusal
from vmckpt.ram import PAGE_SIZE, RamBlock, RamImage
from vmckpt.stream import StreamEnvelope
from vmckpt.stream import format as fmt
from vmckpt.stream.colo import ColoReceiver
from vmckpt.stream.reader import _Block

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


def receiver_with_image() -> tuple[ColoReceiver, socket.socket]:
    ours, primary = socket.socketpair()
    receiver = ColoReceiver(ours)
    receiver.ram = RamImage.zeroed([RamBlock("pc.ram", 64 * PAGE_SIZE)])
    receiver.envelope = StreamEnvelope(b"", "pc", SECTION_ID, 0, 4, b"")
    # The reader learns the blocks from MEM_SIZE; give it the image directly.
    receiver.reader.image = receiver.ram
    receiver.reader.blocks["pc.ram"] = _Block("pc.ram", receiver.ram.data["pc.ram"], 64 * PAGE_SIZE)
    return receiver, primary


def test_checkpoint_applies_dirty_pages_and_keeps_device_state() -> None:
    receiver, primary = receiver_with_image()
    assert receiver.ram is not None
    receiver.ram.pages_of("pc.ram")[9] = 7  # a page that the checkpoint zeroes
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
    receiver.expect(fmt.COLO_CHECKPOINT_REQUEST)
    taken = receiver.receive_checkpoint()
    receiver.acknowledge()
    thread.join(5)
    assert replies[0] == be32(fmt.COLO_CHECKPOINT_REPLY)
    assert replies[1] == be32(fmt.COLO_VMSTATE_RECEIVED) + be32(fmt.COLO_VMSTATE_LOADED)
    assert taken.device_state == device
    assert list(taken.touched["pc.ram"]) == [3, 5, 9]
    pages = receiver.ram.pages_of("pc.ram")
    assert pages[3].tobytes() == page3
    assert pages[5].tobytes() == page5
    assert not pages[9].any()
    assert not np.delete(pages, [3, 5], axis=0).any()
    receiver.close()
    primary.close()


def test_unexpected_message_is_an_error() -> None:
    receiver, primary = receiver_with_image()
    primary.sendall(be32(fmt.COLO_VMSTATE_SIZE))
    with pytest.raises(
        StreamError, match=r"expected COLO message CHECKPOINT_REQUEST.*VMSTATE_SIZE"
    ):
        receiver.expect(fmt.COLO_CHECKPOINT_REQUEST)
    receiver.close()
    primary.close()


def test_primary_that_hangs_up_midway_is_an_error() -> None:
    receiver, primary = receiver_with_image()
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
