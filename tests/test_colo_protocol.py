"""The COLO receiver against a scripted primary: message order, RAM, device state, errors.

The bytes are those QEMU 11.1 sends (migration/colo.c), scripted so that every message
order and error can be checked; tests/test_colo.py runs the real thing on QEMU 11, and
the initial migration part is a real QEMU stream in test_stream.py.
"""

from __future__ import annotations

import array
import fcntl
import socket
import struct
import termios
import threading

import numpy as np
import pytest

from tests.framework.guest import wait_for
from vmckpt.errors import StreamError
from vmckpt.mechanisms.choice import colo_refusal
from vmckpt.ram import PAGE_SIZE, RamBlock
from vmckpt.stream import StreamEnvelope
from vmckpt.stream import colo as colo_stream
from vmckpt.stream import format as fmt
from vmckpt.stream.colo import ColoCheckpoint, ColoReceiver

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
    received = receiver.receive_checkpoint()
    receiver.acknowledge()
    taken = received.checkpoint()
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


def record(offset: int, flags: int, block: str | None) -> bytes:
    header = struct.pack(">Q", offset | flags | (0 if block else fmt.RAM_FLAG_CONTINUE))
    return header + (bytes([len(block)]) + block.encode() if block else b"")


def ram_part(records: list[tuple[str, int, bytes | None]], first_block: str | None) -> bytes:
    """A ram END section of (block, page number, data or None for a ZERO page) records;
    a record names its block when it differs from the previous one."""
    out = bytearray(bytes([fmt.SECTION_END]) + be32(SECTION_ID))
    current = first_block
    for block, number, data in records:
        named = None if block == current else block
        current = block
        if data is None:
            out += record(number * PAGE_SIZE, fmt.RAM_FLAG_ZERO, named) + b"\0"
        else:
            out += record(number * PAGE_SIZE, fmt.RAM_FLAG_PAGE, named) + data
    out += struct.pack(">Q", fmt.RAM_FLAG_EOS) + bytes([fmt.SECTION_FOOTER]) + be32(SECTION_ID)
    return bytes(out)


def unread(sock: socket.socket) -> int:
    """Bytes waiting in ``sock``'s receive queue (FIONREAD)."""
    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]


def run_checkpoint(
    receiver: ColoReceiver, primary: socket.socket, body: bytes, chunk: int | None = None
) -> ColoCheckpoint:
    """The primary's side of one checkpoint, sent in pieces of `chunk` bytes (a real
    socket delivers a checkpoint in pieces, and a run of pages may be cut anywhere)."""
    payload = be32(fmt.COLO_CHECKPOINT_REQUEST) + be32(fmt.COLO_VMSTATE_SEND) + body

    def primary_side() -> None:
        step = chunk or len(payload)
        for at in range(0, len(payload), step):
            primary.sendall(payload[at : at + step])
            if chunk:  # the receiver takes each piece before the next comes
                wait_for(
                    lambda: unread(receiver.sock) == 0, "the receiver taking a piece", 30, poll=1e-4
                )

    thread = threading.Thread(target=primary_side)
    thread.start()
    receiver.wait_request()
    received = receiver.receive_checkpoint()
    thread.join(10)
    receiver.acknowledge()
    return received.checkpoint()


def device_part(device: bytes) -> bytes:
    return (
        bytes([fmt.SECTION_EOF])
        + be32(fmt.COLO_VMSTATE_SIZE)
        + struct.pack(">Q", len(device))
        + device
    )


def two_block_receiver() -> tuple[ColoReceiver, socket.socket]:
    receiver, primary = receiver_after_opening()
    receiver.blocks = [RamBlock("pc.ram", 4096 * PAGE_SIZE), RamBlock("vga.vram", 64 * PAGE_SIZE)]
    receiver.last_block = "pc.ram"
    return receiver, primary


