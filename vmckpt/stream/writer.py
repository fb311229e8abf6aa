"""Write a migration stream that QEMU's ``migrate-incoming`` accepts.

The stream is the envelope's prelude, one ``ram`` START section holding
MEM_SIZE and every page of every block, a ``ram`` END section with just EOS,
then the envelope's epilogue. Page records are built with numpy structured
arrays a chunk at a time; nothing loops over pages in Python. The record encoders
(section headers, footers, block names, MEM_SIZE, the record dtypes) are shared with
:mod:`vmckpt.stream.postcopy`, which writes the streams of a postcopy source.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO

from vmckpt.errors import StreamError
from vmckpt.lazy_numpy import np
from vmckpt.ram import PAGE_SIZE, RamBlock, RamImage
from vmckpt.stream import format as fmt
from vmckpt.stream.envelope import StreamEnvelope

if TYPE_CHECKING:
    import numpy.typing as npt

STEP = "writing migration stream"
CHUNK_PAGES = 4096  # 16 MiB of page records per write

# Records as numpy dtype specs, and words as Python ints (they take an array's uint64):
# numpy is loaded on first use (vmckpt/lazy_numpy.py).
PAGE_RECORD = [("word", ">u8"), ("data", "u1", (PAGE_SIZE,))]
ZERO_RECORD = [("word", ">u8"), ("fill", "u1")]
PAGE_RECORD_SIZE = 8 + PAGE_SIZE
ZERO_RECORD_SIZE = 8 + 1

_PAGE_CONT = fmt.RAM_FLAG_PAGE | fmt.RAM_FLAG_CONTINUE
_ZERO_CONT = fmt.RAM_FLAG_ZERO | fmt.RAM_FLAG_CONTINUE
_PAGE_SHIFT = fmt.TARGET_PAGE_BITS


def section_start(envelope: StreamEnvelope) -> bytes:
    """The ``ram`` START section's header, as the envelope names it."""
    name = fmt.RAM_IDSTR.encode()
    return (
        bytes([fmt.SECTION_START])
        + fmt.BE32.pack(envelope.ram_section_id)
        + bytes([len(name)])
        + name
        + fmt.BE32.pack(envelope.ram_instance_id)
        + fmt.BE32.pack(envelope.ram_version_id)
    )


def footer(section_id: int) -> bytes:
    """A section's footer."""
    return bytes([fmt.SECTION_FOOTER]) + fmt.BE32.pack(section_id)


def idstr_bytes(idstr: str) -> bytes:
    """A RAM block's name as the stream spells it: a length byte and the name."""
    raw = idstr.encode("ascii")
    if not 0 < len(raw) < 256:
        raise StreamError(f"RAM block name {idstr!r} cannot be written", step=STEP)
    return bytes([len(raw)]) + raw


def mem_size(blocks: list[RamBlock]) -> bytes:
    """The MEM_SIZE record: the total, then each block's name and length."""
    total = sum(block.length for block in blocks)
    if total & fmt.RAM_FLAGS_MASK or any(b.length % PAGE_SIZE for b in blocks):
        raise StreamError(
            f"RAM blocks of {total} bytes in all are not whole pages: "
            + ", ".join(f"{b.idstr}={b.length}" for b in blocks),
            step=STEP,
        )
    parts = [fmt.BE64.pack(total | fmt.RAM_FLAG_MEM_SIZE)]
    for block in blocks:
        parts.append(idstr_bytes(block.idstr) + fmt.BE64.pack(block.length))
    return b"".join(parts)


class _Records:
    """Reusable record buffers for one chunk of pages."""

    def __init__(self) -> None:
        self.pages = np.empty(CHUNK_PAGES, dtype=PAGE_RECORD)
        self.zeros = np.zeros(CHUNK_PAGES, dtype=ZERO_RECORD)

    def write_block(self, sink: BinaryIO, block: RamBlock, pages: npt.NDArray[np.uint8]) -> int:
        """Every page of one block: PAGE records for non-zero pages, ZERO records for the rest.

        The first record (page 0) carries the block's name; all others have
        CONTINUE set. Within a chunk, ZERO records come before PAGE records:
        QEMU applies each record by its offset, so the order does not matter.
        """
        count = block.pages
        words = pages.view(np.uint64)
        first = pages[0]
        if first.any():
            head = fmt.BE64.pack(fmt.RAM_FLAG_PAGE) + idstr_bytes(block.idstr)
            written = sink.write(head) + sink.write(first.data)
        else:
            head = fmt.BE64.pack(fmt.RAM_FLAG_ZERO) + idstr_bytes(block.idstr) + b"\0"
            written = sink.write(head)
        for start in range(1, count, CHUNK_PAGES):
            stop = min(start + CHUNK_PAGES, count)
            nonzero = words[start:stop].any(axis=1)
            numbers = np.arange(start, stop, dtype=np.uint64)
            full = numbers[nonzero]
            empty = numbers[~nonzero]
            if empty.size:
                zeros = self.zeros[: empty.size]
                zeros["word"] = (empty << _PAGE_SHIFT) | _ZERO_CONT
                written += sink.write(zeros.view(np.uint8).data)
            if full.size:
                records = self.pages[: full.size]
                records["word"] = (full << _PAGE_SHIFT) | _PAGE_CONT
                np.take(pages, full.astype(np.intp), axis=0, out=records["data"], mode="clip")
                written += sink.write(records.view(np.uint8).data)
        return written


def write_stream(sink: BinaryIO, envelope: StreamEnvelope, ram: RamImage) -> int:
    """Write a stream that QEMU's migrate-incoming accepts; return the bytes written.

    The stream is ``envelope.prelude``; a ram START section (the envelope's
    section id, instance and version) with MEM_SIZE listing ``ram.blocks``,
    then every page of every block (non-zero pages as PAGE records, zero pages
    as ZERO records, so the destination's RAM is exactly the image), EOS and
    footer; a ram END section with just EOS and footer; ``envelope.epilogue``.
    The RAM blocks must be the ones the destination QEMU has (same names and
    lengths), as QEMU checks.
    """
    for block in ram.blocks:
        array = ram.data.get(block.idstr)
        if array is None or array.size != block.pages * PAGE_SIZE:
            raise StreamError(
                f"RAM image has no data of {block.pages * PAGE_SIZE} bytes "
                f"for block {block.idstr!r}",
                step=STEP,
            )
    section_id = envelope.ram_section_id
    eos = fmt.BE64.pack(fmt.RAM_FLAG_EOS)
    written = sink.write(envelope.prelude)
    written += sink.write(section_start(envelope) + mem_size(ram.blocks))
    records = _Records()
    for block in ram.blocks:
        if block.pages:
            written += records.write_block(sink, block, ram.pages_of(block.idstr))
    written += sink.write(eos + footer(section_id))
    end = bytes([fmt.SECTION_END]) + fmt.BE32.pack(section_id)
    written += sink.write(end + eos + footer(section_id))
    written += sink.write(envelope.epilogue)
    return written
