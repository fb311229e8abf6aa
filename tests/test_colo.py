"""COLO checkpoint sessions on QEMU 11: on demand, periodic, restored, killed, and refused
where they are not safe (QEMU 10 under TCG)."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.framework.guest import (
    Taken,
    Vmckpt,
    assert_continues,
    assert_guest_untouched,
    one_line_error,
    open_store,
    take,
    wait_for,
)
from tests.test_disks import (
    DISK_SIZE,
    FULL_PASS,
    bitmaps,
    disk_states,
    run_disk_guest,
    wait_disk,
)
from vmckpt.errors import VmckptError
from vmckpt.images import Store
from vmckpt.machine.spec import DiskSpec, GuestSpec
from vmckpt.mechanisms.choice import COLO, PRECOPY, choose_mechanism, colo_refusal
from vmckpt.mechanisms.colo import session_pid
from vmckpt.session import JOURNAL

QEMU11 = os.environ.get("VMCKPT_QEMU11", "/var/cache/vmckpt/qemu-11/bin/qemu-system-x86_64")
RECOVERY_S = 60.0


@pytest.fixture
def qemu11() -> str:
    if not Path(QEMU11).is_file():
        pytest.fail(
            f"QEMU 11 is not at {QEMU11}: run `scripts/install-deps.sh test` (or set "
            "VMCKPT_QEMU11)",
            pytrace=False,
        )
    return QEMU11


@pytest.fixture
def colo(vmckpt: Vmckpt, qemu11: str) -> Iterator[Vmckpt]:
    """The CLI runner with QEMU 11 for every command (guests, restores)."""
    vmckpt.env["VMCKPT_QEMU"] = qemu11
    yield vmckpt
    store = open_store(vmckpt.store)
    if store is not None:
        for name in vmckpt.started:
            pid = session_pid(store, name)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)  # the session this test started, by its PID

                def ended(name: str = name) -> bool:
                    return session_pid(store, name) is None

                wait_for(ended, "the session's end", 60)


def _session(vmckpt: Vmckpt, name: str) -> int:
    rows = [g for g in vmckpt.listing()["guests"] if g["name"] == name]
    assert rows and rows[0]["session"], rows
    return int(str(rows[0]["session"]).split()[-1])


def test_colo_on_demand_and_periodic_checkpoints_restore_from_middle_and_last(
    colo: Vmckpt,
) -> None:
    colo.run_guest("c", memory="512M")
    colo.wait_states("c", 5)
    store = str(colo.store)
    guest = next(g for g in colo.listing()["guests"] if g["name"] == "c")
    assert guest["mechanism"] == COLO, guest
    taken: list[Taken] = []
    for _ in range(3):  # on demand
        taken.append(take(colo, "c"))
        colo.wait_states("c", len(colo.states("c")) + 3)
    # Periodic: a layer each 300 ms, streamed by the session.
    before = colo.last_seq("c")
    out = colo("watch", "c", "--store", store, "--interval", "0.3s", "--count", "4", "--json")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    after = colo.last_seq("c")
    assert len(rows) == 4
    for row in rows:
        taken.append(Taken(row["layer"], before, after, row["pages_stored"], row["bytes"],
                           row["pause_ms"], row["mechanism"]))  # fmt: skip
    assert {t.mechanism for t in taken} == {COLO}
    # One session: the first layer moved the whole RAM, every later one only what was written.
    assert taken[0].pages > 16384
    assert max(t.pages for t in taken[1:]) * 20 < taken[0].pages
    assert all(t.pause_ms is not None and t.pause_ms >= 0 for t in taken[1:])
    parents = {row["layer"]: row["parent"] for row in colo.listing()["layers"]}
    for previous, layer in itertools.pairwise(taken):
        assert parents[layer.layer] == previous.layer
    colo.wait_states("c", len(colo.states("c")) + 3)
    original = colo.states("c")
    colo("verify", "--store", store)
    colo("stop", "c", "--store", store)
    assert session_pid(Store(colo.store), "c") is None, "stop left the session running"

    for shot in (taken[2], taken[-1]):
        colo.restore("--layer", shot.layer, "--name", "c")
        restored = colo.wait_states("c", 12)
        assert_continues(restored, original, shot)
        assert "BAD" not in colo.serial("c")
        # The restored guest is checkpointed again (a new session, a delta against its head).
        again = colo.checkpoint("c")
        assert again["mechanism"] == COLO and again["parent"] == shot.layer
        assert int(str(again["pages_stored"])) < 16384
        colo("stop", "c", "--store", store)
    colo("verify", "--store", store)


@pytest.mark.parametrize(
    "where", ["between-checkpoints", "colo-open", "colo-mid-checkpoint", "colo-before-ack"]
)
def test_colo_session_killed_leaves_the_guest_running_as_found(colo: Vmckpt, where: str) -> None:
    """kill -9 of the session at each point: the guard ends COLO, puts the settings back,
    the guest runs on, and the next checkpoint (a new session) works."""
    colo.run_guest("k", memory="512M")
    colo.wait_states("k", 3)
    store = str(colo.store)
    journal = colo.runtime("k") / JOURNAL
    if where == "between-checkpoints":
        colo.checkpoint("k")
        colo.checkpoint("k")
        os.kill(_session(colo, "k"), signal.SIGKILL)
    else:
        # The session started by this command dies at that point (fault injection).
        fault = {"VMCKPT_FAULT": f"kill-at:{where}"}
        first = colo("checkpoint", "k", "--store", store, env=fault, check=False)
        if where == "colo-open":
            one_line_error(first, "guest k")
        else:
            assert first.returncode == 0, first.stderr  # the opening passes no such point
            one_line_error(colo("checkpoint", "k", "--store", store, check=False), "guest k")
    wait_for(lambda: not journal.exists(), "the guard's recovery", RECOVERY_S)
    assert session_pid(Store(colo.store), "k") is None
    assert_guest_untouched(colo, "k")
    # The next checkpoint works: a new session whose first layer is a delta against the head.
    nxt = colo.checkpoint("k")
    assert nxt["mechanism"] == COLO
    second = take(colo, "k")
    assert second.mechanism == COLO and second.pages < 16384
    colo("verify", "--store", store)


def test_a_failed_opening_lets_go_of_the_session_monitor(colo: Vmckpt) -> None:
    """An opening that fails (the guest was left in postmigrate by a checkpoint taken while
    it was paused) is said in one line, and so is the next request's: the failed opening
    let go of the session monitor, which QEMU serves to one client at a time (the session
    would otherwise wait out its 30 s connect timeout on it)."""
    colo.run_guest("pm")
    colo.wait_states("pm", 2)
    store = str(colo.store)
    colo("pause", "pm", "--store", store)
    colo("checkpoint", "pm", "--store", store, "--mechanism", PRECOPY)
    for _ in range(2):
        refused = colo("checkpoint", "pm", "--store", store, check=False)
        one_line_error(refused, "guest pm", "postmigrate")
    colo("stop", "pm", "--store", store)
    assert session_pid(Store(colo.store), "pm") is None, "stop left the session running"


def test_colo_is_refused_where_unsafe_and_the_guest_is_untouched(vmckpt: Vmckpt) -> None:
    """QEMU 10 under TCG deadlocks or aborts in COLO: refused by construction, in one line."""
    vmckpt.run_guest("u")
    vmckpt.wait_states("u", 3)
    store = str(vmckpt.store)
    for args in (["checkpoint", "u", "--mechanism", "colo"], ["watch", "u", "--colo"]):
        refused = vmckpt(*args, "--store", store, check=False)
        one_line_error(refused, "COLO is refused", "TCG", code=2)
    assert_guest_untouched(vmckpt, "u")
    guest = next(g for g in vmckpt.listing()["guests"] if g["name"] == "u")
    assert guest["mechanism"] == PRECOPY and "TCG" in str(guest["mechanism_reason"])
    check = json.loads(vmckpt("check", "--json").stdout)
    assert check["mechanisms"][COLO].startswith("no:")
    row = vmckpt.checkpoint("u")  # auto: precopy-diff
    assert row["mechanism"] == PRECOPY
    assert_guest_untouched(vmckpt, "u")


def test_mechanism_choice() -> None:
    spec = GuestSpec()
    assert choose_mechanism("11.1.3", "tcg", spec, local=True).mechanism == COLO
    assert choose_mechanism("10.0.13", "tcg", spec, local=True).mechanism == PRECOPY
    assert choose_mechanism("10.2.2", "tcg", spec, local=True).mechanism == PRECOPY
    assert choose_mechanism("10.0.7", "kvm", spec, local=True).mechanism == COLO
    remote = choose_mechanism("11.1.3", "tcg", spec, local=False)
    assert remote.mechanism == PRECOPY and "vmckpt run" in remote.reason
    disk = DiskSpec("disk0", "/tmp/d.img", "raw", 1 << 20)
    with_disk = GuestSpec(disks=(disk,))
    choice = choose_mechanism("11.1.3", "tcg", with_disk, local=True)
    assert choice.mechanism == COLO and "writable disk" in choice.reason
    # Where COLO is refused, the reason names what would make it possible.
    refused = choose_mechanism("10.0.2", "tcg", with_disk, local=True)
    assert refused.mechanism == PRECOPY and "QEMU 11 or later" in refused.reason
    assert "10.0.7" in str(colo_refusal("10.0.2", "kvm"))
    assert colo_refusal("7.2.22", "tcg") is not None


def _disk_guest(colo: Vmckpt, tmp_path: Path, name: str, image_format: str) -> None:
    image = tmp_path / f"{name}.{image_format}"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", image_format, str(image), str(DISK_SIZE)], check=True
    )
    run_disk_guest(colo, name, image)
    wait_disk(colo, name, 10)


def _disk_record(colo: Vmckpt, layer: str) -> dict[str, Any]:
    shown = json.loads(colo("inspect", "--store", str(colo.store), layer, "--json").stdout)
    (disk,) = shown["disks"]
    assert isinstance(disk, dict)
    return disk


@pytest.mark.parametrize("image_format", ["qcow2", "raw"])
def test_colo_writable_disk_restored_from_middle_and_last_layer(
    colo: Vmckpt, tmp_path: Path, image_format: str
) -> None:
    """A guest writing memory and its disk, checkpointed by its COLO session on demand and
    every 0.5 s: each layer holds the disk of its memory's instant (the disk workload checks
    its disk against its memory after a restore: DISKBAD otherwise)."""
    _disk_guest(colo, tmp_path, "cd", image_format)
    store = str(colo.store)
    guest = next(g for g in colo.listing()["guests"] if g["name"] == "cd")
    assert guest["mechanism"] == COLO and "writable disk" in str(guest["mechanism_reason"])
    layers = [str(colo.checkpoint("cd")["layer"]) for _ in range(2)]  # the opening, one more
    out = colo("watch", "cd", "--store", store, "--interval", "0.5s", "--count", "6", "--json")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert len(rows) == 6 and {r["mechanism"] for r in rows} == {COLO}
    layers += [str(r["layer"]) for r in rows]
    parents = {row["layer"]: row["parent"] for row in colo.listing()["layers"]}
    for previous, layer in itertools.pairwise(layers):
        assert parents[layer] == previous
    wait_disk(colo, "cd", len(disk_states(colo.serial("cd"))) + 15)
    original = disk_states(colo.serial("cd"))
    assert "DISKBAD" not in colo.serial("cd")
    # The opening took the disk in full; every later layer only what was written since.
    records = [_disk_record(colo, layer) for layer in layers]
    assert records[0]["full"] and records[0]["format"] == image_format
    assert not any(r["full"] for r in records[1:]), records
    assert all(r["bytes_stored"] * 10 < DISK_SIZE for r in records[1:]), records
    assert len({r["bitmap"] for r in records}) == len(records)
    # Once the session ends (pause does that), the guest holds one vmckpt bitmap, the
    # head's, and no backup job or target.
    colo("pause", "cd", "--store", store)
    assert session_pid(Store(colo.store), "cd") is None
    assert bitmaps(colo, "cd") == (records[-1]["bitmap"],)
    assert not any(Store(colo.store).host.scratch_dir("cd").glob("backup-*"))
    colo("resume", "cd", "--store", store)
    colo("verify", "--store", store)
    colo("stop", "cd", "--store", store)

    for layer in (layers[4], layers[-1]):  # from the middle and the last
        colo.restore("--layer", layer, "--name", "cd")
        restored = wait_disk(colo, "cd", FULL_PASS + 5)
        text = colo.serial("cd")
        assert "DISKBAD" not in text and "BAD" not in text, text[-1500:]
        overlap = [seq for seq in restored if seq in original]
        assert overlap, "the restored run does not overlap the original one"
        for seq in overlap:
            assert restored[seq] == original[seq], f"DISK seq {seq} differs from the original"
        assert any(seq % FULL_PASS == 0 for seq in restored)  # a full pass over every block
        # The restored guest is checkpointed by a new session: a delta against its head.
        again = colo.checkpoint("cd")
        assert again["mechanism"] == COLO and again["parent"] == layer
        assert not _disk_record(colo, str(again["layer"]))["full"]
        colo("stop", "cd", "--store", store)
    colo("verify", "--store", store)


@pytest.mark.parametrize("where", ["between-checkpoints", "colo-before-ack", "colo-disk-instant"])
def test_colo_session_killed_with_a_disk_cleans_up_and_loses_nothing(
    colo: Vmckpt, tmp_path: Path, where: str
) -> None:
    """kill -9 of a disk guest's session: the guard ends COLO, puts the settings back, removes
    the checkpoint's backup job, target and bitmap (the head layer's bitmap stays), the guest
    runs on, and the next checkpoint is a delta that restores consistently."""
    _disk_guest(colo, tmp_path, "kd", "qcow2")
    store = str(colo.store)
    journal = colo.runtime("kd") / JOURNAL
    if where == "between-checkpoints":
        colo.checkpoint("kd")
        colo.checkpoint("kd")
        os.kill(_session(colo, "kd"), signal.SIGKILL)
    else:
        # The session this command starts dies at that point of its first checkpoint after
        # the opening (fault injection; the opening passes neither point).
        fault = {"VMCKPT_FAULT": f"kill-at:{where}"}
        colo("checkpoint", "kd", "--store", store, env=fault)
        one_line_error(colo("checkpoint", "kd", "--store", store, check=False), "guest kd")
    head = str(next(g for g in colo.listing()["guests"] if g["name"] == "kd")["head"])
    kept = _disk_record(colo, head)["bitmap"]
    wait_for(lambda: not journal.exists(), "the guard's recovery", RECOVERY_S)

    def cleaned() -> bool:
        try:
            return bitmaps(colo, "kd") == (kept,)
        except (AssertionError, VmckptError):  # a job or target still there; monitor busy
            return False

    wait_for(cleaned, "the disks' clean-up", RECOVERY_S)
    assert not any((colo.store / "guests" / "kd" / "disk-scratch").glob("backup-*"))
    assert session_pid(Store(colo.store), "kd") is None
    assert_guest_untouched(colo, "kd")
    assert "DISKBAD" not in colo.serial("kd")
    # The next checkpoint (a new session) is a delta against the head, from the kept bitmap.
    nxt = colo.checkpoint("kd")
    assert nxt["mechanism"] == COLO and nxt["parent"] == head
    assert not _disk_record(colo, str(nxt["layer"]))["full"]
    wait_disk(colo, "kd", len(disk_states(colo.serial("kd"))) + 5)
    original = disk_states(colo.serial("kd"))
    colo("stop", "kd", "--store", store)
    colo.restore("--layer", str(nxt["layer"]), "--name", "kd")
    restored = wait_disk(colo, "kd", FULL_PASS + 3)
    assert "DISKBAD" not in colo.serial("kd")
    assert all(restored[s] == original[s] for s in restored if s in original)
    colo("verify", "--store", store)
