"""Composing a chain newest first (docs/FORMAT.md, *Composing a chain*): each layer gives
only the pages no newer layer of the chain stores or zeroes (a bitmap per RAM block), only
those are read, and each is checked against its digest before it is copied (a layer of 1.0
or 1.1, which has none, is read whole and checked against its file's SHA-256). The store's
compose and chain maintenance (a layer that absorbs others) both gather through here.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vmckpt.errors import CorruptLayerError, StoreError
from vmckpt.images import crypt
from vmckpt.images import format as fmt
from vmckpt.images.format import MANIFEST, PAGES, SUMS, BlockIndex, LayerManifest
from vmckpt.images.layerio import CHUNK_PAGES, LayerReader, check_digest
from vmckpt.lazy_numpy import np
from vmckpt.ram import PAGE_SIZE, PageNumbers, PageTarget, RamBlock

if TYPE_CHECKING:
    import numpy.typing as npt


@dataclass
class Coverage:
    """Composing newest first: per RAM block, the pages a newer layer already decided
    (``done``), and which of them its newest record stores (``stored``) or zeroes
    (``zeroed``): what a layer that absorbs others must record."""

    done: dict[str, npt.NDArray[np.bool_]]
    stored: dict[str, npt.NDArray[np.bool_]]
    zeroed: dict[str, npt.NDArray[np.bool_]]
    remaining: int

    @classmethod
    def of(cls, blocks: Iterable[RamBlock]) -> Coverage:
        blocks = list(blocks)

        def masks() -> dict[str, npt.NDArray[np.bool_]]:
            return {b.idstr: np.zeros(b.pages, dtype=np.bool_) for b in blocks}

        return cls(masks(), masks(), masks(), sum(b.pages for b in blocks))

    def take(self, idstr: str, part: BlockIndex) -> npt.NDArray[np.bool_]:
        """Record a layer's part of a block, older than every layer taken before; returns
        which of its stored pages are the newest version (a mask over ``part.stored``)."""
        done = self.done[idstr]
        fresh = ~done[part.stored]
        new_zero = part.zeroed[~done[part.zeroed]]
        self.stored[idstr][part.stored[fresh]] = True
        self.zeroed[idstr][new_zero] = True
        done[part.stored] = True
        done[new_zero] = True
        self.remaining -= int(np.count_nonzero(fresh)) + new_zero.size
        return fresh


@dataclass(frozen=True)
class Wanted:
    """Pages to read from one layer's pages.bin: their positions there (ascending), and
    where each goes (the number of its RAM block in the image, its page number)."""

    positions: npt.NDArray[np.int64]
    blocks: npt.NDArray[np.int32]
    pages: PageNumbers


def _scatter(
    image: PageTarget, rows: npt.NDArray[np.uint8], blocks: npt.NDArray[Any], pages: PageNumbers
) -> None:
    """Copy ``rows`` to their pages: row i to page ``pages[i]`` of block ``blocks[i]``."""
    numbers = np.unique(blocks).tolist()
    if len(numbers) == 1:  # (the common case) without a copy of the rows
        image.put_pages(image.blocks[numbers[0]].idstr, pages, rows)
        return
    for number in numbers:
        mine = blocks == number
        image.put_pages(image.blocks[number].idstr, pages[mine], rows[mine])


def read_whole(
    src: crypt.LayerFile, manifest: LayerManifest, wanted: Wanted, image: PageTarget, step: str
) -> None:
    """A layer without page digests (1.0, 1.1): read its whole pages.bin, check its sha256,
    and copy the wanted pages into ``image`` (only once the whole file matched)."""
    total = manifest.pages_stored
    digest = hashlib.sha256()
    rows = np.empty((wanted.positions.size, PAGE_SIZE), dtype=np.uint8)
    whole = np.empty((min(total, CHUNK_PAGES), PAGE_SIZE), dtype=np.uint8)
    for start in range(0, total, CHUNK_PAGES):
        buf = whole[: min(CHUNK_PAGES, total - start)]
        src.pread_into(buf, start * PAGE_SIZE)
        digest.update(buf.data)
        lo, hi = np.searchsorted(wanted.positions, [start, start + buf.shape[0]])
        rows[lo:hi] = buf[wanted.positions[lo:hi] - start]
    check_digest(manifest, PAGES, digest.hexdigest(), step)
    _scatter(image, rows, wanted.blocks, wanted.pages)


class PageBatch:
    """Pages read for a compose from layers with page digests: collected a batch at a time,
    checked against their digests together (hashed by several threads), and only then
    copied into the image."""

    def __init__(self, image: PageTarget, step: str) -> None:
        self.image = image
        self.step = step
        self.count = 0
        self.rows = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        self.expected = np.empty((CHUNK_PAGES, fmt.PAGE_DIGEST_SIZE), dtype=np.uint8)
        self.blocks = np.empty(CHUNK_PAGES, dtype=np.int32)
        self.pages = np.empty(CHUNK_PAGES, dtype=np.uint32)
        self.positions = np.empty(CHUNK_PAGES, dtype=np.int64)
        self.layers: list[tuple[int, LayerManifest]] = []  # (first row, layer) in row order

    def add(
        self,
        src: crypt.LayerFile,
        manifest: LayerManifest,
        sums: npt.NDArray[np.uint8],
        wanted: Wanted,
    ) -> None:
        """Read the wanted pages of one layer's pages.bin (open as ``src``) into the batch."""
        if self.rows.shape[0] == 0:
            self.rows = np.empty((CHUNK_PAGES, PAGE_SIZE), dtype=np.uint8)
        done = 0
        total = wanted.positions.size
        while done < total:
            if self.count == CHUNK_PAGES:
                self.flush()
            take = min(total - done, CHUNK_PAGES - self.count)
            chosen = wanted.positions[done : done + take]
            rows = slice(self.count, self.count + take)
            self.layers.append((self.count, manifest))
            src.read_pages(chosen, self.rows[rows])
            self.expected[rows] = sums[chosen]
            self.blocks[rows] = wanted.blocks[done : done + take]
            self.pages[rows] = wanted.pages[done : done + take]
            self.positions[rows] = chosen
            self.count += take
            done += take

    def flush(self) -> None:
        """Check the batch's pages against their digests, then copy them into the image."""
        count = self.count
        if not count:
            return
        found = fmt.page_digests(self.rows[:count])
        bad = np.flatnonzero((found != self.expected[:count]).any(axis=1))
        if bad.size:
            row = int(bad[0])
            starts = [start for start, _ in self.layers]
            manifest = self.layers[int(np.searchsorted(starts, row, side="right")) - 1][1]
            raise CorruptLayerError(
                f"{PAGES}: page {int(self.positions[row])} (of {manifest.pages_stored} stored) "
                f"does not match its digest in {SUMS}",
                layer=manifest.id,
                step=self.step,
            )
        _scatter(self.image, self.rows[:count], self.blocks[:count], self.pages[:count])
        self.count = 0
        self.layers = []


