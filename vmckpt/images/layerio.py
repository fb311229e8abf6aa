"""The files of a store's layers: the one code that opens, creates, renames and removes them.

A store may sit on a shared disk or come from another host, so everything in it is untrusted
input (docs/SECURITY.md). Every file here is therefore reached through directory descriptors
(vmckpt.fsutil.Dir): the store's root is opened once, ``layers/`` and each layer directory
relative to it without following a link, and every file relative to its directory, never
following a link either, opened non-blocking (a FIFO cannot hang a reader) and checked to be
a regular file with no other hard link before a byte of it is read. A directory renamed or
replaced by a link after it was opened changes nothing; a file planted as a link or a hard
link to a file outside the store is refused, never followed, written or shown.

- :class:`StoreFiles`: the store's directories, its small files at the root (marker,
  catalog) and the life of a layer directory: made as ``layers/.tmp-<id>-<random>/`` and
  locked while written (:class:`TempLayer`), renamed into place, swapped with a new version,
  moved aside to be removed.
- :class:`LayerReader`: a committed layer's listed files, each checked against its
  manifest as it is read (size, SHA-256, index, page digests), in the clear or decrypted
  (crypt.py): what the store and chain maintenance read.
- :class:`LayerWriter`: a new layer's files written into a :class:`TempLayer`, its seal,
  then its manifest: what a checkpoint, a received copy and chain maintenance write.

The borg split: this module is the store's LoggedIO, vmckpt/images/store.py its Repository.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vmckpt import locks
from vmckpt.errors import CorruptLayerError, StoreError, VmckptError
from vmckpt.fsutil import DIR_MODE, FILE_MODE, Dir, exchange_at, read_regular
from vmckpt.images import crypt
from vmckpt.images import format as fmt
from vmckpt.images.format import (
    DEVICE,
    INDEX,
    LAYER_ID_RE,
    MANIFEST,
    PAGES,
    PRELUDE,
    SUMS,
    BlockIndex,
    DiskDelta,
    FileEntry,
    LayerContent,
    LayerManifest,
)
from vmckpt.images.keys import SEAL
from vmckpt.lazy_numpy import np
from vmckpt.ram import PAGE_SIZE, PageNumbers, PageSet, RamBlock, RamImage, SpilledPages

if TYPE_CHECKING:
    import numpy.typing as npt

LAYERS_DIR = "layers"
TMP_PREFIX = ".tmp-"
CHUNK_PAGES = 16384  # pages copied per step when writing or composing: 64 MiB at most
MAX_MANIFEST_BYTES = 16 << 20  # a manifest (the guest spec included) is kilobytes


def _why(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "is a symbolic link (refused)"
    if exc.errno == errno.ENOTDIR:
        return "is not a directory (refused)"
    return exc.strerror or str(exc)


# --- the store's directories --------------------------------------------------------------


class TempLayer:
    """A layer directory being written: ``layers/.tmp-<id>-<random>/``, open (its descriptor
    also holds the lock that tells ``gc`` it is in use), files made in it by name relative to
    it, each new (O_EXCL), never through a link."""

    def __init__(self, directory: Dir, layer_id: str) -> None:
        self.dir = directory
        self.layer_id = layer_id

    @property
    def name(self) -> str:
        return self.dir.path.name

    def new_file(self, name: str) -> int:
        """A new file in the layer, 0600, that must not exist yet (borg: open with "x")."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(name, flags, FILE_MODE, dir_fd=self.dir.fd)
        os.fchmod(fd, FILE_MODE)  # whatever the umask
        return fd

    def write(
        self, name: str, chunks: Iterable[Any], codec: crypt.Codec = crypt.PLAIN
    ) -> FileEntry:
        """Write buffers to a new file of the layer as ``codec`` holds them, fsync it, and
        return the size and sha256 of the content written."""
        return write_chunks(self.new_file(name), chunks, codec, self.layer_id, name)

    def sync(self) -> None:
        os.fsync(self.dir.fd)

    def close(self) -> None:
        self.dir.close()


def write_chunks(
    fd: int, chunks: Iterable[Any], codec: crypt.Codec, layer_id: str, name: str
) -> FileEntry:
    """Write buffers into the new file ``fd`` (closed after) as ``codec`` holds them, fsync,
    return the content's size and sha256."""
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out:
        writer = codec.writer(out, layer_id, name)
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            writer.write(view)
            digest.update(view)
            size += view.nbytes
        writer.finish()
        out.flush()
        os.fsync(out.fileno())
    return FileEntry(size=size, sha256=digest.hexdigest())


