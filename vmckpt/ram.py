"""Guest RAM as vmckpt holds it: one byte array per QEMU RAM block in memory
(`RamImage`), some pages of it (`PageSet`), or in bounded memory: a whole image in a file
of this host (`RamFile`, a parent a precopy checkpoint is diffed against), and a
migration received as its difference from such a parent (`RamDiff`, the changed pages
spilled to an unnamed file, handed to the layer writer as `SpilledPages`).

This is the value that flows between the modules: `stream` fills it from a
migration stream, `images` stores and composes it, `checkpoint` diffs it.
All page work is vectorised over whole blocks (or batches of pages) with numpy;
nothing here loops over pages in Python (over runs of consecutive pages at most).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, cast

from vmckpt.lazy_numpy import np

if TYPE_CHECKING:
    import numpy.typing as npt

PAGE_SIZE = 4096
WORDS_PER_PAGE = PAGE_SIZE // 8

# Aliases for annotations, as strings: numpy is loaded on first use (vmckpt/lazy_numpy.py).
PageNumbers: TypeAlias = "npt.NDArray[np.uint32]"
AnyPages: TypeAlias = "npt.NDArray[np.integer[Any]]"
Rows: TypeAlias = "npt.NDArray[np.uint8]"


class PageTarget(Protocol):
    """Where pages are put: a migration's reader and a chain's compose write through it."""

    blocks: list[RamBlock]

    def put_pages(self, idstr: str, numbers: AnyPages, rows: Rows) -> None:
        """Page ``numbers[i]`` of block ``idstr`` becomes ``rows[i]`` (a later copy of a
        page repeated in ``numbers`` wins)."""

    def put_zeros(self, idstr: str, numbers: AnyPages) -> None:
        """Pages ``numbers`` of block ``idstr`` become zero."""


@dataclass(frozen=True)
class RamBlock:
    """One RAM block as QEMU names it in the stream (e.g. ``pc.ram``)."""

    idstr: str
    length: int  # bytes; QEMU's "used length"

    @property
    def pages(self) -> int:
        return (self.length + PAGE_SIZE - 1) // PAGE_SIZE


@dataclass
class RamImage:
    """The full contents of every RAM block of a guest at one instant.

    Each block's bytes live in a zero-initialised numpy array whose length is
    rounded up to whole pages, so untouched (zero) pages cost no memory.
    """

    blocks: list[RamBlock]
    data: dict[str, npt.NDArray[np.uint8]] = field(default_factory=dict)

    @classmethod
    def zeroed(cls, blocks: list[RamBlock]) -> RamImage:
        image = cls(list(blocks))
        for block in blocks:
            image.data[block.idstr] = np.zeros(block.pages * PAGE_SIZE, dtype=np.uint8)
        return image

    def block(self, idstr: str) -> RamBlock:
        for block in self.blocks:
            if block.idstr == idstr:
                return block
        raise KeyError(idstr)

    def pages_of(self, idstr: str) -> npt.NDArray[np.uint8]:
        """The block's bytes as a (pages, 4096) view."""
        return self.data[idstr].reshape(-1, PAGE_SIZE)

    def words_of(self, idstr: str) -> npt.NDArray[np.uint64]:
        """The block's bytes as a (pages, 512) view of 64-bit words, for fast compares."""
        return self.data[idstr].view(np.uint64).reshape(-1, WORDS_PER_PAGE)

    def nonzero_pages(self, idstr: str) -> PageNumbers:
        """Page numbers of the block whose contents are not all zero."""
        mask = self.words_of(idstr).any(axis=1)
        return np.flatnonzero(mask).astype(np.uint32)

    def changed_pages(self, idstr: str, older: RamImage) -> PageNumbers:
        """Page numbers of the block that differ from the same block in ``older``."""
        mine = self.words_of(idstr)
        theirs = older.words_of(idstr)
        if mine.shape != theirs.shape:
            raise ValueError(f"RAM block {idstr} changed size: {theirs.shape} -> {mine.shape}")
        # Compare in slices so the temporary boolean array stays small.
        changed: list[PageNumbers] = []
        step = 16384
        for start in range(0, mine.shape[0], step):
            rows = (mine[start : start + step] != theirs[start : start + step]).any(axis=1)
            changed.append((np.flatnonzero(rows) + start).astype(np.uint32))
        return np.concatenate(changed) if changed else np.zeros(0, dtype=np.uint32)

    def same_layout(self, other: RamImage) -> bool:
        return self.blocks == other.blocks

    def take(self, idstr: str, numbers: PageNumbers, out: npt.NDArray[np.uint8]) -> None:
        """Copy pages ``numbers`` of a block into ``out`` (len(numbers), PAGE_SIZE)."""
        np.take(self.pages_of(idstr), numbers, axis=0, out=out)

    def put_pages(self, idstr: str, numbers: AnyPages, rows: Rows) -> None:
        numbers, rows = last_copies(numbers, rows)
        self.pages_of(idstr)[numbers] = rows

    def put_zeros(self, idstr: str, numbers: AnyPages) -> None:
        self.pages_of(idstr)[numbers] = 0