def gather(
    reader: LayerReader,
    newest_first: list[LayerManifest],
    image: PageTarget,
    coverage: Coverage,
    step: str,
) -> None:
    """Copy into ``image`` each page's newest version among ``newest_first``, skipping
    pages ``coverage`` says a newer layer decided already; update ``coverage``. Every
    page copied is checked first (its digest, or its file's sha256)."""
    block_numbers = {block.idstr: number for number, block in enumerate(image.blocks)}
    batch = PageBatch(image, step)
    for manifest in newest_first:
        if coverage.remaining == 0:
            break
        # pages.sum is read only if the layer has pages to give.
        index = reader.index(manifest, step, sums=False)
        positions: list[npt.NDArray[np.int64]] = []
        blocks: list[npt.NDArray[np.int32]] = []
        pages: list[PageNumbers] = []
        offset = 0
        for block, part in zip(manifest.blocks, index.parts, strict=True):
            if part.stored.size or part.zeroed.size:
                fresh = coverage.take(block.idstr, part)
                if fresh.any():
                    chosen = np.flatnonzero(fresh)
                    positions.append(chosen + offset)
                    pages.append(part.stored[chosen])
                    blocks.append(np.full(chosen.size, block_numbers[block.idstr], np.int32))
            offset += part.stored.size
        if not positions:
            continue
        wanted = Wanted(np.concatenate(positions), np.concatenate(blocks),
                         np.concatenate(pages))  # fmt: skip
        with reader.open(manifest, PAGES, step) as src:
            if not manifest.has_page_sums:
                read_whole(src, manifest, wanted, image, step)
            else:
                batch.add(src, manifest, reader.page_sums(manifest, step), wanted)
    batch.flush()


def walk_chain(
    read: Callable[[str, str], LayerManifest],
    layer_id: str,
    step: str,
    cache: dict[str, LayerManifest],
    checked: set[str] | None = None,
) -> list[LayerManifest]:
    """The chain of ``layer_id``, base first, each link checked (parent present, same
    layout, no loop). With ``checked`` (ids whose chains passed already), the walk stops
    below the first of them and returns only the layers above it."""
    chain: list[LayerManifest] = []
    seen: set[str] = set()
    current: str | None = layer_id
    while current is not None:
        if checked is not None and chain and current in checked:
            if cache[current].layout != chain[-1].layout:
                raise CorruptLayerError(
                    f"{MANIFEST}: RAM block layout {chain[-1].layout} differs from that of "
                    f"parent {current} {cache[current].layout}",
                    layer=chain[-1].id,
                    step=step,
                )
            break
        if current in seen:
            raise CorruptLayerError(
                f"{MANIFEST}: parent chain loops back to {current}",
                layer=chain[-1].id,
                step=step,
            )
        if current not in cache:
            try:
                cache[current] = read(current, step)
            except StoreError as exc:
                if not chain or isinstance(exc, CorruptLayerError):
                    raise
                raise CorruptLayerError(
                    f"{MANIFEST}: parent {current} is missing", layer=chain[-1].id, step=step
                ) from exc
        manifest = cache[current]
        if chain and manifest.layout != chain[-1].layout:
            raise CorruptLayerError(
                f"{MANIFEST}: RAM block layout {chain[-1].layout} differs from that of "
                f"parent {current} {manifest.layout}",
                layer=chain[-1].id,
                step=step,
            )
        seen.add(current)
        chain.append(manifest)
        current = manifest.parent
    chain.reverse()
    return chain
