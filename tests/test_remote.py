"""Another machine: restore there, live-migrate there and back, a cut cable, host keys.

"Another machine" is a network namespace with its own sshd (tests/netns.py).
It shares this filesystem, so the tests can read its serial logs; it has its
own store directory, gets layers only over SFTP, and is driven over SSH.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework.guest import (
    REPO,
    State,
    Taken,
    Vmckpt,
    assert_continues,
    one_line_error,
    parse_states,
    tail,
    take,
    wait_for,
)
from tests.framework.netns import OtherHost, other_host
from vmckpt.hostdirs import HostDirs
from vmckpt.images import Store
from vmckpt.machine.qemu import SERIAL_LOG, process_start_time
from vmckpt.qmp import MigrationInfo, Monitor
from vmckpt.remote.ssh import HostAddress, SshHost, SshOptions

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def guest_copy(guest_images: Path) -> Iterator[Path]:
    """The test guest's kernel and initrd, copied once so that a rebuild cannot change them.

    $VMCKPT_TEST_GUEST names a folder with a vmlinuz and initrd.img to use instead.
    """
    source = Path(os.environ.get("VMCKPT_TEST_GUEST", guest_images))
    path = Path(tempfile.mkdtemp(prefix="vk-g-", dir="/tmp"))
    try:
        for name in ("vmlinuz", "initrd.img"):
            assert (source / name).is_file(), f"{source}/{name} was not built"
            shutil.copy(source / name, path / name)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vmckpt(store_dir: Path, guest_copy: Path) -> Iterator[Vmckpt]:
    runner = Vmckpt(store_dir, media=guest_copy)
    try:
        yield runner
    finally:
        runner.kill_all()


@pytest.fixture(scope="module")
def other(root: None) -> Iterator[OtherHost]:
    with other_host() as host:
        yield host


@pytest.fixture
def remote_store(other: OtherHost) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vk-r-", dir="/tmp"))
    try:
        yield path / "store"
    finally:
        Vmckpt(path / "store").kill_all()
        shutil.rmtree(path, ignore_errors=True)


def ssh_args(other: OtherHost, remote_store: Path, known_hosts: Path | None = None) -> list[str]:
    return [
        "--identity", str(other.key),
        "--known-hosts", str(known_hosts or other.known_hosts),
        "--remote-store", str(remote_store),
        # The other host sees this checkout (a shared filesystem): run vmckpt from it.
        "--remote-python", f"env PYTHONPATH={REPO} {sys.executable}",
    ]  # fmt: skip


def remote_log(other: OtherHost, remote_store: Path, name: str) -> Path:
    """A guest's console log on the other host (its runtime directory of the store there)."""
    dirs = HostDirs.for_store(
        Store(remote_store).store_id, remote_store, runtime=other.scratch / "run"
    )
    return dirs.runtime_path(name) / SERIAL_LOG


def remote_states(other: OtherHost, remote_store: Path, name: str) -> list[State]:
    log = remote_log(other, remote_store, name)
    return list(parse_states(log.read_text(errors="replace"))) if log.exists() else []


def wait_remote_states(
    other: OtherHost, remote_store: Path, name: str, count: int, timeout: float = 120
) -> list[State]:
    def console() -> str:
        log = remote_log(other, remote_store, name)
        return tail(log.read_text(errors="replace")) if log.exists() else "(no log)"

    return wait_for(
        lambda: (
            states if len(states := remote_states(other, remote_store, name)) >= count else None
        ),
        f"remote guest {name} printing {count} STATE lines",
        timeout,
        evidence=lambda: f"its console there:\n{console()}",
    )


def in_flight(info: MigrationInfo) -> MigrationInfo | None:
    """A migration that has sent at least 1 MiB and is still under way."""
    return info if info.status == "active" and (info.transferred or 0) >= 1 << 20 else None


def guest_row(vmckpt: Vmckpt, name: str) -> dict[str, object]:
    listing = json.loads(vmckpt("list", "--store", str(vmckpt.store), "--json").stdout)
    rows = [g for g in listing["guests"] if g["name"] == name]
    assert rows, f"guest {name} is not listed: {listing['guests']}"
    return dict(rows[0])


