"""Writable disks of a restored guest: rebuilt from the layers, never touching the original.

Each writable disk is composed from the chain (vmckpt/images) as a raw base
image beside the guest's runtime files, and the restored QEMU writes into a
qcow2 overlay on top of it, so the base stays exactly what the layer holds
(no full copy into another format). The dirty bitmap the layer recorded is
recreated in the restored QEMU so its next checkpoint is incremental.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from vmckpt.errors import QMPError, RestoreError
from vmckpt.images import LayerManifest, Store
from vmckpt.images.disks import compose_disk
from vmckpt.machine.binary import qemu_img
from vmckpt.machine.spec import DiskSpec
from vmckpt.qmp import Monitor

_PREFIX = "disk-"


def materialize(
    store: Store,
    manifest: LayerManifest,
    disks: Sequence[DiskSpec],
    directory: Path,
    *,
    vm: str,
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


def track_restored(mon: Monitor, disks: Sequence[DiskSpec], manifest: LayerManifest) -> None:
    """In a restored QEMU, before the guest runs: recreate each disk's dirty bitmap under
    the name the layer recorded, so the next checkpoint of it is incremental."""
    writable = [d for d in disks if not d.readonly]
    if not writable:
        return
    with contextlib.suppress(QMPError):  # QEMU < 10 lacks it; its nodes are active anyway
        mon.blockdev_set_active(True)
    for disk in writable:
        record = manifest.disk(disk.id)
        if record is not None and record.bitmap:
            mon.bitmap_add(disk.node, record.bitmap)


def discard_restored(disks: Sequence[DiskSpec], directory: Path) -> None:
    """Remove the images :func:`materialize` made in ``directory`` (a restore failed)."""
    for disk in disks:
        for name in (disk.path, disk.backing):
            path = Path(name) if name else None
            if (
                path is not None
                and not disk.readonly
                and path.parent == directory
                and path.name.startswith(_PREFIX)
            ):
                path.unlink(missing_ok=True)
