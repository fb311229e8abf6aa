"""All of a store is untrusted input, not only its layers (docs/SECURITY.md).

Each test plants what someone who can write the store directory, but has no key, could
plant — files where vmckpt 1.4 kept guests' runtime records, links and hard links to files
outside the store, FIFOs, devices, deep or huge JSON, a changed marker, an earlier version
of a layer or of the whole store — and shows vmckpt refusing in one line or ignoring it:
nothing run, signalled, written, deleted or shown outside the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.framework.guest import Vmckpt, one_line_error
from tests.test_disks import checkpoint, disk_states, run_disk_guest, wait_disk
from tests.test_images import content, mutate, random_image
from tests.test_security import copy_to, guest_spec
from vmckpt.errors import CorruptLayerError, StoreError
from vmckpt.images import LayerManifest, Store, keys, maintenance
from vmckpt.images.disks import BASES_DIR
from vmckpt.machine.qemu import process_start_time

COMMAND_S = 60.0  # a command that hangs on a planted file fails the test instead of the suite


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(18)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "store")


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A directory outside the store with files that must stay as they are."""
    directory = tmp_path / "outside"
    directory.mkdir()
    for name in ("precious", "pages.bin", "manifest.json"):
        (directory / name).write_text(f"{name}: not the store's\n")
        (directory / name).chmod(0o644)
    return directory


