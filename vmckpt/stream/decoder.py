"""The one decoder of QEMU's migration stream: its records, read from a buffer it fills.

Both readers of the stream decode through it: :mod:`vmckpt.stream.reader` (a whole
migration into a `RamImage` and an envelope; also the opening of a COLO session) and
:mod:`vmckpt.stream.colo` (each COLO checkpoint's RAM records). Nothing else decodes
the stream (:mod:`vmckpt.stream.writer` encodes the records of the streams vmckpt
writes); the constants are in :mod:`vmckpt.stream.format`.
Records are decoded as QEMU's ``qemu_loadvm_state_main`` and ``ram_load_precopy``
(migration/savevm.c, migration/ram.c) read them; anything the readers do not handle is
refused with a `StreamError` naming its byte offset and what was expected there.

The stream is read into one buffer: ``buffer[pos:filled]`` is received and not yet
decoded, and ``buffer[0]`` is at stream offset ``base``. A page's data is handed to
the `RamSink` as its position in the buffer, not copied: the precopy reader copies it
into the guest's RAM at once, the COLO receiver only after acknowledging the
checkpoint (the guest is stopped until then). So the buffer has two modes:

- streaming (``retain`` False): when it is full, what was decoded is dropped to make
  room; a position is valid until the decoder next reads from its source;
- retaining (``retain`` True): it grows instead, so positions stay valid until
  :meth:`Decoder.restart` (the COLO receiver: a whole checkpoint stays in the buffer).

RAM records are decoded one at a time, except runs of ``PAGE|CONTINUE`` records (fixed
stride: header word and 4 KiB) and of ``ZERO|CONTINUE`` records (header word and fill
byte), which make up most of a stream: such a run, as far as it is already in the
buffer, is checked with numpy in one go (flags, offsets within the block, fill bytes)
and handed to the sink as one call.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, Protocol, TypeAlias

from vmckpt.errors import StreamError
from vmckpt.lazy_numpy import np
from vmckpt.ram import PAGE_SIZE, RamBlock
from vmckpt.stream import format as fmt

if TYPE_CHECKING:
    import numpy.typing as npt

Fill = Callable[[memoryview], int]
"""Reads at most ``len(view)`` bytes of the stream into ``view``; returns how many, 0 at
its end (``socket.recv_into``, or :func:`fill_from` a file)."""

PageNumbers: TypeAlias = "npt.NDArray[np.int64]"  # a string: numpy loads on first use

_PAGE = fmt.RAM_FLAG_PAGE
_ZERO = fmt.RAM_FLAG_ZERO
_CONTINUE = fmt.RAM_FLAG_CONTINUE
_EOS = fmt.RAM_FLAG_EOS
_MEM_SIZE = fmt.RAM_FLAG_MEM_SIZE
_MULTIFD_FLUSH = fmt.RAM_FLAG_MULTIFD_FLUSH
_FLAGS_MASK = fmt.RAM_FLAGS_MASK
_PAGE_RUN = _PAGE | _CONTINUE
_ZERO_RUN = _ZERO | _CONTINUE
_RUNS = (_PAGE_RUN, _ZERO_RUN)
_PAGE_OR_ZERO = (_PAGE, _ZERO)
_PAGE_RECORD = 8 + PAGE_SIZE  # a PAGE record of the current block: header word and data
_ZERO_RECORD = 8 + 1  # a ZERO record of the current block: header word and fill byte
_WORD = ">u8"  # a dtype as a string: numpy loads on first use (vmckpt/lazy_numpy.py)
_UNPACK64 = fmt.BE64.unpack_from
# A run of page records is checked as far as it is buffered, in one go: they are 4 KiB
# each, so that is at most a few thousand. Zero records are 9 bytes: hundreds of
# thousands may be buffered behind a short run (a precopy stream alternates runs of
# pages and of zero pages), so they are checked in windows that grow: a short run costs
# one small check, a long one a few large ones.
_FIRST_ZERO_WINDOW = 64
_ZERO_WINDOW_GROWTH = 8
# In streaming mode, what was decoded is dropped once less than this share of the
# buffer is free, so that reads from the source stay large.
_COMPACT_BELOW = 4


@dataclass(frozen=True)
class Header:
    """The start of a stream: magic, version and the configuration section, as sent."""

    machine_type: str  # from the configuration section, e.g. "pc-i440fx-10.0"; "" if none
    raw: bytes


@dataclass(frozen=True)
class SectionStart:
    """The header of a START or FULL section."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


