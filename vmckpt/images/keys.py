"""Store keys and layer seals: a layer is authenticated with a key kept outside its store.

borg's keyfile model: each store has an id (in its marker file) and a 256-bit
key in ``~/.config/vmckpt/keys/<store id>`` (``$VMCKPT_KEYS_DIR`` overrides
the directory; 0600 in a 0700 directory), made by ``vmckpt init``. Every
layer the store commits gets a seal, ``manifest.mac``: an HMAC-SHA256 over
the store id, the layer id, the layer's origin and the bytes of its
manifest.json — which holds the size and SHA-256 of every other file, so
the seal covers all of the layer. Someone who can write the store but cannot
read the key cannot make a layer that authenticates.

The origin says where the layer's content comes from: ``local`` (this store
wrote it), ``host:NAME`` (another host sent it; sealed here only after its
content checks passed, by the user's own command) or ``adopted`` (an older or
re-keyed store's layer the user sealed with ``vmckpt init --adopt``). Free-form
QEMU arguments and libvirt domain XML are used on restore only from ``local``
layers (docs/SECURITY.md). A layer with no seal reads as ``unsealed``, and every
layer of a store this user has no key for as ``no-key``: both can be listed and
inspected, neither restored.

The key file also says whether the store is encrypted (``"encryption"``, absent for a store
in the clear): the key file is trusted, the store's marker is not, so a marker that
disagrees with it (an encrypted store's marker edited to say it is not, so that new layers
would be written in the clear) is refused. An encrypted store's files are encrypted under a
key derived from the store's key (vmckpt/images/crypt.py).
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from vmckpt.errors import CorruptLayerError, StoreError
from vmckpt.fsutil import DIR_MODE, FILE_MODE, parse_json, read_json, write_json_atomic

SEAL = "manifest.mac"
KEYS_ENV = "VMCKPT_KEYS_DIR"
ALGORITHM = "hmac-sha256"
LOCAL = "local"
ADOPTED = "adopted"
HOST_PREFIX = "host:"
UNSEALED = "unsealed"  # no manifest.mac: not authenticated
NO_KEY = "no-key"  # this user has no key for the store: cannot be authenticated
MAX_SEAL_BYTES = 4096
STORE_ID_RE = re.compile(r"^[0-9a-f]{32}\Z")
ORIGIN_RE = re.compile(r"^(local|adopted|host:[A-Za-z0-9@._:\[\]-]{1,255})\Z")
_CONTEXT = b"vmckpt layer seal v1\0"
ENCRYPTIONS = ("chacha20-poly1305",)  # what a store may be encrypted with (images/crypt.py)


def is_sealed(origin: str) -> bool:
    """Whether an origin is that of a layer that authenticated with the store's key."""
    return bool(ORIGIN_RE.fullmatch(origin))


def host_origin(host: str) -> str:
    """The origin of a layer another host sent (its name cleaned to the origin's alphabet)."""
    name = re.sub(r"[^A-Za-z0-9@._:\[\]-]", "_", host)[:255] or "unknown"
    return f"{HOST_PREFIX}{name}"


def keys_dir() -> Path:
    return Path(os.environ.get(KEYS_ENV) or Path.home() / ".config" / "vmckpt" / "keys")


def new_store_id() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True)
class StoreKey:
    """A store's key, and whether its store is encrypted; repr hides it."""

    store_id: str
    key: bytes
    encryption: str | None = None

    def __repr__(self) -> str:
        return f"StoreKey({self.store_id})"

    def mac(self, layer_id: str, origin: str, manifest: bytes) -> str:
        message = b"\0".join(
            [_CONTEXT, self.store_id.encode(), layer_id.encode(), origin.encode(), manifest]
        )
        return hmac.new(self.key, message, hashlib.sha256).hexdigest()


def key_path(store_id: str) -> Path:
    if not STORE_ID_RE.fullmatch(store_id):
        raise StoreError(f"store id {store_id!r} is not 32 hex digits", step="key")
    return keys_dir() / store_id


