"""The postcopy source's wire protocol (vmckpt/stream/postcopy.py), byte by byte: what it sends
is parsed back here as QEMU's loader reads it, and the return path is fed what QEMU's
destination sends (migration.c's message layouts)."""

from __future__ import annotations

import io
import json
import socket
import struct
import threading

import numpy as np
import numpy.typing as npt
import pytest

from vmckpt.errors import StreamError
from vmckpt.ram import PAGE_SIZE, RamBlock
from vmckpt.stream import StreamEnvelope
from vmckpt.stream import format as fmt
from vmckpt.stream import postcopy as pc

BLOCKS = [RamBlock("pc.ram", 64 * PAGE_SIZE), RamBlock("vga.vram", 8 * PAGE_SIZE)]
DEVICES = (
    bytes([fmt.SECTION_FULL]) + struct.pack(">I", 3) + b"\x05timer" + struct.pack(">II", 0, 1)
    + b"device-bytes" + bytes([fmt.SECTION_FOOTER]) + struct.pack(">I", 3)
)  # fmt: skip
VMDESC = json.dumps({"page_size": 4096, "devices": []}).encode()
SWITCHOVER = pc.command(fmt.MIG_CMD_SWITCHOVER_START)


def stored_device_state(*, vmdesc: bool = True) -> bytes:
    """A device.bin as vmckpt stores it: leading commands, devices, EOF, device description."""
    tail = bytes([fmt.VMDESCRIPTION]) + struct.pack(">I", len(VMDESC)) + VMDESC if vmdesc else b""
    return SWITCHOVER + DEVICES + bytes([fmt.SECTION_EOF]) + tail


def envelope() -> StreamEnvelope:
    prelude = struct.pack(">II", fmt.QEMU_VM_FILE_MAGIC, fmt.QEMU_VM_FILE_VERSION) + b"config"
    return StreamEnvelope(prelude, "pc-i440fx-10.0", 2, 0, 4, stored_device_state())


class Cursor:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        assert self.pos + n <= len(self.data), "ran past the end"
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def u8(self) -> int:
        return self.take(1)[0]

    def be16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def be32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def be64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def command(self) -> tuple[int, bytes]:
        assert self.u8() == fmt.COMMAND
        cmd, length = self.be16(), self.be16()
        return cmd, self.take(length)


def read_records(cur: Cursor) -> list[tuple[str, int, bytes | None]]:
    """Page records up to EOS as ram.c's postcopy loader reads them: (block, offset, data or
    None for a ZERO page). The first record of a section must name its block."""
    out: list[tuple[str, int, bytes | None]] = []
    block: str | None = None
    while True:
        word = cur.be64()
        flags = word & fmt.RAM_FLAGS_MASK
        if flags == fmt.RAM_FLAG_EOS:
            return out
        if not flags & fmt.RAM_FLAG_CONTINUE:
            block = cur.take(cur.u8()).decode()
        assert block is not None, "CONTINUE without a block"
        kind = flags & ~fmt.RAM_FLAG_CONTINUE
        if kind == fmt.RAM_FLAG_PAGE:
            out.append((block, word & ~fmt.RAM_FLAGS_MASK, cur.take(PAGE_SIZE)))
        else:
            assert kind == fmt.RAM_FLAG_ZERO
            assert cur.u8() == 0
            out.append((block, word & ~fmt.RAM_FLAGS_MASK, None))


def test_split_device_state() -> None:
    for vmdesc in (True, False):
        device = pc.split_device_state(stored_device_state(vmdesc=vmdesc))
        assert device.commands == SWITCHOVER and device.sections == DEVICES
    device = pc.split_device_state(DEVICES + b"\x00")
    assert device.commands == b"" and device.sections == DEVICES


@pytest.mark.parametrize(
    ("epilogue", "message"),
    [
        (DEVICES, "does not end with the EOF section"),
        (b"device-state-0000", "does not hold device sections ending with EOF"),
        (pc.command(fmt.MIG_CMD_PING, b"\0\0\0\1") + DEVICES + b"\0", "starts with command 2"),
        (DEVICES[:-5] + b"\x00" * 5 + b"\x00", "no section footer before the EOF"),
        (b"\x08\x00", "stream truncated at byte offset 2"),
    ],
)
def test_split_device_state_refuses_what_vmckpt_does_not_store(
    epilogue: bytes, message: str
) -> None:
    with pytest.raises(StreamError, match=message):
        pc.split_device_state(epilogue)


