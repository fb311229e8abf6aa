"""The stream's record decoder on its own: each record kind, truncation at every record
boundary, bad flags, unknown sections, and its numpy runs against one record at a time.

Streams are built here byte by byte (struct, the layouts of QEMU's migration/savevm.c and
migration/ram.c), not with vmckpt's writer, so that a decoder that misreads a layout
fails; tests/test_stream.py reads real QEMU streams.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO, cast

import numpy as np
import pytest

from vmckpt.errors import StreamError
from vmckpt.ram import PAGE_SIZE, RamBlock
from vmckpt.stream import read_stream
from vmckpt.stream.decoder import (
    Command,
    Decoder,
    Fill,
    PageNumbers,
    RamBlocks,
    fill_from,
)

SID = 2  # the ram section's id
PC_RAM = RamBlock("pc.ram", 64 * PAGE_SIZE)
VRAM = RamBlock("vga.vram", 8 * PAGE_SIZE)


def be16(value: int) -> bytes:
    return struct.pack(">H", value)


def be32(value: int) -> bytes:
    return struct.pack(">I", value)


def be64(value: int) -> bytes:
    return struct.pack(">Q", value)


def name(text: str) -> bytes:
    return bytes([len(text)]) + text.encode()


def page_data(seed: int) -> bytes:
    return bytes([seed & 0xFF]) * 16 + np.random.default_rng(seed).bytes(PAGE_SIZE - 16)


# -- a stream, and where each of its records starts -------------------------------------


@dataclass
class Stream:
    """A stream being built, with the offset where each record starts (``marks``)."""

    data: bytearray = field(default_factory=bytearray)
    marks: list[tuple[int, str]] = field(default_factory=list)

    def add(self, what: str, *parts: bytes) -> Stream:
        self.marks.append((len(self.data), what))
        for part in parts:
            self.data += part
        return self

    def page(self, number: int, seed: int, block: str | None = None) -> Stream:
        flags = 0x08 if block else 0x28
        return self.add("PAGE", be64(number * PAGE_SIZE | flags), name(block) if block else b"",
                        page_data(seed))  # fmt: skip

    def zero(self, number: int, block: str | None = None, fill: int = 0) -> Stream:
        flags = 0x02 if block else 0x22
        return self.add("ZERO", be64(number * PAGE_SIZE | flags), name(block) if block else b"",
                        bytes([fill]))  # fmt: skip

    def eos_footer(self) -> Stream:
        return self.add("EOS", be64(0x10)).add("footer", b"\x7e", be32(SID))


CONFIG = (
    b"\x07" + be32(14) + b"pc-i440fx-11.1"
    + b"\x05" + name("configuration/capabilities") + be32(1) + be32(1) + name("events")
    + b"\x05" + name("configuration/uuid") + be32(1) + bytes(range(16))
)  # fmt: skip
VMDESC = json.dumps({"page_size": PAGE_SIZE, "devices": []}).encode()
DEVICE_PART = (
    b"\x04" + be32(3) + name("timer") + be32(0) + be32(2) + b"state" + b"\x7e" + be32(3)
    + b"\x00" + b"\x06" + be32(len(VMDESC)) + VMDESC
)  # fmt: skip


def every_record() -> Stream:
    """A stream with a record of every kind the decoder handles, and runs of both kinds."""
    s = Stream()
    s.add("magic", be32(0x5145564D)).add("version", be32(3)).add("configuration", CONFIG)
    s.add("command", b"\x08", be16(11), be16(0))  # SWITCHOVER_START, kept in the prelude
    s.add("START", b"\x01", be32(SID), name("ram"), be32(0), be32(4))
    total = PC_RAM.length + VRAM.length
    s.add("MEM_SIZE", be64(total | 0x04), name("pc.ram"), be64(PC_RAM.length),
          name("vga.vram"), be64(VRAM.length))  # fmt: skip
    s.page(0, 1, "pc.ram")
    for number in range(1, 6):  # a run of pages
        s.page(number, 10 + number)
    for number in range(6, 40):  # a run of zero pages
        s.zero(number)
    s.page(40, 40).zero(41).page(42, 42)  # lone records
    s.add("MULTIFD_FLUSH", be64(0x200))
    s.eos_footer()
    s.add("PART", b"\x02", be32(SID))
    s.page(1, 99, "vga.vram").page(2, 98).page(3, 97)
    s.page(3, 77, "pc.ram").page(3, 78).page(3, 79)  # page 3 thrice: the last copy wins
    s.zero(2, "vga.vram")
    s.eos_footer()
    s.add("command", b"\x08", be16(11), be16(0))
    s.add("END", b"\x03", be32(SID))
    s.eos_footer()
    s.add("device part", DEVICE_PART)
    return s


# -- a sink that records what it was handed --------------------------------------------


@dataclass
class Recorder:
    """A RamSink that notes every record, its page data copied at once."""

    decoder: Decoder | None = None
    events: list[tuple[str, str, int, bytes | None]] = field(default_factory=list)
    blocks: list[RamBlock] = field(default_factory=list)
    runs: int = 0
    commands: list[Command] = field(default_factory=list)

    def data(self, position: int) -> bytes:
        assert self.decoder is not None
        return bytes(self.decoder.buffer[position : position + PAGE_SIZE])

    def mem_size(self, blocks: list[RamBlock], at: int) -> None:
        self.blocks = blocks

    def page(self, block: str, number: int, position: int) -> None:
        self.events.append(("page", block, number, self.data(position)))

    def pages(self, block: str, numbers: PageNumbers, first: int, stride: int) -> None:
        self.runs += 1
        for i, number in enumerate(numbers.tolist()):
            self.events.append(("page", block, number, self.data(first + i * stride)))

    def zero(self, block: str, number: int) -> None:
        self.events.append(("zero", block, number, None))

    def zeros(self, block: str, numbers: PageNumbers) -> None:
        self.runs += 1
        self.events.extend(("zero", block, number, None) for number in numbers.tolist())

    def command(self, command: Command) -> None:
        self.commands.append(command)


def pieces(data: bytes, size: int) -> Fill:
    """A source that hands out at most ``size`` bytes a read (a socket does so)."""
    source = io.BytesIO(data)

    def fill(view: memoryview) -> int:
        chunk = source.read(min(size, len(view)))
        view[: len(chunk)] = chunk
        return len(chunk)

    return fill


def decode_ram(data: bytes, fill: Fill | None = None, buffer: int = 1 << 16) -> Recorder:
    """Decode ``data`` (a whole stream) with the decoder's records, as reader.py does."""
    decoder = Decoder(fill or pieces(data, 1 << 30), step="test", buffer=bytearray(buffer))
    sink = Recorder(decoder)
    header = decoder.header()
    assert header.machine_type == "pc-i440fx-11.1"
    at = decoder.at()
    assert decoder.u8("section type") == 0x08
    sink.commands.append(decoder.command(at))
    at = decoder.at()
    assert decoder.u8("section type") == 0x01
    start = decoder.section_start()
    assert (start.section_id, start.idstr, start.instance_id, start.version_id) == (
        SID,
        "ram",
        0,
        4,
    )
    ram = RamBlocks()
    decoder.ram_chunk(ram, sink, SID, "START", at)
    decoder.ram_sections(ram, sink, SID, until=0x03, where="before the RAM section ended")
    assert decoder.device_part(until_vmdesc=False) == DEVICE_PART
    return sink


