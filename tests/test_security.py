"""A store is untrusted input: layers are sealed with a key kept outside the store, and
only what authenticates is used; free-form QEMU arguments come only from this store's own
layers (docs/SECURITY.md names the claims these tests back)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.framework.guest import Vmckpt
from tests.test_images import content, random_image
from vmckpt.errors import CorruptLayerError, RestoreError, StoreError, UsageError
from vmckpt.images import LayerManifest, Store, keys
from vmckpt.images import format as fmt
from vmckpt.images.transfer import layer_files, receive_layer
from vmckpt.machine.spec import GuestSpec, check_machine, check_name
from vmckpt.mechanisms.restore import restore_command
from vmckpt.mechanisms.restore_prep import qemu_args_for

EVIL_ARGS = ["-netdev", "tap,id=n0,script=/tmp/evil.sh", "-pidfile", "/etc/evil"]


def guest_spec(qemu_args: list[str] | None = None) -> dict[str, Any]:
    """A valid guest spec (no media: nothing to find on disk)."""
    spec = GuestSpec(memory_mib=64, cpus=1, accel="tcg", qemu_args=tuple(qemu_args or ()))
    return spec.to_dict()


def write_layer(store: Store, rng: np.random.Generator, qemu_args: list[str]) -> LayerManifest:
    layer = replace(content(random_image(rng), None, None), spec=guest_spec(qemu_args))
    return store.write_layer(layer)


def tamper(store: Store, layer_id: str, **changes: Any) -> None:
    """Edit a manifest as someone without the key would: the checksum recomputed as
    docs/FORMAT.md describes, the seal left as it was."""
    path = store.layer_path(layer_id, "manifest.json")
    obj = json.loads(path.read_bytes())
    obj.update(changes)
    obj["manifest_sha256"] = fmt.manifest_checksum(obj)
    path.write_bytes(fmt.manifest_bytes(obj))


def copy_to(store: Store, other: Store, layer_id: str, origin: str) -> None:
    """Copy a layer into another store the way the remote agent does."""
    files = [(name, content) for name, _, content in layer_files(store, layer_id)]
    assert receive_layer(other, layer_id, store.manifest_sha256(layer_id), files, origin=origin)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "store")


def cli(store: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    return Vmckpt(store)(*args, "--store", str(store), check=False, env=env)


def assert_one_line(result: Any, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


# --- keys -----------------------------------------------------------------------------


def test_init_makes_a_private_key_outside_the_store(store: Store, store_keys: Path) -> None:
    assert store.store_id is not None and keys.STORE_ID_RE.match(store.store_id)
    path = store_keys / store.store_id
    assert path.is_file() and not str(path).startswith(str(store.path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store_keys.stat().st_mode) == 0o700
    assert store.key is not None and store.key.store_id == store.store_id
    assert store.key.key.hex() not in repr(store.key)
    # A key others can read is refused (like ssh's private keys).
    path.chmod(0o644)
    with pytest.raises(StoreError, match="readable by others"):
        Store(store.path).key  # noqa: B018 - the property loads the key


def test_every_layer_is_sealed_and_authenticates(store: Store, rng: np.random.Generator) -> None:
    manifest = write_layer(store, rng, [])
    assert manifest.origin == "local"
    assert Store(store.path).manifest(manifest.id).origin == "local"
    seal = json.loads(store.layer_path(manifest.id, keys.SEAL).read_bytes())
    assert seal["alg"] == "hmac-sha256" and seal["origin"] == "local"
    assert store.verify(manifest.id) == [manifest.id]


# --- a layer edited, unsealed, or sealed by another key -------------------------------


def test_edited_manifest_is_refused_in_one_line(store: Store, rng: np.random.Generator) -> None:
    """The attack of issue 12: qemu_args edited, the checksum recomputed."""
    manifest = write_layer(store, rng, [])
    tamper(store, manifest.id, spec=guest_spec(EVIL_ARGS))
    with pytest.raises(CorruptLayerError, match="MAC does not match"):
        store.manifest(manifest.id)
    for command in (["verify", manifest.id], ["restore", "--layer", manifest.id]):
        assert_one_line(cli(store.path, *command), 4, manifest.id, "manifest.mac")
    # list still shows the store (the bad layer as damaged), and nothing started a QEMU.
    listing = cli(store.path, "list", "--json")
    assert manifest.id in listing.stdout
    assert not store.host.has_runtime("tiny")


def test_edited_machine_type_is_refused(store: Store, rng: np.random.Generator) -> None:
    manifest = write_layer(store, rng, [])
    tamper(store, manifest.id, machine_type="pc-i440fx-10.0,dump-guest-core=on")
    with pytest.raises(CorruptLayerError, match="MAC does not match"):
        store.verify(manifest.id)


def test_missing_seal_is_refused_with_the_way_out(store: Store, rng: np.random.Generator) -> None:
    manifest = write_layer(store, rng, [])
    store.layer_path(manifest.id, keys.SEAL).unlink()
    assert store.manifest(manifest.id).origin == "unsealed"  # listed, inspected...
    with pytest.raises(CorruptLayerError, match="init --adopt"):
        store.compose(manifest.id)  # ...never used
    assert_one_line(cli(store.path, "restore", "--layer", manifest.id), 4, "not authenticated")


def test_seal_of_another_layer_or_store_does_not_authenticate(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    first = write_layer(store, rng, [])
    second = write_layer(store, rng, [])
    # A seal moved from one layer to another: it names the layer id, so it fails.
    shutil.copy(store.layer_path(first.id, keys.SEAL), store.layer_path(second.id, keys.SEAL))
    with pytest.raises(CorruptLayerError, match="MAC does not match"):
        store.manifest(second.id)
    # A whole layer, seal included, from another store (another key) fails too.
    other = Store.create(tmp_path / "other")
    foreign = write_layer(other, rng, EVIL_ARGS)
    shutil.copytree(other.layer_path(foreign.id), store.layer_path(foreign.id))
    with pytest.raises(CorruptLayerError, match="MAC does not match"):
        store.manifest(foreign.id)


def test_a_user_without_the_key_cannot_restore(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    manifest = write_layer(store, rng, [])
    elsewhere = {"VMCKPT_KEYS_DIR": str(tmp_path / "no-keys")}
    listing = cli(store.path, "list", "--json", env=elsewhere)
    assert listing.returncode == 0 and manifest.id in listing.stdout
    result = cli(store.path, "verify", manifest.id, env=elsewhere)
    assert_one_line(result, 3, "no key", store.store_id or "?")


def test_origin_values_are_checked() -> None:
    for good in ("local", "adopted", "host:10.0.0.2", "host:bob@example.org:2222"):
        assert keys.is_sealed(good)
    for bad in ("", "unsealed", "no-key", "host:", "host:a b", "remote", "local\n"):
        assert not keys.is_sealed(bad)
    assert keys.host_origin("evil host;rm -rf") == "host:evil_host_rm_-rf"


# --- layers from another host ---------------------------------------------------------


def test_a_received_layer_is_sealed_as_from_that_host(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    manifest = write_layer(store, rng, EVIL_ARGS)
    other = Store.create(tmp_path / "other")
    with pytest.raises(StoreError, match="not host:NAME"):
        copy_to(store, other, manifest.id, origin="local")  # a sender cannot claim "local"
    assert not other.has_layer(manifest.id)
    copy_to(store, other, manifest.id, origin=keys.host_origin("source.example"))
    received = other.manifest(manifest.id)
    assert received.origin == "host:source.example"
    assert other.verify(manifest.id) == [manifest.id]
    # Its QEMU arguments are not used (with a warning); the user's own are.
    spec = GuestSpec.from_dict(received.spec)
    assert spec.qemu_args == tuple(EVIL_ARGS)
    assert qemu_args_for(received, spec, None, "tiny") == ()
    assert qemu_args_for(received, spec, ("-S",), "tiny") == ("-S",)
    assert qemu_args_for(store.manifest(manifest.id), spec, None, "tiny") == tuple(EVIL_ARGS)


def test_inspect_shows_origin_and_what_restore_passes_qemu(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    manifest = write_layer(store, rng, EVIL_ARGS)
    ours = json.loads(cli(store.path, "inspect", manifest.id, "--json").stdout)
    assert ours["origin"] == "local"
    assert ours["restore_command"][-len(EVIL_ARGS) - 3 : -3] == EVIL_ARGS
    assert ours["restore_command"][-3:] == ["-S", "-incoming", "defer"]
    other = Store.create(tmp_path / "other")
    copy_to(store, other, manifest.id, origin=keys.host_origin("source"))
    theirs = json.loads(cli(other.path, "inspect", manifest.id, "--json").stdout)
    assert theirs["origin"] == "host:source"
    assert not set(EVIL_ARGS) & set(theirs["restore_command"])
    text = cli(other.path, "inspect", manifest.id).stdout
    assert "origin         host:source" in text and "restore runs" in text


def test_restore_command_validates_what_it_passes(store: Store, rng: np.random.Generator) -> None:
    manifest = write_layer(store, rng, [])
    with pytest.raises(UsageError, match="machine type"):
        restore_command(store, replace(manifest, machine_type="pc,dump-guest-core=on"))
    with pytest.raises(UsageError, match="guest name"):
        restore_command(store, replace(manifest, guest="a,b"))
    assert "-pidfile" not in restore_command(store, manifest)


# --- maintenance never launders --------------------------------------------------------


def test_squash_keeps_the_least_trusted_origin(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    from vmckpt.images import maintenance

    image = random_image(rng)
    base = store.write_layer(content(image, None, None, tag="0"))
    other = Store.create(tmp_path / "other")
    copy_to(store, other, base.id, origin=keys.host_origin("source"))
    child = other.write_layer(content(image, base.id, image, tag="1"))
    assert other.manifest(child.id).origin == "local"
    maintenance.squash(other, None, child.id)
    assert other.manifest(child.id).origin == "host:source"
    # An unsealed layer is not rewritten (that would seal it).
    other.layer_path(child.id, keys.SEAL).unlink()
    grandchild = other.write_layer(content(image, child.id, image, tag="2"))
    with pytest.raises(StoreError, match="not authenticated"):
        maintenance.squash(other, None, grandchild.id)


# --- adopting a store -----------------------------------------------------------------


def test_init_adopt_seals_what_checks_and_refuses_the_rest(
    store: Store, rng: np.random.Generator
) -> None:
    good = write_layer(store, rng, [])
    bad = write_layer(store, rng, [])
    for layer in (good, bad):
        store.layer_path(layer.id, keys.SEAL).unlink()
    pages = store.layer_path(bad.id, "pages.bin")
    data = bytearray(pages.read_bytes())
    data[0] ^= 1
    pages.write_bytes(bytes(data))
    result = cli(store.path, "init", "--adopt", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["sealed"] == [good.id] and not report["new_key"]
    assert [layer for layer, _ in report["refused"]] == [bad.id]
    adopted = Store(store.path)
    assert adopted.manifest(good.id).origin == "adopted"
    # What failed its checks is no longer one of the store's layers (the catalog drops it).
    with pytest.raises(StoreError, match="catalog does not name it"):
        adopted.manifest(bad.id)
    assert adopted.uncatalogued() == [bad.id]


def test_init_adopt_of_a_store_whose_key_is_elsewhere(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    manifest = write_layer(store, rng, EVIL_ARGS)
    env = {"VMCKPT_KEYS_DIR": str(tmp_path / "new-keys")}
    result = cli(store.path, "init", "--adopt", env=env)
    assert result.returncode == 0, result.stderr
    assert "sealed 1 layer(s)" in result.stdout
    os.environ["VMCKPT_KEYS_DIR"], old = env["VMCKPT_KEYS_DIR"], os.environ["VMCKPT_KEYS_DIR"]
    try:
        adopted = Store(store.path)
        assert adopted.store_id != store.store_id  # a new id names the new key
        assert adopted.manifest(manifest.id).origin == "adopted"
        spec = GuestSpec.from_dict(adopted.manifest(manifest.id).spec)
        assert qemu_args_for(adopted.manifest(manifest.id), spec, None, "tiny") == ()
    finally:
        os.environ["VMCKPT_KEYS_DIR"] = old
    # The old key no longer matches the store's id: the old owner must adopt in turn.
    with pytest.raises(StoreError, match="no key"):
        Store(store.path).compose(manifest.id)


@pytest.mark.parametrize(
    "check", [check_name, check_machine, lambda v: check_name(v, "disk id")], ids=str
)
def test_a_trailing_newline_is_not_a_valid_name(check: Any) -> None:
    """`$` matches before a final newline: every validator anchors with \\Z."""
    check("pc")
    with pytest.raises(UsageError):
        check("pc\n")
    assert not fmt.LAYER_ID_RE.match("0001-abcdef\n")


# --- with real QEMU -----------------------------------------------------------------------


def test_restore_passes_qemu_arguments_only_from_this_stores_layers(vmckpt: Vmckpt) -> None:
    """`run --qemu-arg=-pidfile ...`: a restore from this store passes it again; a restore
    of the same layer received from another host does not, unless the user repeats it."""
    pidfile = vmckpt.store.parent / "qemu.pid"
    vmckpt.run_guest("web", extra=("--qemu-arg=-pidfile", f"--qemu-arg={pidfile}"))
    vmckpt.wait_states("web", 2)
    assert pidfile.exists()
    layer = str(vmckpt.checkpoint("web")["layer"])
    other = Store.create(vmckpt.store.parent / "other")
    copy_to(Store(vmckpt.store), other, layer, origin=keys.host_origin("source"))
    elsewhere = Vmckpt(other.path, media=vmckpt.media)
    try:
        pidfile.unlink()
        result = elsewhere.restore("--name", "copy")
        assert "-pidfile" in result.stderr and "not used" in result.stderr
        elsewhere.wait_states("copy", 1)
        assert not pidfile.exists()
        repeated = vmckpt.store.parent / "repeated.pid"
        elsewhere.restore("--name", "copy2", "--qemu-arg=-pidfile", f"--qemu-arg={repeated}")
        assert repeated.exists()
    finally:
        elsewhere.kill_all()
    vmckpt.restore("--name", "again", "--layer", layer)
    assert pidfile.exists()


def test_libvirt_define_uses_domain_xml_only_from_local_layers(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    """Domain XML can name hooks and QEMU command lines: `restore --libvirt-define` refuses
    it from a layer another host sent, before libvirt is even asked."""
    from vmckpt.mechanisms.restore_libvirt import restore_domain

    spec = {**guest_spec(), "libvirt_xml": "<domain type='qemu'><name>evil</name></domain>"}
    manifest = store.write_layer(replace(content(random_image(rng), None, None), spec=spec))
    other = Store.create(tmp_path / "other")
    copy_to(store, other, manifest.id, origin=keys.host_origin("source"))
    with pytest.raises(RestoreError, match="origin is host:source"):
        restore_domain(other, manifest.id, "copy", uri="test:///nowhere")