def test_preamble_in_the_order_a_destination_needs() -> None:
    env = envelope()
    data = pc.preamble(env, BLOCKS, pc.split_device_state(env.epilogue))
    cur = Cursor(data)
    assert cur.take(len(env.prelude)) == env.prelude
    assert cur.command() == (fmt.MIG_CMD_OPEN_RETURN_PATH, b"")
    assert cur.command() == (fmt.MIG_CMD_PING, struct.pack(">I", pc.RETURN_PATH_PING))
    assert cur.command() == (fmt.MIG_CMD_POSTCOPY_ADVISE, struct.pack(">QQ", 4096, 4096))
    # ram START: section header, MEM_SIZE with the blocks, EOS, footer; no page
    assert cur.u8() == fmt.SECTION_START and cur.be32() == 2
    assert cur.take(cur.u8()) == b"ram" and (cur.be32(), cur.be32()) == (0, 4)
    total = sum(b.length for b in BLOCKS)
    assert cur.be64() == total | fmt.RAM_FLAG_MEM_SIZE
    for block in BLOCKS:
        assert cur.take(cur.u8()).decode() == block.idstr and cur.be64() == block.length
    assert cur.be64() == fmt.RAM_FLAG_EOS
    assert cur.u8() == fmt.SECTION_FOOTER and cur.be32() == 2
    # one discard of one page (QEMU 10.0.2/11.1.3 deadlock without it)
    cmd, discard = cur.command()
    assert cmd == fmt.MIG_CMD_POSTCOPY_RAM_DISCARD
    assert discard == b"\x00\x06pc.ram\x00" + struct.pack(">QQ", 0, PAGE_SIZE)
    assert cur.command() == (fmt.MIG_CMD_SWITCHOVER_START, b"")
    cmd, length = cur.command()
    assert cmd == fmt.MIG_CMD_PACKAGED
    blob = Cursor(cur.take(struct.unpack(">I", length)[0]))
    assert cur.pos == len(data), "nothing after the package"
    assert blob.command() == (fmt.MIG_CMD_POSTCOPY_LISTEN, b"")
    assert blob.take(len(DEVICES)) == DEVICES
    assert blob.command() == (fmt.MIG_CMD_PING, struct.pack(">I", pc.PACKAGE_LOADED))
    assert blob.command() == (fmt.MIG_CMD_POSTCOPY_RUN, b"")
    assert blob.pos == len(blob.data), "no EOF, no device description in the package"


def test_end_and_recovery_commands() -> None:
    cur = Cursor(pc.end_of_stream(2))
    assert (cur.u8(), cur.be32(), cur.be64()) == (fmt.SECTION_END, 2, fmt.RAM_FLAG_EOS)
    assert (cur.u8(), cur.be32(), cur.u8()) == (fmt.SECTION_FOOTER, 2, fmt.SECTION_EOF)
    assert Cursor(pc.recv_bitmap_command("pc.ram")).command() == (10, b"\x06pc.ram")
    assert Cursor(pc.resume_command()).command() == (9, b"")


def test_page_records_name_each_blocks_first_page() -> None:
    layout = pc.PageLayout(BLOCKS)
    assert layout.total == 72 and layout.starts.tolist() == [0, 64, 72]
    writer = pc.RecordWriter(layout, section_id=2)
    rng = np.random.default_rng(1)
    pages = np.array([0, 1, 5, 63, 64, 70], dtype=np.int64)
    rows = rng.integers(0, 256, (pages.size, PAGE_SIZE), dtype=np.uint8)
    zeros = np.array([3, 71], dtype=np.int64)
    for _ in range(2):  # buffers are reused: a second section reads the same
        buffers = writer.section(pages, rows, zeros)
        data = b"".join(bytes(b) for b in buffers)
        cur = Cursor(data)
        assert (cur.u8(), cur.be32()) == (fmt.SECTION_PART, 2)
        records = read_records(cur)
        assert (cur.u8(), cur.be32()) == (fmt.SECTION_FOOTER, 2) and cur.pos == len(data)
        expected = [
            ("pc.ram", 0, rows[0]), ("pc.ram", PAGE_SIZE, rows[1]),
            ("pc.ram", 5 * PAGE_SIZE, rows[2]), ("pc.ram", 63 * PAGE_SIZE, rows[3]),
            ("vga.vram", 0, rows[4]), ("vga.vram", 6 * PAGE_SIZE, rows[5]),
            ("pc.ram", 3 * PAGE_SIZE, None), ("vga.vram", 7 * PAGE_SIZE, None),
        ]  # fmt: skip
        assert len(records) == len(expected)
        for (block, offset, got), (want_block, want_offset, want) in zip(
            records, expected, strict=True
        ):
            assert (block, offset) == (want_block, want_offset)
            assert got == (None if want is None else bytes(want))


