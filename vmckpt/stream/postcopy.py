"""vmckpt as the *source* of a postcopy migration: the bytes it sends, the return path it reads.

A lazy restore (vmckpt/mechanisms/lazy_restore.py, vmckpt/mechanisms/pageserver/) makes
the restoring QEMU the destination of a postcopy migration whose source is vmckpt, serving pages
from the store. QEMU's side is its ordinary postcopy destination (savevm.c,
postcopy-ram.c, ram.c); this module is what a source must send it, in order:

1. the stored prelude (magic, version, configuration);
2. OPEN_RETURN_PATH, then a PING (its PONG shows the return path works);
3. POSTCOPY_ADVISE with the host's page-size summary and the target page size
   (both 4096 for the guests vmckpt serves): the destination discards its RAM;
4. the ``ram`` START section: MEM_SIZE and the RAM blocks, no page, EOS;
5. one POSTCOPY_RAM_DISCARD of a single page. QEMU 10.0.2 and 11.1.3 need it:
   a LISTEN with no discard before it has the state set to LISTENING and then
   back to DISCARD, and the destination deadlocks on its own page placement;
6. the leading commands of the stored device state (SWITCHOVER_START);
7. PACKAGED: LISTEN, every device section, a PING (:data:`PACKAGE_LOADED`, whose
   PONG says the device state is loaded) and RUN, without EOF or device
   description;
8. then any number of ``ram`` PART sections of page records (requested pages
   first, the rest pushed in the background), each page exactly once: QEMU
   places a page with UFFDIO_COPY, and a second copy of it fails its load;
9. a ``ram`` END section and EOF, but only once QEMU answered the package's PING: while it
   loads the device state its main thread may fault on guest pages (a zero page too), and
   its loader waits for that main thread before it lets go of the faults, so a request that
   comes after EOF would never be answered (seen with a 10 MiB Genode guest whose pages were
   all pushed before QEMU had loaded its devices). Faults of the running guest after EOF are
   released by QEMU itself (it unregisters its RAM from userfaultfd: pages never sent read
   as zero, as they are).

The return path (destination to source, on the same socket) carries page
requests, PONGs, SHUT at the end, and for a recovery the received bitmaps and
the resume acknowledgement (:class:`ReturnPath`).

Recovery, when a source died: the destination is paused (``postcopy-paused``);
``migrate-recover`` gives it a new channel, on which the new source sends
RECV_BITMAP per RAM block (the destination answers with the pages it holds),
then POSTCOPY_RESUME (answered by RESUME_ACK), then carries on with PART
sections of the pages it still lacks (no new header: the destination's loader
goes on where it stopped).

Page records are built with numpy, a block's run of pages at a time; nothing
here loops over pages in Python. The records and section framing are those of
:mod:`vmckpt.stream.writer`; the stored device state is cut by the one decoder
(:mod:`vmckpt.stream.decoder`).
"""

from __future__ import annotations

import io
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Final, cast

from vmckpt.errors import StreamError
from vmckpt.lazy_numpy import np
from vmckpt.ram import PAGE_SIZE, RamBlock
from vmckpt.stream import format as fmt
from vmckpt.stream.decoder import Decoder, fill_from, vmdesc_at
from vmckpt.stream.envelope import StreamEnvelope
from vmckpt.stream.writer import (
    PAGE_RECORD,
    PAGE_RECORD_SIZE,
    ZERO_RECORD,
    ZERO_RECORD_SIZE,
    footer,
    idstr_bytes,
    mem_size,
    section_start,
)

if TYPE_CHECKING:
    import numpy.typing as npt

STEP = "postcopy stream"
HOST_PAGE_SIZE: Final = PAGE_SIZE  # the destination's page-size summary vmckpt serves
RETURN_PATH_PING: Final = 1
# A PING inside the package, just before RUN: its PONG says the destination loaded the
# device state (QEMU 11 sends the same value for the same purpose).
PACKAGE_LOADED: Final = 0x42

