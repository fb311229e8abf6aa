"""Guest RAM as vmckpt holds it in memory: one byte array per QEMU RAM block.

This is the value that flows between the modules: `stream` fills it from a
migration stream, `images` stores and composes it, `checkpoint` diffs it.
All page work is vectorised over whole blocks with numpy; nothing here
loops over pages in Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

PAGE_SIZE = 4096
WORDS_PER_PAGE = PAGE_SIZE // 8

PageNumbers = npt.NDArray[np.uint32]


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
