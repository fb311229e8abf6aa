"""A writable disk as it was at a layer (docs/FORMAT.md, *Writable disks*): the chain of deltas
that make it up, and the disk written out as a raw image (a restore's base image)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from vmckpt.errors import CorruptLayerError, StoreError
from vmckpt.images import format as fmt
from vmckpt.images.format import MANIFEST, LayerManifest
from vmckpt.images.store import Store


def disk_chain(store: Store, layer_id: str, disk_id: str) -> list[LayerManifest]:
    """The layers whose deltas make up disk ``disk_id`` at ``layer_id``: from the newest
    layer at or below it that holds the disk in full, up to ``layer_id``."""
    chain = store.chain(layer_id, "compose-disk")
    store.require_sealed(chain, "compose-disk")
    newest = chain[-1].disk(disk_id)
    if newest is None:
        raise StoreError(f"has no disk {disk_id!r}", layer=layer_id, step="compose-disk")
    used: list[LayerManifest] = []
    for manifest in reversed(chain):
        record = manifest.disk(disk_id)
        if record is None or record.size != newest.size:
            raise CorruptLayerError(
                f"{MANIFEST}: disk {disk_id} needs layer {manifest.id}'s delta, which it "
                "lacks (or its size differs)",
                layer=layer_id,
                step="compose-disk",
            )
        used.append(manifest)
        if record.full:
            break
    used.reverse()
    return used


def compose_disk(store: Store, layer_id: str, disk_id: str, target: Path) -> int:
    """Write disk ``disk_id`` as it was at ``layer_id`` into a new raw file ``target``.

    Checks every layer used (manifest, files, index, sha256 of the data while
    reading it) and removes ``target`` on failure. Returns the disk size.
    """
    size = 0
    try:
        with store.reading("compose a disk"), open(target, "xb") as out:
            used = disk_chain(store, layer_id, disk_id)
            for manifest in used:
                record = manifest.disk(disk_id)
                assert record is not None
                size = record.size
                out.truncate(size)
                index_bytes = store.reader.read_small(manifest, record.index_file, "compose-disk")
                store.reader.check_present(manifest, record.data_file, "compose-disk")
                index = fmt.decode_disk_index(index_bytes, record, manifest.id, "compose-disk")
                for offset, length in index.zeroed:
                    out.seek(offset)
                    for start in range(0, length, 1 << 20):
                        out.write(bytes(min(1 << 20, length - start)))
                digest = hashlib.sha256()
                with store.reader.open(manifest, record.data_file, "compose-disk") as src:
                    # The data file holds the stored extents one after the other.
                    chunks = src.chunks()
                    pending = memoryview(b"")
                    for offset, length in index.stored:
                        out.seek(offset)
                        remaining = length
                        while remaining:
                            if not pending:
                                pending = memoryview(next(chunks, b""))
                                if not pending:
                                    raise src.truncated()
                            piece = pending[:remaining]
                            digest.update(piece)
                            out.write(piece)
                            remaining -= len(piece)
                            pending = pending[len(piece) :]
                expected = manifest.files[record.data_file].sha256
                if digest.hexdigest() != expected:
                    raise CorruptLayerError(
                        f"{record.data_file}: sha256 mismatch (expected {expected}, "
                        f"found {digest.hexdigest()})",
                        layer=manifest.id,
                        step="compose-disk",
                    )
            out.flush()
            os.fsync(out.fileno())
    except BaseException as exc:
        target.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise StoreError(
                f"cannot write disk {disk_id} to {target}: {exc}",
                layer=layer_id,
                step="compose-disk",
            ) from exc
        raise
    return size
