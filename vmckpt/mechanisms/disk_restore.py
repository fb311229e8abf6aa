"""Writable disks of a restored guest: rebuilt from the layers in O(changes), never touching
the original.

Each writable disk is a qcow2 overlay in the restore's own directory whose backing image is
the disk's *base* — the layer below that holds the disk in full, written out once per host as
a read-only raw image in this host's data directory of the store and shared by every restore
and clone of the layers above it (vmckpt/images/disks.py, :func:`~vmckpt.images.disks.shared_base`).
The deltas of the layers between that base and the restored one are written into the overlay
(through a qemu-storage-daemon, vmckpt/machine/nbd.py): a restore writes what changed since
the base, not the disk. The restored QEMU writes into the overlay only. The dirty bitmap the
layer recorded is recreated in the restored QEMU so its next checkpoint is incremental.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vmckpt import log
from vmckpt.errors import QMPError, RestoreError
from vmckpt.images import LayerManifest, Store
from vmckpt.images.disks import (
    BASE_MODE,
    OVERLAY_SUFFIX,
    DiskPlan,
    delta_extents,
    disk_plan,
    overlay_names,
    shared_base,
)
from vmckpt.machine.binary import qemu_img
from vmckpt.machine.nbd import ImageWriter
from vmckpt.machine.spec import DiskSpec
from vmckpt.qmp import Monitor

_PREFIX = "disk-"
CLUSTER_SIZE = 65536  # the overlay's, as the capture's backup targets (deltas come in these)
_TEMPLATE_MAX = 1 << 20  # an empty overlay's header and tables: ~200 KiB
_log = log.get(__name__)


@dataclass
class DiskRestoreStats:
    """What rebuilding a restore's disks wrote: bases made now (bytes of their deltas),
    delta data written into overlays, bytes zeroed there."""

    bases_made: int = 0
    base_bytes: int = 0
    delta_bytes: int = 0
    zeroed_bytes: int = 0


def materialize(
    store: Store,
    manifest: LayerManifest,
    disks: Sequence[DiskSpec],
    directory: Path,
    *,
    vm: str,
    stats: DiskRestoreStats | None = None,
) -> tuple[DiskSpec, ...]:
    """Build each writable disk as it was at ``manifest``'s layer in ``directory`` (a qcow2
    overlay on the disk's shared base, the later deltas written into it); check read-only
    ones. Returns the disks the restored QEMU uses; on failure removes what it made (never a
    shared base: a base is complete once it exists, and others may use it)."""
    result: list[DiskSpec] = []
    made: list[Path] = []
    stats = stats if stats is not None else DiskRestoreStats()
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
            overlay = directory / f"{_PREFIX}{disk.id}-{manifest.id}-{secrets.token_hex(2)}.qcow2"
            base = build_overlay(store, manifest.id, disk.id, overlay, vm=vm, stats=stats)
            made.append(overlay)
            result.append(replace(disk, path=str(overlay), format="qcow2", backing=str(base)))
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        raise
    return tuple(result)


def build_overlay(
    store: Store,
    layer_id: str,
    disk_id: str,
    overlay: Path,
    *,
    vm: str,
    stats: DiskRestoreStats | None = None,
    base_dir: Path | None = None,
) -> Path:
    """Disk ``disk_id`` at ``layer_id`` as a new qcow2 image ``overlay`` (0600, a name that
    must not exist) on the disk's shared base (made if missing: in this host's data
    directory of the store, or ``base_dir``); returns the base's path. On failure the
    overlay is removed (if this made it)."""
    stats = stats if stats is not None else DiskRestoreStats()
    with store.reading("restore a disk"):
        plan = disk_plan(store, layer_id, disk_id)
        base, made = shared_base(store, plan, base_dir)
        if made:
            stats.bases_made += 1
            stats.base_bytes += plan.base_record.bytes_stored
        # The name is taken with O_EXCL (never an existing file, nor a link planted there),
        # then the empty overlay is written into it.
        try:
            fd = os.open(overlay, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise RestoreError(f"cannot make {overlay}: {exc.strerror or exc}", vm=vm,
                               layer=layer_id, step="compose-disk") from exc  # fmt: skip
        try:
            if base_dir is None:  # in the data directory: its template beside it
                with os.fdopen(os.dup(fd), "wb") as out:
                    out.write(_overlay_template(base, plan.size, vm=vm))
            else:
                os.close(fd)
                fd = -1
                _create_overlay(overlay, base, plan.size, vm=vm)
            if plan.deltas:
                apply_deltas(store, plan, overlay, vm=vm, stats=stats)
        except BaseException:
            overlay.unlink(missing_ok=True)
            raise
        finally:
            if fd >= 0:
                os.close(fd)
    return base


def _create_overlay(path: Path, base: Path, size: int, *, vm: str) -> None:
    qemu_img(
        "create", "-q", "-f", "qcow2", "-o", f"cluster_size={CLUSTER_SIZE}",
        "-F", "raw", "-b", str(base), str(path), str(size), vm=vm, step="compose-disk",
    )  # fmt: skip


def _overlay_template(base: Path, size: int, *, vm: str) -> bytes:
    """The bytes of an empty overlay on ``base`` (a shared base in the data directory): kept
    beside it, made by qemu-img the first time. Used only if it is this user's read-only
    regular file naming ``base`` as its backing file and ``size`` as its own; else remade
    (it holds nothing but what qemu-img writes for these two)."""
    template = base.with_name(base.name + OVERLAY_SUFFIX)
    with contextlib.suppress(OSError):
        fd = os.open(template, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        try:
            info = os.fstat(fd)
            if (
                stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid()
                and stat.S_IMODE(info.st_mode) == BASE_MODE and info.st_nlink == 1
                and info.st_size <= _TEMPLATE_MAX
            ):  # fmt: skip
                data = os.pread(fd, _TEMPLATE_MAX, 0)
                if overlay_names(data, base, size):
                    return data
        finally:
            os.close(fd)
    temporary = template.with_name(f".tmp-{template.name}-{secrets.token_hex(4)}")
    try:
        _create_overlay(temporary, base, size, vm=vm)
        temporary.chmod(BASE_MODE)
        data = temporary.read_bytes()
        if not overlay_names(data, base, size):
            raise RestoreError(f"qemu-img made an overlay of {base} that does not name it",
                               vm=vm, step="compose-disk")  # fmt: skip
        os.rename(temporary, template)  # the same bytes as any other restore's: last one stays
    finally:
        temporary.unlink(missing_ok=True)
    return data


def apply_deltas(
    store: Store, plan: DiskPlan, overlay: Path, *, vm: str, stats: DiskRestoreStats
) -> None:
    """Write the plan's deltas, oldest first, into ``overlay`` (the caller holds the chain's
    read lock; a delta whose data does not check raises and the overlay must go)."""
    # Not synced: the restored QEMU reads the overlay through the page cache, and its guest's
    # flushes sync the file (these writes with it); after a host crash the restore is gone
    # anyway, its overlay with it.
    with ImageWriter(overlay, "qcow2", vm=vm, step="compose-disk", durable=False) as writer:
        for manifest in plan.deltas:
            for offset, length, data in delta_extents(store, manifest, plan.disk_id):
                if data is None:
                    writer.write_zeroes(offset, length)
                else:
                    writer.write(offset, data)
        stats.delta_bytes += writer.written
        stats.zeroed_bytes += writer.zeroed
    _log.debug("%s: disk %s: %d bytes of %d deltas written over base layer %s", vm,
               plan.disk_id, writer.written, len(plan.deltas), plan.base.id)  # fmt: skip


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
