"""How vmckpt rebuilt a restored guest's disks before restores in O(changes) (main as of
commit a4fee79, frozen here for benchmarks/disk_restore.py to measure against): every
restore composed the whole disk at the layer as a new raw image (zeroed ranges written as
zeroes) and put a qcow2 overlay on it. Not used by vmckpt itself."""

from __future__ import annotations

import hashlib
import os
import secrets
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from vmckpt.errors import CorruptLayerError, RestoreError, StoreError
from vmckpt.images import LayerManifest, Store
from vmckpt.images import format as fmt
from vmckpt.images.disks import disk_chain
from vmckpt.machine.binary import qemu_img
from vmckpt.machine.spec import DiskSpec
from vmckpt.mechanisms.disk_restore import DiskRestoreStats

_PREFIX = "disk-"


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


def materialize(
    store: Store,
    manifest: LayerManifest,
    disks: Sequence[DiskSpec],
    directory: Path,
    *,
    vm: str,
    stats: DiskRestoreStats | None = None,
) -> tuple[DiskSpec, ...]:
    """Build each writable disk as it was at ``manifest``'s layer in ``directory`` (a raw
    base and a qcow2 overlay); check read-only ones. Returns the disks the restored QEMU
    uses; on failure removes what it made."""
    result: list[DiskSpec] = []
    made: list[Path] = []
    try:
        for disk in disks:
            if disk.readonly:
                disk.check(vm)
                result.append(disk)
                continue
            if manifest.disk(disk.id) is None:
                raise RestoreError(
                    f"holds no contents for writable disk {disk.id}",
                    vm=vm,
                    layer=manifest.id,
                    step="compose-disk",
                )
            stem = directory / f"{_PREFIX}{disk.id}-{manifest.id}-{secrets.token_hex(2)}"
            base = stem.with_suffix(".raw")
            made.append(base)
            compose_disk(store, manifest.id, disk.id, base)
            if stats is not None:
                stats.base_bytes += os.stat(base).st_blocks * 512
            base.chmod(0o400)  # the overlay writes, the base never changes
            overlay = stem.with_suffix(".qcow2")
            made.append(overlay)
            qemu_img(
                "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay),
                str(disk.size), vm=vm, step="compose-disk",
            )  # fmt: skip
            overlay.chmod(0o600)
            result.append(replace(disk, path=str(overlay), format="qcow2", backing=str(base)))
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        raise
    return tuple(result)