def test_send_buffers_survives_partial_sends() -> None:
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    buffers = [bytes([n]) * (10_000 + n) for n in range(40)]
    got = bytearray()

    def drain() -> None:
        while chunk := theirs.recv(7000):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    assert pc.send_buffers(ours, buffers) == sum(len(b) for b in buffers)
    ours.close()
    reader.join()
    theirs.close()
    assert bytes(got) == b"".join(buffers)


# -- the return path ------------------------------------------------------------------------


def message(kind: int, data: bytes) -> bytes:
    return struct.pack(">HH", kind, len(data)) + data


def request(offset: int, length: int, name: str | None = None) -> bytes:
    data = struct.pack(">QI", offset, length)
    if name is None:
        return message(fmt.MIG_RP_MSG_REQ_PAGES, data)
    return message(fmt.MIG_RP_MSG_REQ_PAGES_ID, data + bytes([len(name)]) + name.encode())


def bitmap(
    name: str,
    received: npt.NDArray[np.bool_],
    *,
    ending: int | None = None,
    size: int | None = None,
) -> bytes:
    """QEMU's answer to RECV_BITMAP: the message, then unframed the size, the bitmap
    (little-endian longs) and the end mark."""
    raw = np.packbits(received, bitorder="little").tobytes()
    raw += bytes(-len(raw) % 8)
    raw += bytes((size or len(raw)) - len(raw))
    return (
        message(fmt.MIG_RP_MSG_RECV_BITMAP, bytes([len(name)]) + name.encode())
        + struct.pack(">Q", len(raw)) + raw
        + struct.pack(">Q", fmt.RECV_BITMAP_ENDING if ending is None else ending)
    )  # fmt: skip


def messages(data: bytes) -> list[pc.Message]:
    path = pc.ReturnPath(io.BytesIO(data), pc.PageLayout(BLOCKS))
    out = []
    while (one := path.next()) is not None:
        out.append(one)
    return out


def test_return_path_messages() -> None:
    received = np.zeros(8, dtype=np.bool_)
    received[[0, 3, 7]] = True
    data = (
        message(fmt.MIG_RP_MSG_PONG, struct.pack(">I", 1))
        + request(5 * PAGE_SIZE, PAGE_SIZE, "pc.ram")
        + request(6 * PAGE_SIZE, 2 * PAGE_SIZE)  # the same block as the last named one
        + request(PAGE_SIZE, PAGE_SIZE, "vga.vram")
        + bitmap("vga.vram", received)
        + message(fmt.MIG_RP_MSG_RESUME_ACK, struct.pack(">I", 1))
        + message(fmt.MIG_RP_MSG_SHUT, struct.pack(">I", 0))
    )
    got = messages(data)
    assert got[:4] == [
        pc.Pong(1),
        pc.PageRequest(5, 1),
        pc.PageRequest(6, 2),
        pc.PageRequest(65, 1),
    ]
    assert isinstance(got[4], pc.ReceivedBitmap) and got[4].block == 1
    assert got[4].received.tolist() == received.tolist()
    assert got[5:] == [pc.ResumeAck(1), pc.Shut(0)]


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        (request(0, PAGE_SIZE), StreamError, "names no RAM block"),
        (request(0, PAGE_SIZE, "nvram"), StreamError, "RAM block 'nvram', which the layer lacks"),
        (request(100, PAGE_SIZE, "pc.ram"), StreamError, "not in whole pages"),
        (request(63 * PAGE_SIZE, 2 * PAGE_SIZE, "pc.ram"), StreamError, "lies beyond"),
        (bitmap("pc.ram", np.ones(64, np.bool_), size=16), StreamError, "is 16 bytes, not 8"),
        (bitmap("vga.vram", np.ones(8, np.bool_), ending=7), StreamError, "end mark"),
        (message(9, b""), StreamError, "unexpected return-path message 9"),
        (request(0, PAGE_SIZE, "pc.ram")[:7], EOFError, "ended inside"),
    ],
)
def test_return_path_refuses_what_qemu_does_not_send(
    data: bytes, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        messages(data)