def expected_events() -> list[tuple[str, str, int, bytes | None]]:
    events: list[tuple[str, str, int, bytes | None]] = [("page", "pc.ram", 0, page_data(1))]
    events += [("page", "pc.ram", n, page_data(10 + n)) for n in range(1, 6)]
    events += [("zero", "pc.ram", n, None) for n in range(6, 40)]
    events += [("page", "pc.ram", 40, page_data(40)), ("zero", "pc.ram", 41, None)]
    events += [("page", "pc.ram", 42, page_data(42))]
    events += [("page", "vga.vram", n, page_data(100 - n)) for n in (1, 2, 3)]
    events += [("page", "pc.ram", 3, page_data(seed)) for seed in (77, 78, 79)]
    events += [("zero", "vga.vram", 2, None)]
    return events


# -- each record kind ----------------------------------------------------------------------


def test_every_record_kind_decoded_at_once_uses_runs() -> None:
    sink = decode_ram(bytes(every_record().data))
    assert sink.blocks == [PC_RAM, VRAM]
    assert sink.events == expected_events()
    assert sink.runs >= 4  # the runs of pages and of zero pages went through numpy
    assert [c.cmd for c in sink.commands] == [11, 11]
    assert sink.commands[1].raw == b"\x08" + be16(11) + be16(0)