class StoreFiles:
    """A store directory, its root opened once (the path the user gave, resolved then) and
    every entry reached relative to it (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._root: Dir | None = None
        self._layers: Dir | None = None

    @property
    def root(self) -> Dir:
        if self._root is None:
            try:
                self._root = Dir.open(self.path, follow=True)
            except OSError as exc:
                raise StoreError(f"{self.path}: {_why(exc)}", step="open") from exc
        return self._root

    @property
    def layers(self) -> Dir:
        """``layers/``, a real directory of the store (StoreError if it is a link)."""
        if self._layers is None:
            try:
                self._layers = self.root.sub(LAYERS_DIR)
            except OSError as exc:
                raise StoreError(f"{self.path / LAYERS_DIR} {_why(exc)}", step="open") from exc
        return self._layers

    def has_layers_dir(self) -> bool:
        return self.root.is_dir(LAYERS_DIR)

    def close(self) -> None:
        for directory in (self._layers, self._root):
            if directory is not None:
                directory.close()
        self._layers = self._root = None

    # -- small files at the root (the marker, the catalog) --------------------------------

    def read_root_file(self, name: str, limit: int) -> bytes:
        """A regular file of the store's root of at most ``limit`` bytes (OSError if not)."""
        return read_regular(name, limit, dir_fd=self.root.fd)

    def root_stamp(self, name: str) -> tuple[int, int, int]:
        """(inode, mtime, size) of a root file: a new version has a new stamp."""
        info = self.root.lstat(name)
        return (info.st_ino, info.st_mtime_ns, info.st_size)

    def replace_root_file(self, name: str, data: bytes) -> None:
        """Replace a root file atomically: a new, uniquely named temporary file beside it
        (0600, O_EXCL), fsynced, renamed over it, the root fsynced."""
        temporary = f"{TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(temporary, flags, FILE_MODE, dir_fd=self.root.fd)
        try:
            os.fchmod(fd, FILE_MODE)
            write_chunks(fd, [data], crypt.PLAIN, "", name)
            os.rename(temporary, name, src_dir_fd=self.root.fd, dst_dir_fd=self.root.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=self.root.fd)
            raise
        os.fsync(self.root.fd)

    def lock_file(self, name: str) -> Path:
        """A lock file's path at the root (locks.hold opens it without following a link)."""
        return self.path / name

    # -- layer directories --------------------------------------------------------------

    def layer_names(self) -> list[str]:
        """Every layer directory (a name of the layer-id pattern; not a link)."""
        if not self.has_layers_dir():
            return []
        layers = self.layers
        return [n for n in layers.names() if LAYER_ID_RE.match(n) and layers.is_dir(n)]

    def entry_names(self) -> list[str]:
        """Every entry of ``layers/``, temporaries included."""
        return self.layers.names() if self.has_layers_dir() else []

    def is_layer_dir(self, layer_id: str) -> bool:
        return (
            bool(LAYER_ID_RE.match(layer_id))
            and self.has_layers_dir()
            and (self.layers.is_dir(layer_id))
        )

    def open_layer(self, layer_id: str, step: str) -> Dir:
        """A layer directory, opened without following a link."""
        if not LAYER_ID_RE.match(layer_id):
            raise StoreError(f"{layer_id!r} is not a layer id", step=step)
        try:
            return self.layers.sub(layer_id)
        except FileNotFoundError as exc:
            raise StoreError(f"no such layer in {self.path}", layer=layer_id, step=step) from exc
        except OSError as exc:
            raise CorruptLayerError(
                f"the layer directory {_why(exc)}", layer=layer_id, step=step
            ) from exc

    def read_layer_file(self, layer_id: str, name: str, limit: int, step: str) -> bytes:
        """A small file of a layer (manifest.json, manifest.mac) as stored: a regular file of
        its own, at most ``limit`` bytes. FileNotFoundError if it is missing."""
        with self.open_layer(layer_id, step) as directory:
            try:
                return read_regular(name, limit, dir_fd=directory.fd)
            except FileNotFoundError:
                raise
            except OSError as exc:
                raise CorruptLayerError(f"{name}: {_why(exc)}", layer=layer_id, step=step) from exc

    def open_layer_file(self, layer_id: str, name: str, step: str) -> tuple[int, os.stat_result]:
        """A listed file of a layer, open for reading: a regular file of its own (never a
        link, never a file with other hard links: it may be one outside the store)."""
        with self.open_layer(layer_id, step) as directory:
            try:
                fd = os.open(
                    name,
                    os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                    dir_fd=directory.fd,
                )
            except FileNotFoundError as exc:
                raise CorruptLayerError(f"{name} is missing", layer=layer_id, step=step) from exc
            except OSError as exc:
                why = "is not a regular file" if exc.errno == errno.ELOOP else _why(exc)
                raise CorruptLayerError(f"{name} {why}", layer=layer_id, step=step) from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CorruptLayerError(f"{name} is not a regular file", layer=layer_id, step=step)
            if info.st_nlink != 1:
                # It may be a file outside the store: nothing of it is read or shown.
                raise CorruptLayerError(
                    f"{name} has other hard links (refused)", layer=layer_id, step=step
                )
        except BaseException:
            os.close(fd)
            raise
        return fd, info

    def replace_layer_file(self, layer_id: str, name: str, data: bytes) -> None:
        """Replace a small file of a committed layer atomically (a seal, by `init --adopt`)."""
        with self.open_layer(layer_id, "write") as directory:
            temporary = f"{TMP_PREFIX}{name}-{os.getpid()}-{secrets.token_hex(4)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(temporary, flags, FILE_MODE, dir_fd=directory.fd)
            try:
                write_chunks(fd, [data], crypt.PLAIN, layer_id, name)
                os.rename(temporary, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(temporary, dir_fd=directory.fd)
                raise
            os.fsync(directory.fd)

    def new_temporary(self, layer_id: str) -> TempLayer:
        """A new temporary layer directory for ``layer_id``, made (0700) and locked."""
        name = f"{TMP_PREFIX}{layer_id}-{secrets.token_hex(4)}"
        layers = self.layers
        os.mkdir(name, DIR_MODE, dir_fd=layers.fd)
        try:
            directory = layers.sub(name)
            os.fchmod(directory.fd, DIR_MODE)  # whatever the umask
            locks.lock_fd(directory.fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rmdir(name, dir_fd=layers.fd)
            raise
        return TempLayer(directory, layer_id)

    def temporary_in_use(self, name: str) -> bool:
        """Whether a live process holds the lock of a temporary layer directory."""
        try:
            directory = self.layers.sub(name)
        except OSError:
            return False
        with directory:
            return locks.fd_locked(directory.fd)

    def publish(self, temp: TempLayer, layer_id: str) -> None:
        """Rename a complete temporary layer to ``layers/<id>`` (never over an entry)."""
        layers = self.layers
        if os.path.lexists(f"/proc/self/fd/{layers.fd}/{layer_id}"):
            raise StoreError(f"{self.path / LAYERS_DIR / layer_id} exists already",
                             layer=layer_id, step="write")  # fmt: skip
        os.rename(temp.name, layer_id, src_dir_fd=layers.fd, dst_dir_fd=layers.fd)
        os.fsync(layers.fd)

    def unpublish(self, layer_id: str) -> None:
        """Remove a layer directory just renamed into place (its commit failed)."""
        self.layers.remove(layer_id)

    def exchange(self, first: str, second: str) -> None:
        """Swap two entries of ``layers/`` atomically (renameat2 RENAME_EXCHANGE)."""
        exchange_at(self.layers.fd, first, second, self.path / LAYERS_DIR)

    def bury(self, layer_id: str) -> str:
        """Move a layer aside, invisible at once, to be removed: returns its new name."""
        grave = f"{TMP_PREFIX}{layer_id}-removed-{secrets.token_hex(4)}"
        layers = self.layers
        os.rename(layer_id, grave, src_dir_fd=layers.fd, dst_dir_fd=layers.fd)
        return grave

    def remove(self, name: str) -> None:
        """Remove an entry of ``layers/`` (a directory with everything in it; a link as a
        link), never following a link."""
        with contextlib.suppress(OSError):
            self.layers.remove(name)

    def sync_layers(self) -> None:
        os.fsync(self.layers.fd)

    def mkdir_layers(self) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(LAYERS_DIR, DIR_MODE, dir_fd=self.root.fd)


# --- reading a layer -------------------------------------------------------------------------


def check_digest(manifest: LayerManifest, name: str, found: str, step: str) -> None:
    expected = manifest.files[name].sha256
    if found != expected:
        raise CorruptLayerError(
            f"{name}: sha256 mismatch (expected {expected}, found {found})",
            layer=manifest.id,
            step=step,
        )


@dataclass(frozen=True)
class LayerIndex:
    """A layer's decoded pages.idx and, from format 1.2, its pages.sum rows."""

    parts: list[BlockIndex]
    sums: npt.NDArray[np.uint8] | None


def check_page_sums(
    manifest: LayerManifest,
    index: LayerIndex,
    positions: npt.NDArray[Any],
    pages: npt.NDArray[np.uint8],
    step: str,
) -> None:
    """The pages read from pages.bin ``positions`` match their pages.sum digests."""
    assert index.sums is not None
    found = fmt.page_digests(pages)
    bad = np.flatnonzero((found != index.sums[positions]).any(axis=1))
    if bad.size:
        position = int(positions[int(bad[0])])
        raise CorruptLayerError(
            f"{PAGES}: page {position} (of {manifest.pages_stored} stored) does not match its "
            f"digest in {SUMS}",
            layer=manifest.id,
            step=step,
        )


@dataclass(frozen=True)
class CheckedLayer:
    """A layer whose files matched its manifest, with its decoded index and small files."""

    manifest: LayerManifest
    parts: list[BlockIndex]
    prelude: bytes
    device: bytes


class LayerReader:
    """The listed files of committed layers, read and checked against their manifests, as
    the store holds them (``codec``: in the clear or encrypted)."""

    def __init__(self, files: StoreFiles, codec: Callable[[str], crypt.Codec]) -> None:
        self.files = files
        self._codec = codec
        # Files read and checked ahead (prefetch), by (layer, name, listed sha256): taken
        # once by read_small. Only a manifest listing that very digest finds one.
        self._checked: dict[tuple[str, str, str], bytes] = {}

    def open(self, manifest: LayerManifest, name: str, step: str) -> crypt.LayerFile:
        """A listed file, checked to be a regular file of its own of the listed size (in an
        encrypted store: the size that holds the listed size encrypted)."""
        entry = manifest.files[name]
        codec = self._codec(step)
        fd, info = self.files.open_layer_file(manifest.id, name, step)
        try:
            expected = codec.disk_size(entry.size)
            if info.st_size != expected:
                hint = " (truncated?)" if info.st_size < expected else ""
                listed = (
                    f"manifest says {entry.size}"
                    if codec.encryption is None
                    else f"{expected} expected for the {entry.size} bytes the manifest lists, "
                    "encrypted"
                )
                raise CorruptLayerError(
                    f"{name} is {info.st_size} bytes, {listed}{hint}",
                    layer=manifest.id,
                    step=step,
                )
            return codec.reader(fd, entry.size, manifest.id, name, step)
        except BaseException:
            os.close(fd)
            raise

    def check_present(self, manifest: LayerManifest, name: str, step: str) -> None:
        """A listed file of a layer: present, a regular file, of the listed size."""
        self.open(manifest, name, step).close()

    def read_small(self, manifest: LayerManifest, name: str, step: str) -> bytes:
        """A small listed file (index, digests, prelude, device state), checked: size, sha256."""
        ahead = self._checked.pop((manifest.id, name, manifest.files[name].sha256), None)
        if ahead is not None:
            return ahead
        with self.open(manifest, name, step) as src:
            data = src.read_all()
        check_digest(manifest, name, hashlib.sha256(data).hexdigest(), step)
        return data

    def prefetch(self, chain: Iterable[LayerManifest], names: Iterable[str], step: str) -> None:
        """Read and check ``names`` of each layer of ``chain``, in that order, for read_small
        to return later: run in a thread, it overlaps what another does meanwhile (reading
        and hashing release the GIL). The first error ends it: read_small reads that file
        itself and reports it where it is needed."""
        wanted = tuple(names)
        for manifest in chain:
            for name in wanted:
                if name not in manifest.files:
                    continue
                try:
                    data = self.read_small(manifest, name, step)
                except (VmckptError, OSError):
                    return
                self._checked[(manifest.id, name, manifest.files[name].sha256)] = data

    def drop_prefetched(self) -> None:
        """Forget what prefetch read that nobody took (a layer the open did not need)."""
        self._checked.clear()

    def index(self, manifest: LayerManifest, step: str, sums: bool = True) -> LayerIndex:
        """The layer's decoded page index and (1.2, if ``sums``) page digests, both checked."""
        parts = fmt.decode_index(self.read_small(manifest, INDEX, step), manifest, step)
        stored = sum(part.stored.size for part in parts)
        if manifest.files[PAGES].size != stored * PAGE_SIZE:
            raise CorruptLayerError(
                f"{PAGES}: manifest says {manifest.files[PAGES].size} bytes, but the index "
                f"stores {stored} pages ({stored * PAGE_SIZE} bytes)",
                layer=manifest.id,
                step=step,
            )
        digests = None
        if sums and manifest.has_page_sums:
            digests = self.page_sums(manifest, step)
        return LayerIndex(parts, digests)

    def page_sums(self, manifest: LayerManifest, step: str) -> npt.NDArray[np.uint8]:
        return fmt.decode_sums(self.read_small(manifest, SUMS, step), manifest, step)

    def disk_index(self, manifest: LayerManifest, record: fmt.DiskRecord, step: str) -> Any:
        data = self.read_small(manifest, record.index_file, step)
        return fmt.decode_disk_index(data, record, manifest.id, step)

    def check(self, manifest: LayerManifest, step: str) -> CheckedLayer:
        """Check every file of a layer against its manifest, all of it: sizes and sha256 of
        every file, the index, and (1.2) every page against its digest."""
        layer_id = manifest.id
        for name in sorted(manifest.files):
            self.check_present(manifest, name, step)
        index = self.index(manifest, step)
        small = {name: self.read_small(manifest, name, step) for name in (PRELUDE, DEVICE)}
        for name in sorted(manifest.files):
            if name in (PAGES, INDEX, SUMS, PRELUDE, DEVICE):
                continue
            if name.startswith("disk-") and name.endswith(".bin"):
                with self.open(manifest, name, step) as src:
                    check_digest(manifest, name, src.sha256(), step)
            else:
                small[name] = self.read_small(manifest, name, step)
        self._check_pages(manifest, index, step)
        for disk in manifest.disks:
            fmt.decode_disk_index(small[disk.index_file], disk, layer_id, step)
        return CheckedLayer(manifest, index.parts, small[PRELUDE], small[DEVICE])

    def _check_pages(self, manifest: LayerManifest, index: LayerIndex, step: str) -> None:
        """pages.bin read once: its sha256, and (1.2) each page against pages.sum."""
        total = manifest.pages_stored
        digest = hashlib.sha256()
        scratch = np.empty((min(total, CHUNK_PAGES), PAGE_SIZE), dtype=np.uint8)
        first_bad: CorruptLayerError | None = None
        with self.open(manifest, PAGES, step) as src:
            for start in range(0, total, CHUNK_PAGES):
                buf = scratch[: min(CHUNK_PAGES, total - start)]
                src.pread_into(buf, start * PAGE_SIZE)
                digest.update(buf.data)
                if index.sums is not None and first_bad is None:
                    positions = np.arange(start, start + buf.shape[0])
                    try:
                        check_page_sums(manifest, index, positions, buf, step)
                    except CorruptLayerError as exc:
                        first_bad = exc
        # The file's own checksum speaks first; a page that matches no digest in a file
        # that matches its checksum means a wrong pages.sum.
        check_digest(manifest, PAGES, digest.hexdigest(), step)
        if first_bad is not None:
            raise first_bad


# --- writing a layer -------------------------------------------------------------------------


def _file_chunks(path: Path, expected: int) -> Iterable[bytes]:
    """The bytes of a scratch file (this host's), exactly ``expected`` of them."""
    got = 0
    with open(path, "rb") as src:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            got += len(chunk)
            yield chunk
    if got != expected:
        raise StoreError(f"{path} holds {got} bytes, its extents need {expected}", step="write")


@dataclass(frozen=True)
class DiskWrite:
    """A disk delta to write into a layer: its record's fields, and its data as chunks (the
    stored extents' bytes, concatenated in order)."""

    id: str
    format: str
    size: int
    path: str
    full: bool
    stored: fmt.Extents
    zeroed: fmt.Extents
    bitmap: str | None
    chunks: Iterable[bytes]

    @classmethod
    def of(cls, delta: DiskDelta) -> DiskWrite:
        stored_bytes = sum(length for _, length in delta.stored)
        return cls(
            delta.id, delta.format, delta.size, delta.path, delta.full, delta.stored,
            delta.zeroed, delta.bitmap, _file_chunks(delta.data_path, stored_bytes),
        )  # fmt: skip


def _write_disks(
    disks: list[DiskWrite],
    files: dict[str, FileEntry],
    write: Callable[[str, Iterable[Any]], FileEntry],
) -> tuple[fmt.DiskRecord, ...]:
    """Write each disk delta's index and data into the layer being built (with ``write``)."""
    records: list[fmt.DiskRecord] = []
    for delta in disks:
        if not fmt.DISK_ID_RE.match(delta.id) or any(r.id == delta.id for r in records):
            raise StoreError(f"disk id {delta.id!r} is not allowed or repeats", step="write")
        problem = fmt.check_extents(delta.stored, delta.zeroed, delta.size)
        if problem:
            raise StoreError(f"disk {delta.id}: {problem}", step="write")
        record = fmt.DiskRecord(
            id=delta.id,
            format=delta.format,
            size=delta.size,
            path=delta.path,
            full=delta.full,
            extents_stored=len(delta.stored),
            extents_zeroed=len(delta.zeroed),
            bytes_stored=sum(length for _, length in delta.stored),
            bytes_zeroed=sum(length for _, length in delta.zeroed),
            bitmap=delta.bitmap,
        )
        files[record.index_file] = write(
            record.index_file, [fmt.encode_disk_index(delta.stored, delta.zeroed)]
        )
        files[record.data_file] = write(record.data_file, delta.chunks)
        if files[record.data_file].size != record.bytes_stored:
            raise StoreError(
                f"disk {delta.id}: {files[record.data_file].size} bytes of data, its extents "
                f"need {record.bytes_stored}",
                step="write",
            )
        records.append(record)
    return tuple(records)


def page_chunks(
    ram: RamImage | PageSet | SpilledPages, parts: list[BlockIndex]
) -> Iterable[npt.NDArray[np.uint8]]:
    """The stored pages in index order, copied out CHUNK_PAGES at a time into one buffer."""
    largest = max((part.stored.size for part in parts), default=0)
    scratch = np.empty((min(largest, CHUNK_PAGES), PAGE_SIZE), dtype=np.uint8)
    for block, part in zip(ram.blocks, parts, strict=True):
        for start in range(0, part.stored.size, CHUNK_PAGES):
            numbers = part.stored[start : start + CHUNK_PAGES]
            buf = scratch[: numbers.size]
            ram.take(block.idstr, numbers, buf)
            yield buf


def _page_numbers(raw: Any, block: RamBlock, what: str) -> PageNumbers:
    """Validate page numbers given for a block; return them sorted, unique, uint32."""
    if raw is None:
        return np.zeros(0, dtype=np.uint32)
    numbers = np.asarray(raw)
    if numbers.ndim != 1 or (numbers.size and numbers.dtype.kind not in "ui"):
        raise StoreError(
            f"{what} of RAM block {block.idstr!r} must be a 1-d array of page numbers",
            step="write",
        )
    if numbers.size == 0:
        return np.zeros(0, dtype=np.uint32)
    low, high = int(numbers.min()), int(numbers.max())
    if low < 0 or high >= block.pages:
        raise StoreError(
            f"{what} of RAM block {block.idstr!r}: page {low if low < 0 else high} is outside "
            f"the block ({block.pages} pages)",
            step="write",
        )
    result: PageNumbers = numbers.astype(np.uint32)
    if result.size > 1 and not bool(np.all(result[1:] > result[:-1])):
        result = np.unique(result)
    return result


class LayerWriter:
    """A new layer's files, written into a :class:`TempLayer` as the store holds them."""

    def __init__(self, codec: crypt.Codec) -> None:
        self.codec = codec

    def write(
        self,
        temp: TempLayer,
        content: LayerContent,
        parts: list[BlockIndex],
        disks: list[DiskWrite],
        *,
        created: str,
        origin: str,
        seal: Callable[[str, str, bytes], bytes],
    ) -> tuple[LayerManifest, bytes]:
        """Write a complete layer into ``temp``: its files, each fsynced, its seal (``seal``
        of the layer id, origin and manifest bytes), then manifest.json, then the
        directory's fsync. Returns the manifest as read back and its bytes."""
        layer_id = temp.layer_id
        sums: list[npt.NDArray[np.uint8]] = []

        def pages() -> Iterable[npt.NDArray[np.uint8]]:
            for chunk in page_chunks(content.ram, parts):
                sums.append(fmt.page_digests(chunk))
                yield chunk

        def write(name: str, chunks: Iterable[Any]) -> FileEntry:
            return temp.write(name, chunks, self.codec)

        files = {PAGES: write(PAGES, pages())}
        files[SUMS] = write(SUMS, sums)
        files[INDEX] = write(INDEX, [fmt.encode_index(parts)])
        files[PRELUDE] = write(PRELUDE, [content.prelude])
        files[DEVICE] = write(DEVICE, [content.epilogue])
        records = _write_disks(disks, files, write)
        manifest = LayerManifest(
            id=layer_id,
            parent=content.parent,
            created=created,
            guest=content.guest,
            spec=content.spec,
            qemu_version=content.qemu_version,
            machine_type=content.machine_type,
            mechanism=content.mechanism,
            ram_section=content.ram_section,
            blocks=tuple(
                fmt.BlockSummary(block.idstr, block.length, part.stored.size, part.zeroed.size)
                for block, part in zip(content.ram.blocks, parts, strict=True)
            ),
            stats=content.stats,
            files=files,
            format_version=(fmt.FORMAT_MAJOR, fmt.LAYER_MINOR),
            disks=records,
        )
        data = fmt.manifest_bytes(fmt.manifest_to_json(manifest))
        # Return what a reader will see (JSON turns tuples into lists, etc.).
        manifest = replace(fmt.parse_manifest(data, layer_id, "write"), origin=origin)
        temp.write(SEAL, [seal(layer_id, origin, data)])
        temp.write(MANIFEST, [data])
        temp.sync()
        return manifest, data


def check_content(content: LayerContent) -> list[BlockIndex]:
    """Validate what is to be written; return each block's index, in block order."""
    ram = content.ram
    names = [block.idstr for block in ram.blocks]
    if len(set(names)) != len(names):
        raise StoreError(f"RAM block names repeat: {names}", step="write")
    unknown = (set(content.pages) | set(content.zeroed)) - set(names)
    if unknown:
        raise StoreError(f"pages given for unknown RAM blocks {sorted(unknown)}", step="write")
    for what, value in (("spec", content.spec), ("stats", content.stats)):
        try:
            fmt.canonical_json(value)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"{what} cannot be stored as JSON: {exc}", step="write") from exc
    parts: list[BlockIndex] = []
    for block in ram.blocks:
        if isinstance(ram, PageSet | SpilledPages):
            stored = _page_numbers(content.pages.get(block.idstr), block, "pages")
            zeroed = _page_numbers(content.zeroed.get(block.idstr), block, "zeroed")
            held = ram.stored.get(block.idstr, np.zeros(0, dtype=np.uint32))
            if np.setdiff1d(stored, held, assume_unique=True).size:
                raise StoreError(
                    f"pages of RAM block {block.idstr!r} are to be stored without their data",
                    step="write",
                )
            if np.intersect1d(stored, zeroed, assume_unique=True).size:
                raise StoreError(
                    f"a page of RAM block {block.idstr!r} is both stored and zeroed", step="write"
                )
            parts.append(BlockIndex(stored=stored, zeroed=zeroed))
            continue
        data = ram.data.get(block.idstr)
        if (
            data is None
            or data.dtype != np.uint8
            or data.shape != (block.pages * PAGE_SIZE,)
            or not data.flags.c_contiguous
        ):
            raise StoreError(
                f"RAM block {block.idstr!r}: data must be {block.pages * PAGE_SIZE} contiguous "
                "uint8 bytes",
                step="write",
            )
        stored = _page_numbers(content.pages.get(block.idstr), block, "pages")
        zeroed = _page_numbers(content.zeroed.get(block.idstr), block, "zeroed")
        both = np.intersect1d(stored, zeroed, assume_unique=True)
        if both.size:
            raise StoreError(
                f"page {int(both[0])} of RAM block {block.idstr!r} is both stored and zeroed",
                step="write",
            )
        words = ram.words_of(block.idstr)
        for start in range(0, zeroed.size, CHUNK_PAGES):
            numbers = zeroed[start : start + CHUNK_PAGES]
            nonzero = words[numbers].any(axis=1)
            if bool(nonzero.any()):
                page = int(numbers[int(np.argmax(nonzero))])
                raise StoreError(
                    f"page {page} of RAM block {block.idstr!r} is listed as zeroed but is not "
                    "all zero",
                    step="write",
                )
        parts.append(BlockIndex(stored=stored, zeroed=zeroed))
    return parts