def tree(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``directory`` (links not followed): content and mode."""
    found = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            found[str(path.relative_to(directory))] = (
                path.read_bytes(),
                stat.S_IMODE(info.st_mode),
            )
    return found


def run(store: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """A vmckpt command on the store; a hang is a failure, not a stuck suite."""
    return Vmckpt(store)(*args, "--store", str(store), check=False, env=env, timeout=COMMAND_S)


def chain(store: Store, rng: np.random.Generator, count: int = 3) -> list[LayerManifest]:
    image = random_image(rng)
    layers = [store.write_layer(replace(content(image, None, None), spec=guest_spec()))]
    for number in range(1, count):
        newer = mutate(image, rng)
        layer = content(newer, layers[-1].id, image, tag=str(number))
        layers.append(store.write_layer(replace(layer, spec=guest_spec())))
        image = newer
    return layers


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """A process of ours that planted records name: it must never be signalled."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


# --- files where vmckpt 1.4 kept a guest's runtime records ----------------------------------


def plant_runtime_records(store: Path, name: str, pid: int, marker: Path) -> None:
    """guest.json naming a live process and a program to run, remote.json whose remote
    python is a payload, a session record and a migration journal naming that process."""
    payload = store.parent / "payload.sh"
    payload.write_text(f"#!/bin/sh\ntouch {marker}\n")
    payload.chmod(0o755)
    guest = store / "guests" / name
    guest.mkdir(parents=True)
    start = process_start_time(pid)
    process = {
        "name": name, "pid": pid, "start_time": start, "qmp_socket": str(guest / "q.sock"),
        "serial_log": str(guest / "serial.log"), "log": str(guest / "qemu.log"),
        "accel": "tcg", "command": [str(payload)], "session_socket": None,
    }  # fmt: skip
    spec = json.loads(json.dumps(guest_spec(["-pidfile", str(marker)])))
    records = {
        "guest.json": {"name": name, "spec": spec, "process": process, "accel": "tcg",
                       "trusted_args": ["-pidfile", str(marker)]},
        "remote.json": {"name": name, "host": "root@127.0.0.1:1", "store": "/x",
                        "python": f"sh -c 'touch {marker}'", "ssh": {}},
        "session.json": {"pid": pid, "start_time": start},
        "migration.json": {"vm": name, "owner_pid": 1, "owner_start": 1, "incoming": False,
                           "was_running": False, "capabilities": {}, "parameters": {}},
    }  # fmt: skip
    for file, data in records.items():
        (guest / file).write_text(json.dumps(data))


def test_runtime_records_planted_in_the_store_are_never_read(
    store: Store, tmp_path: Path, bystander: subprocess.Popen[bytes]
) -> None:
    marker = tmp_path / "ran"
    plant_runtime_records(store.path, "web", bystander.pid, marker)
    listing = run(store.path, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert [g for g in json.loads(listing.stdout)["guests"] if g["name"] == "web"] == []
    for command in (["stop", "web"], ["resume", "web"], ["pause", "web"], ["console", "web"]):
        one_line_error(run(store.path, *command), "web")
    for command in (["checkpoint", "web"], ["gc"], ["verify"]):
        run(store.path, *command)
    assert bystander.poll() is None, "a process named by a planted record was signalled"
    assert not marker.exists(), "a program named by a planted record ran"
    assert (store.path / "guests" / "web" / "guest.json").exists()  # not ours: left alone


# --- links and hard links out of the store --------------------------------------------------


def test_gc_never_follows_a_link_out_of_the_store(
    store: Store, outside: Path, rng: np.random.Generator
) -> None:
    before = tree(outside)
    chain(store, rng, 2)
    layers = store.layers_path
    (layers / ".tmp-0099-aaaaaa-dead").symlink_to(outside)  # a link named as garbage
    leftover = layers / ".tmp-0098-bbbbbb-dead"
    leftover.mkdir()
    (leftover / "pages.bin").symlink_to(outside / "pages.bin")  # inside garbage
    media = store.path / "media" / ("0" * 64)
    media.mkdir(parents=True)
    stale = media / ".tmp-kernel-1234"
    stale.symlink_to(outside / "precious")
    os.utime(stale, (0, 0), follow_symlinks=False)
    old = store.path / "guests" / "g"  # vmckpt 1.4's scratch place
    old.mkdir(parents=True)
    (old / "disk-scratch").symlink_to(outside)
    result = run(store.path, "gc", "--json")
    assert result.returncode == 0, result.stderr
    removed = {g["path"] for g in json.loads(result.stdout)["removed"]}
    assert {"layers/.tmp-0099-aaaaaa-dead", "layers/.tmp-0098-bbbbbb-dead"} <= removed
    assert f"media/{'0' * 64}/.tmp-kernel-1234" in removed
    assert tree(outside) == before and (old / "disk-scratch").is_symlink()
    assert store.verify() == store.layer_ids()


@pytest.mark.parametrize("directory", ["layers", "media"])
def test_a_store_directory_that_is_a_link_is_refused(
    store: Store, outside: Path, rng: np.random.Generator, directory: str
) -> None:
    chain(store, rng, 1)
    before = tree(outside)
    target = store.path / directory
    if target.exists():
        shutil.rmtree(target)
    target.symlink_to(outside)
    for command in (["list"], ["gc"], ["verify"]):
        one_line_error(run(store.path, *command), "a link?", code=3)
    assert tree(outside) == before


def test_a_lock_file_linked_out_of_the_store_is_refused(store: Store, outside: Path) -> None:
    before = tree(outside)
    for lock in ("store.lock", "maintenance.lock"):
        path = store.path / lock
        path.unlink(missing_ok=True)
        os.link(outside / "precious", path)
    one_line_error(run(store.path, "gc"), "not a plain file of its own", code=14)
    assert tree(outside) == before


def test_a_layer_file_linked_out_of_the_store_is_neither_read_nor_shown(
    store: Store, outside: Path, rng: np.random.Generator
) -> None:
    layer = chain(store, rng, 1)[0]
    secret = outside / "pages.bin"
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    pages = store.layer_path(layer.id, "pages.bin")
    pages.unlink()
    os.link(secret, pages)
    for command in (["verify"], ["verify", layer.id], ["restore", "--layer", layer.id]):
        result = run(store.path, *command)
        one_line_error(result, "pages.bin has other hard links", code=4)
        assert digest[:12] not in result.stdout + result.stderr
    symlinked = store.layer_path(layer.id, "pages.sum")
    symlinked.unlink()
    symlinked.symlink_to(secret)
    with pytest.raises(CorruptLayerError, match=r"not a regular file|has other hard links"):
        store.verify(layer.id)


def test_a_foreign_layer_naming_a_file_of_this_host_does_not_reveal_it(
    store: Store, tmp_path: Path, outside: Path, rng: np.random.Generator
) -> None:
    """A layer another host sent names a secret of this host as its kernel: restore and
    inspect refuse it without showing anything of that file (not even a digest)."""
    secret = outside / "precious"
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    spec = guest_spec()
    spec["media"] = [{"role": "kernel", "path": str(secret), "sha256": "ab" * 32, "args": ""}]
    layer = store.write_layer(replace(content(random_image(rng), None, None), spec=spec))
    other = Store.create(tmp_path / "other")
    copy_to(store, other, layer.id, origin=keys.host_origin("elsewhere"))
    for command in (["restore", "--layer", layer.id], ["verify", "--boot", layer.id]):
        result = run(other.path, *command)
        assert result.returncode != 0
        assert digest[:12] not in result.stdout + result.stderr
    shown = run(other.path, "inspect", layer.id)
    assert digest[:12] not in shown.stdout + shown.stderr


# --- FIFOs, devices, deep and huge files -------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "device", "deep", "huge"])
@pytest.mark.parametrize("where", ["manifest", "catalog", "marker"])
def test_a_bad_store_file_gives_one_line_never_a_hang_or_traceback(
    store: Store, rng: np.random.Generator, kind: str, where: str
) -> None:
    layer = chain(store, rng, 1)[0]
    path = {
        "manifest": store.layer_path(layer.id, "manifest.json"),
        "catalog": store.path / "catalog.json",
        "marker": store.path / "vmckpt-store.json",
    }[where]
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path, 0o600)
    elif kind == "device":
        os.mknod(path, 0o600 | stat.S_IFCHR, os.makedev(1, 3))  # /dev/null's
    elif kind == "deep":
        path.write_text("[" * 200_000 + "]" * 200_000)
    else:
        with path.open("wb") as handle:
            handle.truncate(1 << 40)  # sparse: a terabyte of nothing
    for command in (["verify"], ["restore", "--layer", layer.id]):
        result = run(store.path, *command)
        one_line_error(result)
        assert "Traceback" not in result.stderr
    listing = run(store.path, "list")
    assert "Traceback" not in listing.stderr
    said = "damaged" in listing.stdout or len(listing.stderr.strip().splitlines()) == 1
    assert listing.returncode != 0 and said, (listing.stdout, listing.stderr)


# --- a store that cannot be written ----------------------------------------------------------


@pytest.fixture
def read_only(store: Store, tmp_path: Path, root: None) -> Iterator[Path]:
    """The store seen through a read-only bind mount (as root, modes do not stop writes)."""
    view = tmp_path / "ro"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(store.path), str(view)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def test_a_read_only_store_reads_and_refuses_changes_in_one_line(
    store: Store, rng: np.random.Generator, read_only: Path
) -> None:
    layers = chain(store, rng, 3)
    # The store read through the mount is another path, hence another store on this host;
    # its key is the same (the key follows the store id).
    before = tree(store.path)
    listing = run(read_only, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    assert [row["layer"] for row in json.loads(listing.stdout)["layers"]] == [m.id for m in layers]
    assert run(read_only, "verify").returncode == 0
    for command in (
        ["gc"], ["prune", "--keep-last", "1"], ["delete", layers[0].id],
        ["squash", layers[2].id], ["init", "--adopt", str(read_only)],
    ):  # fmt: skip
        one_line_error(run(read_only, *command), "read-only")
    assert tree(store.path) == before


# --- init --adopt never lowers a store's protection ----------------------------------------------


def rewrite_marker(store: Path, **changes: Any) -> None:
    marker = store / "vmckpt-store.json"
    data = json.loads(marker.read_text())
    data.update(changes)
    for key, value in changes.items():
        if value is None:
            del data[key]
    marker.write_text(json.dumps(data))


def test_adopt_puts_back_an_encrypted_stores_marker(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    store = Store.create(tmp_path / "enc", encrypt=True)
    layers = chain(store, rng, 2)
    original = store.store_id
    rewrite_marker(store.path, encryption=None, store_id="f" * 32, format_version=[1, 3])
    result = run(store.path, "init", "--adopt", "--json")
    assert result.returncode == 0, result.stderr
    adopted = Store(store.path)
    assert adopted.store_id == original and adopted.encrypted, "protection was lowered"
    assert json.loads(result.stdout)["new_key"] is False
    newer = adopted.write_layer(
        replace(content(random_image(rng), layers[-1].id, None), spec=guest_spec())
    )
    with adopted.layer_path(newer.id, "pages.bin").open("rb") as handle:
        assert handle.read(8) == b"VMCKENC\0", "a new layer was written in the clear"


def test_adopt_without_the_key_of_an_encrypted_store_is_refused(
    tmp_path: Path, rng: np.random.Generator
) -> None:
    store = Store.create(tmp_path / "enc", encrypt=True)
    chain(store, rng, 1)
    rewrite_marker(store.path, encryption=None, store_id="f" * 32, format_version=[1, 3])
    nokeys = {"VMCKPT_KEYS_DIR": str(tmp_path / "no-keys")}
    result = run(store.path, "init", "--adopt", env=nokeys)
    one_line_error(result, "is encrypted and this user has no key", code=3)
    assert not (tmp_path / "no-keys").exists() or not any((tmp_path / "no-keys").iterdir())


def test_adopt_does_not_rekey_a_store_whose_key_still_authenticates_it(
    store: Store, rng: np.random.Generator
) -> None:
    layers = chain(store, rng, 2)
    original = store.store_id
    rewrite_marker(store.path, store_id="e" * 32)
    result = run(store.path, "init", "--adopt", "--json")
    assert result.returncode == 0 and json.loads(result.stdout)["new_key"] is False
    assert Store(store.path).store_id == original
    assert Store(store.path).manifest(layers[1].id).origin == "local"
    # Asked for explicitly, a new key: the layers are sealed anew as adopted, and it says so.
    rekeyed = run(store.path, "init", "--adopt", "--new-key", "--json")
    assert rekeyed.returncode == 0, rekeyed.stderr
    assert json.loads(rekeyed.stdout)["new_key"] is False  # the key exists: nothing to re-key
    rewrite_marker(store.path, store_id="d" * 32)
    forced = run(store.path, "init", "--adopt", "--new-key", "--json")
    assert forced.returncode == 0 and json.loads(forced.stdout)["new_key"] is True
    assert "re-keyed on request" in forced.stderr and "adopted" in forced.stderr
    assert Store(store.path).manifest(layers[1].id).origin == "adopted"


# --- rollback: a replaced version, a deleted layer, an earlier store ---------------------------


def test_a_replaced_version_put_back_is_refused(store: Store, rng: np.random.Generator) -> None:
    layers = chain(store, rng, 3)
    saved = store.path.parent / "saved"
    shutil.copytree(store.layer_path(layers[2].id), saved)
    maintenance.squash(store, None, layers[2].id)  # rewrites layer 3 as a base layer
    shutil.rmtree(store.layer_path(layers[2].id))
    shutil.copytree(saved, store.layer_path(layers[2].id))
    with pytest.raises(CorruptLayerError, match="not the version of the layer the store's catalog"):
        store.compose(layers[2].id)
    one_line_error(run(store.path, "verify"), "earlier version put back", code=4)


def test_a_deleted_layer_put_back_is_not_the_stores(store: Store, rng: np.random.Generator) -> None:
    layers = chain(store, rng, 3)
    saved = store.path.parent / "saved"
    shutil.copytree(store.layer_path(layers[0].id), saved)
    maintenance.delete(store, layers[0].id)
    shutil.copytree(saved, store.layer_path(layers[0].id))
    assert layers[0].id not in store.layer_ids() and store.uncatalogued() == [layers[0].id]
    one_line_error(run(store.path, "restore", "--layer", layers[0].id), "catalog does not name")
    swept = json.loads(run(store.path, "gc", "--json").stdout)
    assert f"layers/{layers[0].id}" in {g["path"] for g in swept["removed"]}
    assert not store.layer_path(layers[0].id).exists()


def test_a_store_put_back_to_an_earlier_state_is_refused(
    store: Store, rng: np.random.Generator
) -> None:
    layers = chain(store, rng, 2)
    earlier = store.path.parent / "earlier"
    shutil.copytree(store.path, earlier)
    maintenance.delete(store, layers[0].id)  # a layer the user wanted gone
    shutil.rmtree(store.path)
    shutil.copytree(earlier, store.path)
    one_line_error(run(store.path, "list"), "put back to an earlier state", code=3)
    one_line_error(run(store.path, "restore", "--layer", layers[0].id), "earlier state")
    accepted = run(store.path, "init", "--adopt", "--accept-rollback")
    assert accepted.returncode == 0, accepted.stderr
    assert run(store.path, "list").returncode == 0
    # A catalog removed is the same: refused, and made anew only when asked.
    (store.path / "catalog.json").unlink()
    one_line_error(run(store.path, "list"), "catalog.json is missing", code=3)
    assert run(store.path, "init", "--adopt", "--accept-rollback").returncode == 0
    assert Store(store.path).layer_ids() == [m.id for m in layers]


def test_a_catalog_edited_without_the_key_is_refused(
    store: Store, rng: np.random.Generator
) -> None:
    layers = chain(store, rng, 2)
    path = store.path / "catalog.json"
    data = json.loads(path.read_text())
    del data["layers"][layers[0].id]
    path.write_text(json.dumps(data))
    one_line_error(run(store.path, "list"), "does not authenticate", code=3)
    with pytest.raises(StoreError, match=r"catalog\.json"):
        Store(store.path).layer_ids()


# --- with a guest: runtime files live on this host, never in the store -------------------------


def test_a_running_guest_keeps_its_runtime_files_on_this_host(
    vmckpt: Vmckpt, tmp_path: Path
) -> None:
    vmckpt.run_guest("rt")
    vmckpt.wait_states("rt", 2)
    store = Store(vmckpt.store)
    runtime = store.host.runtime_path("rt")
    assert not runtime.is_relative_to(vmckpt.store)
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    assert {p.name for p in runtime.iterdir()} >= {"guest.json", "serial.log"}
    stray = [p for p in vmckpt.store.rglob("*") if p.name in ("guest.json", "serial.log")]
    assert stray == [], f"runtime files in the store: {stray}"
    # A record planted where vmckpt 1.4 kept it, editing the spec: the checkpoint seals the
    # spec this host recorded, and a restore passes QEMU nothing of the planted one.
    marker = tmp_path / "injected.pid"
    plant_runtime_records(vmckpt.store, "rt", os.getpid(), marker)
    layer = vmckpt.checkpoint("rt")["layer"]
    sealed = json.loads(
        vmckpt("inspect", str(layer), "--store", str(vmckpt.store), "--json").stdout
    )
    assert str(marker) not in json.dumps(sealed)
    vmckpt("stop", "rt", "--store", str(vmckpt.store))
    vmckpt.restore("--layer", str(layer), "--name", "rt")
    vmckpt.wait_states("rt", len(vmckpt.states("rt")) + 2)
    assert not marker.exists(), "an argument of the planted spec reached QEMU"


def test_disks_are_rebuilt_on_this_host_never_through_the_store(
    vmckpt: Vmckpt, tmp_path: Path, outside: Path
) -> None:
    """Links planted where vmckpt 1.4 rebuilt a restored guest's disks (the store's guests/
    directory): a restore, and a boot check, rebuild disks in fresh private directories of
    this host, and leave what the links point to as it was."""
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    run_disk_guest(vmckpt, "dk", image)
    wait_disk(vmckpt, "dk", 2)
    layer = checkpoint(vmckpt, "dk")
    vmckpt("stop", "dk", "--store", str(vmckpt.store))
    planted = vmckpt.store / "guests" / "dk"
    planted.mkdir(parents=True)
    for suffix in ("raw", "qcow2"):
        for tag in ("0000", "ffff", "1234"):
            (planted / f"disk-vda-{layer}-{tag}.{suffix}").symlink_to(outside / "precious")
    before = tree(outside)
    store = Store(vmckpt.store)
    boot = vmckpt("verify", "--boot", layer, "--store", str(vmckpt.store), "--seconds", "2")
    assert "alive" in boot.stdout, boot.stdout
    assert not any((store.host.data / "scratch").iterdir()), "a boot check left its scratch"
    vmckpt.restore("--layer", layer, "--name", "dk")
    wait_disk(vmckpt, "dk", len(disk_states(vmckpt.serial("dk"))) + 2)
    record = vmckpt.guest("dk").record
    disks = [Path(d.path) for d in record.spec.disks]
    assert disks and all(p.is_relative_to(store.host.data_path("dk")) for p in disks)
    # Their bases: written once on this host, in its data directory of the store.
    bases = [Path(d.backing) for d in record.spec.disks if not d.readonly]
    assert bases and all(p.parent == store.host.data / BASES_DIR for p in bases)
    assert tree(outside) == before
