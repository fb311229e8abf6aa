"""A writable disk as it was at a layer (docs/FORMAT.md, *Writable disks*): the chain of deltas
that make it up, the disk written out as a raw image, and what a restore in O(changes) needs:

- :func:`disk_plan`: the layer holding the disk in full (its *base*) and the deltas above it;
- :func:`shared_base`: that base written out once per host as a read-only raw image in this
  host's data directory of the store (``disk-bases/<digest>.raw``, named by the digests the
  sealed manifest gives its delta), shared by every restore and clone of any layer above it;
- :func:`delta_extents`: the extents of one layer's delta, checked, for a restore to write
  into the qcow2 overlay it puts on the base (vmckpt/mechanisms/disk_restore.py).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmckpt import locks
from vmckpt.errors import CorruptLayerError, StoreError
from vmckpt.fsutil import fsync_dir
from vmckpt.hostdirs import private_dir
from vmckpt.images import format as fmt
from vmckpt.images.format import MANIFEST, DiskRecord, LayerManifest
from vmckpt.images.store import Store

BASES_DIR = "disk-bases"  # in this host's data directory of a store
BASE_SUFFIX = ".raw"
BASE_MODE = 0o400
BASES_LOCK = ".lock"
# An empty qcow2 overlay on a base, made once beside it: a restore copies it (qemu-img per
# restore cost ~10 ms of a restore's ~100)
OVERLAY_SUFFIX = ".overlay.qcow2"
BASES_LOCK_WAIT_S = 3600.0  # another restore writing a base: wait for it, not fail


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
            for number, manifest in enumerate(used):
                size = _record(manifest, disk_id).size
                out.truncate(size)
                for offset, length, data in delta_extents(store, manifest, disk_id):
                    out.seek(offset)
                    if data is not None:
                        out.write(data)
                    elif number:
                        # The first layer is the full one: the new file reads as zero
                        # already (sparse), so its zeroed ranges are left as they are.
                        for start in range(0, length, 1 << 20):
                            out.write(bytes(min(1 << 20, length - start)))
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


# -- restores in O(changes): a shared base, and the deltas above it --------------------------


@dataclass(frozen=True)
class DiskPlan:
    """Disk ``disk_id`` at a layer: the layer that holds it in full (``base``) and the layers
    whose deltas come on top of it, oldest first (empty when the layer itself is the base)."""

    disk_id: str
    size: int
    base: LayerManifest
    deltas: tuple[LayerManifest, ...]

    @property
    def base_record(self) -> DiskRecord:
        record = self.base.disk(self.disk_id)
        assert record is not None
        return record

    @property
    def delta_bytes(self) -> int:
        """The data bytes the deltas hold (what applying them writes, zeroes aside)."""
        return sum(_record(m, self.disk_id).bytes_stored for m in self.deltas)


def _record(manifest: LayerManifest, disk_id: str) -> DiskRecord:
    record = manifest.disk(disk_id)
    assert record is not None  # disk_chain checked every layer it returns
    return record


def disk_plan(store: Store, layer_id: str, disk_id: str) -> DiskPlan:
    """The base and the deltas of disk ``disk_id`` at ``layer_id`` (the chain authenticated)."""
    used = disk_chain(store, layer_id, disk_id)
    return DiskPlan(disk_id, _record(used[0], disk_id).size, used[0], tuple(used[1:]))


def base_name(manifest: LayerManifest, disk_id: str) -> str:
    """The file name of a layer's full delta of a disk written out: a digest of what the sealed
    manifest says of it (size, SHA-256 of its index and data), so a base is found by content
    and two layers holding the same disk share it."""
    record = _record(manifest, disk_id)
    if not record.full:
        raise StoreError(f"disk {disk_id} is not held in full", layer=manifest.id, step="disk-base")
    text = "\0".join(
        (
            "vmckpt disk base v1",
            str(record.size),
            manifest.files[record.index_file].sha256,
            manifest.files[record.data_file].sha256,
        )
    )
    return hashlib.sha256(text.encode()).hexdigest()[:40] + BASE_SUFFIX


def bases_dir(store: Store) -> Path:
    """This host's directory of shared disk bases of the store (made 0700, checked)."""
    private_dir(store.host.data.parent)
    private_dir(store.host.data)
    return private_dir(store.host.data / BASES_DIR)


