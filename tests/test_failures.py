"""Bad input and failed checkpoints: one clear line, non-zero exit, nothing lost.

Each case damages something on purpose and checks three things: the exit
code is not zero, stderr is one line naming what and where, and the store
(or the guest) is exactly as it was.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import short_tmp
from tests.framework.guest import (
    GUEST_BUILD,
    Vmckpt,
    assert_guest_untouched,
    guest_append,
    one_line_error,
    qemu_pids_of,
    snapshot,
)
from vmckpt.images import Store
from vmckpt.images.format import manifest_bytes, manifest_checksum
from vmckpt.qmp import Monitor

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def chain_original(guest_images: Path) -> Iterator[tuple[Path, list[str]]]:
    """A stopped guest with a chain of three layers, built once for the module."""
    path = short_tmp("vk-chain-")
    runner = Vmckpt(path / "store", media=guest_images)
    try:
        runner.run_guest("bad")
        runner.wait_states("bad", 3)
        layers = [str(runner.checkpoint("bad")["layer"]) for _ in range(3)]
        runner("stop", "bad", "--store", str(runner.store))
        yield runner.store, layers
    finally:
        runner.kill_all()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def chain(
    chain_original: tuple[Path, list[str]], store_dir: Path, guest_images: Path
) -> Iterator[tuple[Vmckpt, list[str]]]:
    """A copy of that store for one test to damage."""
    original, layers = chain_original
    shutil.copytree(original, store_dir, symlinks=True)
    runner = Vmckpt(store_dir, media=guest_images)
    try:
        yield runner, layers
    finally:
        runner.kill_all()


def _restore_fails(vmckpt: Vmckpt, layer: str, *needles: str) -> None:
    before = snapshot(vmckpt.store)
    result = vmckpt("restore", "--store", str(vmckpt.store), "--layer", layer, check=False)
    one_line_error(result, *needles)
    assert snapshot(vmckpt.store) == before, "a failed restore changed the store"
    assert qemu_pids_of(vmckpt.store) == [], "a failed restore left its QEMU running"


def test_flipped_byte_in_a_page_file(chain: tuple[Vmckpt, list[str]]) -> None:
    vmckpt, layers = chain
    pages = Store(vmckpt.store).layer_path(layers[0], "pages.bin")
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0x40
    pages.write_bytes(bytes(data))
    verify = vmckpt("verify", "--store", str(vmckpt.store), layers[2], check=False)
    one_line_error(verify, layers[0], "pages.bin", "sha256")
    _restore_fails(vmckpt, layers[2], layers[0], "pages.bin")


def test_truncated_layer(chain: tuple[Vmckpt, list[str]]) -> None:
    vmckpt, layers = chain
    pages = Store(vmckpt.store).layer_path(layers[1], "pages.bin")
    pages.write_bytes(pages.read_bytes()[:4096])
    one_line_error(
        vmckpt("verify", "--store", str(vmckpt.store), check=False), layers[1], "pages.bin"
    )
    _restore_fails(vmckpt, layers[2], layers[1], "pages.bin")


def test_missing_parent(chain: tuple[Vmckpt, list[str]]) -> None:
    vmckpt, layers = chain
    shutil.rmtree(Store(vmckpt.store).layer_path(layers[0]))
    one_line_error(
        vmckpt("verify", "--store", str(vmckpt.store), layers[1], check=False),
        layers[0],
        "missing",
    )
    _restore_fails(vmckpt, layers[1], layers[0], "missing")


def test_unknown_format_version(chain: tuple[Vmckpt, list[str]]) -> None:
    vmckpt, layers = chain
    path = Store(vmckpt.store).layer_path(layers[2], "manifest.json")
    manifest = json.loads(path.read_text())
    manifest["format_version"] = [2, 0]
    manifest.pop("manifest_sha256")
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    path.write_bytes(manifest_bytes(manifest))
    one_line_error(
        vmckpt("verify", "--store", str(vmckpt.store), layers[2], check=False),
        layers[2],
        "2.0",
    )
    _restore_fails(vmckpt, layers[2], layers[2], "2.0")


def test_store_that_does_not_exist(tmp_path: Path, vmckpt: Vmckpt) -> None:
    missing = tmp_path / "nowhere"
    for command in (["list"], ["verify"], ["restore"], ["checkpoint", "x"], ["stop", "x"]):
        result = vmckpt(*command, "--store", str(missing), check=False)
        one_line_error(result, str(missing), "does not exist")
    assert not missing.exists()
    # `run` does not create a store either (a typo must not create one), unless asked to.
    run = [
        "run", "typo", "--store", str(tmp_path / "no" / "such" / "st"),
        "--kernel", str(GUEST_BUILD / "vmlinuz"), "--accel", "tcg", "--detach",
    ]  # fmt: skip
    one_line_error(vmckpt(*run, check=False), "does not exist", "vmckpt init")
    one_line_error(vmckpt(*run, "--create", check=False), "parent directory", "does not exist")
    assert not (tmp_path / "no").exists()


def test_boot_medium_changed_since_the_checkpoint(vmckpt: Vmckpt, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd.img"
    shutil.copy(GUEST_BUILD / "initrd.img", initrd)
    vmckpt(
        "run", "media", "--store", str(vmckpt.store), "--create",
        "--kernel", str(GUEST_BUILD / "vmlinuz"), "--initrd", str(initrd),
        "--append", guest_append(pages=4, buf_mb=16), "--memory", "256M",
        "--accel", "tcg", "--detach",
    )  # fmt: skip
    vmckpt.wait_states("media", 2)
    layer = json.loads(
        vmckpt("checkpoint", "media", "--store", str(vmckpt.store), "--json").stdout
    )["layer"]
    vmckpt("stop", "media", "--store", str(vmckpt.store))
    with initrd.open("ab") as handle:
        handle.write(b"changed")
    _restore_fails(vmckpt, layer, "initrd", "changed since the checkpoint")


# -- a monitor that is not there, or not QEMU ----------------------------------------


def _serve_garbage(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_9.2 this is not QEMU\r\n")
            conn.recv(100)
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    return server


def test_qmp_socket_nobody_listens_on_or_not_qemu(vmckpt: Vmckpt, tmp_path: Path) -> None:
    dead = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(dead))
    sock.close()  # the file stays, nobody listens
    with pytest.raises(Exception, match="nobody listens") as info:
        Monitor.unix(dead, vm="ghost", timeout=3)
    assert "guest ghost" in str(info.value)

    server = _serve_garbage(tmp_path / "other.sock")
    try:
        with pytest.raises(Exception, match="not QEMU") as info:
            Monitor.unix(tmp_path / "other.sock", vm="ghost", timeout=3)
    finally:
        server.close()

    # The same through the CLI: a running guest whose monitor socket was replaced.
    vmckpt.run_guest("mon")
    vmckpt.wait_states("mon", 2)
    record = vmckpt.guest("mon").record
    assert record.process is not None
    qmp = record.process.qmp_socket
    real = qmp.with_name("real.sock")
    qmp.rename(real)
    try:
        dead_again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead_again.bind(str(qmp))
        dead_again.close()
        result = vmckpt("checkpoint", "mon", "--store", str(vmckpt.store), check=False)
        one_line_error(result, "guest mon", "nobody listens")
        qmp.unlink()
        server = _serve_garbage(qmp)
        try:
            result = vmckpt("checkpoint", "mon", "--store", str(vmckpt.store), check=False)
            one_line_error(result, "guest mon", "not QEMU")
        finally:
            server.close()
    finally:
        qmp.unlink(missing_ok=True)
        real.rename(qmp)
    assert snapshot(vmckpt.store) == {}


# -- checkpoints that fail midway leave the guest as it was --------------------------------


def test_receiver_dies_midway(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("dies")
    vmckpt.wait_states("dies", 3)
    for budget in (1 << 20, 40 << 20):
        result = vmckpt(
            "checkpoint", "dies", "--store", str(vmckpt.store), check=False,
            env={"VMCKPT_FAULT": f"receiver-dies-after:{budget}"},
        )  # fmt: skip
        one_line_error(result, "guest dies")
        assert_guest_untouched(vmckpt, "dies")
        assert snapshot(vmckpt.store) == {}
    # Nothing was lost: the next checkpoint works and restores.
    vmckpt("checkpoint", "dies", "--store", str(vmckpt.store))
    vmckpt("verify", "--store", str(vmckpt.store))


def test_store_disk_full(vmckpt: Vmckpt, tmp_path: Path, root: None) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(small)], check=True)
    try:
        store = small / "store"
        full = Vmckpt(store, media=vmckpt.media)
        try:
            full.run_guest("full")
            full.wait_states("full", 3)
            result = full("checkpoint", "full", "--store", str(store), check=False)
            line = one_line_error(result, "guest full")
            assert "No space left" in line or "space" in line
            assert_guest_untouched(full, "full")
            assert list(Store(store).layers_path.iterdir()) == [], "a partial layer was left"
        finally:
            full.kill_all()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
