"""The layered image set: round trips, composition, verification, atomic writes."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vmckpt.errors import CorruptLayerError, FormatVersionError, StoreError
from vmckpt.images import (
    FORMAT_MAJOR,
    FORMAT_MINOR,
    LayerContent,
    LayerManifest,
    Store,
    keys,
    layerio,
)
from vmckpt.images import format as fmt
from vmckpt.ram import PAGE_SIZE, PageNumbers, RamBlock, RamImage

BLOCKS = [
    RamBlock("pc.ram", 1 << 20),
    RamBlock("vga.vram", 64 << 10),
    RamBlock("odd", 3 * PAGE_SIZE + 100),  # a length that is not whole pages
]


# --- helpers --------------------------------------------------------------


def random_image(rng: np.random.Generator, fill: float = 0.5) -> RamImage:
    image = RamImage.zeroed(BLOCKS)
    for block in BLOCKS:
        pages = image.pages_of(block.idstr)
        chosen = np.flatnonzero(rng.random(block.pages) < fill)
        pages[chosen] = rng.integers(0, 256, size=(chosen.size, PAGE_SIZE), dtype=np.uint8)
    # Keep the bytes past the used length zero, as QEMU's stream never carries them.
    odd = image.data["odd"]
    odd[BLOCKS[2].length :] = 0
    return image


def mutate(image: RamImage, rng: np.random.Generator) -> RamImage:
    """A later state: some pages rewritten, some newly written, some cleared to zero."""
    new = RamImage(list(image.blocks), {k: v.copy() for k, v in image.data.items()})
    for block in BLOCKS[:2]:
        pages = new.pages_of(block.idstr)
        nonzero = image.nonzero_pages(block.idstr)
        zero = np.setdiff1d(np.arange(block.pages, dtype=np.uint32), nonzero)
        rewrite = rng.choice(nonzero, size=max(1, nonzero.size // 8), replace=False)
        pages[rewrite] = rng.integers(0, 256, size=(rewrite.size, PAGE_SIZE), dtype=np.uint8)
        clear = rng.choice(np.setdiff1d(nonzero, rewrite), size=3, replace=False)
        pages[clear] = 0
        fresh = rng.choice(zero, size=min(4, zero.size), replace=False)
        pages[fresh] = rng.integers(1, 256, size=(fresh.size, PAGE_SIZE), dtype=np.uint8)
    return new


def delta(
    new: RamImage, old: RamImage | None
) -> tuple[dict[str, PageNumbers], dict[str, PageNumbers]]:
    """Pages to store and pages that became zero, as the checkpoint code computes them."""
    pages: dict[str, PageNumbers] = {}
    zeroed: dict[str, PageNumbers] = {}
    for block in new.blocks:
        nonzero = new.nonzero_pages(block.idstr)
        if old is None:
            pages[block.idstr] = nonzero
            continue
        changed = new.changed_pages(block.idstr, old)
        pages[block.idstr] = np.intersect1d(changed, nonzero).astype(np.uint32)
        zeroed[block.idstr] = np.setdiff1d(changed, nonzero).astype(np.uint32)
    return pages, zeroed


def content(
    image: RamImage, parent: str | None, older: RamImage | None, tag: str = "x"
) -> LayerContent:
    pages, zeroed = delta(image, older)
    return LayerContent(
        parent=parent,
        guest="tiny",
        spec={"memory_mib": 1, "machine": "pc-i440fx-10.0", "devices": ["virtio-blk"]},
        qemu_version="10.0.2",
        machine_type="pc-i440fx-10.0",
        mechanism="incremental-storage",
        ram_section=(2, 0, 4),
        stats={"pause_ms": 12.5, "tag": tag},
        ram=image,
        pages=dict(pages),
        zeroed=dict(zeroed),
        prelude=b"QEVM\x00\x00\x00\x03prelude-" + tag.encode(),
        epilogue=b"device-state-" + tag.encode() * 100,
    )


def assert_same_image(got: RamImage, want: RamImage) -> None:
    assert [(b.idstr, b.length) for b in got.blocks] == [(b.idstr, b.length) for b in want.blocks]
    for block in want.blocks:
        np.testing.assert_array_equal(got.pages_of(block.idstr), want.pages_of(block.idstr))


def images_equal(a: RamImage, b: RamImage) -> bool:
    return all(np.array_equal(a.data[k.idstr], b.data[k.idstr]) for k in a.blocks)


def rewrite_manifest(store: Store, layer_id: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit a manifest, recompute its checksum and seal it again with the store's key, as a
    newer (or malicious) writer holding the key would: these tests reach the checks behind
    the seal. (tests/test_security.py: without the key, such an edit is refused.)"""
    path = store.layer_path(layer_id, "manifest.json")
    obj = json.loads(path.read_bytes())
    change(obj)
    obj["manifest_sha256"] = fmt.manifest_checksum(obj)
    os.chmod(path, 0o600)
    data = fmt.manifest_bytes(obj)
    path.write_bytes(data)
    seal = path.with_name(keys.SEAL)
    origin = json.loads(seal.read_bytes())["origin"]
    assert store.key is not None
    seal.write_bytes(keys.seal_bytes(store.key, layer_id, origin, data))
    with store.lock("recatalog"):
        store.update_catalog("recatalog", add={layer_id: [hashlib.sha256(data).hexdigest()]})


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20250131)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "store")