def shared_base(store: Store, plan: DiskPlan, directory: Path | None = None) -> tuple[Path, bool]:
    """The plan's base written out as a read-only raw image, made now if it is not there yet;
    and whether it was made now. Where: this host's data directory of the store, or
    ``directory`` (the user's: where a libvirt domain's restored disks go, which libvirt's
    QEMU can read), as ``vmckpt-base-<digest>.raw``.

    It is written to a temporary name (every listed file of the layer checked while it is
    read, see :func:`compose_disk`), made read-only, synced and renamed into place under the
    bases' lock, so a base that exists is complete. One found must be a regular file, mode
    0400, no other link, of the disk's size, and in the data directory this user's (in a
    directory of the user's, libvirt gives its QEMU's user the images it uses, the backing
    ones too, while a domain runs); anything else is refused.
    """
    name = base_name(plan.base, plan.disk_id)
    if directory is None:
        where = bases_dir(store)
    else:
        where, name = directory, f"vmckpt-base-{name}"
    path = where / name
    step = "disk-base"
    with locks.hold(
        bases_dir(store) / BASES_LOCK,
        what=f"write disk base {name}",
        wait_s=BASES_LOCK_WAIT_S,
        busy=f"disk bases of {store.path}: another restore writes one",
    ):
        if _check_base(path, plan.size, plan.base.id, step, own=directory is None):
            return path, False
        temporary = where / f".tmp-{name}-{secrets.token_hex(4)}"
        try:
            compose_disk(store, plan.base.id, plan.disk_id, temporary)
            temporary.chmod(BASE_MODE)
            os.rename(temporary, path)  # no base of this name: checked under the lock
            fsync_dir(where)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return path, True


