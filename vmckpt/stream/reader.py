"""Read a QEMU migration stream into a `RamImage` and an opaque envelope.

The stream is parsed record by record, as QEMU's ``ram_load_precopy`` does,
but everything that is not RAM is kept as raw bytes: the prelude (header and
configuration) and the epilogue (device state, vmdesc, EOF). Only what the
RAM part needs is interpreted; anything else that appears before RAM ends is
rejected rather than guessed at.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import BinaryIO, Protocol, cast

import numpy as np
import numpy.typing as npt

from vmckpt.errors import StreamError
from vmckpt.ram import PAGE_SIZE, RamBlock, RamImage
from vmckpt.stream import format as fmt
from vmckpt.stream.envelope import StreamEnvelope

STEP = "reading migration stream"
_READ_BUFFER = 1 << 20

_PAGE = fmt.RAM_FLAG_PAGE
_ZERO = fmt.RAM_FLAG_ZERO
_EOS = fmt.RAM_FLAG_EOS
_CONTINUE = fmt.RAM_FLAG_CONTINUE
_FLAGS_MASK = fmt.RAM_FLAGS_MASK
_UNPACK64 = fmt.BE64.unpack
_ZERO_PAGE = bytes(PAGE_SIZE)


class _Source(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...
    def readinto(self, buffer: memoryview, /) -> int | None: ...


class _Block:
    """Where the pages of one RAM block go: its array (the whole block), and its size."""

    __slots__ = ("array", "idstr", "limit", "view")

    def __init__(self, idstr: str, array: npt.NDArray[np.uint8], limit: int) -> None:
        self.idstr = idstr
        self.array = array
        self.view = array.data
        self.limit = limit  # the block's used length: pages must start below it

    def page(self, offset: int) -> memoryview:
        """The 4 KiB to fill with the page at ``offset``."""
        page: memoryview = self.view[offset : offset + PAGE_SIZE]
        return page

    def zero(self, offset: int) -> None:
        self.view[offset : offset + PAGE_SIZE] = _ZERO_PAGE


def _error(message: str) -> StreamError:
    return StreamError(message, step=STEP)


class _Reader:
    """One pass over one stream; `pos` is the byte offset of the next unread byte."""

    def __init__(
        self, source: BinaryIO, on_blocks: Callable[[list[RamBlock]], RamImage] | None
    ) -> None:
        if isinstance(source, io.RawIOBase):
            source = cast(BinaryIO, io.BufferedReader(source, buffer_size=_READ_BUFFER))
        self.src = cast(_Source, source)
        self.pos = 0
        self.on_blocks = on_blocks or RamImage.zeroed
        self.record: bytearray | None = None  # raw bytes kept for the envelope
        self.image: RamImage | None = None
        self.blocks: dict[str, _Block] = {}
        self.last_block: _Block | None = None
        self.colo = False  # a COLO session: return-path commands; ends at the vmdesc
        self.pings: list[int] = []  # PING values seen (a COLO receiver may answer them)

    # -- primitive reads -------------------------------------------------------

    def read(self, n: int, what: str) -> bytes:
        data = self.src.read(n)
        if len(data) != n:
            raise _error(
                f"stream truncated at byte offset {self.pos + len(data)}: "
                f"expected {n} bytes of {what}, got {len(data)}"
            )
        self.pos += n
        if self.record is not None:
            self.record += data
        return data

    def u8(self, what: str) -> int:
        return self.read(1, what)[0]

    def be16(self, what: str) -> int:
        return int(fmt.BE16.unpack(self.read(2, what))[0])

    def be32(self, what: str) -> int:
        return int(fmt.BE32.unpack(self.read(4, what))[0])

    def be64(self, what: str) -> int:
        return int(fmt.BE64.unpack(self.read(8, what))[0])

    def idstr(self, what: str) -> str:
        raw = self.read(self.u8(f"length of {what}"), what)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise _error(
                f"{what} at byte offset {self.pos - len(raw)} is not ASCII: {raw!r}"
            ) from None

    def fill(self, view: memoryview, offset: int) -> None:
        """Read exactly len(view) bytes into view (the PAGE payload path)."""
        got = self.src.readinto(view) or 0
        while got < len(view):
            more = self.src.readinto(view[got:])
            if not more:
                raise _error(
                    f"stream truncated at byte offset {offset + got}: "
                    f"expected {len(view)} bytes of page data, got {got}"
                )
            got += more

    # -- the stream ------------------------------------------------------------

    def run(self) -> tuple[StreamEnvelope, RamImage]:
        self.record = bytearray()
        magic = self.be32("magic")
        if magic != fmt.QEMU_VM_FILE_MAGIC:
            raise _error(
                f"not a QEMU migration stream: magic {magic:#010x} at byte offset 0, "
                f"expected {fmt.QEMU_VM_FILE_MAGIC:#010x}"
            )
        version = self.be32("version")
        if version != fmt.QEMU_VM_FILE_VERSION:
            raise _error(
                f"unsupported migration stream version {version} at byte offset 4, "
                f"only version {fmt.QEMU_VM_FILE_VERSION} is handled"
            )
        machine_type = ""
        section_type = self.u8("section type")
        if section_type == fmt.CONFIGURATION:
            machine_type, section_type = self.configuration()

        # Until the ram START: commands only; they stay in the prelude.
        while section_type == fmt.COMMAND:
            self.command()
            section_type = self.u8("section type")
        start_at = self.pos - 1
        if section_type != fmt.SECTION_START:
            raise self.unexpected(section_type, start_at, "before the RAM section")
        section_id, idstr, instance_id, version_id = self.section_header(start_at)
        if idstr != fmt.RAM_IDSTR:
            raise _error(
                f"unsupported iterative section {idstr!r} (section id {section_id}) "
                f"at byte offset {start_at}: only 'ram' is handled"
            )
        prelude = bytes(self.record[: -(self.pos - start_at)])
        self.record = None

        self.ram_chunk(section_id, "START", start_at)
        if self.image is None:
            raise _error(
                f"RAM section START (section id {section_id}) at byte offset {start_at} "
                "has no MEM_SIZE record"
            )

        # PART sections until END; commands in between are kept for the epilogue.
        kept = bytearray()
        while True:
            at = self.pos
            section_type = self.u8("section type")
            if section_type == fmt.COMMAND:
                self.record = bytearray(b"\x08")
                self.command()
                kept += self.record
                self.record = None
                continue
            if section_type not in (fmt.SECTION_PART, fmt.SECTION_END):
                raise self.unexpected(section_type, at, "before the RAM section ended")
            sid = self.be32("section id")
            if sid != section_id:
                raise _error(
                    f"{fmt.SECTION_NAMES[section_type]} of section id {sid} at byte offset "
                    f"{at}: only the 'ram' section (id {section_id}) is handled"
                )
            kind = "PART" if section_type == fmt.SECTION_PART else "END"
            self.ram_chunk(section_id, kind, at)
            if section_type == fmt.SECTION_END:
                break

        epilogue_at = self.pos
        rest = self.read_rest_until_vmdesc() if self.colo else self.src.read()
        self.pos += len(rest)
        epilogue = bytes(kept) + rest
        self.check_epilogue(rest, epilogue_at)
        envelope = StreamEnvelope(
            prelude=prelude,
            machine_type=machine_type,
            ram_section_id=section_id,
            ram_instance_id=instance_id,
            ram_version_id=version_id,
            epilogue=epilogue,
        )
        return envelope, self.image

    def read_rest_until_vmdesc(self) -> bytes:
        """The device part of a stream whose channel stays open (COLO).

        Device sections do not say their length, and QEMU keeps the channel
        open, waiting for vmckpt's CHECKPOINT_READY: so the part ends where
        the EOF byte and the device description (which QEMU always sends
        unless suppress-vmdesc is set) end.
        """
        rest = bytearray()
        read1 = getattr(self.src, "read1", None)
        while True:
            chunk = read1(1 << 16) if read1 else self.src.read(1)
            if not chunk:
                return bytes(rest)  # the caller's check_epilogue reports it
            rest += chunk
            if _ends_with_vmdesc(rest):
                return bytes(rest)

    def unexpected(self, section_type: int, at: int, where: str) -> StreamError:
        if section_type == fmt.SECTION_FULL:
            sid = self.be32("section id")
            idstr = self.idstr(f"section name (section at byte offset {at})")
            return _error(
                f"device section {idstr!r} (section id {sid}) at byte offset {at} {where}: "
                "device state inside the RAM part is not supported"
            )
        name = fmt.SECTION_NAMES.get(section_type, f"unknown section type {section_type:#04x}")
        return _error(f"unexpected {name} at byte offset {at} {where}")

    def section_header(self, at: int) -> tuple[int, str, int, int]:
        section_id = self.be32("section id")
        idstr = self.idstr(f"section name (section at byte offset {at})")
        instance_id = self.be32("instance id")
        version_id = self.be32("version id")
        return section_id, idstr, instance_id, version_id

    def configuration(self) -> tuple[str, int]:
        """The configuration section; returns the machine type and the next section type."""
        at = self.pos - 1
        length = self.be32("configuration name length")
        if length > 255:
            raise _error(f"configuration section at byte offset {at}: name length {length}")
        raw = self.read(length, "machine type")
        machine_type = raw.rstrip(b"\0").decode("ascii", errors="replace")
        while (section_type := self.u8("section type")) == fmt.SUBSECTION:
            sub_at = self.pos - 1
            name = self.idstr("subsection name")
            self.be32("subsection version")
            if name == "configuration/target-page-bits":
                bits = self.be32("target page bits")
                if bits != fmt.TARGET_PAGE_BITS:
                    raise _error(
                        f"target page bits {bits} at byte offset {self.pos - 4}: "
                        f"only {fmt.TARGET_PAGE_BITS} (4 KiB pages) is handled"
                    )
            elif name == "configuration/capabilities":
                count = self.be32("capability count")
                caps = [self.idstr("capability name") for _ in range(count)]
                bad = sorted(set(caps) & fmt.UNSUPPORTED_CAPABILITIES)
                if bad:
                    raise _error(
                        f"stream was written with migration capability {', '.join(bad)} "
                        f"(configuration at byte offset {sub_at}), which is not supported"
                    )
            elif name == "configuration/uuid":
                self.read(16, "uuid")
            else:
                raise _error(f"unknown configuration subsection {name!r} at byte offset {sub_at}")
        return machine_type, section_type

    def command(self) -> None:
        at = self.pos - 1
        cmd = self.be16("command")
        length = self.be16("command length")
        if cmd in fmt.COLO_SESSION_COMMANDS and self.colo:
            # Checkpointing and its return path are vmckpt's business: a restored
            # guest must not wait for them, so these stay out of the prelude.
            data = self.read(length, f"data of command {fmt.COMMAND_NAMES[cmd]}")
            if cmd == fmt.MIG_CMD_PING and length == 4:
                self.pings.append(int(fmt.BE32.unpack(data)[0]))
            if self.record is not None:
                del self.record[-(5 + length) :]
            return
        if cmd not in fmt.ACCEPTED_COMMANDS:
            name = fmt.COMMAND_NAMES.get(cmd, "unknown")
            raise _error(
                f"unsupported command {cmd} ({name}) at byte offset {at}: "
                "postcopy, COLO and return-path streams are not handled"
            )
        self.read(length, f"data of command {cmd}")

    def check_epilogue(self, rest: bytes, at: int) -> None:
        """Device state is opaque, but the stream must end as QEMU ends it.

        QEMU writes the last FULL section's footer, the EOF byte, then
        (unless suppressed) VMDESCRIPTION with a be32 length and JSON. A stream
        cut anywhere before that does not end this way.
        """
        end = len(rest)
        candidate = rest.rfind(b"\x00\x06", 0, end)
        while candidate >= 0:
            start = candidate + 6
            if start <= end and fmt.BE32.unpack_from(rest, candidate + 2)[0] == end - start:
                try:
                    json.loads(rest[start:])
                except ValueError:
                    break
                end = candidate + 1
                break
            candidate = rest.rfind(b"\x00\x06", 0, candidate)
        if end == 0 or rest[end - 1] != fmt.SECTION_EOF:
            raise _error(
                f"stream truncated or malformed: the device part at byte offset {at} "
                f"({len(rest)} bytes) does not end with the EOF section "
                "(and optional device description)"
            )
        if end >= 6 and rest[end - 6] != fmt.SECTION_FOOTER:
            raise _error(
                f"stream truncated or malformed: no section footer before the EOF "
                f"section at byte offset {at + end - 1}"
            )

    # -- RAM -------------------------------------------------------------------

    def mem_size(self, total: int, at: int) -> None:
        if self.image is not None:
            raise _error(f"second MEM_SIZE record at byte offset {at}")
        blocks: list[RamBlock] = []
        remaining = total
        while remaining > 0:
            idstr = self.idstr("RAM block name")
            length = self.be64(f"length of RAM block {idstr!r}")
            if length > remaining:
                raise _error(
                    f"MEM_SIZE at byte offset {at}: RAM block {idstr!r} of {length} bytes "
                    f"exceeds the {remaining} bytes left of the total {total} (extra per-block "
                    "fields from postcopy/ignore-shared/mapped-ram are not supported)"
                )
            blocks.append(RamBlock(idstr, length))
            remaining -= length
        image = self.on_blocks(blocks)
        for block in blocks:
            array = image.data.get(block.idstr)
            if array is None or array.dtype != np.uint8 or array.size < block.pages * PAGE_SIZE:
                raise ValueError(f"on_blocks returned no room for RAM block {block.idstr!r}")
            self.blocks[block.idstr] = _Block(block.idstr, array, block.length)
        self.image = image

    def ram_chunk(self, section_id: int, kind: str, section_at: int) -> None:
        """Records of one ram section up to EOS, then its footer."""
        read = self.src.read
        unpack = _UNPACK64
        block = self.last_block
        pos = self.pos
        try:
            while True:
                word_bytes = read(8)
                if len(word_bytes) != 8:
                    self.pos = pos
                    raise _error(
                        f"stream truncated at byte offset {pos + len(word_bytes)} inside RAM "
                        f"section {kind} (section id {section_id}) at byte offset {section_at}"
                    )
                at = pos
                pos += 8
                word = unpack(word_bytes)[0]
                flags = word & _FLAGS_MASK
                record = flags & ~_CONTINUE
                if record in (_PAGE, _ZERO):
                    if flags & _CONTINUE:
                        if block is None:
                            raise _error(
                                f"RAM record with CONTINUE but no previous block "
                                f"at byte offset {at}"
                            )
                    else:
                        self.pos = pos
                        name = self.idstr("RAM block name")
                        pos = self.pos
                        found = self.blocks.get(name)
                        if found is None:
                            raise _error(
                                f"page of unknown RAM block {name!r} at byte offset {at}"
                                + ("" if self.image else " (before MEM_SIZE)")
                            )
                        block = found
                    offset = word - flags
                    if offset >= block.limit:
                        raise _error(
                            f"page offset {offset:#x} beyond RAM block {block.idstr!r} "
                            f"({block.limit:#x} bytes) at byte offset {at}"
                        )
                    if record == _PAGE:
                        self.fill(block.page(offset), pos)
                        pos += PAGE_SIZE
                    else:
                        fill = read(1)
                        if fill != b"\0":
                            self.pos = pos
                            if not fill:
                                raise _error(
                                    f"stream truncated at byte offset {pos}: "
                                    "expected the fill byte of a ZERO page"
                                )
                            raise _error(
                                f"ZERO page with fill byte {fill[0]:#04x} at byte offset {at} "
                                f"(RAM block {block.idstr!r}, offset {offset:#x}): "
                                "only 0 is supported"
                            )
                        pos += 1
                        block.zero(offset)
                elif record == _EOS:
                    break
                elif record == fmt.RAM_FLAG_MEM_SIZE:
                    self.pos = pos
                    self.mem_size(word - flags, at)
                    pos = self.pos
                elif record == fmt.RAM_FLAG_MULTIFD_FLUSH:
                    pass
                else:
                    raise _error(
                        f"unsupported RAM record flags {fmt.ram_flag_names(flags)} ({flags:#x}) "
                        f"at byte offset {at} in RAM section {kind} (section id {section_id})"
                    )
        finally:
            self.last_block = block
        self.pos = pos
        at = pos
        footer = self.u8("section footer")
        if footer != fmt.SECTION_FOOTER:
            raise _error(
                f"expected section footer (0x7e) at byte offset {at} after RAM section {kind} "
                f"(section id {section_id}), found {footer:#04x}"
            )
        footer_id = self.be32("section footer id")
        if footer_id != section_id:
            raise _error(
                f"section footer at byte offset {at} names section id {footer_id}, "
                f"expected {section_id} (RAM section {kind} at byte offset {section_at})"
            )


def read_stream(
    source: BinaryIO, *, on_blocks: Callable[[list[RamBlock]], RamImage] | None = None
) -> tuple[StreamEnvelope, RamImage]:
    """Read a whole migration stream, applying every RAM page to a RamImage.

    ``source`` is a socket file object or file, read until its end (QEMU closes
    the channel after the EOF section and the optional device description).
    Later copies of a page overwrite earlier ones (a live migration sends a
    page again when the guest dirtied it); ZERO pages set the page to zeros.
    ``on_blocks`` allocates the image once MEM_SIZE has told the block list
    (default: `RamImage.zeroed`).

    Raises `StreamError` for a malformed, truncated or unsupported stream; the
    image may then be partly filled and must be discarded.
    """
    return _Reader(source, on_blocks).run()


def _ends_with_vmdesc(data: bytearray) -> bool:
    """Whether data ends with EOF, VMDESCRIPTION, be32 length and that much JSON."""
    if not data.endswith(b"}"):
        return False
    candidate = data.rfind(b"\x00\x06")
    while candidate >= 0:
        start = candidate + 6
        if len(data) >= start and fmt.BE32.unpack_from(data, candidate + 2)[0] == len(data) - start:
            try:
                json.loads(bytes(data[start:]))
            except ValueError:
                return False
            return True
        candidate = data.rfind(b"\x00\x06", 0, candidate)
    return False