def load_key(store_id: str) -> StoreKey | None:
    """The store's key from the keys directory, or None if this user has none."""
    path = key_path(store_id)
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the store key {path}: {exc}", step="key") from exc
    if os.stat(path).st_mode & 0o077:
        raise StoreError(f"the store key {path} is readable by others (chmod 600 it)", step="key")
    try:
        key = bytes.fromhex(str(data["key"]))
        if data["store_id"] != store_id or len(key) != 32:
            raise ValueError("not this store's key")
        encryption = data.get("encryption")
        if encryption is not None and encryption not in ENCRYPTIONS:
            raise ValueError(f"unknown encryption {encryption!r}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StoreError(f"the store key {path} is not valid: {exc}", step="key") from exc
    return StoreKey(store_id, key, encryption)


def all_keys() -> list[StoreKey]:
    """Every key this user has (those that read)."""
    try:
        names = sorted(os.listdir(keys_dir()))
    except OSError:
        return []
    found = []
    for name in names:
        if STORE_ID_RE.fullmatch(name):
            try:
                key = load_key(name)
            except StoreError:
                continue
            if key is not None:
                found.append(key)
    return found


def create_key(store_id: str, store_path: Path, encryption: str | None = None) -> StoreKey:
    """Make a new key for a store (never replacing one that exists); ``encryption``: the
    store's (None: the store is not encrypted)."""
    directory = keys_dir()
    directory.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    os.chmod(directory, DIR_MODE)
    key = StoreKey(store_id, secrets.token_bytes(32), encryption)
    data = {"store_id": store_id, "key": key.key.hex(), "store": str(store_path)}
    if encryption is not None:
        data["encryption"] = encryption
    path = key_path(store_id)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    with os.fdopen(os.open(path, flags, FILE_MODE), "w") as handle:
        os.fchmod(handle.fileno(), FILE_MODE)  # whatever the umask
        json.dump(data, handle)
        handle.flush()
        os.fsync(handle.fileno())
    return key


def seal_bytes(key: StoreKey, layer_id: str, origin: str, manifest: bytes) -> bytes:
    """The content of a layer's manifest.mac."""
    if not ORIGIN_RE.fullmatch(origin):
        raise StoreError(f"origin {origin!r} is not local, adopted or host:NAME", step="seal")
    seal = {"alg": ALGORITHM, "origin": origin, "mac": key.mac(layer_id, origin, manifest)}
    return (json.dumps(seal, sort_keys=True) + "\n").encode()


def check_seal(key: StoreKey, layer_id: str, manifest: bytes, seal: bytes, step: str) -> str:
    """The layer's origin, if its seal authenticates its manifest; CorruptLayerError if not."""

    def refuse(why: str) -> CorruptLayerError:
        return CorruptLayerError(
            f"{SEAL}: {why}: the layer does not authenticate with this store's key "
            "(changed, or written by someone without it)",
            layer=layer_id,
            step=step,
        )

    try:
        data = parse_json(seal)
    except ValueError as exc:
        raise refuse("not valid JSON") from exc
    if not isinstance(data, dict) or data.get("alg") != ALGORITHM:
        raise refuse("not an HMAC-SHA256 seal")
    origin, mac = data.get("origin"), data.get("mac")
    if not isinstance(origin, str) or not ORIGIN_RE.fullmatch(origin) or not isinstance(mac, str):
        raise refuse("its origin or MAC is malformed")
    if not hmac.compare_digest(mac, key.mac(layer_id, origin, manifest)):
        raise refuse("the MAC does not match")
    return origin


# --- the generations of catalogs this user has seen (images/catalog.py) -----------------


SEEN_SCOPES = ("seen", "bucket-seen")  # a store's catalog; the catalog in its bucket


def _seen_path(store_id: str, scope: str = "seen") -> Path:
    assert scope in SEEN_SCOPES
    return key_path(store_id).with_name(f"{store_id}.{scope}")


def seen_generation(store_id: str, scope: str = "seen") -> int:
    """The highest catalog generation of the store this user has seen (0: none), kept beside
    its key: a catalog older than that is a store put back to an earlier state."""
    try:
        data = read_json(_seen_path(store_id, scope))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        raise StoreError(
            f"cannot read {_seen_path(store_id, scope)}: {exc}", step="catalog"
        ) from exc
    value = data.get("generation") if isinstance(data, dict) else None
    return value if isinstance(value, int) and value >= 0 else 0


def note_generation(store_id: str, generation: int, scope: str = "seen") -> None:
    """Remember that the store's catalog reached ``generation`` (never lowering what is
    remembered: concurrent commands serialise on a lock of the file). ``scope``
    ``bucket-seen``: the catalog in the store's bucket (images/bucketstore.py), numbered
    apart from the catalog of this host's working copy."""
    path = _seen_path(store_id, scope)
    lock_path = path.with_name(f".{store_id}.{scope}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if seen_generation(store_id, scope) >= generation:
            return
        write_json_atomic(path, {"store_id": store_id, "generation": generation})
    finally:
        os.close(fd)


def forget_generation(store_id: str) -> None:
    """Accept the store's catalog as it is now, whatever this user saw before (``vmckpt init
    --adopt --accept-rollback``, after restoring a store from a backup on purpose)."""
    _seen_path(store_id).unlink(missing_ok=True)
