"""The catalog: the one sealed record of what a store holds — which layers are its own, in
which version, and every guest's head. Layers are sealed one by one (keys.py), but a seal
cannot say that a layer is still wanted: a layer that was deleted, or a version that chain
maintenance replaced, put back by hand, would still authenticate. The catalog can say it, as
borg's manifest and restic's index do: a layer is the store's only if the catalog names it
with the SHA-256 of its manifest, and the catalog itself is authenticated with the store's
key (HMAC-SHA256) and numbered (``generation``, one more at every change). This host
remembers the highest generation it has seen of each store (keys.py), so a whole store put
back to an earlier state is noticed too.

Every change to the set of layers or to a head writes a new catalog (temporary file, fsync,
rename, under the store lock): that write is the commit point of a checkpoint, a received
layer, a head move and a chain maintenance. A layer directory that no catalog names (a crash
between the layer's rename and the catalog's) is invisible, and ``gc`` removes it.

docs/FORMAT.md, *The catalog*, specifies the file.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from vmckpt.errors import StoreError
from vmckpt.fsutil import parse_json
from vmckpt.hostdirs import HOST_ID_RE, KIND_DIRS, NAME_RE
from vmckpt.images.format import LAYER_ID_RE, canonical_json, manifest_bytes
from vmckpt.images.keys import StoreKey

CATALOG = "catalog.json"
CATALOG_FORMAT = "vmckpt-catalog"
CATALOG_VERSION = (1, 5)
# 1.6: the catalog records the layers removed from a store in a bucket (``removed``), which a
# reader of 1.5 would ignore (it would upload them again), so such a catalog says 1.6 and a
# reader of 1.5 refuses it. A catalog that records none is written as 1.5, as before.
REMOVED_VERSION = (1, 6)
MAX_CATALOG_BYTES = 64 << 20  # ~100 bytes a layer: hundreds of thousands of layers
_CONTEXT = b"vmckpt catalog v1\0"
_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")


def head_key(kind: str, name: str) -> str:
    """A head's key in the catalog: ``guest/NAME`` or ``libvirt/DOMAIN``."""
    return f"{kind}/{name}"


@dataclass(frozen=True)
class Head:
    """The layer a guest's next checkpoint is a delta against, and the host whose guest it
    is (hostdirs.host_id): on a store that several hosts share, each host's ``gc`` forgets
    only its own guests' heads."""

    layer: str
    host: str