@dataclass(frozen=True)
class Command:
    """A COMMAND section (enum MigrationCommand in savevm.c)."""

    cmd: int
    data: bytes
    at: int  # byte offset of its section type byte

    @property
    def name(self) -> str:
        return fmt.COMMAND_NAMES.get(self.cmd, "unknown")

    @property
    def raw(self) -> bytes:
        """The section as sent (commands are kept in an envelope as bytes)."""
        return (
            bytes([fmt.COMMAND])
            + fmt.BE16.pack(self.cmd)
            + fmt.BE16.pack(len(self.data))
            + self.data
        )

    def ping_value(self) -> int | None:
        """A PING's value (its return-path PONG echoes it); None for any other command."""
        if self.cmd != fmt.MIG_CMD_PING or len(self.data) != 4:
            return None
        return int(fmt.BE32.unpack(self.data)[0])


@dataclass
class RamBlocks:
    """The RAM blocks a stream's page records refer to: each one's used length (from the
    MEM_SIZE record), and the block a record with CONTINUE means (the last one named)."""

    lengths: dict[str, int] = field(default_factory=dict)
    current: str | None = None

    @classmethod
    def of(cls, blocks: list[RamBlock], current: str | None) -> RamBlocks:
        return cls({block.idstr: block.length for block in blocks}, current)


class RamSink(Protocol):
    """What receives the records of the ``ram`` section as they are decoded, in stream
    order. Page data is at ``decoder.buffer[position : position + PAGE_SIZE]``, valid as
    the module docstring says; a page sent again overrides what came before."""

    def mem_size(self, blocks: list[RamBlock], at: int) -> None:
        """The MEM_SIZE record (at byte offset ``at``): the guest's RAM blocks."""

    def page(self, block: str, number: int, position: int) -> None:
        """One PAGE record: page ``number`` of ``block``, its data at ``position``."""

    def pages(self, block: str, numbers: PageNumbers, first: int, stride: int) -> None:
        """A run of PAGE records of one block: data of ``numbers[i]`` at position
        ``first + i * stride``."""

    def zero(self, block: str, number: int) -> None:
        """One ZERO record: page ``number`` of ``block`` is all zeros."""

    def zeros(self, block: str, numbers: PageNumbers) -> None:
        """A run of ZERO records of one block."""

    def command(self, command: Command) -> None:
        """A COMMAND section between the ram section's parts (may raise to refuse it)."""


def fill_from(source: BinaryIO) -> Fill:
    """A `Fill` reading a file object (``readinto``, else ``read``)."""
    readinto = getattr(source, "readinto", None)
    if readinto is not None:

        def fill_into(view: memoryview) -> int:
            return int(readinto(view) or 0)

        return fill_into

    def fill_by_read(view: memoryview) -> int:
        data = source.read(len(view))
        view[: len(data)] = data
        return len(data)

    return fill_by_read


