"""A store written by the format 1.1 code (tests/fixtures/store-1.1, made by
tests/fixtures/make_store_1_1.py) is read, verified and composed to the very
contents that code composed (tests/fixtures/store-1.1.json), and pruned,
squashed and deleted from without any layer composing differently."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from vmckpt.errors import StoreError
from vmckpt.images import Store, maintenance
from vmckpt.images.adopt import adopt
from vmckpt.images.disks import compose_disk
from vmckpt.images.retention import KeepRules

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def expected() -> dict[str, Any]:
    data = json.loads((FIXTURES / "store-1.1.json").read_text())
    assert isinstance(data, dict)
    return data


@pytest.fixture
def unadopted(tmp_path: Path) -> Store:
    """A copy of the fixture as it is (tests may change it): its layers have no seals."""
    shutil.copytree(FIXTURES / "store-1.1", tmp_path / "store")
    return Store(tmp_path / "store")


@pytest.fixture
def legacy(unadopted: Store) -> Store:
    """A copy of the fixture, adopted (`vmckpt init --adopt`): every layer sealed."""
    result = adopt(unadopted)
    assert result.new_key and not result.refused and not result.already
    assert sorted(result.sealed) == unadopted.layer_ids() != []
    return unadopted


def test_legacy_store_is_listed_but_not_restored_until_adopted(
    unadopted: Store, expected: dict[str, Any], tmp_path: Path
) -> None:
    """A store from before seals: its layers read as unsealed; their content is used only
    once the user adopted the store; adopting makes a key and seals every layer."""
    assert unadopted.store_id is None and unadopted.key is None
    layer_id = sorted(expected["layers"])[0]
    assert unadopted.manifest(layer_id).origin == "unsealed"
    with pytest.raises(StoreError, match="init --adopt"):
        unadopted.compose(layer_id)
    with pytest.raises(StoreError, match="init --adopt"):
        unadopted.verify(layer_id)
    with pytest.raises(StoreError, match="init --adopt"):
        unadopted.check_writable()  # no key to seal a new layer with
    result = adopt(unadopted)
    assert result.new_key and len(result.sealed) == len(expected["layers"])
    reopened = Store(unadopted.path)
    assert reopened.store_id == result.store_id and reopened.key is not None
    assert {reopened.manifest(i).origin for i in reopened.layer_ids()} == {"adopted"}
    assert composed(reopened, layer_id, tmp_path) == without_name(expected["layers"][layer_id])
    # A second adopt has nothing to do.
    again = adopt(reopened)
    assert not again.new_key and not again.sealed and len(again.already) == len(result.sealed)


def composed(store: Store, layer_id: str, tmp: Path) -> dict[str, Any]:
    """The digests of what ``layer_id`` composes to, in the fixture's JSON vocabulary."""
    ram, prelude, device = store.compose(layer_id)
    entry: dict[str, Any] = {
        "ram": {b.idstr: hashlib.sha256(ram.data[b.idstr].data).hexdigest() for b in ram.blocks},
        "prelude": hashlib.sha256(prelude).hexdigest(),
        "device": hashlib.sha256(device).hexdigest(),
    }
    if store.manifest(layer_id).disk("vda") is not None:
        out = tmp / f"vda-{layer_id}.raw"
        out.unlink(missing_ok=True)
        compose_disk(store, layer_id, "vda", out)
        entry["disk_vda"] = hashlib.sha256(out.read_bytes()).hexdigest()
    return entry


def without_name(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in entry.items() if k != "name"}


def test_legacy_store_is_read_verified_and_composed(
    legacy: Store, expected: dict[str, Any], tmp_path: Path
) -> None:
    layers = expected["layers"]
    assert legacy.verify() == sorted(layers)
    versions = {legacy.manifest(i).format_version for i in layers}
    assert versions == {(1, 0), (1, 1)}  # the fixture has both of the older minors
    for layer_id, entry in layers.items():
        assert composed(legacy, layer_id, tmp_path) == without_name(entry), entry["name"]
    for name, head in expected["heads"].items():
        assert legacy.head(name) == head
    # The comparison can fail: two different layers compose differently.
    first, second = sorted(layers)[:2]
    assert composed(legacy, first, tmp_path)["ram"] != without_name(layers[second])["ram"]


def names(expected: dict[str, Any]) -> dict[str, str]:
    return {entry["name"]: layer_id for layer_id, entry in expected["layers"].items()}


def assert_compose_as_recorded(store: Store, expected: dict[str, Any], tmp: Path) -> None:
    assert store.verify() == store.layer_ids()
    for layer_id in store.layer_ids():
        entry = expected["layers"][layer_id]
        assert composed(store, layer_id, tmp) == without_name(entry), entry["name"]


def test_legacy_store_is_pruned_correctly(
    legacy: Store, expected: dict[str, Any], tmp_path: Path
) -> None:
    ids = names(expected)
    # Each guest keeps its two newest layers (and its head): A, B and G go. B has two
    # children (C, and E of guest fork): both absorb it and A; H absorbs G's disk too.
    result = maintenance.prune(legacy, KeepRules(last=2))
    assert set(result.removed) == {ids["A"], ids["B"], ids["G"]}
    assert set(result.rewritten) == {ids["C"], ids["E"], ids["H"]}
    assert_compose_as_recorded(legacy, expected, tmp_path)
    for name in "CEH":
        manifest = legacy.manifest(ids[name])
        assert manifest.format_version == (1, 3) and manifest.parent is None
        assert manifest.origin == "adopted"  # a rewrite keeps the least trusted origin
    assert legacy.manifest(ids["H"]).disks[0].full
    # Layers nobody rewrote stay as written (1.0, 1.1).
    assert legacy.manifest(ids["D"]).format_version == (1, 0)
    assert legacy.manifest(ids["I"]).format_version == (1, 1)


def test_legacy_store_squash_and_delete(
    legacy: Store, expected: dict[str, Any], tmp_path: Path
) -> None:
    ids = names(expected)
    maintenance.squash(legacy, None, ids["I"])  # I absorbs H and G, disk deltas merged
    assert legacy.manifest(ids["I"]).parent is None
    legacy.set_head("tiny", ids["C"])
    maintenance.delete(legacy, ids["D"])  # a leaf once it is no head
    maintenance.squash(legacy, ids["A"], ids["C"])  # A, B into C; E absorbs them too
    assert sorted(legacy.layer_ids()) == sorted([ids[n] for n in "CEGHI"])
    assert_compose_as_recorded(legacy, expected, tmp_path)