@pytest.mark.parametrize("size", [1, 7, 4105, 5000])
def test_records_arriving_in_pieces_decode_the_same(size: int) -> None:
    """A source that delivers a few bytes at a time: runs are cut anywhere, and one byte at
    a time no run is ever buffered (every record is decoded on its own)."""
    data = bytes(every_record().data)
    sink = decode_ram(data, pieces(data, size))
    assert sink.events == expected_events()
    if size == 1:
        assert sink.runs == 0


def test_a_small_buffer_streams_and_a_retaining_one_keeps_every_page() -> None:
    data = bytes(every_record().data)
    streamed = decode_ram(data, pieces(data, 3000), buffer=64)
    assert streamed.events == expected_events()
    # Retaining: the buffer grows, and every position is still valid after the end.
    decoder = Decoder(pieces(data, 3000), step="test", buffer=bytearray(64))
    decoder.retain = True
    positions: list[int] = []

    class Positions(Recorder):
        def page(self, block: str, number: int, position: int) -> None:
            positions.append(position)

        def pages(self, block: str, numbers: PageNumbers, first: int, stride: int) -> None:
            positions.extend(first + i * stride for i in range(numbers.size))

    decoder.header()
    decoder.u8("")
    decoder.command(0)
    decoder.u8("")
    decoder.section_start()
    sink = Positions(decoder)
    ram = RamBlocks()
    decoder.ram_chunk(ram, sink, SID, "START", 0)
    decoder.ram_sections(ram, sink, SID, until=0x03, where="")
    assert decoder.generation == 0 and len(decoder.buffer) >= len(data) - len(DEVICE_PART)
    pages = [e[3] for e in expected_events() if e[0] == "page"]
    assert [bytes(decoder.buffer[p : p + PAGE_SIZE]) for p in positions] == pages


def test_header_keeps_its_bytes_and_commands_their_encoding() -> None:
    decoder = Decoder(pieces(bytes(every_record().data), 5), step="test", buffer=bytearray(16))
    header = decoder.header()
    assert header.raw == be32(0x5145564D) + be32(3) + CONFIG
    assert decoder.at() == len(header.raw)
    ping = Command(2, be32(0xDEADBEEF), 0)
    assert ping.ping_value() == 0xDEADBEEF and ping.name == "PING"
    assert Command(11, b"", 0).ping_value() is None


def test_read_stream_applies_every_record_kind() -> None:
    data = bytes(every_record().data)
    envelope, image = read_stream(io.BytesIO(data))
    assert envelope.machine_type == "pc-i440fx-11.1"
    assert envelope.prelude == be32(0x5145564D) + be32(3) + CONFIG + b"\x08" + be16(11) + be16(0)
    assert envelope.epilogue == b"\x08" + be16(11) + be16(0) + DEVICE_PART
    expected = {b.idstr: np.zeros((b.pages, PAGE_SIZE), dtype=np.uint8) for b in image.blocks}
    for _, idstr, number, data_ in expected_events():
        expected[idstr][number] = np.frombuffer(data_, dtype=np.uint8) if data_ else 0
    for block in image.blocks:
        assert np.array_equal(image.pages_of(block.idstr), expected[block.idstr]), block
    assert image.pages_of("pc.ram")[3].tobytes() == page_data(79)  # the later copy won


def test_device_part_until_vmdesc_stops_there() -> None:
    """On a channel that stays open (COLO) the part ends with the device description,
    however the bytes arrive; nothing more is read."""
    served = io.BytesIO(DEVICE_PART)

    def fill(view: memoryview) -> int:
        chunk = served.read(min(10, len(view)))
        assert chunk, "read past the device description (QEMU would send nothing: a hang)"
        view[: len(chunk)] = chunk
        return len(chunk)

    decoder = Decoder(fill, step="test", buffer=bytearray(1 << 10))
    assert decoder.device_part(until_vmdesc=True) == DEVICE_PART
    assert decoder.unparsed() == 0


