"""A chain's pages, read one at a time or a run at a time, each checked as it is read.

A lazy restore serves a guest's pages from the store while the guest runs
(vmckpt/mechanisms/pageserver/), so it cannot compose the whole chain first.
:class:`PageSource` is the store's read-only answer: opened on a layer, it
checks what a compose checks before returning anything (every manifest and seal
of the chain, each layer's index and page digests, every pages.bin present with
its listed size, the newest layer's prelude and device state), and builds the
chain's **page index** with numpy: for every page of the guest's RAM, which
layer of the chain holds its newest version (or none: the page is zero) and at
which position of that layer's pages.bin. Pages are then read by
:class:`PageReader`, each checked against its digest in pages.sum before it is
returned (a page that does not match is a CorruptLayerError naming the layer and
the page); in an encrypted store each 256 KiB record is decrypted on demand.

Pages are numbered globally: the RAM blocks of the layer, in stream order, as one
range (block ``i`` starts at ``block_starts[i]``). Layers without page digests
(format 1.0 and 1.1) cannot be served page by page: :class:`NoPageDigests`.

The files of the chain stay open for as long as the source lives, so a chain
maintenance that swaps a layer for an equivalent version meanwhile changes nothing
it reads. Readers made by :meth:`PageSource.reader` have their own descriptors
(duplicates), so threads each read with their own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vmckpt.errors import CorruptLayerError, StoreError
from vmckpt.images import crypt
from vmckpt.images import format as fmt
from vmckpt.images.format import DEVICE, PAGES, PRELUDE, SUMS, LayerManifest
from vmckpt.lazy_numpy import np
from vmckpt.ram import PAGE_SIZE, RamBlock, distinct

if TYPE_CHECKING:
    import numpy.typing as npt

    from vmckpt.images.store import Store

STEP = "serve pages"
ZERO = -1  # owner of a page no layer holds


class NoPageDigests(StoreError):
    """A layer of the chain has no per-page digests (format 1.0/1.1): its pages cannot be
    checked one by one, so they can only be composed whole."""


@dataclass(frozen=True)
class _Layer:
    manifest: LayerManifest
    pages: crypt.LayerFile  # its pages.bin, open
    sums: npt.NDArray[np.uint8]  # its pages.sum rows


@dataclass(frozen=True)
class SourceHead:
    """What a page source serves before its first page, checked without reading the chain's
    indexes or pages: the chain (manifests and seals), the RAM blocks, the newest layer's
    prelude and device state. (:meth:`PageSource.head`: cheap whatever the RAM size.)"""

    chain: list[LayerManifest]
    blocks: list[RamBlock]
    prelude: bytes
    device_state: bytes

    @property
    def manifest(self) -> LayerManifest:
        return self.chain[-1]


class PageSource:
    """The page index of one layer's chain and its open files (module doc)."""

    def __init__(
        self,
        store_id: str,
        chain: list[LayerManifest],
        layers: dict[int, _Layer],
        blocks: list[RamBlock],
        owner: npt.NDArray[np.int32],
        position: npt.NDArray[np.int64],
        stored: npt.NDArray[np.int64],
        prelude: bytes,
        device_state: bytes,
        codec: crypt.Codec,
    ) -> None:
        self.store_id = store_id
        self.chain = chain
        self.manifest = chain[-1]
        self.blocks = blocks
        counts = np.array([block.pages for block in blocks], dtype=np.int64)
        self.block_starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total_pages = int(self.block_starts[-1])
        self.owner = owner  # per global page: index into chain, or ZERO
        self.position = position  # per stored page: its row in its owner's pages.bin
        self.prelude = prelude
        self.device_state = device_state
        self._layers = layers
        self._codec = codec
        self.stored = stored  # the pages some layer holds, ascending

    @staticmethod
    def head(store: Store, layer_id: str) -> SourceHead:
        """The chain of ``layer_id`` checked (manifests, seals, RAM size, page digests
        present) and its newest layer's prelude and device state read: what a restore needs
        before its QEMU starts. :meth:`open` checks it all again and builds the page index."""
        with store.reading("open a page source"):
            chain = PageSource._checked_chain(store, layer_id)
            newest = chain[-1]
            prelude = store.reader.read_small(newest, PRELUDE, STEP)
            device = store.reader.read_small(newest, DEVICE, STEP)
        blocks = [RamBlock(block.idstr, block.length) for block in newest.blocks]
        return SourceHead(chain, blocks, prelude, device)

    @staticmethod
    def _checked_chain(store: Store, layer_id: str) -> list[LayerManifest]:
        step = STEP
        chain = store.chain(layer_id, step)
        store.require_sealed(chain, step)
        newest = chain[-1]
        store.check_ram_size(newest, step)
        old = next((m for m in chain if not m.has_page_sums), None)
        if old is not None:
            version = ".".join(str(n) for n in old.format_version)
            raise NoPageDigests(
                f"layer {old.id} (format {version}) has no page digests: its pages can "
                "only be composed whole",
                layer=newest.id,
                step=step,
            )
        return chain

    @classmethod
    def open(cls, store: Store, layer_id: str) -> PageSource:
        """Check the chain of ``layer_id`` as a compose does, without reading its pages, and
        build its page index. Holds the chain lock (shared) meanwhile."""
        step = STEP
        with store.reading("open a page source"):
            chain = cls._checked_chain(store, layer_id)
            newest = chain[-1]
            blocks = [RamBlock(block.idstr, block.length) for block in newest.blocks]
            counts = [block.pages for block in blocks]
            starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
            total = int(starts[-1])
            owner = np.full(total, ZERO, dtype=np.int32)
            position = np.empty(total, dtype=np.int64)  # read only where owner says
            decided: npt.NDArray[np.bool_] | None = None  # none yet: the newest layer's own
            held: list[npt.NDArray[np.int64]] = []  # each contributing layer's pages, sorted
            layers: dict[int, _Layer] = {}
            try:
                for index in range(len(chain) - 1, -1, -1):
                    manifest = chain[index]
                    parts = store.reader.index(manifest, step, sums=False).parts
                    # The layer's pages as global numbers, in its pages.bin's order (ascending).
                    stored = np.concatenate(
                        [
                            part.stored.astype(np.int64) + int(starts[n])
                            for n, part in enumerate(parts)
                        ]
                    )
                    if decided is None:  # the newest: every page it lists is its own
                        chosen, rows = stored, np.arange(stored.size, dtype=np.int64)
                    else:
                        fresh = ~decided[stored]
                        rows = np.flatnonzero(fresh)
                        chosen = stored[rows]
                    if chosen.size:
                        owner[chosen] = index
                        position[chosen] = rows
                        held.append(chosen)
                        pages = store.reader.open(manifest, PAGES, step)
                        try:
                            sums = store.reader.page_sums(manifest, step)
                        except BaseException:
                            pages.close()
                            raise
                        layers[index] = _Layer(manifest, pages, sums)
                    if index == 0:
                        break  # the oldest: nothing is left to decide
                    if decided is None:
                        decided = np.zeros(total, dtype=np.bool_)
                    decided[stored] = True
                    for n, part in enumerate(parts):
                        decided[part.zeroed.astype(np.int64) + int(starts[n])] = True
                    if decided.all():
                        break
                prelude = store.reader.read_small(newest, PRELUDE, step)
                device = store.reader.read_small(newest, DEVICE, step)
                codec = store.codec(step)
            except BaseException:
                for layer in layers.values():
                    layer.pages.close()
                raise
        stored = held[0] if len(held) == 1 else np.sort(np.concatenate(held or [starts[:0]]))
        return cls(
            store.store_id or "", chain, layers, blocks, owner, position, stored, prelude,
            device, codec,
        )  # fmt: skip

    def close(self) -> None:
        for layer in self._layers.values():
            layer.pages.close()

    def __enter__(self) -> PageSource:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def stored_bytes(self) -> int:
        """The bytes of every page some layer holds (what a push sends)."""
        return int(self.stored.size) * PAGE_SIZE

    def push_order(self, chunk: int) -> Iterator[npt.NDArray[np.int64]]:
        """Every stored page once, as chunks of at most ``chunk`` global page numbers, in
        the order that reads each layer's pages.bin front to back (layer by layer)."""
        order = np.lexsort((self.position[self.stored], self.owner[self.stored]))
        pages = self.stored[order]
        for start in range(0, pages.size, chunk):
            yield pages[start : start + chunk]

    def reader(self) -> PageReader:
        """A reader with descriptors of its own (one per thread)."""
        files: dict[int, crypt.LayerFile] = {}
        try:
            for index, layer in self._layers.items():
                src = layer.pages
                fd = os.dup(src.fd)
                try:
                    files[index] = self._codec.reader(fd, src.size, src.layer, src.name, STEP)
                except BaseException:
                    os.close(fd)
                    raise
        except BaseException:
            for each in files.values():
                each.close()
            raise
        return PageReader(self, files)


