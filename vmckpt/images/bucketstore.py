"""A store whose layers live in an S3-compatible bucket (``vmckpt init s3://BUCKET/PREFIX``),
shared by several hosts: the bucket is the store of record, and each host works through its
own *working copy*, an ordinary directory store with the same id and key in this host's data
directory (hostdirs), so the layer writer, reader, compose and restore run unchanged on local
files. docs/FORMAT.md, *A store in a bucket*, specifies the layout.

In the bucket, under the prefix, the store is laid out as a directory store is:
``vmckpt-store.json`` (the marker, created once, If-None-Match), ``catalog.json`` (the sealed
catalog, replaced only by compare-and-swap, If-Match on its ETag) and
``layers/<id>/<file>`` (a layer's files as the store holds them, encrypted in an encrypted
store, its ``manifest.json`` and ``manifest.mac``). Layer objects never change once the
catalog names them; the catalog is the commit point, as in a directory store:

- a checkpoint commits its layer into the working copy (the pause is that of a directory
  store), then :meth:`BucketStore.push` uploads every file of each layer the bucket's
  catalog does not name, parents first, and only then swaps the catalog for one that names
  them (and this host's guests' heads), retrying on a lost race. An upload that is
  interrupted leaves objects no catalog names: invisible, removed by :meth:`BucketStore.gc`
  once older than a grace period; the layer stays in the working copy until a push succeeds.
- a restore fetches the chain of the layer it needs, only the layers the working copy lacks:
  each manifest must be one the (authenticated) catalog names, its seal must authenticate
  with the store's key, and each file is checked against its manifest's size and digest (an
  encrypted file's records authenticate when read) before the copy is published in the
  working copy.
- a prune, delete or squash (bucketmaint.py) removes layers by one swap of the catalog that
  drops them and records them as ``removed`` (format 1.6), then deletes their objects; no
  host uploads, resolves or restores a removed layer again, and :meth:`BucketStore.gc`
  deletes what objects of one are left and drops it from the working copy.

No lock is held in the bucket, so a dead host leaves none behind.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from vmckpt import faults, log
from vmckpt.errors import BucketError, CorruptLayerError, StoreError
from vmckpt.fsutil import parse_json, read_json, write_json_atomic
from vmckpt.hostdirs import data_root, host_id, private_dir
from vmckpt.images import crypt, keys
from vmckpt.images import format as fmt
from vmckpt.images.bucket import Bucket, BucketConfig, BucketUrl
from vmckpt.images.catalog import CATALOG, MAX_CATALOG_BYTES, Catalog, Head, manifest_digest
from vmckpt.images.format import LAYER_ID_RE, MANIFEST, LayerManifest
from vmckpt.images.layerio import LAYERS_DIR, MAX_MANIFEST_BYTES
from vmckpt.images.store import MAX_MARKER_BYTES, STORE_MARKER, Store, marker_bytes

WORKING_DIR = "buckets"  # under data_root(): one working copy per bucket store
WHERE_FILE = "bucket.json"  # beside it: the URL, and the endpoint and region init was given
CAS_ATTEMPTS = 20
GC_GRACE_S = 3600.0  # objects of a layer no catalog names are left alone this long
# The working copy's bound (bytes, or with K/M/G/T), kept as layers are fetched: the layers
# this host needs for nothing (see trim) go, the least recently fetched first, to make room.
CACHE_LIMIT_ENV = "VMCKPT_CACHE_LIMIT"
_SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)(?:i?B)?", re.IGNORECASE)
_log = log.get(__name__)


def working_path(url: BucketUrl) -> Path:
    """This host's working copy of the store at ``url`` (whatever the endpoint: a copy that
    is of another store than the bucket's is refused when opened)."""
    digest = hashlib.sha256(str(url).encode()).hexdigest()[:32]
    top = private_dir(private_dir(data_root()) / WORKING_DIR)
    return private_dir(top / digest) / "store"


