"""Layers copied between stores (another host's, through vmckpt/remote): a layer's files as a
sender sends them, and a received layer taken in — published only once every file matches its
manifest and the manifest the sender's digest, and sealed by the receiver with the sender's
host as its origin (docs/SECURITY.md, claim 2)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from vmckpt.errors import StoreError
from vmckpt.fsutil import read_regular
from vmckpt.images import crypt, keys
from vmckpt.images import format as fmt
from vmckpt.images.catalog import manifest_digest
from vmckpt.images.format import LAYER_ID_RE, MANIFEST, FileEntry, LayerManifest
from vmckpt.images.layerio import MAX_MANIFEST_BYTES, TempLayer
from vmckpt.images.store import Store, write_error


def receive_layer(
    store: Store,
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
    store.sealing_key("receive-layer")
    if store.has_layer(layer_id):
        if store.manifest_sha256(layer_id) != manifest_sha256:
            raise StoreError(
                "the store has a different layer under this id", layer=layer_id,
                step="receive-layer",
            )  # fmt: skip
        for _name, chunks in files:
            for _chunk in chunks:
                pass  # consume what the sender sends anyway
        return False
    temp = store.new_version(layer_id)
    codec = store.codec("receive-layer")
    try:
        written: dict[str, FileEntry] = {}
        for name, chunks in files:
            if not fmt.is_layer_file_name(name) or name in written:
                raise StoreError(
                    f"file name {name!r} is not allowed", layer=layer_id, step="receive-layer"
                )
            # As this store holds its files, whatever the sender's did; the manifest is
            # never encrypted.
            written[name] = temp.write(name, chunks, crypt.PLAIN if name == MANIFEST else codec)
        manifest, data = _check_copy(temp, manifest_sha256, written)
        temp.write(keys.SEAL, [store.seal_bytes(layer_id, origin, data)])
        temp.sync()
        store.publish(temp, manifest_digest(data), manifest.parent, None)
    except BaseException as exc:
        store.files.remove(temp.name)
        if isinstance(exc, OSError):
            raise write_error(exc, layer_id) from exc
        raise
    finally:
        temp.close()
    return True


def _check_copy(
    temp: TempLayer, manifest_sha256: str, written: dict[str, FileEntry]
) -> tuple[LayerManifest, bytes]:
    layer_id = temp.layer_id

    def bad(message: str) -> StoreError:
        return StoreError(f"the copy is damaged: {message}", layer=layer_id, step="check-copy")

    if MANIFEST not in written:
        raise bad(f"{MANIFEST} is missing")
    if written[MANIFEST].sha256 != manifest_sha256:
        raise bad(f"{MANIFEST} differs from the one the sender has")
    data = read_regular(MANIFEST, MAX_MANIFEST_BYTES, dir_fd=temp.dir.fd)
    manifest = fmt.parse_manifest(data, layer_id, "check-copy")
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
    return manifest, data


def layer_files(store: Store, layer_id: str) -> list[tuple[str, int, Iterator[bytes]]]:
    """A committed layer's files to send to another store: name, size and content (the
    plaintext in an encrypted store: the receiver holds them as its store does), the
    manifest last (the receiver commits on it). Each file is opened when its content is
    first asked for, checked to be of its listed size, and read in chunks; in an
    encrypted store each record authenticates before it is sent."""
    manifest = store.manifest(layer_id)
    step = "send"

    def content(name: str) -> Iterator[bytes]:
        with store.reader.open(manifest, name, step) as src:
            yield from src.chunks()

    data = store.files.read_layer_file(layer_id, MANIFEST, MAX_MANIFEST_BYTES, step)
    files = [(name, manifest.files[name].size, content(name)) for name in sorted(manifest.files)]
    return [*files, (MANIFEST, len(data), iter([data]))]
