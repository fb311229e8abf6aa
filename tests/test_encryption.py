"""Encryption at rest (`vmckpt init --encrypt`): every layer file but the manifest and its
seal is held encrypted and authenticated record by record (docs/FORMAT.md, *Encryption at
rest*; docs/SECURITY.md, *What is encrypted*, names the claims these tests back).

A manifest is the same in an encrypted store as in one in the clear (it lists the
content's sizes and digests), so layers travel between the two and keep their identity.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.framework.guest import Vmckpt, assert_continues, one_line_error, take
from tests.test_images import (
    BLOCKS,
    ChainT,
    assert_same_image,
    content,
    flip_byte,
    mutate,
    random_image,
    write_chain,
)
from tests.test_security import copy_to
from vmckpt.errors import CorruptLayerError, FormatVersionError, StoreError
from vmckpt.images import DiskDelta, Store, crypt, keys, maintenance
from vmckpt.images import format as fmt
from vmckpt.images.catalog import Catalog
from vmckpt.images.disks import compose_disk
from vmckpt.images.layerio import write_chunks
from vmckpt.images.retention import KeepRules
from vmckpt.images.transfer import layer_files, receive_layer
from vmckpt.ram import PAGE_SIZE, RamImage

SECRET = b"vmckpt-secret-page-pattern!"  # what must not be found on disk


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261212)


@pytest.fixture
def encrypted(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "encrypted", encrypt=True)


@pytest.fixture
def plain(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "plain")


@pytest.fixture
def chain3(encrypted: Store, rng: np.random.Generator) -> ChainT:
    """A base layer and two deltas in an encrypted store, with the images each was written
    from (tests/test_images.py's chain3, encrypted)."""
    images = [random_image(rng)]
    images.append(mutate(images[0], rng))
    images.append(mutate(images[1], rng))
    return encrypted, write_chain(encrypted, images), images


def path_of(store: Store, layer_id: str, name: str = "") -> Path:
    return store.layer_path(layer_id, name or None)


def cli(store: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return Vmckpt(store)(*args, check=False, env=env)


def record_offset(number: int) -> int:
    """Where record ``number`` of a sealed file starts on disk."""
    return crypt.HEADER_SIZE + number * crypt.RECORD_DISK


# --- the store, its marker and key --------------------------------------------------------


def test_encrypted_store_marker_and_key(encrypted: Store, store_keys: Path) -> None:
    assert encrypted.encrypted and encrypted.encryption == "chacha20-poly1305"
    marker = json.loads((encrypted.path / "vmckpt-store.json").read_bytes())
    # 1.4: a reader of 1.3 refuses the store instead of reading encrypted files as clear;
    # 1.5 (every new store): a reader of 1.4 refuses it instead of ignoring its catalog.
    assert marker["format_version"] == [1, 5]
    assert marker["encryption"] == "chacha20-poly1305"
    assert encrypted.store_id is not None
    key = json.loads((store_keys / encrypted.store_id).read_bytes())
    assert key["encryption"] == "chacha20-poly1305"
    assert Store(encrypted.path).encrypted


def test_plain_store_marker_and_key_are_as_before(plain: Store, store_keys: Path) -> None:
    assert not plain.encrypted
    marker = json.loads((plain.path / "vmckpt-store.json").read_bytes())
    assert marker["format_version"] == [1, 5] and "encryption" not in marker
    assert plain.store_id is not None
    assert "encryption" not in json.loads((store_keys / plain.store_id).read_bytes())


def test_an_older_reader_refuses_a_store_with_a_catalog(
    encrypted: Store, plain: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fmt, "FORMAT_MINOR", 4)  # a vmckpt of format 1.4 knows no catalog
    for store in (encrypted, plain):
        with pytest.raises(FormatVersionError, match=r"1\.5 is newer than this vmckpt reads"):
            Store(store.path)


def test_a_marker_that_disagrees_with_the_key_is_refused(
    chain3: ChainT, rng: np.random.Generator
) -> None:
    """Someone who can write the store, not read the key, edits the marker to say the store
    is not encrypted (so that new layers would be written in the clear): refused."""
    store, manifests, images = chain3
    marker = store.path / "vmckpt-store.json"
    data = json.loads(marker.read_bytes())
    del data["encryption"]
    data["format_version"] = [1, 3]
    os.chmod(marker, 0o600)
    marker.write_text(json.dumps(data))
    edited = Store(store.path)
    assert not edited.encrypted
    with pytest.raises(StoreError, match=r"its marker says not encrypted, its key .* says "):
        edited.write_layer(content(mutate(images[2], rng), manifests[2].id, images[2]))
    result = cli(store.path, "verify", "--store", str(store.path))
    one_line_error(result, "says encrypted (chacha20-poly1305)", "was the marker changed?", code=3)


def test_unknown_encryption_in_the_marker_is_refused(encrypted: Store) -> None:
    marker = encrypted.path / "vmckpt-store.json"
    data = json.loads(marker.read_bytes())
    data["encryption"] = "rot13"
    os.chmod(marker, 0o600)
    marker.write_text(json.dumps(data))
    with pytest.raises(StoreError, match="encryption 'rot13' is not one this vmckpt knows"):
        Store(encrypted.path)


def test_init_encrypt_on_the_command_line(tmp_path: Path, store_keys: Path) -> None:
    path = tmp_path / "st"
    made = cli(path, "init", "--encrypt", str(path))
    assert made.returncode == 0, made.stderr
    assert "encrypted with chacha20-poly1305" in made.stdout
    store = Store(path)
    assert store.encrypted and store.store_id is not None
    assert str(store_keys / store.store_id) in made.stdout
    again = cli(path, "init", "--encrypt", str(path), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["encryption"] == "chacha20-poly1305"
    assert json.loads(again.stdout)["created"] is False
    # No in-place conversion: a store in the clear stays so.
    clear = tmp_path / "clear"
    assert cli(clear, "init", str(clear)).returncode == 0
    refused = cli(clear, "init", "--encrypt", str(clear))
    one_line_error(refused, "is not encrypted", "never converted in place", code=3)
    assert not Store(clear).encrypted
    usage = cli(clear, "init", "--adopt", "--encrypt", str(clear))
    one_line_error(usage, "--adopt keeps a store as it is", code=2)


# --- round trips ----------------------------------------------------------------------------


def test_encrypted_chain_composes_to_each_image(chain3: ChainT) -> None:
    store, manifests, images = chain3
    for manifest, image, tag in zip(manifests, images, "012", strict=True):
        ram, prelude, epilogue = store.compose(manifest.id)
        assert_same_image(ram, image)
        assert prelude == b"QEVM\x00\x00\x00\x03prelude-" + tag.encode()
        assert epilogue == b"device-state-" + tag.encode() * 100
    assert store.verify() == [m.id for m in manifests]
    reopened = Store(store.path)
    assert_same_image(reopened.compose(manifests[2].id)[0], images[2])


def test_manifests_list_the_content_the_same_as_in_a_clear_store(
    chain3: ChainT, plain: Store
) -> None:
    """Sizes and digests in a manifest are those of the content: the same layer content
    gives the same `files` in either store; on disk, the encrypted file is the content's
    size plus a header and a tag per record."""
    store, manifests, images = chain3
    clear = write_chain(plain, images)
    for sealed, open_ in zip(manifests, clear, strict=True):
        assert sealed.files == open_.files
        assert sealed.format_version == open_.format_version == (1, 3)
        for name, entry in sealed.files.items():
            on_disk = path_of(store, sealed.id, name).stat().st_size
            assert on_disk == crypt.sealed_size(entry.size), name
            assert path_of(plain, open_.id, name).stat().st_size == entry.size
            assert path_of(store, sealed.id, name).read_bytes()[:8] == crypt.MAGIC


def test_record_boundaries_round_trip() -> None:
    """Content of every size around the record size, written in pieces of several sizes,
    reads back whole, at any offset, and page by page."""
    codec = crypt.SealedCodec("0" * 32, bytes(range(32)))
    rng = np.random.default_rng(3)
    record = crypt.RECORD_SIZE
    for size in (0, 1, PAGE_SIZE, record - 1, record, record + 1, 3 * record, 17 * record + 5):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        for piece in (1000, record, 5 * record + 3):
            if size > 200_000 and piece == 1000:
                continue
            out = io.BytesIO()
            writer = codec.writer(out, "0001-abcdef", "pages.bin")
            for start in range(0, size, piece):
                writer.write(memoryview(data[start : start + piece]))
            writer.finish()
            raw = out.getvalue()
            assert len(raw) == crypt.sealed_size(size)
            assert size < 64 or data[:64] not in raw
            fd = os.memfd_create("sealed")
            os.write(fd, raw)
            with codec.reader(fd, size, "0001-abcdef", "pages.bin", "test") as src:
                assert src.read_all() == data
                for offset, length in ((0, size), (size // 3, size // 2), (max(0, size - 7), 7)):
                    length = min(length, size - offset)
                    assert src.pread(offset, length) == data[offset : offset + length]
                pages = size // PAGE_SIZE
                if pages:
                    wanted = np.unique(rng.integers(0, pages, 40)).astype(np.int64)
                    rows = np.empty((wanted.size, PAGE_SIZE), dtype=np.uint8)
                    src.read_pages(wanted, rows)
                    whole = np.frombuffer(data[: pages * PAGE_SIZE], np.uint8)
                    assert np.array_equal(rows, whole.reshape(-1, PAGE_SIZE)[wanted])


def test_no_plaintext_on_disk(encrypted: Store, plain: Store) -> None:
    """A page pattern, the prelude and the device state are nowhere in the encrypted
    store's files (they are in the clear store's: the search can find them)."""
    image = RamImage.zeroed(BLOCKS)
    pages = image.pages_of("pc.ram")
    pattern = np.frombuffer((SECRET * (PAGE_SIZE // len(SECRET) + 1))[:PAGE_SIZE], np.uint8)
    pages[::3] = pattern
    layer = content(image, None, None)
    layer.prelude = b"QEVM" + SECRET
    layer.epilogue = SECRET * 50
    for store in (encrypted, plain):
        manifest = store.write_layer(layer)
        found = {
            path.name
            for path in path_of(store, manifest.id).iterdir()
            if SECRET in path.read_bytes()
        }
        if store is plain:
            assert found == {"pages.bin", "prelude.bin", "device.bin"}
        else:
            assert found == set()
            ram, prelude, device = store.compose(manifest.id)
            assert_same_image(ram, image)
            assert (prelude, device) == (layer.prelude, layer.epilogue)


# --- damage -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["pages.bin", "pages.sum", "pages.idx", "prelude.bin", "device.bin"]
)
def test_flipped_byte_in_any_record(chain3: ChainT, name: str) -> None:
    """A flipped byte in the first and in the last record of each file: that record does
    not authenticate, in one line naming the layer, the file and the record."""
    store, manifests, _ = chain3
    layer = manifests[0]
    path = path_of(store, layer.id, name)
    last = crypt.records_of(layer.files[name].size) - 1
    for number, offset in ((0, record_offset(0) + 5), (last, path.stat().st_size - 1)):
        original = path.read_bytes()
        flip_byte(path, offset)
        with pytest.raises(CorruptLayerError) as caught:
            store.verify(layer.id)
        message = caught.value.one_line()
        assert f"layer {layer.id}, during verify: {name}: record {number} does not " in message
        assert "\n" not in message
        path.write_bytes(original)
    assert store.verify(layer.id) == [layer.id]


def test_damage_shows_in_one_line_on_the_command_line(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    flip_byte(path_of(store, manifests[1].id, "pages.bin"), record_offset(0) + 100)
    for command in (["verify", manifests[2].id], ["restore", "--layer", manifests[2].id]):
        result = cli(store.path, *command, "--store", str(store.path))
        one_line_error(result, manifests[1].id, "pages.bin: record 0 does not authenticate", code=4)
        assert "Traceback" not in result.stderr


def test_damaged_header_is_refused(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    path = path_of(store, manifests[0].id, "pages.idx")
    original = path.read_bytes()
    flip_byte(path, 0)  # the magic
    with pytest.raises(CorruptLayerError, match=r"pages\.idx: its header is not that of an"):
        store.compose(manifests[0].id)
    path.write_bytes(original)
    flip_byte(path, crypt.HEADER_SIZE - 1)  # the salt: another key for the file
    with pytest.raises(CorruptLayerError, match=r"pages\.idx: record 0 does not authenticate"):
        store.compose(manifests[0].id)


def test_truncated_or_grown_file(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer = manifests[0]
    path = path_of(store, layer.id, "pages.bin")
    size = path.stat().st_size
    original = path.read_bytes()
    for cut in (1, crypt.RECORD_DISK, size - crypt.HEADER_SIZE):
        path.write_bytes(original[:-cut])
        with pytest.raises(CorruptLayerError) as caught:
            store.compose(layer.id)
        message = caught.value.one_line()
        expected = crypt.sealed_size(layer.files["pages.bin"].size)
        assert f"pages.bin is {size - cut} bytes, {expected} expected" in message
        assert message.endswith("(truncated?)")
    path.write_bytes(original + b"\0")
    with pytest.raises(CorruptLayerError, match=f"pages.bin is {size + 1} bytes"):
        store.verify(layer.id)


def test_records_reordered_or_moved_are_refused(chain3: ChainT) -> None:
    """Records swapped within a file, a file put in another layer's place, and two files of
    one layer swapped: the associated data binds each record's number, file and layer."""
    store, manifests, _ = chain3
    base, first = manifests[0], manifests[1]
    path = path_of(store, base.id, "pages.bin")
    assert crypt.records_of(base.files["pages.bin"].size) >= 3
    original = path.read_bytes()
    one, two = record_offset(0), record_offset(1)  # two whole records
    record = crypt.RECORD_DISK
    swapped = bytearray(original)
    swapped[one : one + record] = original[two : two + record]
    swapped[two : two + record] = original[one : one + record]
    path.write_bytes(bytes(swapped))
    with pytest.raises(CorruptLayerError, match=r"pages\.bin: record 0 does not authenticate"):
        store.verify(base.id)
    path.write_bytes(original)
    # prelude.bin of layer 0 and of layer 1 are of the same size; the content differs.
    assert base.files["prelude.bin"].size == first.files["prelude.bin"].size
    other = path_of(store, first.id, "prelude.bin").read_bytes()
    mine = path_of(store, base.id, "prelude.bin")
    mine.write_bytes(other)
    with pytest.raises(CorruptLayerError, match=r"prelude\.bin: record 0 does not authenticate"):
        store.compose(base.id)


def test_files_of_one_layer_swapped_are_refused(encrypted: Store, rng: np.random.Generator) -> None:
    layer = content(random_image(rng), None, None)
    layer.prelude = b"P" * 500
    layer.epilogue = b"D" * 500  # the same size: swapping them keeps every size right
    manifest = encrypted.write_layer(layer)
    prelude, device = (
        path_of(encrypted, manifest.id, "prelude.bin"),
        path_of(encrypted, manifest.id, "device.bin"),
    )
    a, b = prelude.read_bytes(), device.read_bytes()
    prelude.write_bytes(b)
    device.write_bytes(a)
    with pytest.raises(CorruptLayerError, match=r"(prelude|device)\.bin: record 0 does not"):
        encrypted.compose(manifest.id)


def test_another_version_of_a_file_is_refused(chain3: ChainT, tmp_path: Path) -> None:
    """Content this store encrypted for the same layer and file name, of the same size (an
    earlier version of a layer chain maintenance rewrote under its id, say): its records
    authenticate, but the content does not match the sealed manifest's digests."""
    store, manifests, _ = chain3
    layer = manifests[2]
    size = layer.files["pages.bin"].size
    other = tmp_path / "other-version"
    other.mkdir()
    fd = os.open(other / "pages.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    write_chunks(fd, [bytes(size - 1) + b"\1"], store.codec("write"), layer.id, "pages.bin")
    os.replace(other / "pages.bin", path_of(store, layer.id, "pages.bin"))
    with pytest.raises(CorruptLayerError, match=r"pages\.bin: page 0 .* does not match its digest"):
        store.compose(layer.id)
    with pytest.raises(CorruptLayerError, match=r"pages\.bin: sha256 mismatch"):
        store.verify(layer.id)


def test_wrong_key_is_refused(chain3: ChainT, store_keys: Path) -> None:
    """Another key under the store's id: the seals do not authenticate. Re-sealed with that
    key (someone who holds it), the seals do, but not one record does: the data key is
    derived from the store's key."""
    store, manifests, _ = chain3
    assert store.store_id is not None
    digests = {
        m.id: hashlib.sha256(path_of(store, m.id, "manifest.json").read_bytes()) for m in manifests
    }
    key_file = store_keys / store.store_id
    saved = key_file.read_bytes()
    data = json.loads(saved)
    other = os.urandom(32)
    data["key"] = other.hex()
    key_file.write_text(json.dumps(data))
    try:
        wrong = Store(store.path)
        with pytest.raises(CorruptLayerError, match="MAC does not match"):
            wrong.compose(manifests[0].id)
        with pytest.raises(StoreError, match=r"catalog\.json: it does not authenticate"):
            wrong.layer_ids()
        assert wrong.key is not None
        for manifest in manifests:
            seal = path_of(store, manifest.id, keys.SEAL)
            data_bytes = path_of(store, manifest.id, "manifest.json").read_bytes()
            seal.write_bytes(keys.seal_bytes(wrong.key, manifest.id, "local", data_bytes))
        catalog = Catalog(
            store.store_id,
            generation=1000,
            layers={i: (d.hexdigest(),) for i, d in digests.items()},
        )
        wrong.write_catalog(catalog)
        with pytest.raises(CorruptLayerError, match="record 0 does not authenticate"):
            wrong.compose(manifests[0].id)
        result = cli(store.path, "verify", "--store", str(store.path))
        one_line_error(result, "record 0 does not authenticate", code=4)
    finally:
        key_file.write_bytes(saved)


def test_without_the_key_nothing_is_read(chain3: ChainT, tmp_path: Path) -> None:
    store, manifests, _ = chain3
    elsewhere = {"VMCKPT_KEYS_DIR": str(tmp_path / "no-keys")}
    listing = cli(store.path, "list", "--json", "--store", str(store.path), env=elsewhere)
    assert listing.returncode == 0 and manifests[0].id in listing.stdout  # metadata in the clear
    result = cli(store.path, "verify", manifests[2].id, "--store", str(store.path), env=elsewhere)
    one_line_error(result, "no key", code=3)
    adopt = cli(store.path, "init", "--adopt", str(store.path), env=elsewhere)
    one_line_error(adopt, "is encrypted and this user has no key", code=3)


# --- maintenance, disks, copies -----------------------------------------------------------------


def disk_delta(
    tmp: Path, number: int, size: int, data: bytes, stored: list[tuple[int, int]], full: bool
) -> DiskDelta:
    scratch = tmp / f"disk-{number}.data"
    scratch.write_bytes(b"".join(data[o : o + n] for o, n in stored))
    return DiskDelta(
        id="vda", format="raw", size=size, path="/images/vda.raw", full=full,
        stored=tuple(stored), zeroed=(), data_path=scratch, bitmap=None,
    )  # fmt: skip


def test_maintenance_keeps_what_every_layer_composes_to(
    encrypted: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    """prune, delete and squash in an encrypted store: every kept layer composes (RAM,
    prelude, device state, its disk) to what it composed to before, and its rewritten files
    are encrypted."""
    size = 3 << 20  # a disk of 12 records: pieces of the merged delta cross records
    disk = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    images = [random_image(rng)]
    ids: list[str] = []
    parent = None
    for number in range(6):
        if number:
            images.append(mutate(images[-1], rng))
            start = int(rng.integers(0, size // 512 - 2048)) * 512
            length = int(rng.integers(1, 2048)) * 512
            disk[start : start + length] = rng.integers(0, 256, length, np.uint8).tobytes()
            stored = [(start, length), (size - 4096, 4096)]
            disk[size - 4096 :] = bytes([number]) * 4096
        else:
            stored = [(0, size)]
        layer = content(images[-1], parent, images[-2] if number else None, tag=str(number))
        layer.disks = [disk_delta(tmp_path, number, size, bytes(disk), stored, full=not number)]
        parent = encrypted.write_layer(layer).id
        ids.append(parent)
    encrypted.set_head("tiny", ids[-1])

    def state() -> dict[str, tuple[Any, ...]]:
        result = {}
        for layer_id in encrypted.layer_ids():
            target = tmp_path / f"composed-{layer_id}.raw"
            target.unlink(missing_ok=True)
            compose_disk(encrypted, layer_id, "vda", target)
            ram, prelude, device = encrypted.compose(layer_id)
            result[layer_id] = (ram, prelude, device, target.read_bytes())
        return result

    def same(before: dict[str, tuple[Any, ...]]) -> None:
        assert encrypted.verify() == encrypted.layer_ids()
        after = state()
        for layer_id, got in after.items():
            want = before[layer_id]
            assert_same_image(got[0], want[0])
            assert got[1:] == want[1:], layer_id

    before = state()
    maintenance.delete(encrypted, ids[2])
    same(before)
    maintenance.squash(encrypted, None, ids[4])
    same(before)
    maintenance.prune(encrypted, KeepRules(last=2))
    same(before)
    assert encrypted.layer_ids() == [ids[4], ids[5]]
    rewritten = encrypted.manifest(ids[4])
    assert rewritten.is_base
    for name, entry in rewritten.files.items():
        assert path_of(encrypted, ids[4], name).stat().st_size == crypt.sealed_size(entry.size)


def test_layers_travel_between_clear_and_encrypted_stores(
    tmp_path: Path, plain: Store, encrypted: Store, rng: np.random.Generator
) -> None:
    """A chain copied from a store in the clear into an encrypted one (as `restore --host`
    and `migrate` copy it) is encrypted there, with the very same manifests; copied back
    into a third store, in the clear, its files are byte for byte the original ones."""
    images = [random_image(rng)]
    images.append(mutate(images[0], rng))
    images.append(mutate(images[1], rng))
    manifests = write_chain(plain, images)
    origin = keys.host_origin("source.example")
    for manifest in manifests:
        copy_to(plain, encrypted, manifest.id, origin)
    back = Store.create(tmp_path / "back")
    for manifest in manifests:
        copy_to(encrypted, back, manifest.id, keys.host_origin("middle.example"))
    for manifest, image in zip(manifests, images, strict=True):
        digest = plain.manifest_sha256(manifest.id)
        assert encrypted.manifest_sha256(manifest.id) == digest == back.manifest_sha256(manifest.id)
        assert_same_image(encrypted.compose(manifest.id)[0], image)
        assert_same_image(back.compose(manifest.id)[0], image)
        for name, entry in manifest.files.items():
            on_disk = path_of(encrypted, manifest.id, name).stat().st_size
            assert on_disk == crypt.sealed_size(entry.size)
            original = path_of(plain, manifest.id, name).read_bytes()
            assert path_of(back, manifest.id, name).read_bytes() == original
    assert encrypted.verify() == back.verify() == [m.id for m in manifests]


def test_a_damaged_copy_into_an_encrypted_store_is_never_committed(
    plain: Store, encrypted: Store, rng: np.random.Generator
) -> None:
    manifest = plain.write_layer(content(random_image(rng), None, None))
    files = []
    for name, _, chunks in layer_files(plain, manifest.id):
        data = b"".join(chunks)
        if name == "pages.bin":
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        files.append((name, [data]))
    with pytest.raises(StoreError, match=r"pages\.bin does not match its manifest"):
        receive_layer(
            encrypted, manifest.id, plain.manifest_sha256(manifest.id), files, origin="host:a"
        )
    assert not encrypted.has_layer(manifest.id)
    assert not [p for p in encrypted.layers_path.iterdir()]


# --- a real guest --------------------------------------------------------------------------------


def test_encrypted_store_end_to_end(vmckpt: Vmckpt) -> None:
    """init --encrypt, a guest checkpointed twice, restored from the first checkpoint: it
    carries on exactly where it was; the layers' files are encrypted."""
    vmckpt("init", "--encrypt", str(vmckpt.store))
    vmckpt.run_guest("enc")
    vmckpt.wait_states("enc", 5)
    first = take(vmckpt, "enc")
    vmckpt.wait_states("enc", len(vmckpt.states("enc")) + 5)
    second = take(vmckpt, "enc")
    vmckpt.wait_states("enc", len(vmckpt.states("enc")) + 5)
    original = vmckpt.states("enc")
    assert "BAD" not in vmckpt.serial("enc")
    vmckpt("verify", "--store", str(vmckpt.store))
    store = Store(vmckpt.store)
    assert store.encrypted
    for layer_id in (first.layer, second.layer):
        manifest = store.manifest(layer_id)
        for name, entry in manifest.files.items():
            path = path_of(store, layer_id, name)
            assert path.stat().st_size == crypt.sealed_size(entry.size), name
            assert path.read_bytes()[:8] == crypt.MAGIC
    vmckpt("stop", "enc", "--store", str(vmckpt.store))
    vmckpt.restore("--layer", first.layer, "--name", "enc")
    restored = vmckpt.wait_states("enc", 15)
    assert_continues(restored, original, first)
    assert "BAD" not in vmckpt.serial("enc")
    vmckpt("stop", "enc", "--store", str(vmckpt.store))
