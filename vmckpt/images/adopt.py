"""``vmckpt init --adopt``: a store's layers checked and sealed with this user's key, and its
catalog made anew — for a store made before layers were sealed, one whose key is elsewhere,
one whose marker was changed, or one put back from a backup on purpose. It never lowers a
store's protection (docs/SECURITY.md): an encrypted store is never given a key that does not
encrypt, and a store whose layers authenticate with a key of this user's gets that key's id
back rather than a new key, unless a new key is asked for.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from vmckpt import log
from vmckpt.errors import StoreError
from vmckpt.images import crypt, keys, legacy
from vmckpt.images import format as fmt
from vmckpt.images.catalog import Catalog, Head, manifest_digest
from vmckpt.images.format import PAGES, LayerManifest
from vmckpt.images.layerio import TMP_PREFIX
from vmckpt.images.store import Store

_log = log.get(__name__)


@dataclass
class AdoptResult:
    """What :func:`adopt` did: the store's id, whether its key is new, the layers sealed,
    those that authenticated already, and those refused with the reason."""

    store_id: str
    new_key: bool
    sealed: list[str] = field(default_factory=list)
    already: list[str] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)


def adopt(store: Store, *, new_key: bool = False, accept_rollback: bool = False) -> AdoptResult:
    """Check the store's layers and seal those that do not authenticate yet (origin
    ``adopted``), making the store's key first if this user has none, and name them in a
    new catalog.

    For a store made before layers were sealed (no store id), or one whose key is not
    here: a new store id and key, and every layer that passes its checks (manifest, chain
    links, every file and page, as verify) is sealed anew. With a key: only the layers that
    do not authenticate are. A layer whose content fails a check is left as it is, out of
    the catalog, and reported. The user vouches for what is sealed: run it only on a store
    whose layers you trust.

    ``new_key``: re-key even though the layers authenticate with a key of this user's.
    ``accept_rollback``: accept the catalog as it is (or make it from the layers if it is
    missing), for a store put back from a backup on purpose. Holds every lock of the store:
    no checkpoint, maintenance or reader runs meanwhile.
    """
    step = "adopt"
    with store.maintenance_lock(step), store.switching(step), store.lock(step):
        for name in store.files.entry_names():
            if name.startswith(TMP_PREFIX) and store.files.temporary_in_use(name):
                raise StoreError(
                    "a layer is being written (a checkpoint runs); try again when it is done",
                    step=step,
                )
        made = False
        key = store.key
        if key is None:
            key, made = _adopt_key(store, new_key, step)
            store.use_key(key)
        store_id = key.store_id
        result = AdoptResult(store_id, new_key=made)
        if accept_rollback:
            keys.forget_generation(store_id)
        try:
            catalog = None if made else store.load_catalog(key, step)
        except StoreError:
            if not accept_rollback:
                raise
            catalog = None
        if catalog is None:
            catalog = store.catalog_from_directory(key, legacy_heads=False)
        cache: dict[str, LayerManifest] = {}
        adopted: dict[str, list[str]] = {}
        for layer_id in sorted(store.directory_layer_names()):
            try:
                manifest, data = store.manifest_unchecked(layer_id, step)
                digest = manifest_digest(data)
                origin = store.origin_or_unsealed(layer_id, data, step)
                if keys.is_sealed(origin) and catalog.accepts(layer_id, digest):
                    result.already.append(layer_id)
                    continue
                store.chain_unchecked(layer_id, step, cache)
                store.reader.check(manifest, step)
            except StoreError as exc:
                result.refused.append((layer_id, exc.one_line()))
                continue
            seal = keys.seal_bytes(key, layer_id, keys.ADOPTED, data)
            store.files.replace_layer_file(layer_id, keys.SEAL, seal)
            adopted[layer_id] = [digest]
            result.sealed.append(layer_id)
        kept = [i for i in catalog.layers if i in result.already]
        layers = {i: list(catalog.layers[i]) for i in kept} | adopted
        heads: dict[str, Head | None] = dict(catalog.heads)
        if store.marker_version < (fmt.FORMAT_MAJOR, fmt.CATALOG_MINOR):
            heads = legacy.heads(store.path, set(layers)) | heads
        store.write_catalog(Catalog(store_id, catalog.generation).changed(add=layers, heads=heads))
        store.write_marker()
    return result


def _adopt_key(store: Store, new_key: bool, step: str) -> tuple[keys.StoreKey, bool]:
    """The key to seal with when this user has none for the marker's store id, and whether
    it is new: the key of this user's that the layers authenticate with (the marker was
    changed: its id is put back, and the key file, trusted, says whether the store is
    encrypted), or a new one (a store made before seals, or whose key is lost)."""
    encrypted_files = _encrypted_layer_files(store)
    found = _key_of_layers(store)
    if found is not None and not new_key:
        return found, False
    if store.encrypted or encrypted_files:
        evidence = (
            f"its layer files ({encrypted_files[0]}, ...) are"
            if encrypted_files
            else "its marker says so"
        )
        raise StoreError(
            f"store {store.path} is encrypted and this user has no key for it ({evidence} "
            "encrypted): its layers cannot be read without the key, so they cannot be "
            "adopted, and a new key would not encrypt what comes next (copy the key from "
            "where the store was made)",
            step=step,
        )
    if found is not None:
        _log.warning(
            "store %s: re-keyed on request: its layers authenticated with an existing key; "
            "they are sealed anew as `adopted`, so their free-form QEMU arguments and domain "
            "XML are no longer used on restore, and copies of the old key no longer open it",
            store.path,
        )
    store_id = keys.new_store_id()
    return keys.create_key(store_id, store.path), True


def _encrypted_layer_files(store: Store) -> list[str]:
    """Layer files that start like an encrypted one (crypt.MAGIC), whatever the marker says."""
    found = []
    for layer_id in store.directory_layer_names():
        with contextlib.suppress(OSError, StoreError):
            fd, _ = store.files.open_layer_file(layer_id, PAGES, "adopt")
            try:
                if os.read(fd, len(crypt.MAGIC)) == crypt.MAGIC:
                    found.append(f"{layer_id}/{PAGES}")
            finally:
                os.close(fd)
    return found


def _key_of_layers(store: Store) -> keys.StoreKey | None:
    """A key of this user's (any store id) that a sealed layer of this store authenticates
    with, or None."""
    for layer_id in store.directory_layer_names():
        try:
            _, data = store.manifest_unchecked(layer_id, "adopt")
            seal = store.files.read_layer_file(layer_id, keys.SEAL, keys.MAX_SEAL_BYTES, "adopt")
        except (StoreError, OSError):
            continue
        for candidate in keys.all_keys():
            with contextlib.suppress(StoreError):
                keys.check_seal(candidate, layer_id, data, seal, "adopt")
                return candidate
    return None