# Python ints: they take the arrays' uint64 (numpy loads on first use: lazy_numpy.py).
_PAGE = fmt.RAM_FLAG_PAGE | fmt.RAM_FLAG_CONTINUE
_ZERO = fmt.RAM_FLAG_ZERO | fmt.RAM_FLAG_CONTINUE
_SHIFT = fmt.TARGET_PAGE_BITS
_EOS = fmt.BE64.pack(fmt.RAM_FLAG_EOS)


def _error(message: str) -> StreamError:
    return StreamError(message, step=STEP)


def command(cmd: int, data: bytes = b"") -> bytes:
    """One COMMAND item of the stream: type byte, be16 command, be16 length, data."""
    return bytes([fmt.COMMAND]) + fmt.BE16.pack(cmd) + fmt.BE16.pack(len(data)) + data


# -- the device state ------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceState:
    """A layer's stored device state (device.bin), cut for a postcopy source: the commands
    that lead it (sent as they are, before the package) and the device sections (inside
    the package), without the EOF byte and the device description that end it."""

    commands: bytes
    sections: bytes


def split_device_state(epilogue: bytes) -> DeviceState:
    """Cut a stored device state (the stream after the RAM part) for a postcopy source;
    StreamError if it is not what vmckpt stores (leading commands other than those that
    carry no state, no device section, no EOF, no section footer before it). Decoded by
    the stream's one decoder: its commands, then its device part as a stream ends."""
    decoder = Decoder(
        fill_from(io.BytesIO(epilogue)), step=STEP, buffer=bytearray(max(1, len(epilogue)))
    )
    while decoder.more(1, "the device state") and decoder.peek_u8("section type") == fmt.COMMAND:
        at = decoder.at()
        decoder.u8("section type")
        cmd = decoder.command(at)
        if cmd.cmd not in fmt.ACCEPTED_COMMANDS:
            raise _error(f"the device state starts with command {cmd.cmd} ({cmd.name})")
    start = decoder.at()
    if start == len(epilogue) or epilogue[start] != fmt.SECTION_FULL:
        raise _error("the device state does not hold device sections ending with EOF")
    rest = decoder.device_part(until_vmdesc=False)  # ends with EOF after a footer: checked
    eof = vmdesc_at(rest, 0, len(rest))
    end = len(rest) - 1 if eof is None else eof
    return DeviceState(commands=epilogue[:start], sections=rest[:end])


# -- what the source sends first ---------------------------------------------------------


def package(device: DeviceState) -> bytes:
    """The PACKAGED blob: LISTEN, the device sections, a PING, RUN."""
    return (
        command(fmt.MIG_CMD_POSTCOPY_LISTEN)
        + device.sections
        + command(fmt.MIG_CMD_PING, fmt.BE32.pack(PACKAGE_LOADED))
        + command(fmt.MIG_CMD_POSTCOPY_RUN)
    )


def preamble(envelope: StreamEnvelope, blocks: Sequence[RamBlock], device: DeviceState) -> bytes:
    """Everything a source sends before the first page (items 1-7 of the module doc)."""
    if not blocks:
        raise _error("no RAM block to serve")
    first = blocks[0].idstr.encode("ascii")
    discard = (
        bytes([fmt.POSTCOPY_DISCARD_VERSION, len(first)])
        + first
        + b"\0"
        + fmt.BE64.pack(0)
        + fmt.BE64.pack(PAGE_SIZE)
    )
    blob = package(device)
    if len(blob) > fmt.MAX_PACKAGED_BYTES:
        raise _error(
            f"the device state is {len(blob)} bytes, more than QEMU takes in one package "
            f"({fmt.MAX_PACKAGED_BYTES})"
        )
    section = envelope.ram_section_id
    return b"".join(
        [
            envelope.prelude,
            command(fmt.MIG_CMD_OPEN_RETURN_PATH),
            command(fmt.MIG_CMD_PING, fmt.BE32.pack(RETURN_PATH_PING)),
            command(
                fmt.MIG_CMD_POSTCOPY_ADVISE,
                fmt.BE64.pack(HOST_PAGE_SIZE) + fmt.BE64.pack(PAGE_SIZE),
            ),
            section_start(envelope) + mem_size(list(blocks)) + _EOS + footer(section),
            command(fmt.MIG_CMD_POSTCOPY_RAM_DISCARD, discard),
            device.commands,
            command(fmt.MIG_CMD_PACKAGED, fmt.BE32.pack(len(blob))),
            blob,
        ]
    )