class Decoder:
    """Decodes one migration stream from ``fill``, record by record (see the module).

    ``step`` names the work in the errors it raises; ``buffer`` is the buffer to start
    with (its size is the largest read from the source while it is not full).
    """

    def __init__(self, fill: Fill, *, step: str, buffer: bytearray) -> None:
        self.fill = fill
        self.step = step
        self.buffer = buffer
        self.pos = 0
        self.filled = 0
        self.base = 0
        self.retain = False
        self.generation = 0  # counts the times decoded bytes were dropped (positions moved)

    # -- the buffer ------------------------------------------------------------------

    def error(self, message: str) -> StreamError:
        return StreamError(message, step=self.step)

    def at(self) -> int:
        """The stream offset of the next byte to decode."""
        return self.base + self.pos

    def unparsed(self) -> int:
        """Bytes received and not decoded yet."""
        return self.filled - self.pos

    def more(self, n: int, what: str) -> bool:
        """Make ``n`` bytes from ``pos`` available, reading from the source as they come;
        False if the source ends first."""
        while (have := self.filled - self.pos) < n:
            free = len(self.buffer) - self.filled
            if free < n - have or (
                not self.retain and self.pos and free * _COMPACT_BELOW < len(self.buffer)
            ):
                self._make_room(n - have)
            try:
                got = self.fill(memoryview(self.buffer)[self.filled :])
            except OSError as exc:
                raise self.error(
                    f"reading {what} at byte offset {self.base + self.filled} failed: {exc}"
                ) from exc
            if not got:
                return False
            self.filled += got
        return True

    def need(self, n: int, what: str) -> None:
        """`more`, or a truncated stream."""
        if self.filled - self.pos < n and not self.more(n, what):
            raise self.error(
                f"stream truncated at byte offset {self.base + self.filled}: expected "
                f"{n} bytes of {what} at byte offset {self.at()}, got {self.filled - self.pos}"
            )

    def _make_room(self, wanted: int) -> None:
        if not self.retain and self.pos:
            self.restart()
        if len(self.buffer) - self.filled < wanted:
            grown = bytearray(max(2 * len(self.buffer), self.filled + wanted))
            grown[: self.filled] = memoryview(self.buffer)[: self.filled]
            self.buffer = grown

    def restart(self, buffer: bytearray | None = None) -> None:
        """Drop what was decoded: the rest moves to the front of the buffer (or of
        ``buffer``, which becomes the buffer). Positions handed out before are invalid."""
        rest = self.filled - self.pos
        if buffer is not None:
            buffer[:rest] = memoryview(self.buffer)[self.pos : self.filled]
            self.buffer = buffer
        elif self.pos:
            self.buffer[:rest] = memoryview(self.buffer)[self.pos : self.filled]
        self.base += self.pos
        self.pos, self.filled = 0, rest
        self.generation += 1

    # -- primitive values --------------------------------------------------------------

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = bytes(memoryview(self.buffer)[self.pos : self.pos + n])
        self.pos += n
        return data

    def u8(self, what: str) -> int:
        if self.filled == self.pos:
            self.need(1, what)
        self.pos += 1
        return self.buffer[self.pos - 1]

    def be16(self, what: str) -> int:
        self.need(2, what)
        self.pos += 2
        return int(fmt.BE16.unpack_from(self.buffer, self.pos - 2)[0])

    def be32(self, what: str) -> int:
        self.need(4, what)
        self.pos += 4
        return int(fmt.BE32.unpack_from(self.buffer, self.pos - 4)[0])

    def be64(self, what: str) -> int:
        self.need(8, what)
        self.pos += 8
        return int(_UNPACK64(self.buffer, self.pos - 8)[0])

    def idstr(self, what: str) -> str:
        """A name as QEMU writes it: a length byte, then that many ASCII bytes."""
        raw = self.take(self.u8(f"length of {what}"), what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.error(
                f"{what} at byte offset {self.at() - len(raw)} is not ASCII: {raw!r}"
            ) from None

    # -- sections ----------------------------------------------------------------------

    def header(self) -> Header:
        """Magic, version and the configuration section (if any); then ``pos`` is at the
        stream's next section."""
        retain, self.retain = self.retain, True  # its bytes are handed out as they are
        start = self.pos
        try:
            magic = self.be32("magic")
            if magic != fmt.QEMU_VM_FILE_MAGIC:
                raise self.error(
                    f"not a QEMU migration stream: magic {magic:#010x} at byte offset "
                    f"{self.at() - 4}, expected {fmt.QEMU_VM_FILE_MAGIC:#010x}"
                )
            version = self.be32("version")
            if version != fmt.QEMU_VM_FILE_VERSION:
                raise self.error(
                    f"unsupported migration stream version {version} at byte offset "
                    f"{self.at() - 4}, only version {fmt.QEMU_VM_FILE_VERSION} is handled"
                )
            machine_type = ""
            if self.peek_u8("section type") == fmt.CONFIGURATION:
                self.pos += 1
                machine_type = self._configuration()
            raw = bytes(memoryview(self.buffer)[start : self.pos])
        finally:
            self.retain = retain
        return Header(machine_type, raw)

    def peek_u8(self, what: str) -> int:
        self.need(1, what)
        return self.buffer[self.pos]

    def _configuration(self) -> str:
        at = self.at() - 1
        length = self.be32("configuration name length")
        if length > 255:
            raise self.error(f"configuration section at byte offset {at}: name length {length}")
        machine_type = self.take(length, "machine type").rstrip(b"\0")
        while self.peek_u8("section type") == fmt.SUBSECTION:
            sub_at = self.at()
            self.pos += 1
            name = self.idstr("subsection name")
            self.be32("subsection version")
            if name == "configuration/target-page-bits":
                bits = self.be32("target page bits")
                if bits != fmt.TARGET_PAGE_BITS:
                    raise self.error(
                        f"target page bits {bits} at byte offset {self.at() - 4}: "
                        f"only {fmt.TARGET_PAGE_BITS} (4 KiB pages) is handled"
                    )
            elif name == "configuration/capabilities":
                count = self.be32("capability count")
                caps = [self.idstr("capability name") for _ in range(count)]
                bad = sorted(set(caps) & fmt.UNSUPPORTED_CAPABILITIES)
                if bad:
                    raise self.error(
                        f"stream was written with migration capability {', '.join(bad)} "
                        f"(configuration at byte offset {sub_at}), which is not supported"
                    )
            elif name == "configuration/uuid":
                self.take(16, "uuid")
            else:
                raise self.error(
                    f"unknown configuration subsection {name!r} at byte offset {sub_at}"
                )
        return machine_type.decode("ascii", errors="replace")

    def command(self, at: int) -> Command:
        """A COMMAND section whose type byte (at byte offset ``at``) was read."""
        cmd = self.be16("command")
        length = self.be16("command length")
        name = fmt.COMMAND_NAMES.get(cmd, str(cmd))
        return Command(cmd, self.take(length, f"data of command {name}"), at)

    def section_start(self) -> SectionStart:
        """The rest of a START or FULL section's header, its type byte read."""
        at = self.at() - 1
        section_id = self.be32("section id")
        idstr = self.idstr(f"section name (section at byte offset {at})")
        return SectionStart(section_id, idstr, self.be32("instance id"), self.be32("version id"))

    def unexpected(self, section_type: int, at: int, where: str) -> StreamError:
        """The error for a section of a type that may not come here (its type byte read)."""
        if section_type == fmt.SECTION_FULL:  # named by its id and name, which follow
            section_id = self.be32("section id")
            idstr = self.idstr(f"section name (section at byte offset {at})")
            return self.error(
                f"device section {idstr!r} (section id {section_id}) at byte offset {at} "
                f"{where}: device state inside the RAM part is not supported"
            )
        name = fmt.SECTION_NAMES.get(section_type, "unknown")
        return self.error(
            f"unexpected section type {section_type:#04x} ({name}) at byte offset {at} {where}"
        )

    def footer(self, section_id: int, kind: str, section_at: int) -> None:
        at = self.at()
        found = self.u8("section footer")
        if found != fmt.SECTION_FOOTER:
            raise self.error(
                f"expected section footer (0x7e) at byte offset {at} after RAM section {kind} "
                f"(section id {section_id}) at byte offset {section_at}, found {found:#04x}"
            )
        footer_id = self.be32("section footer id")
        if footer_id != section_id:
            raise self.error(
                f"section footer at byte offset {at} names section id {footer_id}, "
                f"expected {section_id} (RAM section {kind} at byte offset {section_at})"
            )

    def ram_sections(
        self, ram: RamBlocks, sink: RamSink, section_id: int, *, until: int, where: str
    ) -> None:
        """PART and END sections of the ``ram`` section (id ``section_id``), commands
        between them to the sink, up to the END section (``until`` SECTION_END) or up to
        the EOF byte (``until`` SECTION_EOF: a COLO checkpoint)."""
        while True:
            at = self.at()
            section_type = self.u8("section type")
            if section_type == until == fmt.SECTION_EOF:
                return
            if section_type == fmt.COMMAND:
                sink.command(self.command(at))
                continue
            if section_type not in (fmt.SECTION_PART, fmt.SECTION_END):
                raise self.unexpected(section_type, at, where)
            kind = fmt.SECTION_NAMES[section_type]
            sid = self.be32("section id")
            if sid != section_id:
                raise self.error(
                    f"{kind} of section id {sid} at byte offset {at}: only the 'ram' section "
                    f"(id {section_id}) is handled"
                )
            self.ram_chunk(ram, sink, section_id, kind, at)
            if section_type == until:
                return

    def ram_chunk(
        self, ram: RamBlocks, sink: RamSink, section_id: int, kind: str, section_at: int
    ) -> None:
        """The records of one part of the ``ram`` section up to its EOS, then its footer."""
        self._ram_records(ram, sink, section_id, kind, section_at)
        self.footer(section_id, kind, section_at)

    # -- RAM records -------------------------------------------------------------------

    def _ram_records(
        self, ram: RamBlocks, sink: RamSink, section_id: int, kind: str, section_at: int
    ) -> None:
        lengths = ram.lengths
        while True:
            if self.filled - self.pos < 8 and not self.more(8, "RAM record header"):
                raise self.error(
                    f"stream truncated at byte offset {self.base + self.filled} inside RAM "
                    f"section {kind} (section id {section_id}) at byte offset {section_at}: "
                    f"expected a RAM record header at byte offset {self.at()}"
                )
            word = _UNPACK64(self.buffer, self.pos)[0]
            flags = word & _FLAGS_MASK
            current = ram.current
            if (
                current is not None
                and flags in _RUNS
                and self._run(sink, current, lengths[current], flags == _ZERO_RUN)
            ):
                continue
            at = self.base + self.pos
            self.pos += 8
            record = flags & ~_CONTINUE
            if record in _PAGE_OR_ZERO:
                if flags & _CONTINUE:
                    if current is None:
                        raise self.error(
                            f"RAM record with CONTINUE but no previous block at byte offset {at}"
                        )
                else:
                    name = self.idstr("RAM block name")
                    if name not in lengths:
                        raise self.error(
                            f"page of unknown RAM block {name!r} at byte offset {at}"
                            + ("" if lengths else " (before MEM_SIZE)")
                        )
                    current = ram.current = name
                offset = word - flags
                if offset >= lengths[current]:
                    raise self.error(
                        f"page offset {offset:#x} beyond RAM block {current!r} "
                        f"({lengths[current]:#x} bytes) at byte offset {at}"
                    )
                if record == _PAGE:
                    if self.filled - self.pos < PAGE_SIZE:
                        self.need(PAGE_SIZE, "page data")
                    sink.page(current, offset // PAGE_SIZE, self.pos)
                    self.pos += PAGE_SIZE
                else:
                    self._zero_fill(current, offset, at)
                    sink.zero(current, offset // PAGE_SIZE)
            elif record == _EOS:
                return
            elif record == _MEM_SIZE:
                self._mem_size(ram, sink, word - flags, at)
            elif record != _MULTIFD_FLUSH:  # a multifd sync point: nothing to do here
                raise self.error(
                    f"unsupported RAM record flags {fmt.ram_flag_names(flags)} ({flags:#x}) at "
                    f"byte offset {at} in RAM section {kind} (section id {section_id}) at "
                    f"byte offset {section_at}"
                )

    def _zero_fill(self, block: str, offset: int, at: int) -> None:
        if self.filled == self.pos and not self.more(1, "the fill byte of a ZERO page"):
            raise self.error(
                f"stream truncated at byte offset {self.at()}: expected the fill byte of a "
                f"ZERO page (record at byte offset {at})"
            )
        fill = self.buffer[self.pos]
        if fill:
            raise self.error(
                f"ZERO page with fill byte {fill:#04x} at byte offset {at} (RAM block "
                f"{block!r}, offset {offset:#x}): only 0 is supported"
            )
        self.pos += 1

    def _run(self, sink: RamSink, block: str, limit: int, zero: bool) -> bool:
        """A run of PAGE|CONTINUE (or ZERO|CONTINUE) records of ``block`` from ``pos``, as
        far as it is in the buffer, checked with numpy and handed to the sink. False if
        the record after the first is not there or of another kind (a lone record costs
        less decoded on its own), or the first is wrong: the caller decodes it on its own
        (and reads more, or reports what is wrong with it)."""
        stride, expected = (_ZERO_RECORD, _ZERO_RUN) if zero else (_PAGE_RECORD, _PAGE_RUN)
        available = (self.filled - self.pos) // stride
        if available < 2 or _UNPACK64(self.buffer, self.pos + stride)[0] & _FLAGS_MASK != expected:
            return False
        window = _FIRST_ZERO_WINDOW if zero else available
        taken = 0
        while taken < available:
            count = min(window, available - taken)
            start = self.pos
            # The header words, byte-swapped into one native array in one pass.
            words = np.ndarray((count,), dtype=_WORD, buffer=self.buffer, offset=start,
                               strides=(stride,)).astype(np.uint64)  # fmt: skip
            bad = (words & _FLAGS_MASK) != expected
            bad |= words >= limit + expected  # (the flags being right) offset >= limit
            if zero:
                fills = np.ndarray((count,), dtype=np.uint8, buffer=self.buffer,
                                   offset=start + 8, strides=(stride,))  # fmt: skip
                bad |= fills != 0
            first_bad = int(bad.argmax())
            good = first_bad if bad[first_bad] else count
            if good:
                numbers = (words[:good] >> fmt.TARGET_PAGE_BITS).view(np.int64)
                if zero:
                    sink.zeros(block, numbers)
                else:
                    sink.pages(block, numbers, start + 8, stride)
                self.pos = start + good * stride
                taken += good
            if good < count:
                break
            window *= _ZERO_WINDOW_GROWTH
        return taken > 0

    def _mem_size(self, ram: RamBlocks, sink: RamSink, total: int, at: int) -> None:
        """The MEM_SIZE record: every RAM block's name and used length, ``total`` in all."""
        if ram.lengths:
            raise self.error(f"second MEM_SIZE record at byte offset {at}")
        blocks: list[RamBlock] = []
        remaining = total
        while remaining > 0:
            idstr = self.idstr("RAM block name")
            length = self.be64(f"length of RAM block {idstr!r}")
            if length > remaining:
                raise self.error(
                    f"MEM_SIZE at byte offset {at}: RAM block {idstr!r} of {length} bytes "
                    f"exceeds the {remaining} bytes left of the total {total} (extra per-block "
                    "fields from postcopy/ignore-shared/mapped-ram are not supported)"
                )
            blocks.append(RamBlock(idstr, length))
            remaining -= length
        sink.mem_size(blocks, at)
        ram.lengths.update((block.idstr, block.length) for block in blocks)

    # -- the device part -----------------------------------------------------------------

    def device_part(self, *, until_vmdesc: bool) -> bytes:
        """Every byte from ``pos`` to the end of the source or, on a channel that stays
        open (``until_vmdesc``: a COLO session), to the end of the device description:
        device sections do not say their length, so the part ends where the EOF byte and
        the device description (which QEMU sends unless suppress-vmdesc is set) end.
        Checked to end as QEMU ends a stream."""
        at = self.at()
        while not (until_vmdesc and self._ends_with_vmdesc()):
            if not self.more(self.filled - self.pos + 1, "the device part"):
                break
        rest = self.take(self.filled - self.pos, "the device part")
        end = vmdesc_at(rest, 0, len(rest))
        if end is None:
            end = len(rest)
        else:
            end += 1  # the EOF byte before the description
        if end == 0 or rest[end - 1] != fmt.SECTION_EOF:
            raise self.error(
                f"stream truncated or malformed: the device part at byte offset {at} "
                f"({len(rest)} bytes) does not end with the EOF section "
                "(and optional device description)"
            )
        # Whatever comes before the EOF byte ends with a section's footer (0x7e, be32 id).
        if end > 1 and (end < 6 or rest[end - 6] != fmt.SECTION_FOOTER):
            raise self.error(
                f"stream truncated or malformed: no section footer before the EOF "
                f"section at byte offset {at + end - 1}"
            )
        return rest

    def _ends_with_vmdesc(self) -> bool:
        if self.filled == self.pos or self.buffer[self.filled - 1] != ord("}"):
            return False  # (the common case, cheaply)
        return vmdesc_at(self.buffer, self.pos, self.filled) is not None


def vmdesc_at(data: bytes | bytearray, start: int, end: int) -> int | None:
    """Where, in ``data[start:end]``, the EOF byte is that a device description ending at
    ``end`` follows (VMDESCRIPTION, a be32 length and that much JSON); None if there is
    no such description."""
    candidate = data.rfind(b"\x00\x06", start, end)
    while candidate >= 0:
        json_at = candidate + 6
        if json_at <= end and fmt.BE32.unpack_from(data, candidate + 2)[0] == end - json_at:
            try:
                json.loads(bytes(data[json_at:end]))
            except ValueError:
                return None
            return candidate
        candidate = data.rfind(b"\x00\x06", start, candidate)
    return None
