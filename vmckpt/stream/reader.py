"""Read a QEMU migration stream into a `RamImage` and an opaque envelope.

The stream is decoded by :class:`~vmckpt.stream.decoder.Decoder`; this module decides
what to keep: every RAM page goes into the image, everything that is not RAM stays raw
bytes, the prelude (header and configuration) and the epilogue (device state, vmdesc,
EOF). Anything else that appears before RAM ends is rejected rather than guessed at.
The opening migration of a COLO session is read the same way (:func:`read_migration`
with ``session``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Generic, TypeVar

from vmckpt.errors import StreamError
from vmckpt.lazy_numpy import np
from vmckpt.ram import PAGE_SIZE, PageTarget, RamBlock, RamImage
from vmckpt.stream import format as fmt
from vmckpt.stream.decoder import Command, Decoder, PageNumbers, RamBlocks, fill_from
from vmckpt.stream.envelope import StreamEnvelope

STEP = "reading migration stream"
READ_BUFFER = 4 << 20  # the decoder's buffer: the size of one read from the source
T = TypeVar("T", bound=PageTarget)


@dataclass(frozen=True)
class Migration:
    """What :func:`read_migration` read: the envelope and RAM of a whole migration, the
    values of its PINGs (a COLO receiver answers them) and the RAM block its last page
    record named (the next part of the stream may CONTINUE in it)."""

    envelope: StreamEnvelope
    image: RamImage
    pings: list[int]
    last_block: str | None


class _MigrationReader(Generic[T]):
    """One pass over one migration: the decoder's records applied to a `PageTarget` (the
    `~vmckpt.stream.decoder.RamSink` of the ram section), the rest kept as bytes."""

    def __init__(
        self, decoder: Decoder, on_blocks: Callable[[list[RamBlock]], T], session: bool
    ) -> None:
        self.decoder = decoder
        self.on_blocks = on_blocks
        self.session = session  # a COLO session: return-path commands; ends at the vmdesc
        self.image: T | None = None
        self.ram = RamBlocks()
        self.kept = bytearray()  # commands between the ram START and END, for the epilogue
        self.pings: list[int] = []

    def run(self) -> tuple[StreamEnvelope, T, list[int], str | None]:
        decoder = self.decoder
        header = decoder.header()
        # Until the ram START: commands only; they stay in the prelude.
        prelude = bytearray(header.raw)
        while True:
            start_at = decoder.at()
            section_type = decoder.u8("section type")
            if section_type != fmt.COMMAND:
                break
            prelude += self.kept_bytes(decoder.command(start_at))
        if section_type != fmt.SECTION_START:
            raise decoder.unexpected(section_type, start_at, "before the RAM section")
        start = decoder.section_start()
        if start.idstr != fmt.RAM_IDSTR:
            raise self.error(
                f"unsupported iterative section {start.idstr!r} (section id "
                f"{start.section_id}) at byte offset {start_at}: only 'ram' is handled"
            )
        section_id = start.section_id
        decoder.ram_chunk(self.ram, self, section_id, "START", start_at)
        if self.image is None:
            raise self.error(
                f"RAM section START (section id {section_id}) at byte offset {start_at} "
                "has no MEM_SIZE record"
            )
        # PART sections until END; commands in between are kept for the epilogue.
        decoder.ram_sections(
            self.ram, self, section_id, until=fmt.SECTION_END, where="before the RAM section ended"
        )
        rest = decoder.device_part(until_vmdesc=self.session)
        envelope = StreamEnvelope(
            prelude=bytes(prelude),
            machine_type=header.machine_type,
            ram_section_id=section_id,
            ram_instance_id=start.instance_id,
            ram_version_id=start.version_id,
            epilogue=bytes(self.kept) + rest,
        )
        return envelope, self.image, self.pings, self.ram.current

    def error(self, message: str) -> StreamError:
        return self.decoder.error(message)

    def kept_bytes(self, command: Command) -> bytes:
        """What of a command the envelope keeps (its bytes, or nothing), or an error."""
        if command.cmd in fmt.COLO_SESSION_COMMANDS and self.session:
            # Checkpointing and its return path are vmckpt's business: a restored
            # guest must not wait for them, so these stay out of the envelope.
            ping = command.ping_value()
            if ping is not None:
                self.pings.append(ping)
            return b""
        if command.cmd not in fmt.ACCEPTED_COMMANDS:
            raise self.error(
                f"unsupported command {command.cmd} ({command.name}) at byte offset "
                f"{command.at}: postcopy, COLO and return-path streams are not handled"
            )
        return command.raw

    # -- RamSink -----------------------------------------------------------------------

    def command(self, command: Command) -> None:
        self.kept += self.kept_bytes(command)

    def mem_size(self, blocks: list[RamBlock], at: int) -> None:
        image = self.on_blocks(blocks)
        if image.blocks != blocks:
            raise ValueError("on_blocks returned a target of other RAM blocks")
        self.image = image

    def _target(self) -> T:
        assert self.image is not None  # the decoder checks MEM_SIZE came first
        return self.image

    def page(self, block: str, number: int, position: int) -> None:
        data = np.ndarray((1, PAGE_SIZE), dtype=np.uint8, buffer=self.decoder.buffer,
                          offset=position)  # fmt: skip
        self._target().put_pages(block, np.array([number], dtype=np.int64), data)

    def pages(self, block: str, numbers: PageNumbers, first: int, stride: int) -> None:
        data = np.ndarray((numbers.size, PAGE_SIZE), dtype=np.uint8, buffer=self.decoder.buffer,
                          offset=first, strides=(stride, 1))  # fmt: skip
        self._target().put_pages(block, numbers, data)

    def zero(self, block: str, number: int) -> None:
        self._target().put_zeros(block, np.array([number], dtype=np.int64))

    def zeros(self, block: str, numbers: PageNumbers) -> None:
        self._target().put_zeros(block, numbers)


def read_migration(
    decoder: Decoder,
    *,
    on_blocks: Callable[[list[RamBlock]], RamImage] | None = None,
    session: bool = False,
) -> Migration:
    """Decode a whole migration (as :func:`read_stream` says) from ``decoder``. With
    ``session`` (the opening of a COLO session, whose channel stays open) the commands of
    the session's return path are accepted (and left out of the envelope), and the
    migration ends with its device description instead of the source's end."""
    envelope, image, pings, last = _MigrationReader(
        decoder, on_blocks or RamImage.zeroed, session
    ).run()
    return Migration(envelope, image, pings, last)


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
    decoder = Decoder(fill_from(source), step=STEP, buffer=bytearray(READ_BUFFER))
    migration = read_migration(decoder, on_blocks=on_blocks)
    return migration.envelope, migration.image


def read_stream_to(
    source: BinaryIO, on_blocks: Callable[[list[RamBlock]], T], *, max_read: int = READ_BUFFER
) -> tuple[StreamEnvelope, T]:
    """`read_stream`, with the pages put into the `PageTarget` that ``on_blocks`` makes once
    MEM_SIZE has told the block list (a `~vmckpt.ram.RamDiff`: bounded memory), reading at
    most ``max_read`` bytes at a time (what is read is decoded before the next read: a
    live source waits at most that long for the reader to come back)."""
    fill = fill_from(source)

    def bounded(view: memoryview) -> int:
        return fill(view[:max_read])

    decoder = Decoder(bounded, step=STEP, buffer=bytearray(READ_BUFFER))
    envelope, image, _, _ = _MigrationReader(decoder, on_blocks, False).run()
    return envelope, image
