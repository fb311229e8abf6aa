"""A store: a directory of immutable, checksummed layers, written crash-safely; the only
code that knows a store's layout (with its collaborators in this package: layerio.py its
files, catalog.py its catalog, compose.py, disks.py, media.py, transfer.py, adopt.py,
maintenance.py). What belongs to this host (guests' records, sockets, logs, restored
disks) is not in the store: vmckpt/hostdirs.py, reached as ``store.host``.

Layout (docs/FORMAT.md has the byte-level specification)::

    store/vmckpt-store.json     marker: format [1, 5], the store id, its encryption
    store/catalog.json          the sealed catalog: the store's layers (each with the digest
                                of its manifest) and every guest's head
    store/*.lock                the store, chain and maintenance locks (vmckpt/locks.py)
    store/layers/<id>/          one layer (manifest.json, manifest.mac, its files)
    store/layers/.tmp-<id>-<r>/ a layer being written or imported; never read, never listed
    store/media/<sha256>/<file> boot media copied from another host, found by content

A layer is the store's once its complete, fsynced directory is renamed into place *and*
the catalog names it: the catalog's write, under the store lock, is the commit point (and
moves the guest's head with it), so a crash leaves the layer either committed with its head
or invisible (``gc`` removes it). Every layer is sealed (manifest.mac, keys.py) and read
only if its seal holds and the catalog names that version of it; nothing in a store is
followed as a link (docs/SECURITY.md). An encrypted store holds its layer files encrypted
(crypt.py) behind the same reader and writer.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from vmckpt import faults, locks, log
from vmckpt.errors import CorruptLayerError, StoreError
from vmckpt.fsutil import (
    DIR_MODE,
    fsync_dir,
    parse_json,
)
from vmckpt.hostdirs import NAME_RE, HostDirs, host_id
from vmckpt.images import crypt, keys, legacy
from vmckpt.images import format as fmt
from vmckpt.images.catalog import (
    CATALOG,
    MAX_CATALOG_BYTES,
    Catalog,
    Head,
    head_key,
    manifest_digest,
)
from vmckpt.images.compose import Coverage, gather, walk_chain
from vmckpt.images.format import (
    DEVICE,
    LAYER_ID_RE,
    MANIFEST,
    PRELUDE,
    STORE_FORMAT,
    BlockIndex,
    LayerContent,
    LayerManifest,
)
from vmckpt.images.layerio import (
    LAYERS_DIR,
    MAX_MANIFEST_BYTES,
    TMP_PREFIX,
    DiskWrite,
    LayerReader,
    LayerWriter,
    StoreFiles,
    TempLayer,
    check_content,
)
from vmckpt.ram import PageTarget, RamBlock, RamImage

STORE_MARKER = "vmckpt-store.json"
MEDIA_DIR = "media"
RUNTIME_NAME_RE = NAME_RE
MAX_MARKER_BYTES = 1 << 16
STORE_LOCK_WAIT_S = 60.0  # publishing a layer holds it for milliseconds; maintenance longer

# Pages copied per step when writing or composing: caps the temporary copy at 64 MiB.
CHUNK_PAGES = 16384
# RAM a layer may describe beyond its guest's memory: video RAM, ROMs, ACPI tables.
RAM_SLACK_BYTES = 1 << 30

_log = log.get(__name__)
T = TypeVar("T", bound=PageTarget)


def marker_bytes(store_id: str, encryption: str | None) -> bytes:
    """The store marker, naming the store's id and (1.4) its encryption."""
    marker: dict[str, Any] = {
        "format": STORE_FORMAT,
        # 1.3: the marker names the store's id, the name of its key (images/keys.py); 1.5:
        # the store has a catalog, which an older reader would ignore (so it refuses it).
        "format_version": [fmt.FORMAT_MAJOR, fmt.CATALOG_MINOR],
        "store_id": store_id,
    }
    if encryption is not None:
        marker["encryption"] = encryption
    return fmt.manifest_bytes(marker)