# -- truncated at every record boundary -----------------------------------------------------


def test_truncated_at_every_record_boundary_names_the_offset() -> None:
    stream = every_record()
    data = bytes(stream.data)
    for at, what in stream.marks[1:]:
        with pytest.raises(StreamError) as error:
            read_stream(io.BytesIO(data[:at]))
        message = str(error.value)
        assert "truncated" in message, (what, message)
        assert f"byte offset {at}" in message, (what, at, message)


def test_truncated_anywhere_is_one_line_naming_an_offset() -> None:
    """Every cut but inside page data (every 97th byte there) and right after the EOF
    byte (a stream may end there: the device description is optional)."""
    stream = every_record()
    data = bytes(stream.data)
    inside_pages: set[int] = set()
    for at, what in stream.marks:
        if what == "PAGE":
            data_at = page_data_at(data, at)
            inside_pages.update(range(data_at + 1, data_at + PAGE_SIZE))
    eof_end = len(data) - (1 + 4 + len(VMDESC))
    cuts = [n for n in range(len(data)) if n % 97 == 0 or n not in inside_pages]
    for cut in cuts:
        if cut == eof_end:
            continue
        with pytest.raises(StreamError) as error:
            read_stream(io.BytesIO(data[:cut]))
        message = str(error.value)
        assert "\n" not in message and "byte offset" in message, (cut, message)
        assert "truncated" in message, (cut, message)
    read_stream(io.BytesIO(data[:eof_end]))  # the stream without its device description


def page_data_at(data: bytes, at: int) -> int:
    """Where the data of the PAGE record at ``at`` starts (after its block's name, if any)."""
    word = struct.unpack_from(">Q", data, at)[0]
    return at + 8 if word & 0x20 else at + 8 + 1 + data[at + 8]


# -- malformed records -------------------------------------------------------------------------


def ram_stream(records: Callable[[Stream], object]) -> tuple[bytes, Stream]:
    """header, configuration, ram START with MEM_SIZE, ``records``, EOS, footer."""
    s = Stream()
    s.add("header", be32(0x5145564D), be32(3), CONFIG)
    s.add("START", b"\x01", be32(SID), name("ram"), be32(0), be32(4))
    s.add("MEM_SIZE", be64(PC_RAM.length | 0x04), name("pc.ram"), be64(PC_RAM.length))
    records(s)
    return bytes(s.data), s


@pytest.mark.parametrize(
    ("flag", "names"),
    [(0x40, "XBZRLE"), (0x100, "COMPRESS_PAGE"), (0x80, "HOOK"), (0x400, "0x400"),
     (0x01, "FULL"), (0x0A, "ZERO|PAGE"), (0x48, "PAGE|XBZRLE")],
)  # fmt: skip
def test_a_bad_flag_is_refused_at_its_offset(flag: int, names: str) -> None:
    def records(s: Stream) -> None:
        s.page(0, 1, "pc.ram").page(1, 2).page(2, 3)
        s.add("bad", be64(3 * PAGE_SIZE | flag), page_data(4)).page(4, 5).eos_footer()

    data, s = ram_stream(records)
    bad = dict((what, at) for at, what in s.marks)["bad"]
    with pytest.raises(
        StreamError,
        match=rf"unsupported RAM record flags {names} .* byte offset {bad} in RAM section START",
    ):
        read_stream(io.BytesIO(data))