class PageReader:
    """Reads pages of a :class:`PageSource`, each checked against its digest."""

    def __init__(self, source: PageSource, files: dict[int, crypt.LayerFile]) -> None:
        self.source = source
        self._files = files

    def close(self) -> None:
        for each in self._files.values():
            each.close()

    def __enter__(self) -> PageReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def read(self, pages: npt.NDArray[np.int64], out: npt.NDArray[np.uint8]) -> None:
        """Pages ``pages`` (global numbers of stored pages) into the rows of ``out``
        (len(pages), PAGE_SIZE), each checked against its digest; CorruptLayerError if one
        does not match (``out`` is then not to be used)."""
        source = self.source
        owners = source.owner[pages]
        if pages.size and int(owners.min()) == ZERO:
            raise ValueError("a page no layer holds (it is zero) was asked for")
        for index in distinct(owners).tolist():
            rows = np.flatnonzero(owners == index) if len(self._files) > 1 else None
            chosen = pages if rows is None else pages[rows]
            positions = source.position[chosen]
            order = None
            if positions.size > 1 and bool(np.any(positions[1:] < positions[:-1])):
                order = np.argsort(positions, kind="stable")
                positions = positions[order]
            target = (
                out
                if rows is None and order is None
                else np.empty((positions.size, PAGE_SIZE), dtype=np.uint8)
            )
            layer = source._layers[index]
            self._files[index].read_pages(positions, target)
            found = fmt.page_digests(target)
            bad = np.flatnonzero((found != layer.sums[positions]).any(axis=1))
            if bad.size:
                raise CorruptLayerError(
                    f"{PAGES}: page {int(positions[int(bad[0])])} (of "
                    f"{layer.manifest.pages_stored} stored) does not match its digest in {SUMS}",
                    layer=layer.manifest.id,
                    step=STEP,
                )
            if target is out:
                continue
            placed = np.empty(positions.size, dtype=np.int64)
            where = np.arange(pages.size) if rows is None else rows
            placed[:] = where if order is None else where[order]
            out[placed] = target