ChainT = tuple[Store, list[LayerManifest], list[RamImage]]


@pytest.fixture
def chain3(store: Store, rng: np.random.Generator) -> ChainT:
    """A base layer and two deltas, with the images each was written from."""
    images = [random_image(rng)]
    images.append(mutate(images[0], rng))
    images.append(mutate(images[1], rng))
    return store, write_chain(store, images), images


def write_chain(store: Store, images: list[RamImage]) -> list[LayerManifest]:
    """A base layer of images[0], then a delta per later image against the one before."""
    manifests: list[LayerManifest] = []
    parent: str | None = None
    older: RamImage | None = None
    for number, image in enumerate(images):
        manifest = store.write_layer(content(image, parent, older, tag=str(number)))
        manifests.append(manifest)
        parent, older = manifest.id, image
    return manifests


def layer_path(store: Store, layer_id: str, name: str = "") -> Path:
    return store.layer_path(layer_id, name or None)


# --- round trips ----------------------------------------------------------


def test_chain_composes_to_each_image(chain3: ChainT) -> None:
    store, manifests, images = chain3
    for manifest, image, tag in zip(manifests, images, "012", strict=True):
        ram, prelude, epilogue = store.compose(manifest.id)
        assert_same_image(ram, image)
        assert prelude == b"QEVM\x00\x00\x00\x03prelude-" + tag.encode()
        assert epilogue == b"device-state-" + tag.encode() * 100
    # The comparison itself can fail: a middle layer is not the final image.
    middle, _, _ = store.compose(manifests[1].id)
    assert not images_equal(middle, images[2])


def test_pages_that_became_zero_are_zero_after_compose(chain3: ChainT) -> None:
    store, manifests, images = chain3
    last = manifests[2]
    zeroed_total = sum(block.pages_zeroed for block in last.blocks)
    assert zeroed_total > 0
    ram, _, _ = store.compose(last.id)
    _, zeroed = delta(images[2], images[1])
    for idstr, numbers in zeroed.items():
        assert numbers.size == 0 or images[1].words_of(idstr)[numbers].any()
        assert not ram.words_of(idstr)[numbers].any()