def remembered(url: BucketUrl) -> BucketConfig:
    """The endpoint and region ``vmckpt init`` was given for the store (this host's own
    file; never a credential); empty if none."""
    try:
        data = read_json(working_path(url).parent / WHERE_FILE)
    except FileNotFoundError:
        return BucketConfig()
    except (OSError, ValueError) as exc:
        raise StoreError(f"{working_path(url).parent / WHERE_FILE}: {exc}", step="open") from exc
    if not isinstance(data, dict):
        return BucketConfig()
    endpoint, region = data.get("endpoint"), data.get("region")
    return BucketConfig(
        endpoint=endpoint if isinstance(endpoint, str) else None,
        region=region if isinstance(region, str) else None,
    )


def remember(url: BucketUrl, config: BucketConfig) -> None:
    path = working_path(url).parent / WHERE_FILE
    write_json_atomic(path, {"url": str(url), "endpoint": config.endpoint, "region": config.region})


def cache_limit() -> int | None:
    """The working copy's bound in bytes ($VMCKPT_CACHE_LIMIT), or None: unbounded."""
    text = os.environ.get(CACHE_LIMIT_ENV, "").strip()
    if not text:
        return None
    match = _SIZE_RE.fullmatch(text)
    if match is None:
        raise StoreError(f"{CACHE_LIMIT_ENV}={text!r} is not a size (e.g. 20G)", step="open")
    return int(match.group(1)) << (10 * " KMGT".index(match.group(2).upper() or " "))


def _layer_key(layer_id: str, name: str) -> str:
    return f"{LAYERS_DIR}/{layer_id}/{name}"


@dataclass(frozen=True)
class PushResult:
    uploaded: list[str]
    heads: list[str]
    bytes_uploaded: int