@pytest.mark.parametrize(
    ("section", "message"),
    [
        (b"\x09", r"unexpected section type 0x09 \(unknown\) at byte offset {at} "
                  r"before the RAM section ended"),
        (b"\x06", r"unexpected section type 0x06 \(VMDESCRIPTION\) at byte offset {at}"),
        (b"\x01" + be32(5) + name("block"),
         r"unexpected section type 0x01 \(START\) at byte offset {at}"),
        (b"\x04" + be32(3) + name("timer"),
         r"device section 'timer' \(section id 3\) at byte offset {at}"),
        (b"\x02" + be32(9),
         r"PART of section id 9 at byte offset {at}: only the 'ram' section \(id 2\)"),
    ],
    ids=["unknown", "vmdesc", "start", "full", "other-id"],
)  # fmt: skip
def test_an_unknown_or_misplaced_section_is_refused_at_its_offset(
    section: bytes, message: str
) -> None:
    data, _ = ram_stream(lambda s: s.page(0, 1, "pc.ram").eos_footer())
    at = len(data)
    with pytest.raises(StreamError, match=message.format(at=at)):
        read_stream(io.BytesIO(data + section + bytes(64)))


def test_an_unknown_section_type_before_the_ram_section() -> None:
    data = be32(0x5145564D) + be32(3) + CONFIG + b"\x42"
    with pytest.raises(
        StreamError,
        match=rf"unexpected section type 0x42 \(unknown\) at byte offset {len(data) - 1} "
        r"before the RAM section",
    ):
        read_stream(io.BytesIO(data + bytes(32)))


@pytest.mark.parametrize(
    ("build", "message"),
    [
        # inside a run of pages, the 4th names a page beyond the block
        (lambda s: s.page(0, 1, "pc.ram").page(1, 2).page(2, 3).page(64, 4, None),
         r"page offset 0x40000 beyond RAM block 'pc.ram' \(0x40000 bytes\) at byte offset {at}"),
        # inside a run of zero pages, the 40th has a fill byte
        (lambda s: [s.zero(0, "pc.ram")] + [s.zero(n) for n in range(1, 40)] + [s.zero(40, fill=7)],
         r"ZERO page with fill byte 0x07 at byte offset {at} "
         r"\(RAM block 'pc.ram', offset 0x28000\)"),
        (lambda s: s.zero(3, None),
         r"RAM record with CONTINUE but no previous block at byte offset {at}"),
        (lambda s: s.page(1, 1, "pc.rom"),
         r"page of unknown RAM block 'pc.rom' at byte offset {at}"),
        (lambda s: s.add("MEM_SIZE", be64(PAGE_SIZE | 0x04), name("pc.ram"), be64(PAGE_SIZE)),
         r"second MEM_SIZE record at byte offset {at}"),
    ],
    ids=["beyond-block-in-run", "zero-fill-in-run", "continue-first", "unknown-block", "mem-size"],
)  # fmt: skip
def test_a_bad_record_in_or_after_a_run_is_refused_at_its_own_offset(
    build: Callable[[Stream], object], message: str
) -> None:
    def records(s: Stream) -> None:
        build(s)
        s.add("last", b"")
        s.eos_footer()

    data, s = ram_stream(records)
    bad = s.marks[[what for _, what in s.marks].index("last") - 1][0]
    for fill in (pieces(data, 1 << 30), pieces(data, 1)):  # run or one at a time: the same
        decoder = Decoder(fill, step="test", buffer=bytearray(1 << 16))
        decoder.header()
        decoder.u8("section type")
        decoder.section_start()
        with pytest.raises(StreamError, match=message.format(at=bad)):
            decoder.ram_chunk(RamBlocks(), Recorder(decoder), SID, "START", 0)


def test_a_source_that_fails_is_a_stream_error_naming_the_offset() -> None:
    data = bytes(every_record().data)[:1000]
    served = pieces(data, 100)

    def fill(view: memoryview) -> int:
        got = served(view)
        if not got:
            raise OSError("connection reset")
        return got

    with pytest.raises(
        StreamError, match=r"reading .* at byte offset 1000 failed: connection reset"
    ):
        decode_ram(data, fill)


def test_fill_from_a_file_without_readinto() -> None:
    class ReadOnly:
        def __init__(self, data: bytes) -> None:
            self.inner = io.BytesIO(data)

        def read(self, n: int = -1) -> bytes:
            return self.inner.read(n)

    data = bytes(every_record().data)
    sink = decode_ram(data, fill_from(cast(BinaryIO, ReadOnly(data))))
    assert sink.events == expected_events()