def _encryption_text(encryption: str | None) -> str:
    return f"encrypted ({encryption})" if encryption else "not encrypted"


def is_real_dir(path: Path) -> bool:
    """A directory, not a symbolic link to one."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


class Store:
    """A vmckpt store on disk: its layers (list, resolve, verify, compose, write, import),
    its catalog and heads, media copies, and (through vmckpt/hostdirs.py) what this host
    keeps for its guests. Its files are reached through :class:`StoreFiles` (layerio.py)."""

    def __init__(self, path: Path | str) -> None:
        """Open an existing store; StoreError if ``path`` is missing or not a store."""
        self.path = Path(path).expanduser().absolute()
        if not self.path.exists():
            raise StoreError(
                f"store {self.path} does not exist (create it with `vmckpt init {self.path}`)",
                step="open",
            )
        marker = self.path / STORE_MARKER
        if not is_real_dir(self.path) or not marker.is_file() or marker.is_symlink():
            raise StoreError(
                f"{self.path} is not a vmckpt store (it has no {STORE_MARKER})", step="open"
            )
        for sub in (LAYERS_DIR, MEDIA_DIR):
            if os.path.lexists(self.path / sub) and not is_real_dir(self.path / sub):
                raise StoreError(
                    f"{self.path / sub} is not a directory of the store (a link?): refused",
                    step="open",
                )
        self.files = StoreFiles(self.path)
        try:
            obj = parse_json(self.files.read_root_file(STORE_MARKER, MAX_MARKER_BYTES))
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
        self.locks = locks.StoreLocks(self.path, lambda: self.files.root.fd)
        self.reader = LayerReader(self.files, self.codec)

    def close(self) -> None:
        """Give back the store's open directories (a dropped Store gives them back when it
        is collected; a long-lived process closes the stores it is done with)."""
        self.files.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @classmethod
    def create(
        cls, path: Path | str, *, parents: bool = False, encrypt: bool = False,
        key: keys.StoreKey | None = None,
    ) -> Store:  # fmt: skip
        """Create a store at ``path``, or open it if it is one already.

        Only the last component is created unless ``parents``: a missing parent
        directory is refused (a typo in a store path must not create a store
        somewhere unexpected), as is a non-empty directory that is not a store.
        The marker file is written last, atomically, so a half-created store is
        not a store. ``encrypt``: its layer files are encrypted (crypt.py); an
        existing store that is not is refused (a store is never converted in place).
        ``key``: that key's id and encryption (a bucket's working copy, bucketstore.py).
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
                os.mkdir(path, DIR_MODE)
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
            os.chmod(path, DIR_MODE)  # whatever the umask
            files = StoreFiles(path)
            try:
                files.mkdir_layers()
                # The key first: a store with a marker always has one; then its (empty)
                # catalog; the marker last.
                store_id = key.store_id if key else keys.new_store_id()
                encryption = key.encryption if key else (crypt.ALGORITHM if encrypt else None)
                key = key or keys.create_key(store_id, path, encryption)
                catalog = Catalog(store_id, generation=keys.seen_generation(store_id) + 1)
                files.replace_root_file(CATALOG, catalog.encode(key))
                keys.note_generation(store_id, catalog.generation)
                files.replace_root_file(STORE_MARKER, marker_bytes(store_id, encryption))
            finally:
                files.close()
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

    def codec(self, step: str) -> crypt.Codec:
        """How the store holds its layer files: in the clear, or encrypted under its key."""
        if self.encryption is None:
            return crypt.PLAIN
        if self._sealed is None:
            key = self.sealing_key(step)
            self._sealed = crypt.SealedCodec(key.store_id, key.key)
        return self._sealed

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

    def sealing_key(self, step: str) -> keys.StoreKey:
        key = self.key
        if key is None:
            raise self.no_key_error(step)
        return key

    def origin_of(self, layer_id: str, manifest: bytes, step: str) -> str:
        """The layer's origin from its seal, checked against the manifest's bytes."""
        try:
            seal = self.files.read_layer_file(layer_id, keys.SEAL, keys.MAX_SEAL_BYTES, step)
        except FileNotFoundError:
            return keys.UNSEALED
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

    def seal_bytes(self, layer_id: str, origin: str, manifest: bytes) -> bytes:
        """A layer's seal (manifest.mac) under the store's key."""
        return keys.seal_bytes(self.sealing_key("seal"), layer_id, origin, manifest)

    def use_key(self, key: keys.StoreKey) -> None:
        """Work with ``key`` from now on (images/adopt.py: the key the layers authenticate
        with, or a new one): the store's id, encryption and host directories follow it."""
        self.store_id, self.encryption, self._key = key.store_id, key.encryption, key
        self.host = HostDirs.for_store(key.store_id, self.path)
        self._sealed = None
        self._catalog_cache = None

    def write_catalog(self, catalog: Catalog) -> None:
        """Replace the catalog with ``catalog`` (adopt; everything else goes through
        :meth:`update_catalog`), sealed under the store's key, and note its generation."""
        assert self.store_id is not None
        self.files.replace_root_file(CATALOG, catalog.encode(self.sealing_key("catalog")))
        keys.note_generation(self.store_id, catalog.generation)
        self._catalog_cache = None

    def authenticates(self, layer_id: str) -> bool:
        """Whether a layer directory's seal authenticates its manifest with this store's key
        (whether the catalog names it or not)."""
        try:
            _, data = self.manifest_unchecked(layer_id, "check")
            return keys.is_sealed(self.origin_of(layer_id, data, "check"))
        except StoreError:
            return False

    def origin_or_unsealed(self, layer_id: str, data: bytes, step: str) -> str:
        try:
            return self.origin_of(layer_id, data, step)
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
        found = self.load_catalog(key, step)
        return found if found is not None else self._first_catalog(key, step)

    def load_catalog(self, key: keys.StoreKey, step: str) -> Catalog | None:
        """The catalog file, authenticated and its generation checked; None if missing."""
        assert self.store_id is not None
        try:
            stamp = self.files.root_stamp(CATALOG)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreError(f"{CATALOG}: {exc.strerror or exc}", step=step) from exc
        if self._catalog_cache is not None and self._catalog_cache[0] == stamp:
            return self._catalog_cache[1]
        try:
            data = self.files.read_root_file(CATALOG, MAX_CATALOG_BYTES)
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
        catalog = self.catalog_from_directory(key, legacy_heads=True)
        try:
            with self.lock("make the store's catalog"):
                found = self.load_catalog(key, step)
                if found is not None:  # another command made it meanwhile
                    return found
                self.files.replace_root_file(CATALOG, catalog.encode(key))
                self.write_marker()
        except (OSError, StoreError) as exc:
            _log.warning("store %s: its catalog cannot be written (%s); read as is", self.path, exc)
            return replace(catalog, generation=0)
        keys.note_generation(self.store_id, catalog.generation)
        return catalog

    def catalog_from_directory(self, key: keys.StoreKey, *, legacy_heads: bool) -> Catalog:
        """A first catalog: every layer directory whose seal authenticates (and, for a store
        made before catalogs, the heads it kept in its guests' directories)."""
        assert self.store_id is not None
        layers: dict[str, list[str]] = {}
        for layer_id in self.directory_layer_names():
            try:
                _, data = self.manifest_unchecked(layer_id, "catalog")
                if keys.is_sealed(self.origin_of(layer_id, data, "catalog")):
                    layers[layer_id] = [manifest_digest(data)]
            except StoreError:
                continue
        heads = legacy.heads(self.path, set(layers)) if legacy_heads else {}
        return Catalog(self.store_id).changed(add=layers, heads=heads)

    def update_catalog(
        self,
        step: str,
        *,
        add: dict[str, list[str]] | None = None,
        drop: Iterable[str] = (),
        heads: dict[str, Head | None] | None = None,
    ) -> Catalog:
        """Write the catalog's next generation (call under the store lock): layers added (or
        their accepted versions replaced), layers dropped, heads set (None: removed)."""
        key = self.sealing_key(step)
        current = self.catalog(step)
        assert current is not None and self.store_id is not None
        catalog = current.changed(add=add, drop=drop, heads=heads)
        self.files.replace_root_file(CATALOG, catalog.encode(key))
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
        missing = [i for i in catalog.layers if not self.files.is_layer_dir(i)]
        settled: dict[str, list[str]] = {}
        for layer_id, versions in catalog.layers.items():
            if len(versions) > 1 and layer_id not in missing:
                with contextlib.suppress(StoreError):
                    _, data = self.manifest_unchecked(layer_id, step)
                    if manifest_digest(data) in versions:
                        settled[layer_id] = [manifest_digest(data)]
        if missing or settled:
            self.update_catalog(step, add=settled, drop=missing)

    def write_marker(self) -> None:
        """Replace the marker (1.5: the store has a catalog), naming the store's id."""
        assert self.store_id is not None
        self.files.replace_root_file(STORE_MARKER, marker_bytes(self.store_id, self.encryption))
        self.marker_version = (fmt.FORMAT_MAJOR, fmt.CATALOG_MINOR)

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

    def directory_layer_names(self) -> list[str]:
        """The layer directories, whether the catalog names them or not."""
        return self.files.layer_names()

    def layer_names(self) -> list[str]:
        """The store's layers: those its catalog names whose directory is there (without a
        key: every layer directory, none of them authenticated)."""
        catalog = self.catalog("list")
        if catalog is None:
            return self.directory_layer_names()
        return [i for i in catalog.layers if self.files.is_layer_dir(i)]

    def uncatalogued(self) -> list[str]:
        """Layer directories the catalog does not name: a layer a crash left between its
        rename and the catalog's write, one deleted or replaced by maintenance and put back,
        one copied in by hand, or one of a store made before seals (`init --adopt`)."""
        catalog = self.catalog("list")
        if catalog is None:
            return []
        return sorted(set(self.directory_layer_names()) - set(catalog.layers))

    def layer_ids(self) -> list[str]:
        """Ids of the layers in the store, oldest first (by created time, then id).

        Lists every layer directory, damaged ones too, so that `verify` reports them.
        """

        def created(layer_id: str) -> str:
            try:
                data = self.files.read_layer_file(layer_id, MANIFEST, MAX_MANIFEST_BYTES, "list")
                obj = parse_json(data)
            except (OSError, ValueError, StoreError):
                return ""
            value = obj.get("created") if isinstance(obj, dict) else None
            return value if isinstance(value, str) else ""

        return sorted(self.layer_names(), key=lambda layer_id: (created(layer_id), layer_id))

    def has_layer(self, layer_id: str) -> bool:
        if not self.files.is_layer_dir(layer_id):
            return False
        catalog = self.catalog("read")
        return catalog is None or layer_id in catalog.layers

    def _new_layer_id(self) -> str:
        """A fresh id (call under the store lock): 1 + the highest sequence number of any
        layer or layer being written, and 6 random hex digits."""
        seqs: list[int] = []
        for entry in self.files.entry_names():
            head = entry.removeprefix(TMP_PREFIX).split("-", 1)[0]
            if head.isdigit():
                seqs.append(int(head))
        return f"{max(seqs, default=0) + 1:04d}-{secrets.token_hex(3)}"

    def resolve(self, ref: str) -> str:
        """The layer id that ``ref`` names exactly or as a unique prefix."""
        names = sorted(self.layer_names())
        if ref in names:
            return ref
        matches = [name for name in names if ref and name.startswith(ref)]
        if not matches:
            strays = [name for name in self.uncatalogued() if ref and name.startswith(ref)]
            if strays:
                raise StoreError(
                    f"{strays[0]} is not a layer of {self.path}: its directory is there, but "
                    "the store's catalog does not name it (left by a crash, removed by a prune "
                    "or delete and put back, or copied in by hand)",
                    step="resolve",
                )
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

    # --- locks (vmckpt/locks.py) -----------------------------------------------------

    def lock(self, what: str, wait_s: float = STORE_LOCK_WAIT_S) -> AbstractContextManager[None]:
        """The store lock (re-entrant within a thread that holds it through this Store)."""
        return self.locks.store(what, wait_s)

    def reading(self, what: str, wait_s: float = STORE_LOCK_WAIT_S) -> AbstractContextManager[None]:
        """The chain lock, shared: held while a chain is read."""
        return self.locks.chain(what, wait_s, shared=True)

    def switching(
        self, what: str, wait_s: float = STORE_LOCK_WAIT_S
    ) -> AbstractContextManager[None]:
        """The chain lock, exclusive: chain maintenance switching layers."""
        return self.locks.chain(what, wait_s, shared=False)

    def maintenance_lock(
        self, what: str, wait_s: float = STORE_LOCK_WAIT_S
    ) -> AbstractContextManager[None]:
        """One chain maintenance (prune, squash, delete, gc) at a time."""
        return self.locks.maintenance(what, wait_s)

    # --- heads (in the catalog) ---------------------------------------------------

    def head(self, name: str, kind: str = "guest") -> str | None:
        """The layer guest ``name``'s next checkpoint is a delta against, or None."""
        catalog = self.catalog("head")
        if catalog is None:
            return None
        head = catalog.heads.get(head_key(kind, name))
        if head is not None and self.files.is_layer_dir(head.layer):
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
            self.update_catalog("head", heads={head_key(k, n): None for k, n in guests})

    def set_head(self, name: str, layer_id: str | None, kind: str = "guest") -> None:
        """Move a guest's head (a restored guest starts from the layer it was restored from);
        None forgets it (its layers are no longer kept for it)."""
        self.host.runtime_path(name, kind)  # a name the catalog can hold
        with self.lock(f"set head of {name}"):
            if layer_id is not None and not self.has_layer(layer_id):
                raise StoreError(f"no layer {layer_id} to be the head of {name}", step="head")
            head = None if layer_id is None else Head(layer_id, host_id())
            self.update_catalog("head", heads={head_key(kind, name): head})

    # --- reading ----------------------------------------------------------

    def manifest(self, layer_id: str, step: str = "read") -> LayerManifest:
        """The layer's manifest, authenticated (its seal, the catalog), its checksum and
        format version checked."""
        return self._manifest(layer_id, step)

    def manifest_with_digest(self, layer_id: str, step: str) -> tuple[LayerManifest, str]:
        """The layer's manifest (as :meth:`manifest`) and the digest the catalog names it by."""
        manifest, data = self._manifest_checked(layer_id, step)
        return manifest, manifest_digest(data)

    def _manifest(self, layer_id: str, step: str) -> LayerManifest:
        return self._manifest_checked(layer_id, step)[0]

    def _manifest_checked(self, layer_id: str, step: str) -> tuple[LayerManifest, bytes]:
        manifest, data = self.manifest_unchecked(layer_id, step)
        origin = self.origin_of(layer_id, data, step)
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
        return replace(manifest, origin=origin), data

    def manifest_unchecked(self, layer_id: str, step: str) -> tuple[LayerManifest, bytes]:
        """The layer's manifest, checked but not authenticated, and its bytes."""
        try:
            data = self.files.read_layer_file(layer_id, MANIFEST, MAX_MANIFEST_BYTES, step)
        except FileNotFoundError as exc:
            raise CorruptLayerError(f"{MANIFEST} is missing", layer=layer_id, step=step) from exc
        manifest = fmt.parse_manifest(data, layer_id, step)
        if manifest.id != layer_id:
            raise CorruptLayerError(
                f"{MANIFEST}: id is {manifest.id!r}, but the layer directory is {layer_id!r}",
                layer=layer_id,
                step=step,
            )
        return manifest, data

    def chain(self, layer_id: str, step: str = "read") -> list[LayerManifest]:
        """The manifests from the base layer to ``layer_id``, base first, each authenticated
        and each link checked."""
        return self._chain(layer_id, step, {})

    def chain_unchecked(
        self, layer_id: str, step: str, cache: dict[str, LayerManifest]
    ) -> list[LayerManifest]:
        """The chain as :meth:`_chain` walks it, of layers not yet authenticated (adopt)."""

        def read(layer: str, step: str) -> LayerManifest:
            return self.manifest_unchecked(layer, step)[0]

        return self._chain(layer_id, step, cache, reader=read)

    def _chain(
        self,
        layer_id: str,
        step: str,
        cache: dict[str, LayerManifest],
        checked: set[str] | None = None,
        reader: Callable[[str, str], LayerManifest] | None = None,
    ) -> list[LayerManifest]:
        """The chain of ``layer_id``, base first, each link checked (compose.walk_chain)."""
        return walk_chain(reader or self._manifest, layer_id, step, cache, checked)

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
                    self.reader.check(manifest, "verify")
                return [manifest.id for manifest in chain]
            ids = self.layer_ids()
            checked: set[str] = set()
            for each in ids:
                checked.update(m.id for m in self._chain(each, "verify", cache, checked))
                self.require_sealed([cache[each]], "verify")
                self.reader.check(cache[each], "verify")
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
            self.check_ram_size(newest, "compose")
            blocks = [RamBlock(block.idstr, block.length) for block in newest.blocks]
            image = RamImage.zeroed(blocks)
            gather(self.reader, list(reversed(chain)), image, Coverage.of(blocks), "compose")
            prelude = self.reader.read_small(newest, PRELUDE, "compose")
            device = self.reader.read_small(newest, DEVICE, "compose")
        return image, prelude, device

    def compose_into(self, layer_id: str, make: Callable[[list[RamBlock]], T]) -> T:
        """The guest's RAM at ``layer_id`` put into the `PageTarget` ``make`` returns for
        the chain's RAM blocks (a `~vmckpt.ram.RamFile`: composed in bounded memory, a
        batch of pages at a time), every page checked as `compose` checks it. The target
        holds only checked pages, but is complete only if this returns."""
        with self.reading("compose"):
            chain = self._chain(layer_id, "compose", {})
            self.require_sealed(chain, "compose")
            newest = chain[-1]
            self.check_ram_size(newest, "compose")
            blocks = [RamBlock(block.idstr, block.length) for block in newest.blocks]
            target = make(blocks)
            gather(self.reader, list(reversed(chain)), target, Coverage.of(blocks), "compose")
        return target

    def check_ram_size(self, manifest: LayerManifest, step: str) -> None:
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

    # --- writing ----------------------------------------------------------

    def check_writable(self) -> None:
        """Refuse early (before a guest is paused for a checkpoint) a store that cannot take
        a new layer: a read-only file system, missing permissions, no key to seal it."""
        self.sealing_key("check-store")
        probe = f"{TMP_PREFIX}probe-{secrets.token_hex(4)}"
        try:
            layers = self.files.layers
            os.mkdir(probe, DIR_MODE, dir_fd=layers.fd)
            os.rmdir(probe, dir_fd=layers.fd)
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
        self.sealing_key("write")
        parts = check_content(content)
        if content.parent is not None:
            parent = self._manifest(content.parent, "write")
            layout = [(block.idstr, block.length) for block in content.ram.blocks]
            if parent.layout != layout:
                raise StoreError(
                    f"RAM block layout {layout} differs from that of parent "
                    f"{parent.id} {parent.layout}",
                    step="write",
                )
        if head_of is not None:
            self.host.runtime_path(head_of[1], head_of[0])  # a name the catalog can hold
        disks = [DiskWrite.of(delta) for delta in content.disks]
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        temp = self._make_temporary(None)
        try:
            manifest, digest = self.write_version(
                temp, content, parts, disks, created=created, origin=origin
            )
            faults.point(faults.MID_WRITE)
            self.publish(temp, digest, content.parent, head_of)
        except BaseException as exc:
            self.files.remove(temp.name)  # nothing, once renamed into place
            if isinstance(exc, OSError):
                raise write_error(exc, temp.layer_id) from exc
            raise
        finally:
            temp.close()
        return manifest

    def _make_temporary(self, layer_id: str | None) -> TempLayer:
        """A temporary layer directory layers/.tmp-<id>-<random>/ (for a new id if
        ``layer_id`` is None), made and locked under the store lock (close it when done)."""
        try:
            with self.lock("allocate a layer id" if layer_id is None else f"write {layer_id}"):
                if layer_id is None:
                    self._remove_dead_temporaries()
                    layer_id = self._new_layer_id()
                return self.files.new_temporary(layer_id)
        except OSError as exc:
            raise StoreError(
                f"cannot write into {self.layers_path}: {exc.strerror or exc}", step="write"
            ) from exc

    def new_version(self, layer_id: str | None) -> TempLayer:
        """A temporary directory for a new version of layer ``layer_id`` (chain maintenance
        writes it with :meth:`write_version`; close it when done); None: for a new layer,
        under a new id."""
        return self._make_temporary(layer_id)

    def _remove_dead_temporaries(self) -> None:
        """Temporary layer directories whose writer died (their lock is free) go at the next
        commit (gc removes them too). Call under the store lock."""
        for name in self.files.entry_names():
            if name.startswith(TMP_PREFIX) and not self.files.temporary_in_use(name):
                self.files.remove(name)

    def write_version(
        self,
        temp: TempLayer,
        content: LayerContent,
        parts: list[BlockIndex],
        disks: list[DiskWrite],
        *,
        created: str,
        origin: str,
    ) -> tuple[LayerManifest, str]:
        """Write a complete layer into ``temp`` (layerio.LayerWriter): its files, its seal,
        its manifest. Returns the manifest as read back and the digest the catalog names it
        by."""
        writer = LayerWriter(self.codec("write"))
        manifest, data = writer.write(
            temp, content, parts, disks, created=created, origin=origin, seal=self.seal_bytes
        )
        return manifest, manifest_digest(data)

    def publish(
        self,
        temp: TempLayer,
        digest: str,
        parent: str | None,
        head_of: tuple[str, str] | None,
    ) -> None:
        """Rename a complete temporary layer into place, then commit it (and move the head)
        in the catalog, under the store lock. A failure before the catalog's write removes
        the layer's directory."""
        layer_id = temp.layer_id
        renamed = False
        try:
            with self.lock(f"publish layer {layer_id}"):
                if parent is not None and not self.has_layer(parent):
                    # A prune or delete removed it while this layer was being written.
                    raise StoreError(
                        f"its parent layer {parent} was removed meanwhile", layer=layer_id,
                        step="write",
                    )  # fmt: skip
                self.files.publish(temp, layer_id)
                renamed = True
                faults.point(faults.BEFORE_HEAD)
                heads: dict[str, Head | None] = {}
                if head_of is not None:
                    kind, name = head_of
                    heads[head_key(kind, name)] = Head(layer_id, host_id())
                self.update_catalog("write", add={layer_id: [digest]}, heads=heads)
        except BaseException as exc:
            if renamed:
                self.files.unpublish(layer_id)
            if isinstance(exc, OSError):
                raise write_error(exc, layer_id) from exc
            raise

    def manifest_sha256(self, layer_id: str) -> str:
        """The SHA-256 of a layer's manifest.json file as stored (its identity across stores)."""
        data = self.files.read_layer_file(layer_id, MANIFEST, MAX_MANIFEST_BYTES, "read")
        catalog = self.catalog("read")
        if catalog is not None and not catalog.accepts(layer_id, manifest_digest(data)):
            self.manifest(layer_id)  # says what is wrong with it
        return manifest_digest(data)

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


def write_error(exc: OSError, layer_id: str) -> StoreError:
    """An OSError while writing a layer, as a StoreError naming the file."""
    where = Path(exc.filename).name if exc.filename else "layer directory"
    return StoreError(f"{where}: {exc.strerror or exc}", layer=layer_id, step="write")
