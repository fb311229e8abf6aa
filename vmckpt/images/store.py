"""A store: a directory of immutable, checksummed layers, written crash-safely. This module
owns the store directory: no other module builds a path inside a store. What belongs to
this host while a guest runs (its record, sockets, logs, journals, locks) and this host's
own data for the store (restored disks, scratch, how to reach remote guests) live in the
store's directories on this host (vmckpt/hostdirs.py), reached through the accessors here.

Layout (docs/FORMAT.md has the byte-level specification)::

    store/vmckpt-store.json     marker: {"format": "vmckpt-store", "format_version": [1, 5],
                                         "store_id": "<32 hex digits>"} (an encrypted
                                         store's also "encryption")
    store/catalog.json          the sealed catalog: the store's layers (each with the digest
                                of its manifest) and every guest's head (images/catalog.py)
    store/*.lock                the store, chain and maintenance locks (images/locks.py)
    store/layers/<id>/          one committed layer (manifest.json, manifest.mac, its files)
    store/layers/.tmp-<id>-<r>/ a layer being written or imported; never read, never listed
    store/media/<sha256>/<file> boot media copied from another host, found by content

A layer is the store's once its complete, fsynced directory is renamed into place *and*
the catalog names it: the catalog's write, under the store lock, is the commit point (and
moves the guest's head with it), so a crash leaves the layer either committed with its head
or invisible (``gc`` removes it).

Every layer is sealed (manifest.mac, an HMAC under a key kept outside the
store, vmckpt/images/keys.py) and read back only if the seal holds; nothing in a
store is followed as a symbolic link: a store can come from another host or user
(docs/SECURITY.md).

An encrypted store (``vmckpt init --encrypt``) holds every layer file but manifest.json and
manifest.mac encrypted (vmckpt/images/crypt.py): every read and write of a layer file goes
through the store's codec (``_open_listed``, ``_write_file``), which is a no-op for a store
in the clear. Manifests list the content's sizes and digests either way.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from vmckpt import faults, log
from vmckpt.errors import CorruptLayerError, StoreError
from vmckpt.fsutil import (
    DIR_MODE,
    FILE_MODE,
    fsync_dir,
    make_private_dir,
    open_nofollow,
    read_json,
    read_regular,
    sha256_file,
    write_atomic,
    write_json_atomic,
)
from vmckpt.hostdirs import NAME_RE, HostDirs, host_id
from vmckpt.images import crypt, keys, locks
from vmckpt.images import format as fmt
from vmckpt.images.catalog import (
    CATALOG,
    MAX_CATALOG_BYTES,
    Catalog,
    Head,
    head_key,
    manifest_digest,
)
from vmckpt.images.format import (
    DEVICE,
    INDEX,
    LAYER_ID_RE,
    MANIFEST,
    PAGES,
    PRELUDE,
    STORE_FORMAT,
    SUMS,
    BlockIndex,
    DiskDelta,
    FileEntry,
    LayerContent,
    LayerManifest,
)
from vmckpt.ram import PAGE_SIZE, PageNumbers, PageSet, RamBlock, RamImage

STORE_MARKER = "vmckpt-store.json"
LAYERS_DIR = "layers"
MEDIA_DIR = "media"
TMP_PREFIX = ".tmp-"
STORE_LOCK = "store.lock"
CHAIN_LOCK = "chain.lock"
MAINTENANCE_LOCK = "maintenance.lock"
GUEST_LOCK = "checkpoint.lock"
SCRATCH_DIR = "disk-scratch"  # a guest's checkpoint scratch files (vmckpt/disk_capture.py)
# Where a store of format 1.4 or older kept guests' runtime files and heads (its heads are
# taken into the catalog once, when such a store is first opened by this vmckpt).
LEGACY_HEADS = {"guest": "guests", "libvirt": "libvirt"}
LEGACY_HEAD_FILE = "head.json"
RUNTIME_NAME_RE = NAME_RE
RECORD_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}\.json\Z")
MAX_MARKER_BYTES = 1 << 16
STORE_LOCK_WAIT_S = 60.0  # publishing a layer holds it for milliseconds; maintenance longer

# Pages copied per step when writing or composing: caps the temporary copy at 64 MiB.
CHUNK_PAGES = 16384
MAX_MANIFEST_BYTES = 16 << 20  # a manifest (the guest spec included) is kilobytes
# RAM a layer may describe beyond its guest's memory: video RAM, ROMs, ACPI tables.
RAM_SLACK_BYTES = 1 << 30

_log = log.get(__name__)

# --- durable file primitives ----------------------------------------------


def _mkdir_private(path: Path) -> None:
    os.mkdir(path, DIR_MODE)
    os.chmod(path, DIR_MODE)  # whatever the umask


def _open_new(path: Path) -> int:
    """A new file, 0600, that must not exist yet (borg: open with "x")."""
    fd = open_nofollow(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    os.fchmod(fd, FILE_MODE)
    return fd


def _write_new(
    path: Path, chunks: Iterable[Any], codec: crypt.Codec = crypt.PLAIN, layer: str = ""
) -> FileEntry:
    """Write buffers to a new file as ``codec`` holds them (of layer ``layer``; by default
    in the clear), fsync it, and return the size and sha256 of the content written."""
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(_open_new(path), "wb") as out:
        writer = codec.writer(out, layer, path.name)
        for chunk in chunks:
            view = memoryview(chunk).cast("B")
            writer.write(view)
            digest.update(view)
            size += view.nbytes
        writer.finish()
        out.flush()
        os.fsync(out.fileno())
    return FileEntry(size=size, sha256=digest.hexdigest())


def _write_marker(path: Path, store_id: str, encryption: str | None = None) -> None:
    """Write (or replace) the store marker atomically, naming the store's id and (1.4) its
    encryption."""
    marker: dict[str, Any] = {
        "format": STORE_FORMAT,
        # 1.3: the marker names the store's id, the name of its key (images/keys.py); 1.5:
        # the store has a catalog, which an older reader would ignore (so it refuses it).
        "format_version": [fmt.FORMAT_MAJOR, fmt.CATALOG_MINOR],
        "store_id": store_id,
    }
    if encryption is not None:
        marker["encryption"] = encryption
    tmp = path / f"{TMP_PREFIX}{STORE_MARKER}-{secrets.token_hex(4)}"
    try:
        _write_new(tmp, [fmt.manifest_bytes(marker)])
        os.replace(tmp, path / STORE_MARKER)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path)


def _encryption_text(encryption: str | None) -> str:
    return f"encrypted ({encryption})" if encryption else "not encrypted"


def _real_subdirs(path: Path) -> list[str]:
    """The names (usable as guest names) of the real directories in ``path``."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return []
    return sorted(
        e.name for e in entries if NAME_RE.match(e.name) and e.is_dir(follow_symlinks=False)
    )


def _is_real_dir(path: Path) -> bool:
    """A directory, not a symbolic link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_at_most(fd: int, limit: int) -> bytes:
    """Read from ``fd`` until its end or ``limit`` bytes."""
    chunks = []
    while limit > 0 and (chunk := os.read(fd, min(limit, 1 << 24))):
        chunks.append(chunk)
        limit -= len(chunk)
    return b"".join(chunks)


def _check_digest(manifest: LayerManifest, name: str, found: str, step: str) -> None:
    expected = manifest.files[name].sha256
    if found != expected:
        raise CorruptLayerError(
            f"{name}: sha256 mismatch (expected {expected}, found {found})",
            layer=manifest.id,
            step=step,
        )


@dataclass(frozen=True)
class _LayerIndex:
    """A layer's decoded pages.idx and, from format 1.2, its pages.sum rows."""

    parts: list[BlockIndex]
    sums: npt.NDArray[np.uint8] | None


