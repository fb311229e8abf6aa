"""The parent a precopy-diff checkpoint is diffed against, kept on this host: the guest's RAM
at its head layer in a file of the guest's data directory (private to this host, never in
the store), read a batch of pages at a time (`~vmckpt.ram.RamFile`), so a checkpoint holds
neither the parent nor the received RAM whole.

It is trusted because vmckpt wrote it: from the layer the previous checkpoint wrote (the
received pages applied to the previous parent, O(changed pages)), or composed from the
store, every page checked against its layer's digest as a restore checks it (once, when
the head is another layer than the file holds: a first checkpoint on this host, after a
restore, a COLO checkpoint, another host's layers). Its state file names the layer (id and
creation time) it holds; the state is removed before the file changes and written (after
the file's fsync) once it is complete, so a crash leaves a file that is rebuilt, never one
taken for another layer.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from vmckpt import log
from vmckpt.errors import CheckpointError, VmckptError
from vmckpt.fsutil import open_nofollow, read_json, write_json_atomic
from vmckpt.hostdirs import private_dir
from vmckpt.images import LayerManifest, Store
from vmckpt.lazy_numpy import np
from vmckpt.ram import BATCH_PAGES, PAGE_SIZE, RamBlock, RamFile, SpilledPages

CACHE_DIR = "parent-ram"
RAM_FILE = "ram.bin"
BITMAP_FILE = "nonzero.bin"
STATE_FILE = "state.json"
STATE_VERSION = 1
_log = log.get(__name__)


def _state(manifest: LayerManifest, blocks: list[RamBlock]) -> dict[str, Any]:
    return {
        "version": STATE_VERSION,
        "layer": manifest.id,
        "created": manifest.created,
        "blocks": [[block.idstr, block.length] for block in blocks],
    }


class ParentRam:
    """This host's copy of a guest's RAM at its head layer, open for one checkpoint (a
    context manager: the file is closed on exit). ``ram`` is None for a guest without a
    head (every page is then compared with zero)."""

    def __init__(self, directory: Path, vm: str) -> None:
        self.directory = directory
        self.vm = vm
        self.fd = open_nofollow(directory / RAM_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC)
        os.fchmod(self.fd, 0o600)
        self.ram: RamFile | None = None

    @classmethod
    def open(cls, store: Store, name: str, kind: str, head: LayerManifest | None) -> ParentRam:
        """The guest's RAM at ``head``: the file if it holds that layer, else composed from
        the store into it (O(RAM) reads and checks, in bounded memory)."""
        directory = private_dir(store.host.data_dir(name, kind) / CACHE_DIR)
        parent = cls(directory, name)
        try:
            if head is not None and not parent._load(head):
                parent._compose(store, head)
        except BaseException:
            parent.close()
            raise
        return parent

    def _load(self, head: LayerManifest) -> bool:
        try:
            state = read_json(self.directory / STATE_FILE)
            blocks = [RamBlock(str(idstr), int(length)) for idstr, length in state["blocks"]]
            if state != _state(head, blocks):
                return False
            pages = sum(block.pages for block in blocks)
            bitmap = np.fromfile(self.directory / BITMAP_FILE, dtype=np.bool_)
            if bitmap.shape != (pages,) or os.fstat(self.fd).st_size != pages * PAGE_SIZE:
                return False
        except (OSError, ValueError, TypeError, KeyError):
            return False
        self.ram = RamFile(self.fd, blocks, bitmap)
        return True

    def _compose(self, store: Store, head: LayerManifest) -> None:
        self._invalidate()
        _log.info("%s: composing layer %s into this host's parent image", self.vm, head.id)
        if self.ram is not None:
            self.ram.close()
        self.ram = store.compose_into(head.id, lambda blocks: RamFile.empty(self.fd, blocks))
        self._save(head)

    def _invalidate(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.directory / STATE_FILE)

    def _save(self, layer: LayerManifest) -> None:
        assert self.ram is not None
        os.fdatasync(self.fd)
        self.ram.bitmap.tofile(self.directory / BITMAP_FILE)
        os.chmod(self.directory / BITMAP_FILE, 0o600)
        write_json_atomic(self.directory / STATE_FILE, _state(layer, self.ram.blocks))

    def advance(self, layer: LayerManifest, pages: SpilledPages, zeroed: dict[str, Any]) -> None:
        """The file becomes ``layer``'s RAM: the pages it stores (their data in ``pages``)
        and zeroes applied, O(changed pages). A failure leaves the file to be rebuilt by the
        next checkpoint; it is logged, never raised (the layer is committed already)."""
        try:
            self._invalidate()
            if self.ram is None:
                self.ram = RamFile.empty(self.fd, pages.blocks)
            elif self.ram.blocks != pages.blocks:
                raise CheckpointError("RAM blocks differ", vm=self.vm, step="parent image")
            ram = self.ram
            ram.drop_mapped()
            rows = np.empty((BATCH_PAGES, PAGE_SIZE), dtype=np.uint8)
            for block in pages.blocks:
                stored = pages.stored[block.idstr]
                for start in range(0, stored.size, BATCH_PAGES):
                    numbers = stored[start : start + BATCH_PAGES]
                    pages.take(block.idstr, numbers, rows[: numbers.size])
                    ram.put_pages(block.idstr, numbers, rows[: numbers.size])
                gone = zeroed.get(block.idstr)
                if gone is not None and gone.size:
                    ram.put_zeros(block.idstr, gone)
            self._save(layer)
        except (OSError, VmckptError) as exc:
            _log.warning("%s: this host's parent image not updated (%s)", self.vm, exc)
            self._invalidate()

    def close(self) -> None:
        if self.ram is not None:
            self.ram.close()
        os.close(self.fd)

    def __enter__(self) -> ParentRam:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