def distinct(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The distinct values of a 1-D array, sorted: ``np.unique`` without numpy 2's first-call
    import of ``numpy.ma`` (~20 ms: a lazy restore's first page request waited for it)."""
    return first_of_runs(np.sort(values))[0]


def first_of_runs(ordered: npt.NDArray[Any]) -> tuple[npt.NDArray[Any], npt.NDArray[np.intp]]:
    """The distinct values of a sorted 1-D array and the index each first appears at:
    ``np.unique(ordered, return_index=True)`` without its first-call import of ``numpy.ma``
    (an encrypted store's first page request waited for it)."""
    if ordered.size < 2:
        return ordered, np.arange(ordered.size, dtype=np.intp)
    keep = np.empty(ordered.size, dtype=np.bool_)
    keep[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=keep[1:])
    starts = np.flatnonzero(keep)
    return ordered[starts], starts


def quantile(values: Sequence[float], q: float) -> float:
    """``np.quantile(values, q)`` (its default, linear interpolation) without its first-call
    import of ``numpy.ma``: a page server's record waited ~11 ms for it while its restore
    command waited for the record."""
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    position = q * (ordered.size - 1)
    low = int(position)
    high = min(low + 1, ordered.size - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def last_copies(numbers: AnyPages, rows: Rows) -> tuple[AnyPages, Rows]:
    """``numbers`` and their ``rows`` with only the last copy of a page that repeats (numpy
    does not promise an order for an assignment through repeated indices)."""
    if numbers.size < 2 or bool(np.all(numbers[1:] > numbers[:-1])):
        return numbers, rows
    _, first = np.unique(numbers[::-1], return_index=True)
    keep = np.sort(numbers.size - 1 - first)
    return numbers[keep], rows[keep]


@dataclass
class PageSet:
    """Some pages of a guest's RAM blocks, held sparsely: what one incremental (COLO)
    checkpoint delivered. Memory is O(pages), never O(RAM).

    ``stored[idstr]`` are sorted, unique page numbers whose data is the same row of
    ``rows[idstr]`` (a (n, PAGE_SIZE) uint8 array); ``zeroed[idstr]`` pages became zero.
    """

    blocks: list[RamBlock]
    stored: dict[str, PageNumbers] = field(default_factory=dict)
    rows: dict[str, npt.NDArray[np.uint8]] = field(default_factory=dict)
    zeroed: dict[str, PageNumbers] = field(default_factory=dict)

    @property
    def pages(self) -> int:
        return sum(numbers.size for numbers in self.stored.values())

    def take(self, idstr: str, numbers: PageNumbers, out: npt.NDArray[np.uint8]) -> None:
        """Copy the data of ``numbers`` (all held here) into ``out`` (len(numbers), PAGE_SIZE)."""
        held = self.stored.get(idstr, np.zeros(0, dtype=np.uint32))
        where = np.searchsorted(held, numbers)
        if numbers.size and (
            int(where.max()) >= held.size or not bool(np.all(held[where] == numbers))
        ):
            raise KeyError(f"pages of RAM block {idstr!r} that this page set does not hold")
        np.take(self.rows[idstr], where, axis=0, out=out)


# -- RAM in files: bounded memory -------------------------------------------------------

READ_GAP_PAGES = 8  # read across a gap this small rather than make one more read
READ_SPAN_PAGES = 1024  # at most this much per read call (the scratch span stays small)
BATCH_PAGES = 4096  # pages copied per step between files: 16 MiB
MAPPED_READS_DROP = 8192  # RamFile.get: pages read through the mapping before it is dropped


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:  # beyond the end of a sparse file that was cut short: zeros
            view[done:] = bytes(len(view) - done)
            return
        done += got


def _pwrite_full(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwritev(fd, [view[done:]], offset + done)


def _bytes(rows: Rows) -> memoryview:
    return memoryview(cast(Any, rows)).cast("B")


def read_rows(fd: int, positions: AnyPages, out: Rows, base: int = 0) -> None:
    """Rows ``positions`` (page-sized rows of the file at byte ``base``, any order) into the
    rows of ``out`` (C-contiguous): one read per run of positions, across small gaps."""
    if not positions.size:
        return
    if positions.size > 1 and not bool(np.all(positions[1:] > positions[:-1])):
        # In order, a slice at a time: the copy in between stays small.
        order = np.argsort(positions, kind="stable")
        ordered = np.empty((min(order.size, BATCH_PAGES), PAGE_SIZE), dtype=np.uint8)
        for start in range(0, order.size, BATCH_PAGES):
            rows = order[start : start + BATCH_PAGES]
            read_rows(fd, positions[rows], ordered[: rows.size], base)
            out[rows] = ordered[: rows.size]
        return
    read_in_runs(positions, out, lambda rows, at: _pread_full(fd, _bytes(rows), base + at))


def read_in_runs(positions: AnyPages, out: Rows, pread: Callable[[Rows, int], None]) -> None:
    """Rows ``positions`` (ascending) of a page-row file into the rows of ``out``, one
    ``pread(rows, byte offset)`` per run of positions, across gaps of up to READ_GAP_PAGES
    and at most READ_SPAN_PAGES a call (the scratch span stays small)."""
    breaks = (np.flatnonzero(np.diff(positions) > READ_GAP_PAGES) + 1).tolist()
    for a, end in zip([0, *breaks], [*breaks, positions.size], strict=True):
        while a < end:
            first = int(positions[a])
            b = a + int(np.searchsorted(positions[a:end], first + READ_SPAN_PAGES))
            last = int(positions[b - 1])
            if last - first + 1 == b - a:  # consecutive: straight into place
                pread(out[a:b], first * PAGE_SIZE)
            else:
                span = np.empty((last - first + 1, PAGE_SIZE), dtype=np.uint8)
                pread(span, first * PAGE_SIZE)
                out[a:b] = span[positions[a:b] - first]
            a = b


def write_rows(fd: int, positions: AnyPages, rows: Rows, base: int = 0) -> None:
    """``rows[i]`` to row ``positions[i]`` (unique) of the file at byte ``base``: one write
    per run of consecutive positions."""
    if not positions.size:
        return
    if positions.size > 1 and not bool(np.all(positions[1:] > positions[:-1])):
        # A slice at a time, each in order: the copy in between stays small.
        for start in range(0, positions.size, BATCH_PAGES):
            part = positions[start : start + BATCH_PAGES]
            order = np.argsort(part, kind="stable")
            write_rows(fd, part[order], rows[start : start + BATCH_PAGES][order], base)
        return
    if not rows.flags.c_contiguous:
        rows = np.ascontiguousarray(rows)
    breaks = (np.flatnonzero(np.diff(positions) != 1) + 1).tolist()
    for a, b in zip([0, *breaks], [*breaks, positions.size], strict=True):
        _pwrite_full(fd, _bytes(rows[a:b]), base + int(positions[a]) * PAGE_SIZE)


class RamFile:
    """A guest's whole RAM in a file of this host (each block at a page-aligned offset, in
    block order; pages never written are holes), with a bitmap of its non-zero pages kept
    in memory: a parent image read a batch at a time, never held whole. The caller owns
    ``fd`` (the file is in a private directory of this host, never in a store)."""

    def __init__(self, fd: int, blocks: list[RamBlock], nonzero: npt.NDArray[np.bool_]) -> None:
        self.fd = fd
        self._map: mmap.mmap | None = None  # the file read through a mapping (see `get`)
        self._rows: Rows | None = None
        self._mapped_reads = 0
        self.blocks = list(blocks)
        self.offsets: dict[str, int] = {}
        self.nonzero: dict[str, npt.NDArray[np.bool_]] = {}
        at = 0
        for block in self.blocks:
            self.offsets[block.idstr] = at
            self.nonzero[block.idstr] = nonzero[at // PAGE_SIZE : at // PAGE_SIZE + block.pages]
            at += block.pages * PAGE_SIZE
        self.size = at
        self.bitmap = nonzero
        if nonzero.shape != (at // PAGE_SIZE,):
            raise ValueError(f"a bitmap of {nonzero.size} pages for RAM of {at} bytes")

    @classmethod
    def empty(cls, fd: int, blocks: list[RamBlock]) -> RamFile:
        """All zeros: the file cut to its size (a hole)."""
        pages = sum(block.pages for block in blocks)
        os.ftruncate(fd, 0)
        os.ftruncate(fd, pages * PAGE_SIZE)
        return cls(fd, blocks, np.zeros(pages, dtype=np.bool_))

    def get(self, idstr: str, numbers: AnyPages, out: Rows) -> None:
        """Pages ``numbers`` of block ``idstr`` into the rows of ``out``: mostly runs of
        consecutive pages (a migration's first pass) with a read per run; scattered pages
        (those a migration sends again) gathered from a read-only mapping of the file in
        one numpy call, the mapping's pages dropped from this process every
        `MAPPED_READS_DROP` pages read (they stay in the page cache), so its resident size
        stays bounded."""
        if numbers.size < 2 or int(np.count_nonzero(np.diff(numbers) != 1)) * 16 < numbers.size:
            read_rows(self.fd, numbers, out, self.offsets[idstr])  # in runs: a read per run
            return
        if self._rows is None:
            if not self.size:
                return
            self._map = mmap.mmap(self.fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
            self._rows = np.frombuffer(self._map, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        np.take(self._rows, numbers + self.offsets[idstr] // PAGE_SIZE, axis=0, out=out)
        self._mapped_reads += numbers.size
        if self._mapped_reads >= MAPPED_READS_DROP:
            self.drop_mapped()

    def drop_mapped(self) -> None:
        """Give the mapping's resident pages back (the page cache keeps them)."""
        if self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED)
        self._mapped_reads = 0

    def close(self) -> None:
        """Unmap the file (the caller closes ``fd``)."""
        self._rows = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def put_pages(self, idstr: str, numbers: AnyPages, rows: Rows) -> None:
        numbers, rows = last_copies(numbers, rows)
        write_rows(self.fd, numbers, rows, self.offsets[idstr])
        self.nonzero[idstr][numbers] = rows.view(np.uint64).any(axis=1)

    def put_zeros(self, idstr: str, numbers: AnyPages) -> None:
        numbers = numbers[self.nonzero[idstr][numbers]]  # zero already: nothing to write
        for start in range(0, numbers.size, BATCH_PAGES):
            part = numbers[start : start + BATCH_PAGES]
            write_rows(self.fd, part, np.zeros((part.size, PAGE_SIZE), dtype=np.uint8),
                       self.offsets[idstr])  # fmt: skip
        self.nonzero[idstr][numbers] = False

    def take(self, idstr: str, numbers: PageNumbers, out: Rows) -> None:
        self.get(idstr, numbers, out)


ZEROED = -2  # RamDiff: the page is zero now, its parent's is not
UNCHANGED = -1  # RamDiff: the page is as in the parent


class SpilledPages:
    """The pages a `RamDiff` kept: ``stored[idstr]`` (sorted page numbers), their data at
    rows ``rows_at[idstr]`` of an unnamed file ``fd`` (the caller's). What the layer writer
    reads a chunk at a time (`take`), like a `PageSet`."""

    def __init__(
        self,
        blocks: list[RamBlock],
        fd: int,
        stored: dict[str, PageNumbers],
        rows_at: dict[str, npt.NDArray[np.int64]],
    ) -> None:
        self.blocks = list(blocks)
        self.fd = fd
        self.stored = stored
        self.rows_at = rows_at

    @property
    def pages(self) -> int:
        return sum(numbers.size for numbers in self.stored.values())

    def take(self, idstr: str, numbers: PageNumbers, out: Rows) -> None:
        """Copy the data of ``numbers`` (all held here) into ``out`` (len(numbers), PAGE_SIZE)."""
        held = self.stored.get(idstr, np.zeros(0, dtype=np.uint32))
        where = np.searchsorted(held, numbers)
        if numbers.size and (
            int(where.max()) >= held.size or not bool(np.all(held[where] == numbers))
        ):
            raise KeyError(f"pages of RAM block {idstr!r} that these pages do not hold")
        read_rows(self.fd, self.rows_at[idstr][where], out)


PENDING_PAGES = 256  # RamDiff: page records of a block gathered before they are diffed
PENDING_RECORDS = 1 << 16  # ... and records in all (zero records cost no data)


@dataclass
class _Pending:
    """A block's records not diffed yet, in arrival order: page numbers, and for each the
    row of its data in ``rows`` (-1: a ZERO record)."""

    rows: Rows
    numbers: list[AnyPages] = field(default_factory=list)
    where: list[npt.NDArray[np.int64]] = field(default_factory=list)
    pages: int = 0
    records: int = 0


class RamDiff:
    """A migration's RAM received as its difference from ``parent`` (None: all zeros), in
    memory O(batch) plus a few bytes per page: each batch of pages is compared with the
    parent's (read from its file, only where the parent's page is not zero); a page that
    differs and is not zero is appended to the unnamed file ``spill`` (the caller's), and
    the newest copy of each page decides. A page never sent is zero (as in a `RamImage`).

    Short runs of records (a migration's last passes alternate a few pages and a few zero
    pages) are gathered, their data copied, and diffed `PENDING_PAGES` at a time: a record
    costs microseconds while QEMU waits for the reader, the diff's fixed cost is paid once
    per batch."""

    def __init__(self, blocks: list[RamBlock], parent: RamFile | None, spill: int) -> None:
        if parent is not None and parent.blocks != list(blocks):
            raise ValueError("the RAM blocks differ from the parent's")
        self.blocks = list(blocks)
        self.parent = parent
        self.spill = spill
        self.spilled = 0
        self.state = {b.idstr: np.full(b.pages, UNCHANGED, dtype=np.int64) for b in blocks}
        self.received = {b.idstr: np.zeros(b.pages, dtype=np.bool_) for b in blocks}
        self._rows = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        self._theirs = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        self._pending: dict[str, _Pending] = {}

    def put_pages(self, idstr: str, numbers: AnyPages, rows: Rows) -> None:
        pending = self._pending.get(idstr)
        if numbers.size >= PENDING_PAGES:  # a long run: diffed as it is
            if pending is not None and pending.records:
                self._flush(idstr, pending)
            self._diff_pages(idstr, numbers, rows)
            return
        if pending is None:
            pending = self._pending[idstr] = _Pending(
                np.empty((PENDING_PAGES, PAGE_SIZE), dtype=np.uint8)
            )
        elif pending.pages + numbers.size > PENDING_PAGES:
            self._flush(idstr, pending)
        start = pending.pages
        pending.rows[start : start + numbers.size] = rows
        pending.numbers.append(numbers)
        pending.where.append(np.arange(start, start + numbers.size, dtype=np.int64))
        pending.pages += numbers.size
        pending.records += numbers.size

    def put_zeros(self, idstr: str, numbers: AnyPages) -> None:
        pending = self._pending.get(idstr)
        if pending is None or not pending.records:
            self._diff_zeros(idstr, numbers)  # nothing to keep in order with
            return
        pending.numbers.append(numbers)
        pending.where.append(np.full(numbers.size, -1, dtype=np.int64))
        pending.records += numbers.size
        if pending.records >= PENDING_RECORDS:
            self._flush(idstr, pending)

    def _flush(self, idstr: str, pending: _Pending) -> None:
        """Diff a block's pending records: of each page, its last record."""
        numbers = np.concatenate(pending.numbers)
        where = np.concatenate(pending.where)
        _, first = np.unique(numbers[::-1], return_index=True)
        last = numbers.size - 1 - first  # ascending page numbers
        numbers, where = numbers[last], where[last]
        data = where >= 0
        self._diff_pages(idstr, numbers[data], pending.rows[where[data]])
        self._diff_zeros(idstr, numbers[~data])
        pending.numbers, pending.where = [], []
        pending.pages = pending.records = 0

    def _parent_nonzero(self, idstr: str, numbers: AnyPages) -> npt.NDArray[np.bool_]:
        if self.parent is None:
            return np.zeros(numbers.size, dtype=np.bool_)
        return self.parent.nonzero[idstr][numbers]

    def _diff_pages(self, idstr: str, numbers: AnyPages, rows: Rows) -> None:
        numbers, rows = last_copies(numbers, rows)
        count = numbers.size
        if not count:
            return
        if self._rows.shape[0] < count:
            self._rows = np.empty((max(count, 256), PAGE_SIZE), dtype=np.uint8)
        mine = self._rows[:count]
        mine[...] = rows  # contiguous and aligned: compared as 64-bit words
        words = mine.view(np.uint64)
        nonzero = np.asarray(words.any(axis=1), dtype=np.bool_)
        differs = nonzero.copy()  # against a zero page
        theirs_at = np.flatnonzero(self._parent_nonzero(idstr, numbers))
        if theirs_at.size and self.parent is not None:
            if self._theirs.shape[0] < theirs_at.size:
                self._theirs = np.empty((max(theirs_at.size, 256), PAGE_SIZE), dtype=np.uint8)
            theirs = self._theirs[: theirs_at.size]
            self.parent.get(idstr, numbers[theirs_at], theirs)
            if theirs_at.size == count:
                differs = (words != theirs.view(np.uint64)).any(axis=1)
            else:
                differs[theirs_at] = (words[theirs_at] != theirs.view(np.uint64)).any(axis=1)
        state = self.state[idstr]
        self.received[idstr][numbers] = True
        state[numbers[~differs]] = UNCHANGED
        state[numbers[differs & ~nonzero]] = ZEROED
        keep = np.flatnonzero(differs & nonzero)
        if keep.size:
            kept = mine if keep.size == count else mine[keep]
            write_rows(self.spill, np.arange(self.spilled, self.spilled + keep.size), kept)
            state[numbers[keep]] = np.arange(self.spilled, self.spilled + keep.size)
            self.spilled += keep.size

    def _diff_zeros(self, idstr: str, numbers: AnyPages) -> None:
        self.received[idstr][numbers] = True
        self.state[idstr][numbers] = np.where(
            self._parent_nonzero(idstr, numbers), ZEROED, UNCHANGED
        )

    def result(self) -> tuple[SpilledPages, dict[str, PageNumbers], dict[str, PageNumbers]]:
        """The pages to store (their data in the spill file) and the pages that became zero,
        per block: what the layer writer takes."""
        for idstr, pending in self._pending.items():
            if pending.records:
                self._flush(idstr, pending)
        stored: dict[str, PageNumbers] = {}
        zeroed: dict[str, PageNumbers] = {}
        rows_at: dict[str, npt.NDArray[np.int64]] = {}
        for block in self.blocks:
            state = self.state[block.idstr]
            numbers = np.flatnonzero(state >= 0).astype(np.uint32)
            stored[block.idstr] = numbers
            rows_at[block.idstr] = state[numbers]
            gone = state == ZEROED
            if self.parent is not None:  # never sent: zero, as in a RamImage
                gone |= ~self.received[block.idstr] & self.parent.nonzero[block.idstr]
            zeroed[block.idstr] = np.flatnonzero(gone).astype(np.uint32)
        return SpilledPages(self.blocks, self.spill, stored, rows_at), stored, zeroed