def test_restore_on_other_host_from_middle_layer_and_continue(
    vmckpt: Vmckpt, other: OtherHost, remote_store: Path
) -> None:
    store = str(vmckpt.store)
    vmckpt.run_guest("rr")
    vmckpt.wait_states("rr", 5)
    taken: list[Taken] = []
    for _ in range(3):
        taken.append(take(vmckpt, "rr"))
        vmckpt.wait_states("rr", len(vmckpt.states("rr")) + 4)
    original = vmckpt.states("rr")
    vmckpt("stop", "rr", "--store", store)
    middle = taken[1]

    # An unknown host key is refused, and nothing is done there.
    refused = vmckpt(
        "restore", "--store", store, "--layer", middle.layer, "--name", "rr",
        "--host", other.target, "--detach",
        *ssh_args(other, remote_store, other.empty_known_hosts), check=False,
    )  # fmt: skip
    one_line_error(refused, other.address, "host key", "--accept-new-host-key", code=12)
    assert not remote_store.exists()
    # A key that differs from the recorded one is refused too.
    wrong = other.scratch / "known_hosts.wrong"
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other.scratch / "other")],
        check=True,
    )
    other_key = (other.scratch / "other.pub").read_text().split()
    wrong.write_text(f"{other.address} {other_key[0]} {other_key[1]}\n")
    changed = vmckpt(
        "restore", "--store", store, "--layer", middle.layer, "--name", "rr",
        "--host", other.target, "--detach", *ssh_args(other, remote_store, wrong), check=False,
    )  # fmt: skip
    one_line_error(changed, "host key changed", code=12)
    assert not remote_store.exists()

    # Restore the middle layer there: it gets the base and the middle layer, no more.
    out = vmckpt.restore(
        "--layer", middle.layer, "--name", "rr", "--host", other.target,
        *ssh_args(other, remote_store),
    )  # fmt: skip
    result = json.loads(out.stdout)
    assert result["layers_copied"] == [taken[0].layer, middle.layer]
    assert result["layers_reused"] == []
    assert result["bytes"] > 0
    assert sorted(p.name for p in Store(remote_store).layers_path.iterdir()) == sorted(
        result["layers_copied"]
    )
    restored = wait_remote_states(other, remote_store, "rr", 10)
    assert_continues(restored, original, middle)
    assert other.qemu_pids(), "no QEMU runs on the other host"
    assert "BAD" not in remote_log(other, remote_store, "rr").read_text(errors="replace")

    # The remote guest is first-class here: list, console, checkpoint.
    row = guest_row(vmckpt, "rr")
    assert row["state"] == "running" and row["host"] == other.target.removesuffix(":22")
    console = vmckpt("console", "rr", "--store", store)
    assert "STATE seq=" in console.stdout
    remote_ckpt = json.loads(vmckpt("checkpoint", "rr", "--store", store, "--json").stdout)
    assert remote_ckpt["parent"] == middle.layer
    assert Store(remote_store).layer_path(remote_ckpt["layer"], "manifest.json").is_file()

    vmckpt("stop", "rr", "--store", store)
    assert not other.qemu_pids(), "stop left a QEMU on the other host"

    # A second restore there, from the last layer, copies only the layer it lacks.
    out = vmckpt.restore(
        "--layer", taken[2].layer, "--name", "rr2", "--host", other.target,
        *ssh_args(other, remote_store),
    )  # fmt: skip
    again = json.loads(out.stdout)
    assert again["layers_copied"] == [taken[2].layer]
    assert again["layers_reused"] == [taken[0].layer, middle.layer]
    assert_continues(wait_remote_states(other, remote_store, "rr2", 8), original, taken[2])
    vmckpt("stop", "rr2", "--store", store)