def _check_base(path: Path, size: int, layer_id: str, step: str, *, own: bool) -> bool:
    """Whether a usable base is at ``path`` (False: none); StoreError if something else is."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}", layer=layer_id, step=step) from exc
    problem = None
    mode = stat.S_IMODE(info.st_mode)
    if not stat.S_ISREG(info.st_mode):
        problem = "is not a regular file"
    elif mode != BASE_MODE or (own and info.st_uid != os.geteuid()):
        problem = f"is not a read-only file of this user's (uid {info.st_uid}, mode {mode:04o})"
    elif info.st_nlink != 1:
        problem = "has another hard link"
    elif info.st_size != size:
        problem = f"is {info.st_size} bytes, not the disk's {size}"
    if problem:
        raise StoreError(f"disk base {path} {problem}: refused (remove it to have it rebuilt)",
                         layer=layer_id, step=step)  # fmt: skip
    return True


QCOW2_MAGIC = b"QFI\xfb"


def backing_name(path: Path) -> str | None:
    """The backing file a qcow2 image names in its header (None: not a qcow2 image, or none).
    Read without following a link; the name is at most 1023 bytes (QEMU's own limit)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        where = _backing_field(os.pread(fd, 20, 0))
        if where is None:
            return None
        offset, size = where
        return os.pread(fd, size, offset).decode(errors="replace")
    finally:
        os.close(fd)


def _backing_field(header: bytes) -> tuple[int, int] | None:
    """Where a qcow2 header says its backing file's name lies (offset, length); None: not
    qcow2, or no name (of at most 1023 bytes, QEMU's own limit)."""
    if len(header) < 20 or header[:4] != QCOW2_MAGIC:
        return None
    offset = int.from_bytes(header[8:16], "big")
    size = int.from_bytes(header[16:20], "big")
    return (offset, size) if offset and 0 < size < 1024 else None


def overlay_names(image: bytes, base: Path, size: int) -> bool:
    """Whether a qcow2 image (its bytes from the start) names ``base`` as its backing file
    and ``size`` as its own virtual size."""
    where = _backing_field(image)
    if where is None or len(image) < 32 or int.from_bytes(image[24:32], "big") != size:
        return False
    offset, length = where
    return image[offset : offset + length] == os.fsencode(base)


def unused_bases(store: Store) -> list[Path]:
    """This host's disk bases of the store that nothing needs any more: no layer of the store
    holds the disk they hold (by their names), and no image in this host's data directory of
    the store is backed by them. The caller holds the chain lock exclusively (no restore is
    building an overlay meanwhile) and the bases' lock."""
    directory = store.host.data / BASES_DIR
    if not directory.is_dir() or directory.is_symlink():
        return []
    wanted: set[str] = set()
    for layer_id in store.layer_ids():
        manifest = store.manifest(layer_id, "gc")
        wanted.update(base_name(manifest, d.id) for d in manifest.disks if d.full)
    used: set[str] = set()
    for dirpath, dirs, files in os.walk(store.host.data):  # never into a link
        dirs[:] = [d for d in dirs if d != BASES_DIR]
        for name in files:
            backing = backing_name(Path(dirpath) / name)
            if backing is not None:
                used.add(os.path.normpath(backing))
    names = sorted(os.listdir(directory))
    bases = [
        name for name in names
        if (name.endswith(BASE_SUFFIX) and name not in wanted
            and os.path.normpath(directory / name) not in used)
        or name.startswith(".tmp-")  # a write the lock no longer covers: a crash's
    ]  # fmt: skip
    kept = {name for name in names if name.endswith(BASE_SUFFIX)} - set(bases)
    templates = [
        name for name in names
        if name.endswith(OVERLAY_SUFFIX) and name.removesuffix(OVERLAY_SUFFIX) not in kept
    ]  # fmt: skip
    return [directory / name for name in sorted(bases + templates)]


def delta_extents(
    store: Store, manifest: LayerManifest, disk_id: str, *, step: str = "compose-disk"
) -> Iterator[tuple[int, int, memoryview | None]]:
    """Layer ``manifest``'s delta of disk ``disk_id``, in the order to apply it: its zeroed
    ranges as ``(offset, length, None)``, then its stored data as ``(offset, length, data)``
    pieces (at most a read's worth each).

    The index is checked before anything is yielded; the data's SHA-256 is checked as it is
    read and a mismatch raises CorruptLayerError after the last piece (in an encrypted store
    every record is authenticated before it is used), so whatever the pieces were written
    into must be discarded when this raises.
    """
    record = _record(manifest, disk_id)
    index_bytes = store.reader.read_small(manifest, record.index_file, step)
    index = fmt.decode_disk_index(index_bytes, record, manifest.id, step)
    for offset, length in index.zeroed:
        yield offset, length, None
    digest = hashlib.sha256()
    with store.reader.open(manifest, record.data_file, step) as src:
        chunks = src.chunks()
        pending = memoryview(b"")
        for offset, length in index.stored:
            remaining = length
            while remaining:
                if not pending:
                    pending = memoryview(next(chunks, b""))
                    if not pending:
                        raise src.truncated()
                piece = pending[:remaining]
                digest.update(piece)
                yield offset, len(piece), piece
                offset += len(piece)
                remaining -= len(piece)
                pending = pending[len(piece) :]
    expected = manifest.files[record.data_file].sha256
    if digest.hexdigest() != expected:
        raise CorruptLayerError(
            f"{record.data_file}: sha256 mismatch (expected {expected}, "
            f"found {digest.hexdigest()})",
            layer=manifest.id,
            step=step,
        )