class BucketStore:
    """A store in a bucket, reached through this host's working copy (``local``)."""

    def __init__(self, bucket: Bucket, local: Store) -> None:
        self.bucket = bucket
        self.local = local

    @property
    def name(self) -> str:
        return str(self.bucket.url)

    # --- opening --------------------------------------------------------------

    @classmethod
    def open(
        cls, url: BucketUrl, config: BucketConfig, *, create: bool = False, encrypt: bool = False
    ) -> tuple[BucketStore, bool]:
        """The store at ``url`` through this host's working copy (made on first use, from
        the bucket's marker: the user must have the store's key); ``create``: make the
        store in the bucket if it has none, and remember ``config``'s endpoint and region
        (they fill in, after the environment and the profile, what later commands lack).
        Returns the store and whether it was made."""
        config = config.fill(remembered(url))
        bucket = Bucket(url, config)
        path = working_path(url)
        if (path / STORE_MARKER).exists() and not create:
            return cls(bucket, Store(path)), False
        got = bucket.get(STORE_MARKER, MAX_MARKER_BYTES, "open")
        if got is None:
            if not create:
                raise StoreError(
                    f"bucket {url} holds no store (create it with `vmckpt init {url}`)",
                    step="open",
                )
            made = cls._create(bucket, path, encrypt)
            remember(url, config)
            return made, True
        store_id, encryption = _parse_marker(got[0], url)
        if encrypt and encryption is None:
            raise StoreError(
                f"bucket {url} holds a store that is not encrypted; a store is encrypted when "
                "it is made",
                step="create",
            )
        key = keys.load_key(store_id)
        if key is None:
            raise StoreError(
                f"bucket {url} holds store {store_id}, and this user has no key for it "
                f"({keys.key_path(store_id)}): copy it from a host that uses the store",
                step="open",
            )
        if key.encryption != encryption:
            raise StoreError(
                f"bucket {url}: its marker and the key {keys.key_path(store_id)} disagree on "
                "encryption; refused",
                step="open",
            )
        local = Store.create(path, key=key)
        if create:
            remember(url, config)
        if local.store_id != store_id:
            raise StoreError(
                f"{path} is the working copy of store {local.store_id}, but bucket {url} holds "
                f"store {store_id}; remove {path.parent} (after `vmckpt push`) to start again",
                step="open",
            )
        return cls(bucket, local), False

    @classmethod
    def _create(cls, bucket: Bucket, path: Path, encrypt: bool) -> BucketStore:
        """A new store: its working copy (id and key made here), then in the bucket its
        first catalog and, last, its marker, each only if there is none yet."""
        fresh = not (path / STORE_MARKER).exists()
        local = Store.create(path, encrypt=encrypt)
        try:
            return cls._create_in_bucket(bucket, local)
        except StoreError as exc:
            # A refused init leaves no working copy or key behind; one the object store
            # failed keeps them, so that running it again finishes what this one began.
            if fresh and not isinstance(exc, BucketError):
                local.close()
                shutil.rmtree(path, ignore_errors=True)
                if local.store_id is not None:
                    keys.key_path(local.store_id).unlink(missing_ok=True)
            raise

    @classmethod
    def _create_in_bucket(cls, bucket: Bucket, local: Store) -> BucketStore:
        assert local.store_id is not None
        key = local.sealing_key("create")
        catalog = Catalog(local.store_id, generation=1)
        url = bucket.url
        made = bucket.put(CATALOG, catalog.encode(key), "create", create=True) is not None
        if not made and not _own_catalog(bucket, key, local.store_id):
            raise StoreError(
                f"bucket {url} has a {CATALOG} but no {STORE_MARKER}: another host is making "
                "a store there, or one was left half made; refused",
                step="create",
            )
        keys.note_generation(local.store_id, 1, "bucket-seen")
        marker = marker_bytes(local.store_id, local.encryption)
        if bucket.put(STORE_MARKER, marker, "create", create=True) is None:
            raise StoreError(f"bucket {url}: another host made a store there", step="create")
        return cls(bucket, local)

    # --- the catalog ------------------------------------------------------------

    def catalog(self, step: str) -> tuple[Catalog, str]:
        """The bucket's catalog, authenticated and not older than this user has seen, and
        its ETag (what a replacement must name)."""
        key = self.local.sealing_key(step)
        assert self.local.store_id is not None
        got = self.bucket.get(CATALOG, MAX_CATALOG_BYTES, step)
        if got is None:
            raise StoreError(f"bucket {self.name} has no {CATALOG}; refused", step=step)
        catalog = Catalog.decode(got[0], key, self.local.store_id)
        seen = keys.seen_generation(self.local.store_id, "bucket-seen")
        if catalog.generation < seen:
            raise StoreError(
                f"bucket {self.name}: its {CATALOG} is generation {catalog.generation}, but "
                f"this user has seen generation {seen}: it was put back to an earlier state",
                step=step,
            )
        keys.note_generation(self.local.store_id, catalog.generation, "bucket-seen")
        return catalog, got[1]

    def resolve(self, ref: str, step: str = "resolve") -> str:
        """The layer ``ref`` names (exactly or as a unique prefix) in the bucket's catalog or
        among this host's layers not yet uploaded."""
        catalog, _ = self.catalog(step)
        here = (i for i in self.local.layer_names() if i not in catalog.removed)
        names = sorted(set(catalog.layers) | set(here))
        if ref in names:
            return ref
        matches = [name for name in names if ref and name.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            gone = [name for name in catalog.removed if ref and name.startswith(ref)]
            if len(gone) == 1:
                raise StoreError(
                    f"it was removed from bucket {self.name} (by a prune or delete)",
                    layer=gone[0],
                    step=step,
                )
            raise StoreError(f"no layer matches {ref!r} in {self.name}", step=step)
        raise StoreError(f"{ref!r} is ambiguous: it matches {', '.join(matches[:5])}", step=step)

    def pending(self) -> list[str]:
        """This host's layers that the bucket's catalog does not name, parents first."""
        catalog, _ = self.catalog("push")
        return self._pending(catalog)

    def _pending(self, catalog: Catalog) -> list[str]:
        """Not in the catalog, and not removed from the bucket: a removed layer this working
        copy still holds is never uploaded again (trim and gc drop it)."""
        local = [
            i
            for i in self.local.layer_ids()
            if i not in catalog.layers and i not in catalog.removed
        ]
        depth = {i: len(self.local.chain(i, "push")) for i in local}
        return sorted(local, key=lambda i: (depth[i], i))

    def _refuse_orphans(self, todo: list[str], catalog: Catalog) -> None:
        """A layer to upload whose parent the bucket removed cannot be pushed: its chain is
        gone from the store (it stays here, and restores here while its parent does)."""
        for layer_id in todo:
            parent = self.local.manifest(layer_id, "push").parent
            if parent is not None and parent in catalog.removed:
                raise StoreError(
                    f"it builds on {parent}, which was removed from bucket {self.name} (by a "
                    "prune or delete); it cannot be uploaded",
                    layer=layer_id,
                    step="push",
                )

    # --- push -------------------------------------------------------------------------

    def push(self) -> PushResult:
        """Upload this host's layers the bucket lacks (every file, parents first), then make
        them visible, with this host's guests' heads, by one compare-and-swap of the catalog
        (retried against the new catalog when another host won the race)."""
        catalog, etag = self.catalog("push")
        todo = self._pending(catalog)
        self._refuse_orphans(todo, catalog)
        uploaded = 0
        for layer_id in todo:
            uploaded += self._upload(layer_id)
        faults.point(faults.BEFORE_VISIBLE)
        mine = host_id()
        for _attempt in range(CAS_ATTEMPTS):
            local = self.local.catalog("push")
            assert local is not None
            self._refuse_orphans(todo, catalog)  # a removal may have come first
            add: dict[str, list[str]] = {}
            for layer_id in todo:
                digest = self.local.manifest_sha256(layer_id)
                known = catalog.layers.get(layer_id)
                if known is not None and digest not in known:
                    raise StoreError(
                        f"bucket {self.name} has a different layer under this id",
                        layer=layer_id,
                        step="push",
                    )
                if known is None and layer_id not in catalog.removed:
                    add[layer_id] = [digest]
            heads: dict[str, Head | None] = {
                key: head
                for key, head in local.heads.items()
                if head.host == mine
                and catalog.heads.get(key) != head
                and (head.layer in catalog.layers or head.layer in add)
            }
            if not add and not heads:
                return PushResult(todo, [], uploaded)
            new = catalog.changed(add=add, heads=heads)
            key = self.local.sealing_key("push")
            if self.bucket.put(CATALOG, new.encode(key), "push", if_match=etag) is not None:
                assert self.local.store_id is not None
                keys.note_generation(self.local.store_id, new.generation, "bucket-seen")
                return PushResult(todo, sorted(heads), uploaded)
            catalog, etag = self.catalog("push")  # another host's change came first
        raise BucketError(
            f"bucket {self.name}: its {CATALOG} changed {CAS_ATTEMPTS} times while this host "
            "tried to replace it; the layers stay here, `vmckpt push` tries again",
            step="push",
        )

    def _upload(self, layer_id: str) -> int:
        """Every file of a layer as an object, the manifest first and create-only (it claims
        the id: a different layer under it is refused), the seal last. Returns the bytes
        sent."""
        step = "push"
        self.local.manifest(layer_id, step)  # authenticated and named by the catalog
        manifest = self.local.files.read_layer_file(layer_id, MANIFEST, MAX_MANIFEST_BYTES, step)
        seal = self.local.files.read_layer_file(layer_id, keys.SEAL, keys.MAX_SEAL_BYTES, step)
        parsed = fmt.parse_manifest(manifest, layer_id, step)
        key = _layer_key(layer_id, MANIFEST)
        if self.bucket.put(key, manifest, step, layer=layer_id, create=True) is None:
            there = self.bucket.get(key, MAX_MANIFEST_BYTES, step, layer_id)
            if there is None or there[0] != manifest:
                raise StoreError(
                    f"bucket {self.name} has a different layer under this id",
                    layer=layer_id,
                    step=step,
                )
        sent = len(manifest)
        for name in sorted(parsed.files):
            fd, info = self.local.files.open_layer_file(layer_id, name, step)
            with os.fdopen(fd, "rb") as src:
                self.bucket.put(_layer_key(layer_id, name), src, step, layer=layer_id)
            sent += info.st_size
            faults.point(faults.MID_UPLOAD)
        self.bucket.put(_layer_key(layer_id, keys.SEAL), seal, step, layer=layer_id)
        return sent + len(seal)

    # --- fetch ----------------------------------------------------------------------

    def fetch(self, ref: str) -> tuple[str, list[str]]:
        """The layer ``ref`` names, with every layer of its chain this host lacks copied
        from the bucket into the working copy (checked first). Returns the layer's id and
        the ids fetched."""
        step = "fetch"
        catalog, _ = self.catalog(step)
        layer_id = self.resolve(ref, step)
        if self.local.has_layer(layer_id):
            for manifest in self.local.chain(layer_id, step):
                if manifest.id in catalog.removed:
                    raise StoreError(
                        f"it was removed from bucket {self.name} (by a prune or delete)",
                        layer=manifest.id,
                        step=step,
                    )
        missing: list[tuple[str, bytes, LayerManifest]] = []
        current: str | None = layer_id
        while current is not None and not self.local.has_layer(current):
            if len(missing) > len(catalog.layers):
                raise CorruptLayerError("its chain loops", layer=layer_id, step=step)
            if current not in catalog.layers:
                why = "removed (by a prune or delete)" if current in catalog.removed else "unknown"
                raise StoreError(
                    f"bucket {self.name}: its catalog does not name this layer ({why})",
                    layer=current,
                    step=step,
                )
            got = self.bucket.get(_layer_key(current, MANIFEST), MAX_MANIFEST_BYTES, step, current)
            if got is None or not catalog.accepts(current, manifest_digest(got[0])):
                raise CorruptLayerError(
                    f"bucket {self.name}: its {MANIFEST} is missing or not the one the "
                    "catalog names",
                    layer=current,
                    step=step,
                )
            manifest = fmt.parse_manifest(got[0], current, step)
            if manifest.id != current:
                raise CorruptLayerError(f"{MANIFEST} names layer {manifest.id}", layer=current)
            missing.append((current, got[0], manifest))
            current = manifest.parent
        if missing:
            needed = {m.id for _, _, m in missing}
            if current is not None:
                needed |= {m.id for m in self.local.chain(current, step)}
            self.make_room(sum(self._bytes(m) for _, _, m in missing), needed, catalog)
        for layer, data, manifest in reversed(missing):
            try:
                self._download(layer, data, manifest)
            except StoreError as exc:
                # Its objects may have gone because another host removed it meanwhile (the
                # catalog changes first): then say so, not that the bucket is damaged.
                if layer in self.catalog(step)[0].removed:
                    raise StoreError(
                        f"it was removed from bucket {self.name} (by a prune or delete on "
                        "another host) while this host fetched it; nothing was kept",
                        layer=layer,
                        step=step,
                    ) from exc
                raise
        return layer_id, [layer for layer, _, _ in reversed(missing)]

    def _download(self, layer_id: str, data: bytes, manifest: LayerManifest) -> None:
        step = "fetch"
        seal = self.bucket.get(_layer_key(layer_id, keys.SEAL), keys.MAX_SEAL_BYTES, step, layer_id)
        if seal is None:
            raise CorruptLayerError(f"bucket {self.name}: {keys.SEAL} is missing", layer=layer_id)
        origin = keys.check_seal(self.local.sealing_key(step), layer_id, data, seal[0], step)
        _log.info("fetch layer %s (origin %s) from %s", layer_id, origin, self.name)
        temp = self.local.new_version(layer_id)
        try:
            for name, entry in sorted(manifest.files.items()):
                size = crypt.sealed_size(entry.size) if self.local.encrypted else entry.size
                chunks = self.bucket.stream(_layer_key(layer_id, name), size, step, layer_id)
                written = temp.write(name, chunks)
                if written.size != size or (
                    not self.local.encrypted and written.sha256 != entry.sha256
                ):
                    raise CorruptLayerError(
                        f"bucket {self.name}: {name} does not match its manifest (size or sha256)",
                        layer=layer_id,
                        step=step,
                    )
            temp.write(MANIFEST, [data])
            temp.write(keys.SEAL, [seal[0]])
            temp.sync()
            self.local.publish(temp, manifest_digest(data), manifest.parent, None)
        except BaseException:
            self.local.files.remove(temp.name)
            raise
        finally:
            temp.close()

    def _bytes(self, manifest: LayerManifest) -> int:
        """What a layer's files take in the working copy."""
        sizes = (entry.size for entry in manifest.files.values())
        return sum(crypt.sealed_size(n) if self.local.encrypted else n for n in sizes)

    def make_room(self, incoming: int, needed: set[str], catalog: Catalog) -> list[str]:
        """Keep the working copy within $VMCKPT_CACHE_LIMIT once ``incoming`` bytes are
        fetched: remove the layers trim would (this host needs them for nothing), the least
        recently fetched first, never one of ``needed``, until it fits. What this host needs
        is kept even beyond the bound (a warning says so). Returns the layer ids removed."""
        limit = cache_limit()
        if limit is None:
            return []
        local = self.local
        step = "fetch"
        with local.maintenance_lock(step), local.switching(step), local.lock(step):
            held = {i: self._bytes(local.manifest(i, step)) for i in local.layer_names()}
            total = sum(held.values()) + incoming
            candidates = [i for i in _evictable(self, catalog) if i not in needed]
            candidates.sort(key=lambda i: local.layer_path(i).stat().st_mtime)
            evict: list[str] = []
            for layer_id in candidates:
                if total <= limit:
                    break
                evict.append(layer_id)
                total -= held[layer_id]
            if evict:
                local.update_catalog(step, drop=evict)  # first: a crash leaves strays, gc's
        for layer_id in evict:
            local.files.remove(layer_id)
        if total > limit:
            _log.warning(
                "%s: the working copy holds %d bytes with this fetch, above %s=%d: the rest "
                "is what this host's guests build on or has not uploaded",
                self.name, total, CACHE_LIMIT_ENV, limit,
            )  # fmt: skip
        return evict

    def fetch_all(self) -> list[str]:
        """Every layer the bucket's catalog names, fetched where this host lacks it."""
        catalog, _ = self.catalog("fetch")
        fetched: list[str] = []
        for layer_id in sorted(catalog.layers):
            fetched += self.fetch(layer_id)[1]
        return fetched

    def verify(self) -> list[str]:
        """Every layer of the bucket (fetched where this host lacks it, each copy checked
        against the catalog, its seal and its manifest), and this host's layers not uploaded,
        verified as a directory store's are. Returns the ids verified."""
        if cache_limit() is None:
            self.fetch_all()
            return self.local.verify()
        # Within a bound the copy cannot hold them all at once: each chain is checked as it
        # is fetched (before a later fetch may remove it), then what is here alone.
        catalog, _ = self.catalog("verify")
        verified: set[str] = set()
        for layer_id in sorted(catalog.layers):
            if layer_id not in verified:
                self.fetch(layer_id)
                verified.update(self.local.verify(layer_id))
        for layer_id in self.pending():
            verified.update(self.local.verify(layer_id))
        return sorted(verified)

    # --- removal ---------------------------------------------------------------------

    def manifest_in_bucket(self, layer_id: str, catalog: Catalog, step: str) -> LayerManifest:
        """A layer's manifest as the catalog names it: this host's copy if it is that very
        version, else the bucket's object (checked against the catalog's digest)."""
        if self.local.has_layer(layer_id):
            manifest, digest = self.local.manifest_with_digest(layer_id, step)
            if catalog.accepts(layer_id, digest):
                return manifest
        got = self.bucket.get(_layer_key(layer_id, MANIFEST), MAX_MANIFEST_BYTES, step, layer_id)
        if got is None or not catalog.accepts(layer_id, manifest_digest(got[0])):
            raise CorruptLayerError(
                f"bucket {self.name}: its {MANIFEST} is missing or not the one the catalog names",
                layer=layer_id,
                step=step,
            )
        manifest = fmt.parse_manifest(got[0], layer_id, step)
        if manifest.id != layer_id:
            raise CorruptLayerError(f"{MANIFEST} names layer {manifest.id}", layer=layer_id)
        return manifest

    def remove(
        self, going: dict[str, str], known: set[str], step: str, *, add: str | None = None
    ) -> list[str]:
        """Remove the layers ``going`` (id -> the digest of the version planned for) from the
        bucket: one compare-and-swap of the catalog, which drops them and records them as
        removed (the commit point; their objects are deleted after, see
        :meth:`delete_objects`), and names ``add`` (a layer of the working copy that
        replaces them, uploaded first). ``known``: the layers the plan saw; a layer named
        since that builds on one that goes, or a head moved onto one, refuses the removal
        (nothing changed). Returns the ids removed (a layer another host removed first is
        not)."""
        known = set(known)
        added: dict[str, list[str]] = {}
        parent: str | None = None
        if add is not None:
            self._upload(add)
            added[add] = [self.local.manifest_sha256(add)]
            parent = self.local.manifest(add, step).parent

        def changed(why: str) -> StoreError:
            return StoreError(
                f"bucket {self.name} changed meanwhile ({why}); nothing was removed, run it again",
                step=step,
            )

        for _attempt in range(CAS_ATTEMPTS):
            catalog, etag = self.catalog(step)
            now = [i for i in sorted(going) if catalog.accepts(i, going[i])]
            if add is not None and len(now) != len(going):
                raise changed("a layer to replace was removed by another host")
            if not now:
                return []
            if add is not None and parent is not None and parent not in catalog.layers:
                raise changed(f"layer {parent}, on which {add} builds, is gone")
            for layer_id, who in catalog.heads_of().items():
                if layer_id in now:
                    raise changed(f"layer {layer_id} became the head of {', '.join(who)}")
            for layer_id in sorted(set(catalog.layers) - known - set(going)):
                parent = self.manifest_in_bucket(layer_id, catalog, step).parent
                if parent in going:
                    raise changed(f"new layer {layer_id} builds on {parent}")
                known.add(layer_id)
            new = catalog.changed(add=added, remove=now)
            key = self.local.sealing_key(step)
            if self.bucket.put(CATALOG, new.encode(key), step, if_match=etag) is not None:
                assert self.local.store_id is not None
                keys.note_generation(self.local.store_id, new.generation, "bucket-seen")
                return now
        raise BucketError(
            f"bucket {self.name}: its {CATALOG} changed {CAS_ATTEMPTS} times while this host "
            "tried to replace it; nothing was removed, run it again",
            step=step,
        )

    def delete_objects(self, layer_ids: list[str], step: str) -> None:
        """Delete the objects of layers the catalog records as removed (each layer's
        manifest last: while it is there, an upload cannot claim the id)."""
        wanted = set(layer_ids)
        found: dict[str, list[str]] = {}
        for info in self.bucket.listing(LAYERS_DIR, step):
            parts = info.key.split("/")
            if len(parts) == 3 and parts[0] == LAYERS_DIR and parts[1] in wanted:
                found.setdefault(parts[1], []).append(info.key)
        for _layer_id, objects in sorted(found.items()):
            objects.sort(key=lambda k: k.endswith("/" + MANIFEST))
            self.bucket.delete(objects, step)

    # --- gc -----------------------------------------------------------------------

    def gc(self, grace_s: float = GC_GRACE_S) -> list[str]:
        """Remove the objects of layers the catalog records as removed (those the host that
        removed them left behind), and of layers no catalog names (an upload that was
        interrupted, or is under way: only those whose newest object is older than
        ``grace_s``). Returns the layer ids removed."""
        step = "gc"
        catalog, _ = self.catalog(step)
        by_layer: dict[str, list[str]] = {}
        newest: dict[str, datetime] = {}
        for info in self.bucket.listing(LAYERS_DIR, step):
            parts = info.key.split("/")
            if len(parts) != 3 or parts[0] != LAYERS_DIR or not LAYER_ID_RE.match(parts[1]):
                continue
            layer_id = parts[1]
            if layer_id in catalog.layers:
                continue
            by_layer.setdefault(layer_id, []).append(info.key)
            newest[layer_id] = max(newest.get(layer_id, info.modified), info.modified)
        cutoff = datetime.now(UTC) - timedelta(seconds=grace_s)
        removed = []
        for layer_id, objects in sorted(by_layer.items()):
            if newest[layer_id] > cutoff and layer_id not in catalog.removed:
                continue
            # The manifest last: it is what claims the id.
            objects.sort(key=lambda k: k.endswith("/" + MANIFEST))
            self.bucket.delete(objects, step)
            removed.append(layer_id)
        return removed

    def trim(self, *, removed_only: bool = False) -> list[str]:
        """Bound the working copy: remove the layers the bucket holds (that very version), or
        has removed, that neither a head of this host's guests nor a layer not yet uploaded
        builds on (a restore fetches them again). ``removed_only``: only those the bucket
        removed. Returns the layer ids removed."""
        catalog, _ = self.catalog("gc")
        local = self.local
        with local.maintenance_lock("gc"), local.switching("gc"), local.lock("gc"):
            evict = _evictable(self, catalog)
            if removed_only:
                evict = [i for i in evict if i in catalog.removed]
            if evict:
                local.update_catalog("gc", drop=evict)  # first: a crash leaves strays, gc's
        for layer_id in evict:
            local.files.remove(layer_id)
        return evict


def _own_catalog(bucket: Bucket, key: keys.StoreKey, store_id: str) -> bool:
    """Whether the catalog in the bucket is this store's (left by an init here that failed
    before it wrote the marker: that init goes on)."""
    there = bucket.get(CATALOG, MAX_CATALOG_BYTES, "create")
    if there is None:
        return False
    try:
        Catalog.decode(there[0], key, store_id)
    except StoreError:
        return False
    return True


def _evictable(store: BucketStore, catalog: Catalog) -> list[str]:
    local = store.local
    mine = host_id()
    names = local.layer_names()
    local_catalog = local.catalog("gc")
    assert local_catalog is not None
    roots = [head.layer for head in local_catalog.heads.values() if head.host == mine]
    # not uploaded (a layer removed from the bucket is not: it was, and is gone)
    roots += [i for i in names if i not in catalog.layers and i not in catalog.removed]
    keep: set[str] = set()
    for root in roots:
        if root in names and root not in keep:
            keep.update(m.id for m in local.chain(root, "gc"))
    return [
        i
        for i in names
        if i not in keep and (i in catalog.removed or catalog.accepts(i, local.manifest_sha256(i)))
    ]


def _parse_marker(data: bytes, url: BucketUrl) -> tuple[str, str | None]:
    """The store id and encryption a bucket's marker names (checked as a directory
    store's marker is)."""
    try:
        obj = parse_json(data)
    except ValueError as exc:
        raise StoreError(f"bucket {url}: {STORE_MARKER} is not JSON ({exc})", step="open") from exc
    if not isinstance(obj, dict) or obj.get("format") != fmt.STORE_FORMAT:
        raise StoreError(f"bucket {url}: {STORE_MARKER} is not a vmckpt store marker", step="open")
    what = f"bucket {url}: {STORE_MARKER}"
    version = fmt.parse_version(obj.get("format_version"), what=what, layer=None, step="open")
    fmt.check_version(version, what=what, layer=None, step="open")
    if version < (fmt.FORMAT_MAJOR, fmt.CATALOG_MINOR):
        raise StoreError(f"{what}: a store in a bucket has format 1.5 or newer", step="open")
    store_id = obj.get("store_id")
    if not isinstance(store_id, str) or not keys.STORE_ID_RE.fullmatch(store_id):
        raise StoreError(f"{what}: store_id is not 32 hex digits", step="open")
    encryption = obj.get("encryption")
    if encryption is not None and encryption not in keys.ENCRYPTIONS:
        raise StoreError(f"{what}: encryption {encryption!r} is unknown", step="open")
    return store_id, encryption