@pytest.mark.parametrize("chunk", [None, 1000, 4104 * 3 + 5])
def test_checkpoint_in_pieces_with_two_blocks_zero_pages_and_pages_sent_twice(
    chunk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(7)
    records: list[tuple[str, int, bytes | None]] = []
    for number in rng.choice(4096, size=600, replace=False).tolist():
        kind = rng.random()
        data = None if kind < 0.1 else rng.integers(0, 256, PAGE_SIZE, dtype=np.uint8).tobytes()
        records.append(
            ("pc.ram" if kind < 0.9 else "vga.vram", number % 64 if kind >= 0.9 else number, data)
        )
    # Pages sent again later: the last copy (data or zero) wins.
    records += [(block, number, b"\x5a" * PAGE_SIZE) for block, number, _ in records[:20]]
    records += [(block, number, None) for block, number, _ in records[20:30]]
    expected: dict[str, dict[int, bytes | None]] = {"pc.ram": {}, "vga.vram": {}}
    for block, number, data in records:
        expected[block][number] = data
    # A buffer smaller than the checkpoint: it grows while receiving, and shrinks back
    # before the next checkpoint.
    monkeypatch.setattr(colo_stream, "RECEIVE_BUFFER", 64 * 1024)
    monkeypatch.setattr(colo_stream, "SHRINK_ABOVE", 1 << 20)
    receiver, primary = two_block_receiver()
    assert len(receiver.decoder.buffer) == 64 * 1024
    taken = run_checkpoint(
        receiver, primary, ram_part(records, "pc.ram") + device_part(b"dev\x00"), chunk
    )
    assert taken.device_state == b"dev\x00"
    for block, pages in expected.items():
        data_pages = sorted(n for n, d in pages.items() if d is not None)
        zero_pages = sorted(n for n, d in pages.items() if d is None)
        assert taken.pages.stored.get(block, np.zeros(0)).tolist() == data_pages
        assert taken.pages.zeroed.get(block, np.zeros(0)).tolist() == zero_pages
        for row, number in enumerate(data_pages):
            assert taken.pages.rows[block][row].tobytes() == pages[number]
    assert len(receiver.decoder.buffer) > 1 << 20
    # The next checkpoint reuses the buffer, and continues in the block the last ended in.
    last_block = records[-1][0]
    page = b"\x11" * PAGE_SIZE
    nxt = run_checkpoint(
        receiver, primary, ram_part([(last_block, 3, page)], last_block) + device_part(b"")
    )
    assert nxt.pages.stored[last_block].tolist() == [3]
    assert nxt.pages.rows[last_block][0].tobytes() == page
    assert len(receiver.decoder.buffer) == 64 * 1024
    receiver.close()
    primary.close()


def test_pages_taken_after_the_buffer_was_reused_are_refused() -> None:
    receiver, primary = two_block_receiver()
    body = ram_part([("pc.ram", 1, b"\x01" * PAGE_SIZE)], "pc.ram") + device_part(b"")
    payload = be32(fmt.COLO_CHECKPOINT_REQUEST) + be32(fmt.COLO_VMSTATE_SEND) + body
    primary.sendall(payload)
    receiver.wait_request()
    first = receiver.receive_checkpoint()
    primary.sendall(payload)
    receiver.wait_request()
    receiver.receive_checkpoint()
    with pytest.raises(StreamError, match="reused before its pages were taken"):
        first.checkpoint()
    receiver.close()
    primary.close()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            ram_part(
                [("pc.ram", 1, b"\x01" * PAGE_SIZE), ("pc.ram", 4096, b"\x02" * PAGE_SIZE)],
                "pc.ram",
            )
            + device_part(b""),
            r"page offset 0x1000000 beyond RAM block 'pc.ram' \(0x1000000 bytes\) "
            r"at byte offset 4117",
        ),
        (
            ram_part([("rom", 1, b"\x01" * PAGE_SIZE)], "pc.ram") + device_part(b""),
            r"page of unknown RAM block 'rom' at byte offset 13",
        ),
        (
            ram_part([("pc.ram", 1, None)], "pc.ram").replace(
                b"\0" + struct.pack(">Q", 0x10), b"\7" + struct.pack(">Q", 0x10)
            )
            + device_part(b""),
            r"ZERO page with fill byte 0x07",
        ),
        (
            ram_part([], "pc.ram")[:-5] + bytes([0x7F]) + be32(SECTION_ID) + device_part(b""),
            r"expected section footer \(0x7e\)",
        ),
        (
            ram_part([("pc.ram", 1, b"\x01" * PAGE_SIZE)], "pc.ram") + device_part(b"") + b"xx",
            r"2 bytes after the device state .* before the acknowledgement",
        ),
        (
            bytes([fmt.SECTION_FULL]) + be32(SECTION_ID) + device_part(b""),
            r"device section '' \(section id 2\) at byte offset 8 in a COLO checkpoint's RAM part",
        ),
        (
            ram_part([], "pc.ram")[:5] + struct.pack(">Q", 0x1000 | fmt.RAM_FLAG_XBZRLE),
            r"unsupported RAM record flags XBZRLE \(0x40\) at byte offset 13 in RAM section END",
        ),
        (
            ram_part([], "pc.ram")[:5] + struct.pack(">Q", 0x1000 | fmt.RAM_FLAG_MEM_SIZE),
            r"second MEM_SIZE record at byte offset 13",
        ),
    ],
    ids=[
        "beyond-block", "unknown-block", "zero-fill", "footer", "trailing", "section", "flags",
        "mem-size",
    ],
)  # fmt: skip
def test_bad_checkpoint_framing_is_an_error_naming_the_offset(body: bytes, message: str) -> None:
    receiver, primary = two_block_receiver()
    primary.sendall(be32(fmt.COLO_CHECKPOINT_REQUEST) + be32(fmt.COLO_VMSTATE_SEND) + body)
    receiver.wait_request()
    with pytest.raises(StreamError, match=message):
        receiver.receive_checkpoint()
    receiver.close()
    primary.close()


def test_return_path_is_ended_with_pongs_and_shut() -> None:
    receiver, primary = receiver_after_opening()
    receiver.pings = [1]
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
    with pytest.raises(
        StreamError,
        match=r"truncated at byte offset 2076: expected 4096 bytes of page data at byte offset "
        r"24, got 2052",
    ):
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