def end_of_stream(section_id: int) -> bytes:
    """The ``ram`` END section (just EOS) and EOF: the last bytes a source sends."""
    return (
        bytes([fmt.SECTION_END])
        + fmt.BE32.pack(section_id)
        + _EOS
        + footer(section_id)
        + bytes([fmt.SECTION_EOF])
    )


def recv_bitmap_command(idstr: str) -> bytes:
    """RECV_BITMAP for one RAM block (recovery: the destination answers with the pages
    of that block it holds)."""
    return command(fmt.MIG_CMD_RECV_BITMAP, idstr_bytes(idstr))


def resume_command() -> bytes:
    """POSTCOPY_RESUME (recovery: the destination answers RESUME_ACK and asks again for
    the pages it is waiting for)."""
    return command(fmt.MIG_CMD_POSTCOPY_RESUME)


# -- page records ------------------------------------------------------------------------


class PageLayout:
    """The RAM blocks of a guest numbered as one range of pages: block ``i`` holds the global
    page numbers ``starts[i]`` to ``starts[i + 1] - 1``."""

    def __init__(self, blocks: Sequence[RamBlock]) -> None:
        self.blocks = list(blocks)
        counts = np.array([block.pages for block in self.blocks], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.starts[-1])
        self.names = [idstr_bytes(block.idstr) for block in self.blocks]
        self._index = {block.idstr: number for number, block in enumerate(self.blocks)}

    def block_number(self, idstr: str) -> int | None:
        return self._index.get(idstr)

    def block_of(self, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
        """The block number of each global page number."""
        return np.searchsorted(self.starts, pages, side="right").astype(np.int64) - 1

    def runs(self, pages: npt.NDArray[np.int64]) -> list[tuple[int, int, int]]:
        """Ascending global page numbers cut where the block changes: (block, lo, hi)."""
        if not pages.size:
            return []
        blocks = self.block_of(pages)
        cuts = (np.flatnonzero(np.diff(blocks)) + 1).tolist()
        return [
            (int(blocks[lo]), lo, hi)
            for lo, hi in zip([0, *cuts], [*cuts, pages.size], strict=True)
        ]


class RecordWriter:
    """Builds ``ram`` PART sections of page records for one destination (reusable buffers)."""

    def __init__(self, layout: PageLayout, section_id: int) -> None:
        self.layout = layout
        self.section_id = section_id
        self._head = bytes([fmt.SECTION_PART]) + fmt.BE32.pack(section_id)
        self._tail = _EOS + footer(section_id)
        self._pages = np.empty(0, dtype=PAGE_RECORD)
        self._zeros = np.empty(0, dtype=ZERO_RECORD)

    def section(
        self,
        pages: npt.NDArray[np.int64],
        rows: npt.NDArray[np.uint8],
        zero_pages: npt.NDArray[np.int64] | None = None,
    ) -> list[memoryview | bytes]:
        """A PART section: PAGE records for ``pages`` (ascending global numbers, data in
        ``rows``) and ZERO records for ``zero_pages``; the buffers to send, in order (the
        record buffers are reused by the next call: send them first)."""
        out: list[memoryview | bytes] = [self._head]
        if pages.size:
            if self._pages.size < pages.size:
                self._pages = np.empty(max(pages.size, 64), dtype=PAGE_RECORD)
            records = self._pages[: pages.size]
            offsets = (pages - self.layout.starts[self.layout.block_of(pages)]).astype(np.uint64)
            records["word"] = (offsets << _SHIFT) | _PAGE
            records["data"] = rows
            self._emit(out, pages, records, fmt.RAM_FLAG_PAGE, PAGE_RECORD_SIZE)
        if zero_pages is not None and zero_pages.size:
            if self._zeros.size < zero_pages.size:
                self._zeros = np.zeros(max(zero_pages.size, 64), dtype=ZERO_RECORD)
            records = self._zeros[: zero_pages.size]
            starts = self.layout.starts[self.layout.block_of(zero_pages)]
            records["word"] = ((zero_pages - starts).astype(np.uint64) << _SHIFT) | _ZERO
            records["fill"] = 0
            self._emit(out, zero_pages, records, fmt.RAM_FLAG_ZERO, ZERO_RECORD_SIZE)
        out.append(self._tail)
        return out

    def _emit(
        self,
        out: list[memoryview | bytes],
        pages: npt.NDArray[np.int64],
        records: npt.NDArray[np.void],
        flag: int,
        size: int,
    ) -> None:
        """Append the records, the first of each block's run carrying the block's name (the
        others have CONTINUE set, so each run starts from a named record whatever came
        before: a destination resumed after a recovery has no previous block)."""
        raw = records.view(np.uint8)
        for block, lo, hi in self.layout.runs(pages):
            first = raw[lo * size : (lo + 1) * size]
            word = int(fmt.BE64.unpack(first[:8].tobytes())[0])
            named = fmt.BE64.pack((word & ~fmt.RAM_FLAGS_MASK) | flag) + self.layout.names[block]
            out.append(named + first[8:].tobytes())
            if hi > lo + 1:
                out.append(raw[(lo + 1) * size : hi * size].data)


def send_buffers(sock: socket.socket, buffers: Sequence[memoryview | bytes]) -> int:
    """Send every buffer, in order (a few system calls: sendmsg takes many at once)."""
    total = 0
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        sent = sock.sendmsg(pending[:512])
        total += sent
        while sent and pending:
            head = pending[0]
            if sent >= head.nbytes:
                sent -= head.nbytes
                pending.pop(0)
            else:
                pending[0] = head[sent:]
                sent = 0
    return total


# -- the return path -----------------------------------------------------------------------


@dataclass(frozen=True)
class PageRequest:
    """The destination asks for pages: global numbers ``first`` .. ``first + count - 1``."""

    first: int
    count: int


@dataclass(frozen=True)
class Pong:
    value: int


@dataclass(frozen=True)
class Shut:
    """The destination is done with the return path (status 0: the migration completed)."""

    status: int


@dataclass(frozen=True)
class ReceivedBitmap:
    """Recovery: which pages of a RAM block the destination holds."""

    block: int
    received: npt.NDArray[np.bool_]


@dataclass(frozen=True)
class ResumeAck:
    value: int


@dataclass(frozen=True)
class SwitchoverAck:
    pass


Message = PageRequest | Pong | Shut | ReceivedBitmap | ResumeAck | SwitchoverAck
MAX_MESSAGE = 1 << 16


class ReturnPath:
    """Reads the destination's messages from the migration socket (one thread only)."""

    def __init__(self, source: BinaryIO | socket.socket, layout: PageLayout) -> None:
        if isinstance(source, socket.socket):
            source = cast(BinaryIO, source.makefile("rb", buffering=1 << 16))
        self.source: BinaryIO = source
        self.layout = layout
        self.last_block: int | None = None  # REQ_PAGES names the block of the last REQ_PAGES_ID

    def _read(self, count: int, what: str) -> bytes:
        data = self.source.read(count)
        if data is None or len(data) != count:
            raise EOFError(f"the return path ended inside {what}")
        return data

    def _block(self, raw: bytes) -> int:
        if not raw or raw[0] + 1 > len(raw):
            raise _error("a return-path message names its RAM block with a bad length")
        name = raw[1 : 1 + raw[0]].decode("ascii", errors="replace")
        number = self.layout.block_number(name)
        if number is None:
            raise _error(f"the destination names RAM block {name!r}, which the layer lacks")
        return number

    def next(self) -> Message | None:
        """The next message; None once the destination closed the return path."""
        header = self.source.read(4)
        if not header:
            return None
        if len(header) != 4:
            raise EOFError("the return path ended inside a message header")
        kind = int(fmt.BE16.unpack_from(header, 0)[0])
        length = int(fmt.BE16.unpack_from(header, 2)[0])
        data = self._read(length, f"message {kind}") if length else b""
        if kind == fmt.MIG_RP_MSG_PONG and length == 4:
            return Pong(int(fmt.BE32.unpack(data)[0]))
        if kind == fmt.MIG_RP_MSG_SHUT and length == 4:
            return Shut(int(fmt.BE32.unpack(data)[0]))
        if kind in (fmt.MIG_RP_MSG_REQ_PAGES_ID, fmt.MIG_RP_MSG_REQ_PAGES) and length >= 12:
            offset = int(fmt.BE64.unpack_from(data, 0)[0])
            size = int(fmt.BE32.unpack_from(data, 8)[0])
            if kind == fmt.MIG_RP_MSG_REQ_PAGES_ID:
                self.last_block = self._block(data[12:])
            if self.last_block is None:
                raise _error("a page request names no RAM block")
            return self._request(self.last_block, offset, size)
        if kind == fmt.MIG_RP_MSG_RECV_BITMAP and length >= 1:
            return self._bitmap(self._block(data))
        if kind == fmt.MIG_RP_MSG_RESUME_ACK and length == 4:
            return ResumeAck(int(fmt.BE32.unpack(data)[0]))
        if kind == fmt.MIG_RP_MSG_SWITCHOVER_ACK:
            return SwitchoverAck()
        name = fmt.RP_MESSAGE_NAMES.get(kind, "unknown")
        raise _error(f"unexpected return-path message {kind} ({name}) of {length} bytes")

    def _request(self, block: int, offset: int, size: int) -> PageRequest:
        pages = self.layout.blocks[block].pages
        if offset % PAGE_SIZE or size % PAGE_SIZE or not size:
            raise _error(f"a page request for {size} bytes at {offset:#x} is not in whole pages")
        first, count = offset // PAGE_SIZE, size // PAGE_SIZE
        if first + count > pages:
            raise _error(
                f"a page request for {count} page(s) at {offset:#x} lies beyond RAM block "
                f"{self.layout.blocks[block].idstr!r}"
            )
        return PageRequest(int(self.layout.starts[block]) + first, count)

    def _bitmap(self, block: int) -> ReceivedBitmap:
        pages = self.layout.blocks[block].pages
        size = int(fmt.BE64.unpack(self._read(8, "a bitmap's size"))[0])
        expected = -(-pages // 64) * 8
        if size != expected:
            raise _error(
                f"the received bitmap of {self.layout.blocks[block].idstr!r} is {size} bytes, "
                f"not {expected}"
            )
        raw = np.frombuffer(self._read(size, "a received bitmap"), dtype=np.uint8)
        ending = int(fmt.BE64.unpack(self._read(8, "a bitmap's end mark"))[0])
        if ending != fmt.RECV_BITMAP_ENDING:
            raise _error(f"a received bitmap ends with {ending:#x}, not its end mark")
        # QEMU sends the bitmap as little-endian longs: page i is bit i % 8 of byte i // 8.
        received = np.unpackbits(raw, bitorder="little")[:pages].astype(np.bool_)
        return ReceivedBitmap(block, received)