def _check_page_sums(
    manifest: LayerManifest,
    index: _LayerIndex,
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


@dataclass
class _Coverage:
    """Composing newest first: per RAM block, the pages a newer layer already decided
    (``done``), and which of them its newest record stores (``stored``) or zeroes
    (``zeroed``): what a layer that absorbs others must record."""

    done: dict[str, npt.NDArray[np.bool_]]
    stored: dict[str, npt.NDArray[np.bool_]]
    zeroed: dict[str, npt.NDArray[np.bool_]]
    remaining: int

    @classmethod
    def of(cls, blocks: Iterable[RamBlock]) -> _Coverage:
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
class _Wanted:
    """Pages to read from one layer's pages.bin: their positions there (ascending), and
    where each goes (the number of its RAM block in the image, its page number)."""

    positions: npt.NDArray[np.int64]
    blocks: npt.NDArray[np.int32]
    pages: PageNumbers


def _scatter(
    image: RamImage, rows: npt.NDArray[np.uint8], blocks: npt.NDArray[Any], pages: PageNumbers
) -> None:
    """Copy ``rows`` to their pages: row i to page ``pages[i]`` of block ``blocks[i]``."""
    for number in np.unique(blocks).tolist():
        mine = blocks == number
        image.pages_of(image.blocks[number].idstr)[pages[mine]] = rows[mine]


def _read_whole(
    src: crypt.LayerFile, manifest: LayerManifest, wanted: _Wanted, image: RamImage, step: str
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
    _check_digest(manifest, PAGES, digest.hexdigest(), step)
    _scatter(image, rows, wanted.blocks, wanted.pages)


class _PageBatch:
    """Pages read for a compose from layers with page digests: collected a batch at a time,
    checked against their digests together (hashed by several threads), and only then
    copied into the image."""

    def __init__(self, image: RamImage, step: str) -> None:
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
        wanted: _Wanted,
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


@dataclass(frozen=True)
class _CheckedLayer:
    """A layer whose files matched its manifest, with its decoded index and small files."""

    manifest: LayerManifest
    parts: list[BlockIndex]
    prelude: bytes
    device: bytes


@dataclass
class AdoptResult:
    """What `Store.adopt` did: the store's id, whether its key is new, the layers sealed,
    those that authenticated already, and those refused with the reason."""

    store_id: str
    new_key: bool
    sealed: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


class Store:
    """A vmckpt store on disk: layers (list, resolve, verify, compose, write, import) and the
    runtime files of its guests (records, heads, locks, media)."""

    def __init__(self, path: Path | str) -> None:
        """Open an existing store; StoreError if ``path`` is missing or not a store."""
        self.path = Path(path).expanduser().absolute()
        self._layers = str(self.path / LAYERS_DIR)  # for the paths built per layer and file
        if not self.path.exists():
            raise StoreError(
                f"store {self.path} does not exist (create it with `vmckpt init {self.path}`)",
                step="open",
            )
        marker = self.path / STORE_MARKER
        if not _is_real_dir(self.path) or not marker.is_file() or marker.is_symlink():
            raise StoreError(
                f"{self.path} is not a vmckpt store (it has no {STORE_MARKER})", step="open"
            )
        try:
            obj = read_json(marker, MAX_MARKER_BYTES)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise StoreError(f"{marker}: cannot be read ({exc})", step="open") from exc
        if not isinstance(obj, dict) or obj.get("format") != STORE_FORMAT:
            raise StoreError(f"{marker}: not a vmckpt store marker", step="open")
        version = fmt.parse_version(
            obj.get("format_version"), what=str(marker), layer=None, step="open"
        )
        fmt.check_version(version, what=str(marker), layer=None, step="open")
        store_id = obj.get("store_id")
        if store_id is not None and (
            not isinstance(store_id, str) or not keys.STORE_ID_RE.fullmatch(store_id)
        ):
            raise StoreError(f"{marker}: store_id is not 32 hex digits", step="open")
        encryption = obj.get("encryption")
        if encryption is not None and (
            encryption not in keys.ENCRYPTIONS
            or store_id is None
            or version < (fmt.FORMAT_MAJOR, fmt.ENCRYPTION_MINOR)
        ):
            raise StoreError(
                f"{marker}: encryption {encryption!r} is not one this vmckpt knows "
                f"({', '.join(keys.ENCRYPTIONS)}, format 1.4, with a store id)",
                step="open",
            )
        self.store_id: str | None = store_id
        self.encryption: str | None = encryption
        self.marker_version = version
        self.host = HostDirs.for_store(store_id, self.path)
        self._key: keys.StoreKey | None = None
        self._sealed: crypt.SealedCodec | None = None
        self._catalog_cache: tuple[tuple[int, int, int], Catalog] | None = None
        self._lock_owner: int | None = None

    @classmethod
    def create(cls, path: Path | str, *, parents: bool = False, encrypt: bool = False) -> Store:
        """Create a store at ``path``, or open it if it is one already.

        Only the last component is created unless ``parents``: a missing parent
        directory is refused (a typo in a store path must not create a store
        somewhere unexpected), as is a non-empty directory that is not a store.
        The marker file is written last, atomically, so a half-created store is
        not a store. ``encrypt``: its layer files are encrypted (crypt.py); an
        existing store that is not is refused (a store is never converted in place).
        """
        path = Path(path).expanduser().absolute()
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        if not path.parent.is_dir():
            raise StoreError(
                f"cannot create store {path}: its parent directory {path.parent} does not exist",
                step="create",
            )
        try:
            if not path.exists():
                _mkdir_private(path)
            if (path / STORE_MARKER).exists():
                store = cls(path)
                if encrypt and not store.encrypted:
                    raise StoreError(
                        f"store {path} exists and is not encrypted; a store is encrypted when "
                        "it is made, never converted in place: make a new one with "
                        "`vmckpt init --encrypt`",
                        step="create",
                    )
                return store
            leftovers = sorted(entry.name for entry in path.iterdir())
            if set(leftovers) - {LAYERS_DIR}:
                raise StoreError(
                    f"{path} is not empty and not a vmckpt store ({', '.join(leftovers[:3])}...)",
                    step="create",
                )
            os.chmod(path, DIR_MODE)
            if not (path / LAYERS_DIR).is_dir():
                _mkdir_private(path / LAYERS_DIR)
            # The key first: a store with a marker always has one; then its (empty) catalog.
            store_id = keys.new_store_id()
            encryption = crypt.ALGORITHM if encrypt else None
            key = keys.create_key(store_id, path, encryption)
            catalog = Catalog(store_id, generation=1)
            write_atomic(path / CATALOG, catalog.encode(key))
            keys.note_generation(store_id, catalog.generation)
            _write_marker(path, store_id, encryption)
            fsync_dir(path.parent)
        except OSError as exc:
            raise StoreError(f"cannot create store {path}: {exc}", step="create") from exc
        return cls(path)

    # --- keys and seals ---------------------------------------------------

    @property
    def encrypted(self) -> bool:
        """Whether the store's layer files are encrypted (chosen at `vmckpt init --encrypt`)."""
        return self.encryption is not None

    @property
    def key(self) -> keys.StoreKey | None:
        """This user's key for the store (None: the store has no id, or the user no key).
        Looked up again while missing, so a key made by `init --adopt` is found. A key that
        says the store is (not) encrypted when its marker says otherwise is refused: the key
        file is trusted, the marker not (an edited marker must not make vmckpt write an
        encrypted store's layers in the clear)."""
        if self._key is None and self.store_id is not None:
            key = keys.load_key(self.store_id)
            if key is not None and key.encryption != self.encryption:
                raise StoreError(
                    f"store {self.path}: its marker says {_encryption_text(self.encryption)}, "
                    f"its key {keys.key_path(self.store_id)} says "
                    f"{_encryption_text(key.encryption)}; refused (was the marker changed?)",
                    step="key",
                )
            self._key = key
        return self._key

    def _codec(self, step: str) -> crypt.Codec:
        """How the store holds its layer files: in the clear, or encrypted under its key."""
        if self.encryption is None:
            return crypt.PLAIN
        if self._sealed is None:
            key = self._sealing_key(step)
            self._sealed = crypt.SealedCodec(key.store_id, key.key)
        return self._sealed

    def _write_file(
        self, directory: Path, layer_id: str, name: str, chunks: Iterable[Any]
    ) -> FileEntry:
        """Write a layer file (not its manifest or seal) into its (temporary) directory as
        the store holds it; returns the size and sha256 of its content."""
        return _write_new(directory / name, chunks, self._codec("write"), layer_id)

    def no_key_error(self, step: str) -> StoreError:
        if self.store_id is None:
            why = "it has no key (it was made before layers were sealed, format 1.3)"
        else:
            why = f"this user has no key for it ({keys.key_path(self.store_id)} is missing)"
        return StoreError(
            f"store {self.path}: {why}; copy the key from where the store was made, or run "
            f"`vmckpt init --adopt {self.path}` to check its layers and seal them",
            step=step,
        )

    def _sealing_key(self, step: str) -> keys.StoreKey:
        key = self.key
        if key is None:
            raise self.no_key_error(step)
        return key

    def _origin(self, layer_id: str, manifest: bytes, step: str) -> str:
        """The layer's origin from its seal, checked against the manifest's bytes."""
        try:
            seal = read_regular(f"{self._layers}/{layer_id}/{keys.SEAL}", keys.MAX_SEAL_BYTES)
        except FileNotFoundError:
            return keys.UNSEALED
        except OSError as exc:
            why = "is a symbolic link (refused)" if exc.errno == errno.ELOOP else exc.strerror
            raise CorruptLayerError(f"{keys.SEAL}: {why}", layer=layer_id, step=step) from exc
        key = self.key
        if key is None:
            return keys.NO_KEY
        return keys.check_seal(key, layer_id, manifest, seal, step)

    def require_sealed(self, chain: Iterable[LayerManifest], step: str) -> None:
        """Refuse any layer of ``chain`` that did not authenticate with the store's key:
        its content is used only once it did (restore, compose, maintenance, copies)."""
        for manifest in chain:
            if keys.is_sealed(manifest.origin):
                continue
            if manifest.origin == keys.NO_KEY:
                raise self.no_key_error(step)
            raise CorruptLayerError(
                f"{keys.SEAL} is missing: the layer is not authenticated (written by a vmckpt "
                "before format 1.3, or by someone without the store's key); "
                f"`vmckpt init --adopt {self.path}` checks the store's layers and seals them",
                layer=manifest.id,
                step=step,
            )

    def _seal(self, directory: Path, layer_id: str, origin: str, manifest: bytes) -> None:
        """Write a layer's seal into its (temporary) directory."""
        key = self._sealing_key("seal")
        _write_new(directory / keys.SEAL, [keys.seal_bytes(key, layer_id, origin, manifest)])

    def adopt(self, *, new_key: bool = False, accept_rollback: bool = False) -> AdoptResult:
        """Check the store's layers and seal those that do not authenticate yet (origin
        ``adopted``), making the store's key first if this user has none, and name them in
        the catalog.

        For a store made before layers were sealed (no store id), or one whose key is not
        here: a new store id and key, and every layer that passes its checks (manifest,
        chain links, every file and page, as verify) is sealed anew. With a key: only the
        layers that do not authenticate are. A layer whose content fails a check is left as
        it is and reported. The user vouches for what is sealed: run it only on a store whose
        layers you trust (docs/SECURITY.md).

        It never lowers a store's protection: a store whose layer files are encrypted is not
        given a key that does not encrypt; a store whose layers authenticate with a key this
        user has under another store id (its marker was changed) gets that id back instead
        of a new key — unless ``new_key``, which re-keys it and says what is lost.
        ``accept_rollback``: accept the catalog as it is (or rebuild it from the layers if it
        is missing), after a store was put back from a backup on purpose. Holds every lock of
        the store: no checkpoint, maintenance or reader runs meanwhile.
        """
        step = "adopt"
        with self.maintenance_lock(step), self.switching(step), self.lock(step):
            with contextlib.suppress(FileNotFoundError):
                for entry in os.scandir(self.layers_path):
                    if entry.name.startswith(TMP_PREFIX) and locks.directory_in_use(
                        Path(entry.path)
                    ):
                        raise StoreError(
                            "a layer is being written (a checkpoint runs); try again when "
                            "it is done",
                            step=step,
                        )
            key = self.key
            if key is None:
                key = self._adopt_key(new_key, step)
            assert self.store_id is not None
            result = AdoptResult(self.store_id, new_key=self._new_key)
            if accept_rollback:
                keys.forget_generation(self.store_id)
            try:
                catalog = None if result.new_key else self._load_catalog(key, step)
            except StoreError:
                if not accept_rollback:
                    raise
                catalog = None
            if catalog is None:
                catalog = self._catalog_from_directory(key, legacy_heads=False)
            cache: dict[str, LayerManifest] = {}
            adopted: dict[str, list[str]] = {}
            for layer_id in sorted(self._directory_layer_names()):
                try:
                    manifest, data = self._manifest_unsealed(layer_id, step)
                    digest = manifest_digest(data)
                    origin = self._origin_or_unsealed(layer_id, data, step)
                    if keys.is_sealed(origin) and catalog.accepts(layer_id, digest):
                        result.already.append(layer_id)
                        continue
                    self._chain_unchecked(layer_id, step, cache)
                    self._check_layer(manifest, step)
                except StoreError as exc:
                    result.refused.append((layer_id, exc.one_line()))
                    continue
                seal = keys.seal_bytes(key, layer_id, keys.ADOPTED, data)
                write_atomic(self._layer_dir(layer_id) / keys.SEAL, seal)
                adopted[layer_id] = [digest]
                result.sealed.append(layer_id)
            keep = [i for i in catalog.layers if i in adopted or i in result.already]
            layers = {i: list(catalog.layers[i]) for i in keep if i not in adopted} | adopted
            heads: dict[str, Head | None] = dict(catalog.heads)
            if self.marker_version < (fmt.FORMAT_MAJOR, fmt.CATALOG_MINOR):
                heads = self._legacy_heads(set(layers)) | heads
            fresh = Catalog(self.store_id, catalog.generation).changed(add=layers, heads=heads)
            write_atomic(self.path / CATALOG, fresh.encode(key))
            keys.note_generation(self.store_id, fresh.generation)
            _write_marker(self.path, self.store_id, self.encryption)
            self.marker_version = (fmt.FORMAT_MAJOR, fmt.CATALOG_MINOR)
            self._catalog_cache = None
        return result

    _new_key = False

    def _adopt_key(self, new_key: bool, step: str) -> keys.StoreKey:
        """The key ``adopt`` seals with when this user has none for the store's id: the key
        of this user's that the layers authenticate with (the marker was changed: its id is
        put back), or a new one (a store made before seals, or whose key is lost)."""
        encrypted_files = self._encrypted_layer_files()
        found = None if new_key else self._key_of_layers()
        if found is not None:
            # The layers are this key's: the marker (untrusted) is put right, the key file
            # (trusted) says whether the store is encrypted.
            self.store_id, self.encryption, self._key = found.store_id, found.encryption, found
            self.host = HostDirs.for_store(found.store_id, self.path)
            return found
        if self.encrypted or encrypted_files:
            evidence = (
                f"its layer files ({encrypted_files[0]}, ...) are"
                if encrypted_files
                else "its marker says so"
            )
            raise StoreError(
                f"store {self.path} is encrypted and this user has no key for it ({evidence} "
                "encrypted): its layers cannot be read without the key, so they cannot be "
                "adopted, and a new key would not encrypt what comes next (copy the key from "
                "where the store was made)",
                step=step,
            )
        if new_key and self._key_of_layers() is not None:
            _log.warning(
                "store %s: re-keyed on request: its layers authenticated with an existing key; "
                "they are sealed anew as `adopted`, so their free-form QEMU arguments and domain "
                "XML are no longer used on restore, and copies of the old key no longer open it",
                self.path,
            )
        store_id = keys.new_store_id()
        key = keys.create_key(store_id, self.path)
        self.store_id, self._key, self._new_key = store_id, key, True
        self.host = HostDirs.for_store(store_id, self.path)
        return key

    def _encrypted_layer_files(self) -> list[str]:
        """Layer files that start like an encrypted one (crypt.MAGIC), whatever the marker says."""
        found = []
        for layer_id in self._directory_layer_names():
            path = self._layer_dir(layer_id) / PAGES
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
                try:
                    if stat.S_ISREG(os.fstat(fd).st_mode) and os.read(fd, 8) == crypt.MAGIC:
                        found.append(f"{layer_id}/{PAGES}")
                finally:
                    os.close(fd)
        return found

    def _key_of_layers(self) -> keys.StoreKey | None:
        """A key of this user's (any store id) that a sealed layer of this store authenticates
        with, or None."""
        for layer_id in self._directory_layer_names():
            try:
                _, data = self._manifest_unsealed(layer_id, "adopt")
                seal = read_regular(self._layer_dir(layer_id) / keys.SEAL, keys.MAX_SEAL_BYTES)
            except (StoreError, OSError):
                continue
            for candidate in keys.all_keys():
                with contextlib.suppress(StoreError):
                    keys.check_seal(candidate, layer_id, data, seal, "adopt")
                    return candidate
        return None

    def authenticates(self, layer_id: str) -> bool:
        """Whether a layer directory's seal authenticates its manifest with this store's key
        (whether the catalog names it or not)."""
        try:
            _, data = self._manifest_unsealed(layer_id, "check")
            return keys.is_sealed(self._origin(layer_id, data, "check"))
        except StoreError:
            return False

    def _origin_or_unsealed(self, layer_id: str, data: bytes, step: str) -> str:
        try:
            return self._origin(layer_id, data, step)
        except CorruptLayerError:
            return keys.UNSEALED

    # --- the catalog ----------------------------------------------------------

    def catalog(self, step: str = "catalog") -> Catalog | None:
        """The store's catalog, authenticated and checked against the generations this host
        has seen; None when this user has no key for the store (its layers are then listed
        from the directory, and none is used). A store of format 1.4 or older gets its
        catalog here, once (:meth:`_first_catalog`)."""
        key = self.key
        if key is None or self.store_id is None:
            return None
        found = self._load_catalog(key, step)
        return found if found is not None else self._first_catalog(key, step)

    def _load_catalog(self, key: keys.StoreKey, step: str) -> Catalog | None:
        """The catalog file, authenticated and its generation checked; None if missing."""
        assert self.store_id is not None
        path = self.path / CATALOG
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{CATALOG}: {exc.strerror or exc}", step=step) from exc
        stamp = (info.st_ino, info.st_mtime_ns, info.st_size)
        if self._catalog_cache is not None and self._catalog_cache[0] == stamp:
            return self._catalog_cache[1]
        try:
            data = read_regular(path, MAX_CATALOG_BYTES)
        except OSError as exc:
            raise StoreError(f"{CATALOG}: {exc.strerror or exc}", step=step) from exc
        catalog = Catalog.decode(data, key, self.store_id)
        self._check_generation(catalog, step)
        self._catalog_cache = (stamp, catalog)
        return catalog

    def _check_generation(self, catalog: Catalog, step: str) -> None:
        assert self.store_id is not None
        seen = keys.seen_generation(self.store_id)
        if catalog.generation < seen:
            raise StoreError(
                f"its {CATALOG} is generation {catalog.generation}, but this user has seen "
                f"generation {seen}: the store was put back to an earlier state (layers deleted "
                "or replaced since would come back); if you restored it from a backup on "
                f"purpose, accept it with `vmckpt init --adopt --accept-rollback {self.path}`",
                step=step,
            )
        if catalog.generation > seen:
            keys.note_generation(self.store_id, catalog.generation)

    def _first_catalog(self, key: keys.StoreKey, step: str) -> Catalog:
        """The catalog of a store that has none yet: one made by vmckpt 1.4 or older. It
        names the layers whose seals authenticate and the heads the store's guests had (the
        state as it is found is trusted once, as a key is on first use). Written if the
        store can be written (its marker then says 1.5); else used for this command only."""
        assert self.store_id is not None
        seen = keys.seen_generation(self.store_id)
        if seen > 0 or self.marker_version >= (fmt.FORMAT_MAJOR, fmt.CATALOG_MINOR):
            raise StoreError(
                f"its {CATALOG} is missing (this user has seen generation {seen} of it; a "
                "store of format 1.5 always has one): it was removed; `vmckpt init --adopt "
                f"--accept-rollback {self.path}` checks the layers and makes a new one",
                step=step,
            )
        catalog = self._catalog_from_directory(key, legacy_heads=True)
        try:
            with self.lock("make the store's catalog"):
                if os.path.lexists(self.path / CATALOG):
                    self._catalog_cache = None
                    return self.catalog(step) or catalog
                write_atomic(self.path / CATALOG, catalog.encode(key))
                _write_marker(self.path, self.store_id, self.encryption)
                self.marker_version = (fmt.FORMAT_MAJOR, fmt.CATALOG_MINOR)
        except (OSError, StoreError) as exc:
            _log.warning("store %s: its catalog cannot be written (%s); read as is", self.path, exc)
            return replace(catalog, generation=0)
        keys.note_generation(self.store_id, catalog.generation)
        return catalog

    def _catalog_from_directory(self, key: keys.StoreKey, *, legacy_heads: bool) -> Catalog:
        """A first catalog: every layer directory whose seal authenticates (and, for a store
        made before catalogs, the heads it kept in its guests' directories)."""
        assert self.store_id is not None
        layers: dict[str, list[str]] = {}
        for layer_id in self._directory_layer_names():
            try:
                _, data = self._manifest_unsealed(layer_id, "catalog")
                if keys.is_sealed(self._origin(layer_id, data, "catalog")):
                    layers[layer_id] = [manifest_digest(data)]
            except StoreError:
                continue
        heads = self._legacy_heads(set(layers)) if legacy_heads else {}
        return Catalog(self.store_id).changed(add=layers, heads=heads)

    def _legacy_heads(self, layers: Collection[str]) -> dict[str, Head | None]:
        """The heads a store of format 1.4 or older kept in its guests' directories (those
        on the ``layers`` given), owned by this host."""
        heads: dict[str, Head | None] = {}
        me = host_id()
        for kind, sub in LEGACY_HEADS.items():
            for name in _real_subdirs(self.path / sub):
                with contextlib.suppress(OSError, ValueError):
                    data = read_json(self.path / sub / name / LEGACY_HEAD_FILE)
                    head = data.get("pending") or data.get("head")
                    if isinstance(head, str) and head in layers:
                        heads[head_key(kind, name)] = Head(head, me)
        return heads

    def _update_catalog(
        self,
        step: str,
        *,
        add: dict[str, list[str]] | None = None,
        drop: Iterable[str] = (),
        heads: dict[str, Head | None] | None = None,
    ) -> Catalog:
        """Write the catalog's next generation (call under the store lock)."""
        key = self._sealing_key(step)
        current = self.catalog(step)
        assert current is not None and self.store_id is not None
        catalog = current.changed(add=add, drop=drop, heads=heads)
        write_atomic(self.path / CATALOG, catalog.encode(key))
        keys.note_generation(self.store_id, catalog.generation)
        self._catalog_cache = None
        return catalog

    def tidy_catalog(self, step: str) -> None:
        """After a crash in a chain maintenance (call under the store lock): the catalog
        names no layer whose directory is gone, and one version of each layer, the one
        there."""
        catalog = self.catalog(step)
        if catalog is None:
            return
        missing = [i for i in catalog.layers if not _is_real_dir(self._layer_dir(i))]
        settled: dict[str, list[str]] = {}
        for layer_id, versions in catalog.layers.items():
            if len(versions) > 1 and layer_id not in missing:
                with contextlib.suppress(StoreError):
                    _, data = self._manifest_unsealed(layer_id, step)
                    if manifest_digest(data) in versions:
                        settled[layer_id] = [manifest_digest(data)]
        if missing or settled:
            self._update_catalog(step, add=settled, drop=missing)

    # --- paths and names --------------------------------------------------

    @property
    def layers_path(self) -> Path:
        return self.path / LAYERS_DIR

    def _layer_dir(self, layer_id: str) -> Path:
        return self.layers_path / layer_id

    def layer_path(self, layer_id: str, file: str | None = None) -> Path:
        """Where a layer's directory (or one of its files) is: for people and tests, which
        must not spell out the store's layout (nothing read there is trusted: the store
        reads it again, checked)."""
        if not LAYER_ID_RE.match(layer_id) or (file is not None and "/" in file):
            raise StoreError(f"{layer_id!r}/{file!r} is not a layer file", step="path")
        return self._layer_dir(layer_id) if file is None else self._layer_dir(layer_id) / file

    def recatalog(self, layer_id: str) -> None:
        """Name the layer's current manifest in the catalog (as someone with the key who
        rewrote the layer would: the tests of the checks behind the seal and the catalog)."""
        with self.lock("recatalog"):
            data = read_regular(self.layer_path(layer_id, MANIFEST), MAX_MANIFEST_BYTES)
            self._update_catalog("recatalog", add={layer_id: [manifest_digest(data)]})

    def _directory_layer_names(self) -> list[str]:
        """The layer directories, whether the catalog names them or not."""
        try:
            entries = list(os.scandir(self.layers_path))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [
            e.name for e in entries if LAYER_ID_RE.match(e.name) and e.is_dir(follow_symlinks=False)
        ]

    def _layer_names(self) -> list[str]:
        """The store's layers: those its catalog names whose directory is there (without a
        key: every layer directory, none of them authenticated)."""
        catalog = self.catalog("list")
        if catalog is None:
            return self._directory_layer_names()
        return [i for i in catalog.layers if _is_real_dir(self._layer_dir(i))]

    def uncatalogued(self) -> list[str]:
        """Layer directories the catalog does not name: a layer a crash left between its
        rename and the catalog's write, one deleted or replaced by maintenance and put back,
        one copied in by hand, or one of a store made before seals (`init --adopt`)."""
        catalog = self.catalog("list")
        if catalog is None:
            return []
        return sorted(set(self._directory_layer_names()) - set(catalog.layers))

    def layer_ids(self) -> list[str]:
        """Ids of the layers in the store, oldest first (by created time, then id).

        Lists every layer directory, damaged ones too, so that `verify` reports them.
        """

        def created(layer_id: str) -> str:
            try:
                obj = read_json(self._layer_dir(layer_id) / MANIFEST, MAX_MANIFEST_BYTES)
            except (OSError, ValueError):
                return ""
            value = obj.get("created") if isinstance(obj, dict) else None
            return value if isinstance(value, str) else ""

        return sorted(self._layer_names(), key=lambda layer_id: (created(layer_id), layer_id))

    def has_layer(self, layer_id: str) -> bool:
        if not LAYER_ID_RE.match(layer_id) or not _is_real_dir(self._layer_dir(layer_id)):
            return False
        catalog = self.catalog("read")
        return catalog is None or layer_id in catalog.layers

    def _new_layer_id(self) -> str:
        """A fresh id (call under the store lock): 1 + the highest sequence number of any
        layer or layer being written, and 6 random hex digits."""
        seqs: list[int] = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.layers_path):
                name = entry.name.removeprefix(TMP_PREFIX)
                head = name.split("-", 1)[0]
                if head.isdigit():
                    seqs.append(int(head))
        return f"{max(seqs, default=0) + 1:04d}-{secrets.token_hex(3)}"

    def resolve(self, ref: str) -> str:
        """The layer id that ``ref`` names exactly or as a unique prefix."""
        names = sorted(self._layer_names())
        if ref in names:
            return ref
        matches = [name for name in names if ref and name.startswith(ref)]
        if not matches:
            raise StoreError(f"no layer matches {ref!r} in {self.path}", step="resolve")
        if len(matches) > 1:
            shown = ", ".join(matches[:5]) + (", ..." if len(matches) > 5 else "")
            raise StoreError(f"{ref!r} is ambiguous: it matches {shown}", step="resolve")
        return matches[0]

    def newest(self) -> str:
        """The newest layer's id; StoreError if the store holds none."""
        ids = self.layer_ids()
        if not ids:
            raise StoreError(f"store {self.path} holds no layers", step="resolve")
        return ids[-1]

    # --- locks ---------------------------------------------------------------

    @contextlib.contextmanager
    def lock(self, what: str, wait_s: float = STORE_LOCK_WAIT_S) -> Iterator[None]:
        """The store lock (see vmckpt/images/locks.py); a thread that holds it already
        through this Store takes it again at once (the catalog's write within a gc)."""
        me = threading.get_ident()
        if self._lock_owner == me:
            yield
            return
        with locks.hold(
            self.path / STORE_LOCK, what=what, wait_s=wait_s, busy=f"store {self.path} is busy"
        ):
            self._lock_owner = me
            try:
                yield
            finally:
                self._lock_owner = None

    def reading(
        self, what: str, wait_s: float = STORE_LOCK_WAIT_S
    ) -> contextlib.AbstractContextManager[None]:
        """The chain lock, shared: held while reading a chain, so that no chain maintenance
        switches layers under the reader (it takes the lock exclusively to switch)."""
        return locks.hold(
            self.path / CHAIN_LOCK,
            what=what,
            wait_s=wait_s,
            busy=f"store {self.path}: a chain maintenance is switching layers",
            shared=True,
        )

    def switching(
        self, what: str, wait_s: float = STORE_LOCK_WAIT_S
    ) -> contextlib.AbstractContextManager[None]:
        """The chain lock, exclusive: no reader reads a chain meanwhile (maintenance only)."""
        return locks.hold(
            self.path / CHAIN_LOCK,
            what=what,
            wait_s=wait_s,
            busy=f"store {self.path}: layers are being read (restore, verify)",
        )

    def maintenance_lock(
        self, what: str, wait_s: float = STORE_LOCK_WAIT_S
    ) -> contextlib.AbstractContextManager[None]:
        """One chain maintenance (prune, squash, delete, gc) at a time."""
        return locks.hold(
            self.path / MAINTENANCE_LOCK,
            what=what,
            wait_s=wait_s,
            busy=f"store {self.path}: another prune, squash, delete or gc is under way",
        )

    def guest_lock(
        self, name: str, *, what: str, wait_s: float, kind: str = "guest"
    ) -> contextlib.AbstractContextManager[None]:
        """A guest's checkpoint lock: one checkpoint (or checkpoint session) at a time."""
        return locks.hold(
            self.runtime_dir(name, kind) / GUEST_LOCK,
            what=what,
            wait_s=wait_s,
            busy=f"guest {name}: a checkpoint is under way",
        )

    def guest_locked(self, name: str, kind: str = "guest") -> bool:
        return locks.is_held(self.runtime_path(name, kind) / GUEST_LOCK)

    # --- what this host keeps for the store's guests (vmckpt/hostdirs.py) ----------------

    def runtime_path(self, name: str, kind: str = "guest") -> Path:
        """Where a guest's runtime directory on this host is (not created)."""
        return self.host.runtime_path(kind, name)

    def runtime_dir(self, name: str, kind: str = "guest") -> Path:
        """A guest's runtime directory on this host (made 0700 if needed): its record, QEMU's
        sockets and logs, journals, session records, its checkpoint lock."""
        return self.host.guest_runtime(kind, name)

    def data_dir(self, name: str, kind: str = "guest") -> Path:
        """A guest's data directory on this host (made 0700 if needed): its restored disks,
        how to reach it on another host, its checkpoints' scratch space."""
        return self.host.guest_data(kind, name)

    def scratch_dir(self, name: str, kind: str = "guest") -> Path:
        """Where a checkpoint of guest ``name`` keeps its scratch files (``gc`` removes what an
        interrupted checkpoint left there)."""
        return self.data_dir(name, kind) / SCRATCH_DIR

    def runtime_idle_s(self, name: str, kind: str = "guest") -> float:
        """Seconds since anything in guest ``name``'s runtime directory last changed."""
        directory = self.runtime_path(name, kind)
        newest = 0.0
        with contextlib.suppress(OSError):
            newest = os.lstat(directory).st_mtime
            for entry in os.scandir(directory):
                with contextlib.suppress(OSError):
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        return max(0.0, time.time() - newest)

    def has_runtime(self, name: str, kind: str = "guest") -> bool:
        return _is_real_dir(self.runtime_path(name, kind))

    def _record_path(self, name: str, record: str, kind: str, durable: bool, step: str) -> Path:
        if not RECORD_NAME_RE.match(record):
            raise StoreError(f"{record!r} is not a record name", vm=name, step=step)
        base = self.host.data_path(kind, name) if durable else self.runtime_path(name, kind)
        return base / record

    def read_record(
        self, name: str, record: str, kind: str = "guest", *, durable: bool = False
    ) -> dict[str, Any] | None:
        """A guest's record on this host (``guest.json``; ``durable``: one kept in its data
        directory, such as ``remote.json``), or None if absent."""
        path = self._record_path(name, record, kind, durable, "read-record")
        try:
            data = read_json(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}", vm=name, step="read-record") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{path} is not a JSON object", vm=name, step="read-record")
        return data

    def write_record(
        self,
        name: str,
        record: str,
        data: dict[str, Any],
        kind: str = "guest",
        *,
        durable: bool = False,
    ) -> None:
        """Replace a guest's record atomically (unique temporary name, fsync, rename)."""
        self._record_path(name, record, kind, durable, "write-record")
        directory = self.data_dir(name, kind) if durable else self.runtime_dir(name, kind)
        path = directory / record
        try:
            write_json_atomic(path, data)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}", vm=name, step="write-record") from exc

    def remove_record(
        self, name: str, record: str, kind: str = "guest", *, durable: bool = False
    ) -> None:
        path = self._record_path(name, record, kind, durable, "remove-record")
        if _is_real_dir(path.parent):
            path.unlink(missing_ok=True)

    def runtime_names(self, kind: str = "guest") -> list[str]:
        """Names of the guests of ``kind`` that have a runtime directory on this host."""
        return self.host.names(kind)

    def names_with(self, record: str, kind: str = "guest", *, durable: bool = False) -> list[str]:
        """Names of the guests of ``kind`` that have a ``record`` file on this host."""
        return [
            name
            for name in self.host.names(kind, data=durable)
            if self._record_path(name, record, kind, durable, "list").is_file()
        ]

    def journal_path(self, name: str, file: str, kind: str = "guest") -> Path:
        """Where a guest's journal ``file`` lives (vmckpt.session's migration journal)."""
        if not RECORD_NAME_RE.match(file):
            raise StoreError(f"{file!r} is not a journal name", vm=name, step="journal")
        return self.runtime_dir(name, kind) / file

    # --- heads (in the catalog) ---------------------------------------------------

    def head(self, name: str, kind: str = "guest") -> str | None:
        """The layer guest ``name``'s next checkpoint is a delta against, or None."""
        catalog = self.catalog("head")
        if catalog is None:
            return None
        head = catalog.heads.get(head_key(kind, name))
        if head is not None and _is_real_dir(self._layer_dir(head.layer)):
            return head.layer
        return None

    def heads(self) -> dict[str, list[str]]:
        """Every guest's head: layer id -> the guests (``guest NAME``, ``libvirt DOMAIN``)
        whose next checkpoint builds on it. Such a layer must stay."""
        catalog = self.catalog("head")
        return {} if catalog is None else catalog.heads_of()

    def head_records(self) -> dict[tuple[str, str], Head]:
        """Every head with its owner: (kind, name) -> head."""
        catalog = self.catalog("head")
        if catalog is None:
            return {}
        found = {}
        for key, head in catalog.heads.items():
            kind, name = key.split("/", 1)
            found[(kind, name)] = head
        return found

    def forget_heads(self, guests: Iterable[tuple[str, str]]) -> None:
        """Remove the heads of these (kind, name) guests from the catalog."""
        with self.lock("forget heads"):
            self._update_catalog("head", heads={head_key(k, n): None for k, n in guests})

    def set_head(self, name: str, layer_id: str | None, kind: str = "guest") -> None:
        """Move a guest's head (a restored guest starts from the layer it was restored from);
        None forgets it (its layers are no longer kept for it)."""
        self.runtime_path(name, kind)  # a name the catalog can hold
        with self.lock(f"set head of {name}"):
            if layer_id is not None and not self.has_layer(layer_id):
                raise StoreError(f"no layer {layer_id} to be the head of {name}", step="head")
            head = None if layer_id is None else Head(layer_id, host_id())
            self._update_catalog("head", heads={head_key(kind, name): head})

    # --- media ----------------------------------------------------------------

    def media_path(self, sha256: str, file_name: str) -> Path:
        """Where the store keeps its own copy of a boot medium: media/<sha256>/<file name>."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not RUNTIME_NAME_RE.match(file_name):
            raise StoreError(f"{file_name!r} ({sha256[:12]}) is not a medium name", step="media")
        return self.path / MEDIA_DIR / sha256 / file_name

    def find_medium(self, sha256: str, original: str) -> Path | None:
        """A file with this content: the original path if it still holds it, else the store's
        copy. The content hash decides, never the path."""
        candidates = [Path(original)]
        with contextlib.suppress(StoreError):
            candidates.append(self.media_path(sha256, Path(original).name))
        for candidate in candidates:
            with contextlib.suppress(OSError):
                if candidate.is_file() and sha256_file(candidate.resolve()) == sha256:
                    return candidate.resolve() if candidate == Path(original) else candidate
        return None

    def import_medium(self, sha256: str, file_name: str, chunks: Iterable[bytes]) -> Path:
        """Store a copy of a boot medium received from another host, checked by its hash."""
        target = self.media_path(sha256, file_name)
        try:
            for directory in (target.parent.parent, target.parent):
                if not _is_real_dir(directory):
                    make_private_dir(directory)
            partial = target.with_name(f"{TMP_PREFIX}{file_name}-{secrets.token_hex(4)}")
            try:
                entry = _write_new(partial, chunks)
                if entry.sha256 != sha256:
                    raise StoreError(
                        f"{file_name}: the copy's sha256 is not the one announced", step="media"
                    )
                os.replace(partial, target)
            finally:
                partial.unlink(missing_ok=True)
            fsync_dir(target.parent)
        except OSError as exc:
            raise StoreError(f"cannot store medium {file_name}: {exc}", step="media") from exc
        return target

    # --- reading ----------------------------------------------------------

    def manifest(self, layer_id: str) -> LayerManifest:
        """The layer's manifest, its checksum and format version checked."""
        return self._manifest(layer_id, "read")

    def _manifest(self, layer_id: str, step: str) -> LayerManifest:
        manifest, data = self._manifest_unsealed(layer_id, step)
        origin = self._origin(layer_id, data, step)
        catalog = self.catalog(step)
        if catalog is not None:
            if layer_id not in catalog.layers:
                raise StoreError(
                    f"no such layer in {self.path} (a directory of that name is there, but the "
                    f"store's catalog does not name it: left by a crash, or put there by hand)",
                    layer=layer_id,
                    step=step,
                )
            if not catalog.accepts(layer_id, manifest_digest(data)):
                raise CorruptLayerError(
                    f"{MANIFEST} is not the version of the layer the store's catalog names "
                    "(an earlier version put back?)",
                    layer=layer_id,
                    step=step,
                )
        return replace(manifest, origin=origin)

    def _manifest_unsealed(self, layer_id: str, step: str) -> tuple[LayerManifest, bytes]:
        """The layer's manifest, checked but not authenticated, and its bytes."""
        if not LAYER_ID_RE.match(layer_id):
            raise StoreError(f"{layer_id!r} is not a layer id", step=step)
        directory = f"{self._layers}/{layer_id}"
        try:
            kind = os.lstat(directory).st_mode
        except OSError:
            kind = 0
        if not stat.S_ISDIR(kind):
            if stat.S_ISLNK(kind):
                raise CorruptLayerError(
                    "the layer directory is a symbolic link (refused)", layer=layer_id, step=step
                )
            raise StoreError(f"no such layer in {self.path}", layer=layer_id, step=step)
        try:
            data = read_regular(f"{directory}/{MANIFEST}", MAX_MANIFEST_BYTES)
        except FileNotFoundError as exc:
            raise CorruptLayerError(f"{MANIFEST} is missing", layer=layer_id, step=step) from exc
        except OSError as exc:
            why = "is a symbolic link (refused)" if exc.errno == errno.ELOOP else exc.strerror
            raise CorruptLayerError(f"{MANIFEST}: {why}", layer=layer_id, step=step) from exc
        manifest = fmt.parse_manifest(data, layer_id, step)
        if manifest.id != layer_id:
            raise CorruptLayerError(
                f"{MANIFEST}: id is {manifest.id!r}, but the layer directory is {layer_id!r}",
                layer=layer_id,
                step=step,
            )
        return manifest, data

    def chain(self, layer_id: str) -> list[LayerManifest]:
        """The manifests from the base layer to ``layer_id``, base first."""
        return self._chain(layer_id, "read", {})

    def _chain_unchecked(
        self, layer_id: str, step: str, cache: dict[str, LayerManifest]
    ) -> list[LayerManifest]:
        """The chain as :meth:`_chain` walks it, of layers not yet authenticated (adopt)."""

        def read(layer: str, step: str) -> LayerManifest:
            return self._manifest_unsealed(layer, step)[0]

        return self._chain(layer_id, step, cache, reader=read)

    def _chain(
        self,
        layer_id: str,
        step: str,
        cache: dict[str, LayerManifest],
        checked: set[str] | None = None,
        reader: Callable[[str, str], LayerManifest] | None = None,
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
                    cache[current] = (reader or self._manifest)(current, step)
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

    def _open_listed(self, manifest: LayerManifest, name: str, step: str) -> crypt.LayerFile:
        """Open a listed file of a layer to read its content, checked to be a regular file
        (never a link: it could point anywhere outside the store) of the listed size (in an
        encrypted store: the size that holds the listed size encrypted)."""
        path = f"{self._layers}/{manifest.id}/{name}"
        entry = manifest.files[name]
        codec = self._codec(step)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError as exc:
            raise CorruptLayerError(f"{name} is missing", layer=manifest.id, step=step) from exc
        except OSError as exc:
            reason = "is not a regular file" if exc.errno == errno.ELOOP else f"{exc.strerror}"
            raise CorruptLayerError(f"{name} {reason}", layer=manifest.id, step=step) from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise CorruptLayerError(
                    f"{name} is not a regular file", layer=manifest.id, step=step
                )
            if info.st_nlink != 1:
                # It may be a file outside the store: nothing of it is read or shown.
                raise CorruptLayerError(
                    f"{name} has other hard links (refused)", layer=manifest.id, step=step
                )
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

    def _file_info(self, manifest: LayerManifest, name: str, step: str) -> None:
        """A listed file of a layer: present, a regular file, of the listed size."""
        self._open_listed(manifest, name, step).close()

    def _read_small(self, manifest: LayerManifest, name: str, step: str) -> bytes:
        """A small listed file (index, digests, prelude, device state), checked: size, sha256."""
        with self._open_listed(manifest, name, step) as src:
            data = src.read_all()
        _check_digest(manifest, name, hashlib.sha256(data).hexdigest(), step)
        return data

    def _layer_index(self, manifest: LayerManifest, step: str, sums: bool = True) -> _LayerIndex:
        """The layer's decoded page index and (1.2, if ``sums``) page digests, both checked."""
        parts = fmt.decode_index(self._read_small(manifest, INDEX, step), manifest, step)
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
            digests = self._page_sums(manifest, step)
        return _LayerIndex(parts, digests)

    def _page_sums(self, manifest: LayerManifest, step: str) -> npt.NDArray[np.uint8]:
        return fmt.decode_sums(self._read_small(manifest, SUMS, step), manifest, step)

    def _check_layer(self, manifest: LayerManifest, step: str) -> _CheckedLayer:
        """Check every file of a layer against its manifest, all of it: sizes and sha256 of
        every file, the index, and (1.2) every page against its digest."""
        layer_id = manifest.id
        for name in sorted(manifest.files):
            self._file_info(manifest, name, step)
        index = self._layer_index(manifest, step)
        small = {name: self._read_small(manifest, name, step) for name in (PRELUDE, DEVICE)}
        for name in sorted(manifest.files):
            if name in (PAGES, INDEX, SUMS, PRELUDE, DEVICE):
                continue
            if name.startswith("disk-") and name.endswith(".bin"):
                with self._open_listed(manifest, name, step) as src:
                    _check_digest(manifest, name, src.sha256(), step)
            else:
                small[name] = self._read_small(manifest, name, step)
        self._check_pages(manifest, index, step)
        for disk in manifest.disks:
            fmt.decode_disk_index(small[disk.index_file], disk, layer_id, step)
        return _CheckedLayer(manifest, index.parts, small[PRELUDE], small[DEVICE])

    def _check_pages(self, manifest: LayerManifest, index: _LayerIndex, step: str) -> None:
        """pages.bin read once: its sha256, and (1.2) each page against pages.sum."""
        total = manifest.pages_stored
        digest = hashlib.sha256()
        scratch = np.empty((min(total, CHUNK_PAGES), PAGE_SIZE), dtype=np.uint8)
        first_bad: CorruptLayerError | None = None
        with self._open_listed(manifest, PAGES, step) as src:
            for start in range(0, total, CHUNK_PAGES):
                buf = scratch[: min(CHUNK_PAGES, total - start)]
                src.pread_into(buf, start * PAGE_SIZE)
                digest.update(buf.data)
                if index.sums is not None and first_bad is None:
                    positions = np.arange(start, start + buf.shape[0])
                    try:
                        _check_page_sums(manifest, index, positions, buf, step)
                    except CorruptLayerError as exc:
                        first_bad = exc
        # The file's own checksum speaks first; a page that matches no digest in a file
        # that matches its checksum means a wrong pages.sum.
        _check_digest(manifest, PAGES, digest.hexdigest(), step)
        if first_bad is not None:
            raise first_bad

    def verify(self, layer_id: str | None = None) -> list[str]:
        """Verify the chain ending at ``layer_id``, or every layer of the store.

        Checks each manifest (checksum, format version, fields), each file's size
        and sha256, each index against its manifest (counts, page ranges, order),
        each page against its digest (1.2), that parents exist, have the same RAM
        block layout and form no loop. Returns the ids verified (base first for a
        chain); raises CorruptLayerError (FormatVersionError) on the first problem.
        """
        cache: dict[str, LayerManifest] = {}
        with self.reading("verify"):
            if layer_id is not None:
                chain = self._chain(layer_id, "verify", cache)
                self.require_sealed(chain, "verify")
                for manifest in chain:
                    self._check_layer(manifest, "verify")
                return [manifest.id for manifest in chain]
            ids = self.layer_ids()
            checked: set[str] = set()
            for each in ids:
                checked.update(m.id for m in self._chain(each, "verify", cache, checked))
                self.require_sealed([cache[each]], "verify")
                self._check_layer(cache[each], "verify")
            return ids

    def compose(self, layer_id: str) -> tuple[RamImage, bytes, bytes]:
        """The guest's RAM at ``layer_id`` plus that layer's prelude and device state.

        Newest first: each layer of the chain contributes only the pages no newer
        layer of the chain stores or zeroes (a page bitmap), and only those are
        read, each checked against its digest (1.2 layers; an older layer's whole
        pages.bin is read and hashed instead). Every manifest of the chain, every
        index and digest file read, and the newest layer's prelude and device state
        are checked; any mismatch raises before anything is returned. The cost is
        that of the pages composed, plus a small constant per layer.
        """
        with self.reading("compose"):
            chain = self._chain(layer_id, "compose", {})
            self.require_sealed(chain, "compose")
            newest = chain[-1]
            self._check_ram_size(newest, "compose")
            blocks = [RamBlock(block.idstr, block.length) for block in newest.blocks]
            image = RamImage.zeroed(blocks)
            self._gather(list(reversed(chain)), image, _Coverage.of(blocks), "compose")
            prelude = self._read_small(newest, PRELUDE, "compose")
            device = self._read_small(newest, DEVICE, "compose")
        return image, prelude, device

    def _gather(
        self,
        newest_first: list[LayerManifest],
        image: RamImage,
        coverage: _Coverage,
        step: str,
    ) -> None:
        """Copy into ``image`` each page's newest version among ``newest_first``, skipping
        pages ``coverage`` says a newer layer decided already; update ``coverage``. Every
        page copied is checked first (its digest, or its file's sha256)."""
        block_numbers = {block.idstr: number for number, block in enumerate(image.blocks)}
        batch = _PageBatch(image, step)
        for manifest in newest_first:
            if coverage.remaining == 0:
                break
            # pages.sum is read only if the layer has pages to give.
            index = self._layer_index(manifest, step, sums=False)
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
            wanted = _Wanted(np.concatenate(positions), np.concatenate(blocks),
                             np.concatenate(pages))  # fmt: skip
            with self._open_listed(manifest, PAGES, step) as src:
                if not manifest.has_page_sums:
                    _read_whole(src, manifest, wanted, image, step)
                else:
                    batch.add(src, manifest, self._page_sums(manifest, step), wanted)
        batch.flush()

    def _check_ram_size(self, manifest: LayerManifest, step: str) -> None:
        """Refuse, before allocating it, RAM far beyond what the layer's guest has."""
        memory = manifest.spec.get("memory_mib")
        limit = (memory << 20 if type(memory) is int and memory > 0 else 0) + RAM_SLACK_BYTES
        total = sum(block.length for block in manifest.blocks)
        if total > limit:
            raise CorruptLayerError(
                f"{MANIFEST}: RAM blocks of {total} bytes in all exceed the guest's memory "
                f"({memory} MiB) by far",
                layer=manifest.id,
                step=step,
            )

    def disk_chain(self, layer_id: str, disk_id: str) -> list[LayerManifest]:
        """The layers whose deltas make up disk ``disk_id`` at ``layer_id``: from the newest
        layer at or below it that holds the disk in full, up to ``layer_id``."""
        chain = self._chain(layer_id, "compose-disk", {})
        self.require_sealed(chain, "compose-disk")
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

    def compose_disk(self, layer_id: str, disk_id: str, target: Path) -> int:
        """Write disk ``disk_id`` as it was at ``layer_id`` into a new raw file ``target``.

        Checks every layer used (manifest, files, index, sha256 of the data while
        reading it) and removes ``target`` on failure. Returns the disk size.
        """
        size = 0
        try:
            with self.reading("compose a disk"), open(target, "xb") as out:
                used = self.disk_chain(layer_id, disk_id)
                for manifest in used:
                    record = manifest.disk(disk_id)
                    assert record is not None
                    size = record.size
                    out.truncate(size)
                    index_bytes = self._read_small(manifest, record.index_file, "compose-disk")
                    self._file_info(manifest, record.data_file, "compose-disk")
                    index = fmt.decode_disk_index(index_bytes, record, manifest.id, "compose-disk")
                    for offset, length in index.zeroed:
                        out.seek(offset)
                        for start in range(0, length, 1 << 20):
                            out.write(bytes(min(1 << 20, length - start)))
                    digest = hashlib.sha256()
                    with self._open_listed(manifest, record.data_file, "compose-disk") as src:
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

    # --- writing ----------------------------------------------------------

    def check_writable(self) -> None:
        """Refuse early (before a guest is paused for a checkpoint) a store that cannot take
        a new layer: a read-only file system, missing permissions, no key to seal it."""
        self._sealing_key("check-store")
        probe = self.layers_path / f"{TMP_PREFIX}probe-{secrets.token_hex(4)}"
        try:
            _mkdir_private(probe)
            probe.rmdir()
        except OSError as exc:
            raise StoreError(
                f"cannot write into {self.layers_path}: {exc.strerror or exc}", step="check-store"
            ) from exc

    def write_layer(self, content: LayerContent) -> LayerManifest:
        """Write ``content`` as a new layer, atomically, moving no guest's head."""
        return self.commit_layer(content, head_of=None)

    def commit_layer(
        self,
        content: LayerContent,
        *,
        head_of: tuple[str, str] | None,
        origin: str = keys.LOCAL,
    ) -> LayerManifest:
        """Write ``content`` as a new layer and make it the head of ``head_of`` (kind, name).

        The id is allocated under the store lock (the temporary directory that
        reserves it is made, and locked, under the lock too, so ids never repeat
        and ``gc`` leaves it alone); the layer is built in
        layers/.tmp-<id>-<random>/, every file fsynced, manifest.json written and
        fsynced last, the directory fsynced; then, under the store lock, the
        parent is checked to be still there, the directory is renamed to
        layers/<id>, layers/ fsynced, and the catalog's next generation names the
        layer and moves the head (the commit point). On any failure the layer's
        directory is removed and the store is as before; an OSError is raised as
        StoreError, anything else as it is. The layer is sealed with ``origin``
        (keys.py).
        """
        self._sealing_key("write")
        parts = _check_content(content)
        if content.parent is not None:
            parent = self._manifest(content.parent, "write")
            layout = [(block.idstr, block.length) for block in content.ram.blocks]
            if parent.layout != layout:
                raise StoreError(
                    f"RAM block layout {layout} differs from that of parent "
                    f"{parent.id} {parent.layout}",
                    step="write",
                )
        disks = [_disk_write(delta) for delta in content.disks]
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        if head_of is not None:
            self.runtime_path(head_of[1], head_of[0])  # a name the catalog can hold
        tmp, layer_id, fd = self._make_temporary(None)
        try:
            manifest, digest = self._write_layer_files(
                tmp, layer_id, content, parts, disks, created=created, origin=origin
            )
            faults.point(faults.MID_WRITE)
            self._publish(tmp, layer_id, digest, content.parent, head_of)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing, once renamed into place
            if isinstance(exc, OSError):
                raise _write_error(exc, layer_id) from exc
            raise
        finally:
            os.close(fd)
        return manifest

    def _make_temporary(self, layer_id: str | None) -> tuple[Path, str, int]:
        """A temporary layer directory layers/.tmp-<id>-<random>/ (for a new id if
        ``layer_id`` is None), made and locked under the store lock; returns it, the id and
        the fd that holds its lock (close it when done)."""
        try:
            with self.lock("allocate a layer id" if layer_id is None else f"write {layer_id}"):
                if layer_id is None:
                    self._remove_dead_temporaries()
                    layer_id = self._new_layer_id()
                tmp = self.layers_path / f"{TMP_PREFIX}{layer_id}-{secrets.token_hex(4)}"
                _mkdir_private(tmp)
                try:
                    fd = locks.lock_directory(tmp)
                except BaseException:
                    tmp.rmdir()
                    raise
        except OSError as exc:
            raise StoreError(
                f"cannot write into {self.layers_path}: {exc.strerror or exc}", step="write"
            ) from exc
        return tmp, layer_id, fd

    def _remove_dead_temporaries(self) -> None:
        """Temporary layer directories whose writer died (their lock is free) go at the next
        commit (gc removes them too). Call under the store lock."""
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(self.layers_path):
                if entry.name.startswith(TMP_PREFIX) and not locks.directory_in_use(
                    Path(entry.path)
                ):
                    shutil.rmtree(entry.path, ignore_errors=True)

    def _write_layer_files(
        self,
        tmp: Path,
        layer_id: str,
        content: LayerContent,
        parts: list[BlockIndex],
        disks: list[_DiskWrite],
        *,
        created: str,
        origin: str,
    ) -> tuple[LayerManifest, str]:
        """Write a complete layer into ``tmp``: its files, each fsynced, its seal, then
        manifest.json, then the directory's fsync. Returns the manifest as read back and the
        digest the catalog names it by."""
        sums: list[npt.NDArray[np.uint8]] = []

        def pages() -> Iterable[npt.NDArray[np.uint8]]:
            for chunk in _page_chunks(content.ram, parts):
                sums.append(fmt.page_digests(chunk))
                yield chunk

        def write(name: str, chunks: Iterable[Any]) -> FileEntry:
            return self._write_file(tmp, layer_id, name, chunks)

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
        self._seal(tmp, layer_id, origin, data)
        _write_new(tmp / MANIFEST, [data])
        fsync_dir(tmp)
        return manifest, manifest_digest(data)

    def _publish(
        self,
        tmp: Path,
        layer_id: str,
        digest: str,
        parent: str | None,
        head_of: tuple[str, str] | None,
    ) -> None:
        """Rename a complete temporary layer into place, then commit it (and move the head)
        in the catalog, under the store lock. A failure before the catalog's write removes
        the layer's directory."""
        final = self._layer_dir(layer_id)
        renamed = False
        try:
            with self.lock(f"publish layer {layer_id}"):
                if parent is not None and not self.has_layer(parent):
                    # A prune or delete removed it while this layer was being written.
                    raise StoreError(
                        f"its parent layer {parent} was removed meanwhile", layer=layer_id,
                        step="write",
                    )  # fmt: skip
                if os.path.lexists(final):
                    raise StoreError(f"{final} exists already", layer=layer_id, step="write")
                os.rename(tmp, final)
                renamed = True
                fsync_dir(self.layers_path)
                faults.point(faults.BEFORE_HEAD)
                heads: dict[str, Head | None] = {}
                if head_of is not None:
                    kind, name = head_of
                    heads[head_key(kind, name)] = Head(layer_id, host_id())
                self._update_catalog("write", add={layer_id: [digest]}, heads=heads)
        except BaseException as exc:
            shutil.rmtree(final if renamed else tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise _write_error(exc, layer_id) from exc
            raise

    def receive_layer(
        self,
        layer_id: str,
        manifest_sha256: str,
        files: Iterable[tuple[str, Iterable[bytes]]],
        *,
        origin: str,
    ) -> bool:
        """Take in a layer copied from another store, file by file; publish it only once
        every file matches its manifest and the manifest the sender's hash, sealed with
        this store's key and ``origin`` (``host:NAME``, the host that sent it: the layer's
        free-form QEMU arguments are then not used on restore, docs/SECURITY.md).

        Returns False if the store has that layer already (with the same manifest);
        StoreError if it has a different one under that id, or the copy is damaged
        (nothing is then added).
        """
        if not LAYER_ID_RE.match(layer_id):
            raise StoreError(f"{layer_id!r} is not a layer id", step="receive-layer")
        if not origin.startswith(keys.HOST_PREFIX) or not keys.is_sealed(origin):
            raise StoreError(
                f"origin {origin!r} is not host:NAME", layer=layer_id, step="receive-layer"
            )
        self._sealing_key("receive-layer")
        if self.has_layer(layer_id):
            ours = sha256_file(self._layer_dir(layer_id) / MANIFEST)
            if ours != manifest_sha256:
                raise StoreError(
                    "the store has a different layer under this id", layer=layer_id,
                    step="receive-layer",
                )  # fmt: skip
            for _name, chunks in files:
                for _chunk in chunks:
                    pass  # consume what the sender sends anyway
            return False
        tmp, _, fd = self._make_temporary(layer_id)
        try:
            written: dict[str, FileEntry] = {}
            for name, chunks in files:
                if not fmt.is_layer_file_name(name) or name in written:
                    raise StoreError(
                        f"file name {name!r} is not allowed", layer=layer_id, step="receive-layer"
                    )
                if name == MANIFEST:  # never encrypted
                    written[name] = _write_new(tmp / name, chunks)
                else:  # as this store holds its files, whatever the sender's did
                    written[name] = self._write_file(tmp, layer_id, name, chunks)
            manifest = self._check_copy(tmp, layer_id, manifest_sha256, written)
            with os.fdopen(open_nofollow(tmp / MANIFEST), "rb") as handle:
                self._seal(tmp, layer_id, origin, handle.read())
            fsync_dir(tmp)
            self._publish(tmp, layer_id, manifest_sha256, manifest.parent, None)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise _write_error(exc, layer_id) from exc
            raise
        finally:
            os.close(fd)
        return True

    def _check_copy(
        self, tmp: Path, layer_id: str, manifest_sha256: str, written: dict[str, FileEntry]
    ) -> LayerManifest:
        def bad(message: str) -> StoreError:
            return StoreError(f"the copy is damaged: {message}", layer=layer_id, step="check-copy")

        if MANIFEST not in written:
            raise bad(f"{MANIFEST} is missing")
        if written[MANIFEST].sha256 != manifest_sha256:
            raise bad(f"{MANIFEST} differs from the one the sender has")
        with os.fdopen(open_nofollow(tmp / MANIFEST), "rb") as handle:
            manifest = fmt.parse_manifest(handle.read(), layer_id, "check-copy")
        if manifest.id != layer_id:
            raise bad(f"{MANIFEST} names layer {manifest.id}")
        for name, entry in manifest.files.items():
            got = written.get(name)
            if got is None:
                raise bad(f"{name} is missing")
            if got != entry:
                raise bad(f"{name} does not match its manifest (size or sha256)")
        extra = set(written) - set(manifest.files) - {MANIFEST}
        if extra:
            raise bad(f"unexpected files {sorted(extra)}")
        return manifest

    def layer_files(self, layer_id: str) -> list[tuple[str, int, Iterator[bytes]]]:
        """A committed layer's files to send to another store: name, size and content (the
        plaintext in an encrypted store: the receiver holds them as its store does), the
        manifest last (the receiver commits on it). Each file is opened when its content is
        first asked for, checked to be of its listed size, and read in chunks; in an
        encrypted store each record authenticates before it is sent."""
        manifest = self.manifest(layer_id)
        step = "send"

        def content(name: str) -> Iterator[bytes]:
            with self._open_listed(manifest, name, step) as src:
                yield from src.chunks()

        fd = open_nofollow(self._layer_dir(layer_id) / MANIFEST)
        try:
            data = _read_at_most(fd, MAX_MANIFEST_BYTES + 1)
        finally:
            os.close(fd)
        files = [
            (name, manifest.files[name].size, content(name)) for name in sorted(manifest.files)
        ]
        return [*files, (MANIFEST, len(data), iter([data]))]

    def manifest_sha256(self, layer_id: str) -> str:
        """The SHA-256 of a layer's manifest.json file as stored (its identity across stores)."""
        self.manifest(layer_id)
        return sha256_file(self._layer_dir(layer_id) / MANIFEST)

    def bytes_on_disk(self) -> int:
        """The size of every file in the store (layers, runtime files, media)."""
        total = 0
        for root, _dirs, files in os.walk(self.path):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.lstat(os.path.join(root, name)).st_size
        return total

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free


def _write_error(exc: OSError, layer_id: str) -> StoreError:
    """An OSError while writing a layer, as a StoreError naming the file."""
    where = Path(exc.filename).name if exc.filename else "layer directory"
    return StoreError(f"{where}: {exc.strerror or exc}", layer=layer_id, step="write")


def _file_chunks(path: Path, expected: int) -> Iterable[bytes]:
    """The bytes of a scratch file, exactly ``expected`` of them (else StoreError)."""
    got = 0
    with open(path, "rb") as src:
        for chunk in iter(lambda: src.read(1 << 20), b""):
            got += len(chunk)
            yield chunk
    if got != expected:
        raise StoreError(f"{path} holds {got} bytes, its extents need {expected}", step="write")


@dataclass(frozen=True)
class _DiskWrite:
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


def _disk_write(delta: DiskDelta) -> _DiskWrite:
    stored_bytes = sum(length for _, length in delta.stored)
    return _DiskWrite(
        delta.id, delta.format, delta.size, delta.path, delta.full, delta.stored, delta.zeroed,
        delta.bitmap, _file_chunks(delta.data_path, stored_bytes),
    )  # fmt: skip


def _write_disks(
    disks: list[_DiskWrite],
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


def _page_chunks(
    ram: RamImage | PageSet, parts: list[BlockIndex]
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


def _check_content(content: LayerContent) -> list[BlockIndex]:
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
        if isinstance(ram, PageSet):
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