def test_damaged_copy_is_never_committed(vmckpt: Vmckpt, remote_store: Path) -> None:
    """The check on receipt: one flipped byte and the layer does not appear there."""
    vmckpt.run_guest("dc")
    vmckpt.wait_states("dc", 3)
    layer = take(vmckpt, "dc").layer
    vmckpt("stop", "dc", "--store", str(vmckpt.store))
    agent = [sys.executable, "-m", "vmckpt.agent"]
    subprocess.run([*agent, "prepare", "--store", str(remote_store)], check=True, cwd=REPO)
    source = Store(vmckpt.store).layer_path(layer)
    manifest_sha = hashlib.sha256((source / "manifest.json").read_bytes()).hexdigest()

    def send(flip: bool) -> subprocess.CompletedProcess[bytes]:
        # The sender's seal stays with it (its key is not the receiver's).
        names = sorted(
            p.name for p in source.iterdir() if p.name not in ("manifest.json", "manifest.mac")
        )
        names.append("manifest.json")
        files = {name: bytearray((source / name).read_bytes()) for name in names}
        if flip:
            files["pages.bin"][len(files["pages.bin"]) // 2] ^= 0xFF
        header = {
            "layer": layer,
            "manifest_sha256": manifest_sha,
            "files": [[name, len(data)] for name, data in files.items()],
        }
        stream = json.dumps(header).encode() + b"\n" + b"".join(files.values())
        stream += json.dumps({"end": True}).encode() + b"\n"
        return subprocess.run(
            [*agent, "receive-layers", "--store", str(remote_store), "--sender", "there"],
            input=stream, capture_output=True, cwd=REPO,
        )  # fmt: skip

    damaged = send(flip=True)
    assert damaged.returncode != 0
    assert b"pages.bin does not match its manifest" in damaged.stdout
    there = Store(remote_store)
    assert not there.layer_path(layer).exists()
    assert not [p for p in there.layers_path.iterdir() if p.name.startswith(".")]
    # The same copy, undamaged, is committed.
    assert send(flip=False).returncode == 0
    assert there.layer_path(layer, "manifest.json").is_file()
    # Sealed by the receiver, as from the sending host.
    assert Store(remote_store).manifest(layer).origin == "host:there"


def test_migrate_there_and_back(vmckpt: Vmckpt, other: OtherHost, remote_store: Path) -> None:
    store = str(vmckpt.store)
    vmckpt.run_guest("mg")
    vmckpt.wait_states("mg", 5)
    local_pid = guest_row(vmckpt, "mg")["pid"]
    out = vmckpt(
        "migrate", "mg", "--store", store, "--to", other.target, "--json",
        *ssh_args(other, remote_store),
    )  # fmt: skip
    there = json.loads(out.stdout)
    last_here = vmckpt.last_seq("mg")
    assert there["downtime_ms"] is not None and there["downtime_ms"] > 0
    assert there["total_s"] > 0 and there["bytes_sent"] > 0
    # The source QEMU ended only after the destination ran the guest.
    assert isinstance(local_pid, int) and process_start_time(local_pid) is None  # gone or zombie
    states = wait_remote_states(other, remote_store, "mg", 8)
    seqs = [s.seq for s in states]
    assert seqs[0] <= last_here + 1, (seqs[0], last_here)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    row = guest_row(vmckpt, "mg")
    assert row["state"] == "running" and row["host"] != "local"
    assert len(other.qemu_pids()) == 1

    # And back.
    vmckpt(
        "migrate", "mg", "--store", store, "--to", "local", "--json",
        *ssh_args(other, remote_store),
    )  # fmt: skip
    last_there = [s.seq for s in remote_states(other, remote_store, "mg")][-1]
    assert not other.qemu_pids(), "the QEMU there did not end after migrating back"
    back = vmckpt.wait_states("mg", len(vmckpt.states("mg")) + 5)
    new = [s.seq for s in back if s.seq > last_here]
    assert new and new[0] <= last_there + 1 and new[-1] > last_there, (new, last_there)
    row = guest_row(vmckpt, "mg")
    assert row["state"] == "running" and row["host"] == "local"
    assert "BAD" not in vmckpt.serial("mg")
    vmckpt("stop", "mg", "--store", store)


def test_cut_connection_mid_migration_leaves_source_running(
    vmckpt: Vmckpt, other: OtherHost, remote_store: Path
) -> None:
    store = str(vmckpt.store)
    vmckpt.run_guest("cut")
    vmckpt.wait_states("cut", 5)
    migrate = subprocess.Popen(
        [
            sys.executable, "-m", "vmckpt", "migrate", "cut", "--store", store,
            "--to", other.target, "--bandwidth", "4M", "--heartbeat", "5",
            *ssh_args(other, remote_store),
        ],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip

    def ended_early() -> str:
        return f"vmckpt migrate ended early: {migrate.communicate()}"

    def destination_pids() -> list[int]:
        assert migrate.poll() is None, ended_early()
        return other.qemu_pids()

    def memory_in_flight(mon: Monitor) -> MigrationInfo | None:
        assert migrate.poll() is None, ended_early()
        return in_flight(mon.query_migrate())

    try:
        wait_for(destination_pids, "a QEMU starting on the other host", 60)
        # The guest's memory is on its way (4 MiB/s: ~25 s for this guest): QEMU says so on
        # the guest's second monitor (the first is the migration's).
        with vmckpt.guest("cut").process().session_monitor(timeout=30) as mon:
            wait_for(
                lambda: memory_in_flight(mon),
                "QEMU sending the guest's memory to the other host (1 MiB sent)",
                60,
                evidence=lambda: str(mon.query_migrate()),
            )
        other.link(up=False)
        out, err = migrate.communicate(timeout=120)
    finally:
        if migrate.poll() is None:
            migrate.kill()  # our own child, by its handle
            migrate.wait()
        other.link(up=True)
    assert migrate.returncode == 12, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "runs on at local" in lines[0], err
    # The guest runs on here, and goes on counting.
    row = guest_row(vmckpt, "cut")
    assert row["state"] == "running" and row["host"] == "local", row
    before = vmckpt.last_seq("cut")
    vmckpt.wait_states("cut", len(vmckpt.states("cut")) + 3)
    assert vmckpt.last_seq("cut") > before
    assert "BAD" not in vmckpt.serial("cut")
    # Nothing is left on the other host.
    wait_for(
        lambda: not other.qemu_pids(),
        "the QEMU on the other host ending",
        30,
        evidence=lambda: f"QEMU PIDs in the namespace: {other.qemu_pids()}",
    )
    vmckpt("stop", "cut", "--store", store)


def test_new_host_key_is_added_only_when_accepted(other: OtherHost) -> None:
    known = other.scratch / "known_hosts.accept"
    known.write_text("")
    address = HostAddress.parse(other.target)
    with SshHost(address, SshOptions(str(other.key), str(known), True)).connect() as host:
        code, out, _ = host.run(["echo", "hello"], timeout=30)
    assert (code, out.strip()) == (0, "hello")
    assert other.address in known.read_text()
    # Now known: a connection without the flag succeeds.
    with SshHost(address, SshOptions(str(other.key), str(known))).connect() as host:
        assert host.run(["true"], timeout=30)[0] == 0


def test_migrate_by_layers_sends_less_when_the_destination_has_earlier_layers(
    vmckpt: Vmckpt, other: OtherHost, remote_store: Path
) -> None:
    store = str(vmckpt.store)
    vmckpt.run_guest("ly")
    vmckpt.wait_states("ly", 5)
    args = ["migrate", "ly", "--store", store, "--json", *ssh_args(other, remote_store)]
    cold = json.loads(vmckpt(*args, "--to", other.target, "--mechanism", "layers").stdout)
    assert cold["mechanism"] == "layers" and cold["layers_reused"] == []
    states = wait_remote_states(other, remote_store, "ly", 5)
    seqs = [s.seq for s in states]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    vmckpt(*args, "--to", "local")
    vmckpt.wait_states("ly", len(vmckpt.states("ly")) + 3)
    # The destination keeps the layers it got: the second time only deltas travel.
    warm = json.loads(vmckpt(*args, "--to", other.target, "--mechanism", "layers").stdout)
    assert set(cold["layers_copied"]) <= set(warm["layers_reused"])
    assert warm["bytes_sent"] * 20 < cold["bytes_sent"], (warm["bytes_sent"], cold["bytes_sent"])
    states = wait_remote_states(
        other, remote_store, "ly", len(remote_states(other, remote_store, "ly")) + 3
    )
    assert "BAD" not in remote_log(other, remote_store, "ly").read_text(errors="replace")
    assert len(other.qemu_pids()) == 1
    vmckpt("stop", "ly", "--store", store)
    assert not other.qemu_pids()


def test_destination_qemu_that_fails_to_start_leaves_source_running(
    vmckpt: Vmckpt, other: OtherHost, remote_store: Path
) -> None:
    store = str(vmckpt.store)
    vmckpt.run_guest("df")
    vmckpt.wait_states("df", 3)
    args = ssh_args(other, remote_store)
    python = args.index("--remote-python") + 1
    args[python] = f"env VMCKPT_QEMU=/bin/false {args[python].removeprefix('env ')}"
    failed = vmckpt("migrate", "df", "--store", store, "--to", other.target, *args, check=False)
    line = one_line_error(failed, "QEMU", "runs on at the source", code=12)
    assert "guest df" in line
    row = guest_row(vmckpt, "df")
    assert row["state"] == "running" and row["host"] == "local", row
    before = vmckpt.last_seq("df")
    vmckpt.wait_states("df", len(vmckpt.states("df")) + 2)
    assert vmckpt.last_seq("df") > before
    assert not other.qemu_pids()
    vmckpt("stop", "df", "--store", store)