def test_deltas_store_only_changed_pages(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    base, first, _ = manifests
    assert base.is_base and not first.is_base
    assert first.parent == base.id
    for block in first.blocks:
        if block.idstr == "odd":
            assert (block.pages_stored, block.pages_zeroed) == (0, 0)
    stored = sum(block.pages_stored for block in first.blocks)
    assert first.files["pages.bin"].size == stored * PAGE_SIZE
    assert stored < sum(block.pages_stored for block in base.blocks)
    for manifest in manifests:
        on_disk = sum(
            layer_path(store, manifest.id, name).stat().st_size for name in manifest.files
        )
        assert manifest.bytes_total == on_disk


def test_manifest_round_trips(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    for written in manifests:
        read = store.manifest(written.id)
        assert read == written
        # Every layer is written as 1.3: per-page digests (pages.sum) and a seal.
        assert read.format_version == (FORMAT_MAJOR, fmt.LAYER_MINOR) == (1, 3)
        assert read.origin == "local"
        assert read.has_page_sums
        assert read.files["pages.sum"].size == 16 * read.pages_stored
        assert read.ram_section == (2, 0, 4)
        assert read.stats == {"pause_ms": 12.5, "tag": read.stats["tag"]}
        raw = json.loads(layer_path(store, written.id, "manifest.json").read_bytes())
        assert raw["format"] == "vmckpt-layer"
        assert raw["format_version"] == [1, 3]
        assert raw["manifest_sha256"] == fmt.manifest_checksum(raw)


def test_layer_ids_chain_and_resolve(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    ids = [m.id for m in manifests]
    assert store.layer_ids() == ids
    assert [m.id for m in store.chain(ids[2])] == ids
    assert [m.id for m in store.chain(ids[0])] == ids[:1]
    assert [i.split("-")[0] for i in ids] == ["0001", "0002", "0003"]
    for layer_id in ids:
        assert fmt.LAYER_ID_RE.match(layer_id)
        assert store.resolve(layer_id) == layer_id
    assert store.resolve("0002") == ids[1]
    assert store.resolve(ids[2][:6]) == ids[2]
    with pytest.raises(StoreError, match="ambiguous"):
        store.resolve("000")
    with pytest.raises(StoreError, match="no layer matches"):
        store.resolve("0009")
    with pytest.raises(StoreError, match="no layer matches"):
        store.resolve("")


def test_verify_returns_the_chain_and_every_layer(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    ids = [m.id for m in manifests]
    assert store.verify(ids[1]) == ids[:2]
    assert store.verify() == ids


def test_empty_layer_and_reopened_store(chain3: ChainT) -> None:
    store, manifests, images = chain3
    empty = content(images[2], manifests[2].id, images[2], tag="3")
    assert not any(v.size for v in empty.pages.values())
    manifest = store.write_layer(empty)
    assert manifest.files["pages.bin"].size == 0
    ram, _, _ = Store(store.path).compose(manifest.id)
    assert_same_image(ram, images[2])


# --- store ---------------------------------------------------------------


def test_store_open_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "nothing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError, match="not a vmckpt store"):
        Store(tmp_path / "plain")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="not empty"):
        Store.create(tmp_path / "busy")


def test_store_create_is_idempotent_and_private(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "store"
    with pytest.raises(StoreError, match=r"parent directory .* does not exist"):
        Store.create(path)  # a typo in a path must not create a store somewhere
    assert not (tmp_path / "a").exists()
    first = Store.create(path, parents=True)
    Store.create(path)
    assert Store(path).path == first.path
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    guest = first.host.runtime_dir("tiny")
    # A guest's runtime files are this host's, never the store's (docs/SECURITY.md).
    assert guest.is_dir() and not guest.is_relative_to(path)
    assert guest == first.host.runtime_path("tiny") and guest.is_relative_to(first.host.runtime)
    for directory in (guest, guest.parent, first.host.runtime, first.host.runtime.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    for bad in ("", "..", "a/b", "a,b", "x\ny", ".hidden"):
        with pytest.raises(StoreError):
            first.host.runtime_dir(bad)


def test_relative_store_path_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = Store.create("rel")
    assert store.path == tmp_path / "rel" and store.path.is_absolute()


def test_store_marker_from_a_newer_format(tmp_path: Path) -> None:
    path = tmp_path / "store"
    Store.create(path)
    marker = path / "vmckpt-store.json"
    os.chmod(marker, 0o600)
    marker.write_text(json.dumps({"format": "vmckpt-store", "format_version": [2, 0]}))
    with pytest.raises(FormatVersionError, match="newer"):
        Store(path)


def test_files_and_dirs_are_private(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    for manifest in manifests:
        directory = layer_path(store, manifest.id)
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        names = sorted(p.name for p in directory.iterdir())
        assert names == [
            "device.bin", "manifest.json", "manifest.mac", "pages.bin", "pages.idx", "pages.sum",
            "prelude.bin",
        ]  # fmt: skip
        for path in directory.iterdir():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_files_are_private_under_a_permissive_umask(store: Store, rng: np.random.Generator) -> None:
    old = os.umask(0)
    try:
        manifest = store.write_layer(content(random_image(rng), None, None))
    finally:
        os.umask(old)
    for path in layer_path(store, manifest.id).iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


# --- corruption caught by verify and compose ------------------------------


def needed_position(store: Store, newest: str, layer_id: str) -> int:
    """A position in ``layer_id``'s pages.bin whose page composing ``newest`` uses (no newer
    layer of its chain stores or zeroes that page)."""
    chain = store.chain(newest)
    index = [m.id for m in chain].index(layer_id)
    manifest = chain[index]
    parts = fmt.decode_index(layer_path(store, layer_id, "pages.idx").read_bytes(), manifest, "t")
    newer = [
        fmt.decode_index(layer_path(store, m.id, "pages.idx").read_bytes(), m, "t")
        for m in chain[index + 1 :]
    ]
    offset = 0
    for number, part in enumerate(parts):
        for position, page in enumerate(part.stored.tolist()):
            if not any(page in p[number].stored or page in p[number].zeroed for p in newer):
                return offset + position
        offset += part.stored.size
    raise AssertionError("no page of the layer is used")


def unneeded_position(store: Store, newest: str, layer_id: str) -> int:
    """A position in ``layer_id``'s pages.bin whose page a newer layer of the chain overrides."""
    chain = store.chain(newest)
    index = [m.id for m in chain].index(layer_id)
    parts = fmt.decode_index(
        layer_path(store, layer_id, "pages.idx").read_bytes(), chain[index], "t"
    )
    newer = [
        fmt.decode_index(layer_path(store, m.id, "pages.idx").read_bytes(), m, "t")
        for m in chain[index + 1 :]
    ]
    offset = 0
    for number, part in enumerate(parts):
        for position, page in enumerate(part.stored.tolist()):
            if any(page in p[number].stored or page in p[number].zeroed for p in newer):
                return offset + position
        offset += part.stored.size
    raise AssertionError("every page of the layer is used")


def test_flipped_byte_in_pages(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    middle = manifests[1].id
    position = needed_position(store, manifests[2].id, middle)
    flip_byte(layer_path(store, middle, "pages.bin"), position * PAGE_SIZE + 1000)
    with pytest.raises(CorruptLayerError, match=rf"layer {middle}.*pages\.bin: sha256 mismatch"):
        store.verify(manifests[2].id)
    # compose reads that page (no newer layer overrides it) and checks it against its digest.
    with pytest.raises(
        CorruptLayerError,
        match=rf"layer {middle}.*pages\.bin: page {position} .*does not match its digest",
    ):
        store.compose(manifests[2].id)
    with pytest.raises(CorruptLayerError):
        store.verify()
    # The base is not part of the damage.
    assert store.verify(manifests[0].id) == [manifests[0].id]


def test_damaged_page_that_compose_does_not_need(chain3: ChainT) -> None:
    """compose reads only the pages it uses (and checks each); verify checks them all."""
    store, manifests, images = chain3
    base = manifests[0].id
    position = unneeded_position(store, manifests[2].id, base)
    flip_byte(layer_path(store, base, "pages.bin"), position * PAGE_SIZE + 7)
    assert_same_image(store.compose(manifests[2].id)[0], images[2])
    with pytest.raises(CorruptLayerError, match=rf"layer {base}.*pages\.bin: sha256 mismatch"):
        store.verify(manifests[2].id)
    # Composing the base itself reads every page of it: the damage is found there.
    with pytest.raises(
        CorruptLayerError, match=rf"pages\.bin: page {position} .*does not match its digest"
    ):
        store.compose(base)


@pytest.mark.parametrize("threads", [1, 3])
def test_page_digests_are_each_pages_sha256_with_any_number_of_threads(
    monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    """One thread on a host of 2 CPUs, several on bigger ones (fmt._digest_threads): the
    same digests either way, in the pages' order."""
    monkeypatch.setattr(fmt, "_DIGEST_THREADS", threads)
    monkeypatch.setattr(fmt, "_digest_pool", None)
    rng = np.random.default_rng(5)
    pages = rng.integers(0, 256, size=(fmt._DIGEST_SPLIT + 37, PAGE_SIZE), dtype=np.uint8)
    digests = fmt.page_digests(pages)
    assert digests.shape == (pages.shape[0], fmt.PAGE_DIGEST_SIZE)
    for row in (0, 1, fmt._DIGEST_SPLIT // 2, pages.shape[0] - 1):
        expected = hashlib.sha256(pages[row].tobytes()).digest()[: fmt.PAGE_DIGEST_SIZE]
        assert digests[row].tobytes() == expected, row
    if fmt._digest_pool is not None:
        fmt._digest_pool.shutdown()


def test_wrong_digest_in_pages_sum(chain3: ChainT) -> None:
    """A pages.sum that matches its manifest but not its pages: verify and compose say so."""
    store, manifests, _ = chain3
    middle = manifests[1].id
    position = needed_position(store, manifests[2].id, middle)
    path = layer_path(store, middle, "pages.sum")
    os.chmod(path, 0o600)
    flip_byte(path, position * 16 + 3)
    entry = {"size": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    rewrite_manifest(store, middle, lambda obj: obj["files"].update({"pages.sum": entry}))
    message = rf"layer {middle}.*pages\.bin: page {position} .*digest in pages\.sum"
    with pytest.raises(CorruptLayerError, match=message):
        store.verify(middle)
    with pytest.raises(CorruptLayerError, match=message):
        store.compose(manifests[2].id)


def test_pages_sum_is_required_from_1_2(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[1].id
    rewrite_manifest(store, layer_id, lambda obj: obj["files"].pop("pages.sum"))
    with pytest.raises(CorruptLayerError, match=r"does not list pages\.sum"):
        store.manifest(layer_id)


def test_pages_sum_of_the_wrong_size_is_rejected(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[1].id
    rewrite_manifest(store, layer_id, lambda obj: obj["files"]["pages.sum"].update(size=16))
    with pytest.raises(CorruptLayerError, match=r"pages\.sum is listed with 16 bytes"):
        store.manifest(layer_id)


def as_1_1(store: Store, layer_id: str) -> None:
    """Make a layer what a 1.1 writer wrote: version 1.1, no pages.sum."""

    def change(obj: dict[str, Any]) -> None:
        obj["format_version"] = [1, 1]
        obj["files"].pop("pages.sum")
        obj["disks"] = []

    rewrite_manifest(store, layer_id, change)
    layer_path(store, layer_id, "pages.sum").unlink()


def test_layers_without_page_digests_compose_by_whole_file(chain3: ChainT) -> None:
    """1.0/1.1 layers have no pages.sum: compose reads and hashes their whole pages.bin, and
    a mix of both kinds in one chain composes as before."""
    store, manifests, images = chain3
    as_1_1(store, manifests[0].id)
    assert not store.manifest(manifests[0].id).has_page_sums
    assert store.verify(manifests[2].id) == [m.id for m in manifests]
    for manifest, image in zip(manifests, images, strict=True):
        assert_same_image(store.compose(manifest.id)[0], image)
    # A damaged page of the old layer that the newest layer overrides is found all the same:
    # the whole file is hashed.
    position = unneeded_position(store, manifests[2].id, manifests[0].id)
    flip_byte(layer_path(store, manifests[0].id, "pages.bin"), position * PAGE_SIZE)
    with pytest.raises(CorruptLayerError, match=r"pages\.bin: sha256 mismatch"):
        store.compose(manifests[2].id)


def test_truncated_pages(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    path = layer_path(store, manifests[0].id, "pages.bin")
    size = path.stat().st_size
    os.truncate(path, size - PAGE_SIZE)
    message = rf"pages\.bin is {size - PAGE_SIZE} bytes, manifest says {size} \(truncated\?\)"
    with pytest.raises(CorruptLayerError, match=message):
        store.verify(manifests[2].id)
    with pytest.raises(CorruptLayerError, match="truncated"):
        store.compose(manifests[1].id)


@pytest.mark.parametrize(
    "name", ["pages.bin", "pages.idx", "pages.sum", "prelude.bin", "device.bin"]
)
def test_flipped_byte_in_each_file(chain3: ChainT, name: str) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[2].id
    flip_byte(layer_path(store, layer_id, name), 0)
    with pytest.raises(CorruptLayerError, match=rf"layer {layer_id}.*{name}: sha256 mismatch"):
        store.verify(layer_id)
    # compose checks each page it reads against its digest (pages.sum), the rest by sha256.
    found = "page 0 .*does not match its digest" if name == "pages.bin" else "sha256 mismatch"
    with pytest.raises(CorruptLayerError, match=rf"{name}: {found}"):
        store.compose(layer_id)


def test_every_flipped_bit_in_the_manifest_is_caught(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[1].id
    path = layer_path(store, layer_id, "manifest.json")
    original = path.read_bytes()
    for offset in range(len(original)):
        flip_byte(path, offset)
        with pytest.raises(CorruptLayerError, match=rf"layer {layer_id}.*manifest\.json"):
            store.manifest(layer_id)
        path.write_bytes(original)
    assert store.manifest(layer_id) == manifests[1]


def test_manifest_checksum_mismatch_is_reported(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[1].id
    path = layer_path(store, layer_id, "manifest.json")
    path.write_bytes(path.read_bytes().replace(b'"tiny"', b'"tinz"'))
    with pytest.raises(CorruptLayerError, match=r"manifest\.json: sha256 mismatch"):
        store.verify(manifests[2].id)


def test_missing_parent(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    parent, child = manifests[1].id, manifests[2].id
    os.rename(layer_path(store, parent), store.path / "elsewhere")
    with pytest.raises(StoreError, match=rf"layer {child}.*parent {parent} is missing"):
        store.verify(child)
    with pytest.raises(StoreError, match="is missing"):
        store.verify()
    with pytest.raises(StoreError, match="is missing"):
        store.compose(child)
    with pytest.raises(StoreError, match="is missing"):
        store.chain(child)


def test_missing_file(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[0].id
    os.unlink(layer_path(store, layer_id, "device.bin"))
    with pytest.raises(CorruptLayerError, match=rf"layer {layer_id}.*device\.bin is missing"):
        store.verify(manifests[1].id)


def test_missing_manifest(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[2].id
    os.unlink(layer_path(store, layer_id, "manifest.json"))
    assert layer_id in store.layer_ids()
    with pytest.raises(CorruptLayerError, match=r"manifest\.json is missing"):
        store.verify()


def test_newer_major_is_rejected(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[1].id
    rewrite_manifest(store, layer_id, lambda obj: obj.update(format_version=[2, 0]))
    with pytest.raises(FormatVersionError, match=r"format version 2\.0 is newer"):
        store.manifest(layer_id)
    with pytest.raises(FormatVersionError):
        store.verify(manifests[2].id)


def test_older_major_is_rejected(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[0].id
    rewrite_manifest(store, layer_id, lambda obj: obj.update(format_version=[0, 9]))
    with pytest.raises(FormatVersionError, match=r"format version 0\.9 is older"):
        store.manifest(layer_id)


def test_newer_minor_is_rejected(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[1].id
    newer = [FORMAT_MAJOR, FORMAT_MINOR + 1]
    rewrite_manifest(store, layer_id, lambda obj: obj.update(format_version=newer))
    with pytest.raises(FormatVersionError, match="newer than this vmckpt reads"):
        store.manifest(layer_id)


def test_older_and_equal_minor_are_accepted(
    chain3: ChainT, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, manifests, images = chain3
    # Pretend this reader is at minor 5: layers at 1.1, 1.3 (as written) and 1.5 must load.
    # (tests/test_legacy_store.py reads real 1.0 and 1.1 layers.)
    monkeypatch.setattr(fmt, "FORMAT_MINOR", 5)
    as_1_1(store, manifests[0].id)
    assert store.manifest(manifests[0].id).format_version == (1, 1)
    assert store.manifest(manifests[1].id).format_version == (1, 3)
    rewrite_manifest(store, manifests[2].id, lambda obj: obj.update(format_version=[1, 5]))
    assert store.verify(manifests[2].id) == [m.id for m in manifests]
    ram, _, _ = store.compose(manifests[2].id)
    assert_same_image(ram, images[2])
    # ...and 1.6 is still too new for it.
    rewrite_manifest(store, manifests[2].id, lambda obj: obj.update(format_version=[1, 6]))
    with pytest.raises(FormatVersionError):
        store.manifest(manifests[2].id)


def test_wrong_format_name_is_rejected(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[0].id
    rewrite_manifest(store, layer_id, lambda obj: obj.update(format="something-else"))
    with pytest.raises(CorruptLayerError, match="not 'vmckpt-layer'"):
        store.manifest(layer_id)


def _replace_index(store: Store, layer_id: str, words: list[int]) -> None:
    """Write a different pages.idx and make the manifest agree with it (size, sha256)."""
    data = np.array(words, dtype="<u4").tobytes()
    path = layer_path(store, layer_id, "pages.idx")
    os.chmod(path, 0o600)
    path.write_bytes(data)
    entry = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    rewrite_manifest(store, layer_id, lambda obj: obj["files"].update({"pages.idx": entry}))


def _index_words(store: Store, layer_id: str) -> list[int]:
    data = layer_path(store, layer_id, "pages.idx").read_bytes()
    return [int(w) for w in np.frombuffer(data, dtype="<u4")]


def test_index_page_out_of_range(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[1].id
    words = _index_words(store, layer_id)
    count = words[0]
    words[2 + count - 1] = 256  # pc.ram has pages 0..255
    _replace_index(store, layer_id, words)
    with pytest.raises(CorruptLayerError, match=r"pages\.idx: stored page 256 is outside"):
        store.verify(layer_id)


def test_index_pages_not_sorted(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[1].id
    words = _index_words(store, layer_id)
    words[2], words[3] = words[3], words[2]
    _replace_index(store, layer_id, words)
    with pytest.raises(CorruptLayerError, match="not strictly ascending"):
        store.compose(layer_id)


def test_index_count_differs_from_manifest(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    layer_id = manifests[1].id
    words = _index_words(store, layer_id)
    words[1] += 1  # one more zeroed page than the manifest says
    words.append(0)
    _replace_index(store, layer_id, words)
    with pytest.raises(CorruptLayerError, match="manifest says"):
        store.verify(layer_id)


def test_parent_loop_is_detected(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    base, last = manifests[0].id, manifests[2].id
    rewrite_manifest(store, base, lambda obj: obj.update(parent=last))
    with pytest.raises(CorruptLayerError, match="loops back"):
        store.chain(last)
    with pytest.raises(CorruptLayerError, match="loops back"):
        store.verify()


def test_parent_with_other_layout_is_rejected_on_read(chain3: ChainT) -> None:
    store, manifests, _ = chain3
    base = manifests[0].id

    def grow(obj: dict[str, Any]) -> None:
        obj["blocks"][0]["length"] *= 2

    rewrite_manifest(store, base, grow)
    with pytest.raises(CorruptLayerError, match="layout"):
        store.verify(manifests[1].id)


# --- writing --------------------------------------------------------------


def leftovers(store: Store) -> list[str]:
    return sorted(p.name for p in store.layers_path.iterdir())


def test_failed_rename_leaves_nothing(
    chain3: ChainT, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, manifests, images = chain3
    before = leftovers(store)

    def broken_rename(src: Any, dst: Any, **kwargs: Any) -> None:
        raise RuntimeError("power cut")

    monkeypatch.setattr(os, "rename", broken_rename)
    with pytest.raises(RuntimeError, match="power cut"):
        store.write_layer(content(mutate(images[2], rng), manifests[2].id, images[2]))
    monkeypatch.undo()
    assert leftovers(store) == before
    assert store.verify() == [m.id for m in manifests]


def test_failure_while_writing_pages_leaves_nothing(
    chain3: ChainT, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, manifests, images = chain3
    before = leftovers(store)
    real_fsync = os.fsync
    calls = 0

    def failing_fsync(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:  # pages.bin is synced, pages.idx fails
            raise OSError(28, "No space left on device", "pages.idx")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(StoreError, match=r"pages\.idx: No space left on device"):
        store.write_layer(content(mutate(images[2], rng), manifests[2].id, images[2]))
    monkeypatch.undo()
    assert calls == 2
    assert leftovers(store) == before
    # A retry of the same content succeeds and composes to the same image.
    again = mutate(images[2], rng)
    manifest = store.write_layer(content(again, manifests[2].id, images[2]))
    assert_same_image(store.compose(manifest.id)[0], again)


def test_exception_from_page_data_leaves_nothing(
    chain3: ChainT, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, manifests, images = chain3
    before = leftovers(store)

    def exploding_chunks(*args: Any) -> Any:
        yield np.zeros((1, PAGE_SIZE), dtype=np.uint8)
        raise KeyboardInterrupt

    monkeypatch.setattr(layerio, "page_chunks", exploding_chunks)
    with pytest.raises(KeyboardInterrupt):
        store.write_layer(content(mutate(images[2], rng), manifests[2].id, images[2]))
    assert leftovers(store) == before


def test_write_rejects_other_layout_and_missing_parent(
    chain3: ChainT, rng: np.random.Generator
) -> None:
    store, manifests, _ = chain3
    before = leftovers(store)
    other = RamImage.zeroed([RamBlock("pc.ram", 2 << 20)])
    other.pages_of("pc.ram")[3] = 7
    with pytest.raises(StoreError, match="layout"):
        store.write_layer(content(other, manifests[2].id, None))
    with pytest.raises(StoreError, match="no such layer"):
        store.write_layer(content(random_image(rng), "0099-abcdef", None))
    assert leftovers(store) == before


def test_write_rejects_bad_page_lists(store: Store, rng: np.random.Generator) -> None:
    image = random_image(rng)
    layer = content(image, None, None)
    layer.pages["pc.ram"] = np.array([0, 256], dtype=np.uint32)
    with pytest.raises(StoreError, match="outside the block"):
        store.write_layer(layer)
    layer = content(image, None, None)
    nonzero = image.nonzero_pages("pc.ram")
    layer.zeroed["pc.ram"] = nonzero[:1]
    layer.pages["pc.ram"] = nonzero[1:]
    with pytest.raises(StoreError, match="not all zero"):
        store.write_layer(layer)
    layer = content(image, None, None)
    layer.zeroed["pc.ram"] = nonzero[:1]
    with pytest.raises(StoreError, match="both stored and zeroed"):
        store.write_layer(layer)
    layer = content(image, None, None)
    layer.pages["nope"] = np.array([1], dtype=np.uint32)
    with pytest.raises(StoreError, match="unknown RAM blocks"):
        store.write_layer(layer)
    assert store.layer_ids() == []
    assert leftovers(store) == []


def test_unsorted_page_lists_are_sorted(store: Store, rng: np.random.Generator) -> None:
    image = random_image(rng)
    layer = content(image, None, None)
    layer.pages = {k: v[::-1].astype(np.int64) for k, v in layer.pages.items()}
    manifest = store.write_layer(layer)
    assert store.verify(manifest.id) == [manifest.id]
    assert_same_image(store.compose(manifest.id)[0], image)


def test_stores_give_back_their_directories(tmp_path: Path) -> None:
    """A long-lived process (a test run, a checkpoint session) opens many stores: one that is
    closed, or only dropped, leaves no descriptor behind (the test run once ran out of them)."""
    path = tmp_path / "store"
    Store.create(path).close()
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(300):
        with Store(path) as store:
            store.layer_ids()
        Store(path).layer_ids()  # dropped without a close
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= before