@dataclass(frozen=True)
class Catalog:
    store_id: str
    generation: int = 0
    # layer id -> the SHA-256s of the manifest versions that are the layer (one, or two while
    # a chain maintenance switches it to a new, equivalent version)
    layers: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    heads: Mapping[str, Head] = field(default_factory=dict)
    # layer id -> the SHA-256s of the manifest versions removed (a store in a bucket only: a
    # host whose working copy still holds one never uploads it again)
    removed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def accepts(self, layer_id: str, manifest_sha256: str) -> bool:
        return manifest_sha256 in self.layers.get(layer_id, ())

    def heads_of(self) -> dict[str, list[str]]:
        """Layer id -> the guests (``guest NAME``, ``libvirt DOMAIN``) whose head it is."""
        found: dict[str, list[str]] = {}
        for key, head in sorted(self.heads.items()):
            kind, name = key.split("/", 1)
            found.setdefault(head.layer, []).append(f"{kind} {name}")
        return found

    def changed(
        self,
        *,
        add: Mapping[str, Iterable[str]] | None = None,
        drop: Iterable[str] = (),
        heads: Mapping[str, Head | None] | None = None,
        remove: Iterable[str] = (),
    ) -> Catalog:
        """The next generation: layers added (or their accepted versions replaced), layers
        dropped (with any head on them), layers removed (dropped, and recorded in
        ``removed``: a store in a bucket), heads set (None: removed)."""
        layers = dict(self.layers)
        removed = dict(self.removed)
        for layer_id, versions in (add or {}).items():
            if layer_id in removed:
                raise StoreError(f"{CATALOG}: a removed layer cannot come back", layer=layer_id)
            layers[layer_id] = tuple(dict.fromkeys(versions))
        for layer_id in drop:
            layers.pop(layer_id, None)
        for layer_id in remove:
            gone = layers.pop(layer_id, ())
            removed[layer_id] = tuple(dict.fromkeys((*removed.get(layer_id, ()), *gone)))
        new_heads = dict(self.heads)
        for key, head in (heads or {}).items():
            if head is None:
                new_heads.pop(key, None)
            else:
                new_heads[key] = head
        new_heads = {k: h for k, h in new_heads.items() if h.layer in layers}
        return replace(
            self, generation=self.generation + 1, layers=layers, heads=new_heads, removed=removed
        )

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "format": CATALOG_FORMAT,
            "format_version": list(REMOVED_VERSION if self.removed else CATALOG_VERSION),
            "store_id": self.store_id,
            "generation": self.generation,
            "layers": {k: list(v) for k, v in sorted(self.layers.items())},
            "heads": {k: {"layer": h.layer, "host": h.host} for k, h in sorted(self.heads.items())},
        }
        if self.removed:
            body["removed"] = {k: list(v) for k, v in sorted(self.removed.items())}
        return body

    def encode(self, key: StoreKey) -> bytes:
        """The catalog file, sealed under the store's key."""
        body = self._body()
        return manifest_bytes({**body, "mac": _mac(key, body)})

    @classmethod
    def decode(cls, data: bytes, key: StoreKey, store_id: str) -> Catalog:
        """A catalog file's content, authenticated; StoreError naming what is wrong."""

        def bad(why: str) -> StoreError:
            return StoreError(
                f"{CATALOG}: {why} (the store's catalog was changed, or written by someone "
                "without its key)",
                step="catalog",
            )

        try:
            obj = parse_json(data)
        except ValueError as exc:
            raise bad(f"not valid JSON ({exc})") from exc
        if not isinstance(obj, dict) or obj.get("format") != CATALOG_FORMAT:
            raise bad("not a vmckpt catalog")
        mac = obj.pop("mac", None)
        if not isinstance(mac, str) or not hmac.compare_digest(mac, _mac(key, obj)):
            raise bad("it does not authenticate with this store's key")
        # Authenticated: what follows checks the writer's own work.
        version = obj.get("format_version")
        if version not in (list(CATALOG_VERSION), list(REMOVED_VERSION)):
            raise bad(f"format version {version} is not 1.5 or 1.6")
        if obj.get("store_id") != store_id:
            raise bad(f"it is the catalog of store {obj.get('store_id')}")
        generation = obj.get("generation")
        layers, heads = obj.get("layers"), obj.get("heads")
        if not isinstance(generation, int) or generation < 1:
            raise bad("its generation is not a positive number")
        if not isinstance(layers, dict) or not isinstance(heads, dict):
            raise bad("layers or heads is not an object")
        removed = obj.get("removed", {}) if version == list(REMOVED_VERSION) else {}
        if "removed" in obj and version != list(REMOVED_VERSION):
            raise bad("a catalog of 1.5 records no removed layers")
        if not isinstance(removed, dict):
            raise bad("removed is not an object")

        def entries(found: dict[str, Any], what: str) -> dict[str, tuple[str, ...]]:
            parsed: dict[str, tuple[str, ...]] = {}
            for layer_id, versions in found.items():
                if (
                    not LAYER_ID_RE.match(layer_id)
                    or not isinstance(versions, list)
                    or not versions
                    or not all(isinstance(v, str) and _SHA256_RE.match(v) for v in versions)
                ):
                    raise bad(f"{what} entry {layer_id!r} is malformed")
                parsed[layer_id] = tuple(versions)
            return parsed

        parsed_layers = entries(layers, "layer")
        parsed_removed = entries(removed, "removed layer")
        if set(parsed_layers) & set(parsed_removed):
            raise bad("a layer is both named and removed")
        parsed_heads: dict[str, Head] = {}
        for head_name, head in heads.items():
            kind, _, name = str(head_name).partition("/")
            if (
                kind not in KIND_DIRS
                or not NAME_RE.match(name)
                or not isinstance(head, dict)
                or not isinstance(head.get("layer"), str)
                or head["layer"] not in parsed_layers
                or not isinstance(head.get("host"), str)
                or not HOST_ID_RE.match(head["host"])
            ):
                raise bad(f"head {head_name!r} is malformed")
            parsed_heads[head_name] = Head(head["layer"], head["host"])
        return cls(store_id, generation, parsed_layers, parsed_heads, parsed_removed)


def _mac(key: StoreKey, body: Mapping[str, Any]) -> str:
    return hmac.new(key.key, _CONTEXT + canonical_json(dict(body)), hashlib.sha256).hexdigest()


def manifest_digest(data: bytes) -> str:
    """How the catalog names a version of a layer: the SHA-256 of its manifest.json."""
    return hashlib.sha256(data).hexdigest()
