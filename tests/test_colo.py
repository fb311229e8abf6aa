"""COLO checkpoint sessions on QEMU 11: on demand, periodic, restored, killed, and refused
where they are not safe (QEMU 10 under TCG)."""

from __future__ import annotations

import itertools
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

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
from vmckpt.colo import session_pid
from vmckpt.images import Store
from vmckpt.mechanisms import COLO, PRECOPY, choose_mechanism, colo_refusal
from vmckpt.session import JOURNAL
from vmckpt.spec import DiskSpec, GuestSpec

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
    assert choose_mechanism("11.1.3", "tcg", spec, local=False).mechanism == PRECOPY
    disk = DiskSpec("disk0", "/tmp/d.img", "raw", 1 << 20)
    with_disk = GuestSpec(disks=(disk,))
    choice = choose_mechanism("11.1.3", "tcg", with_disk, local=True)
    assert choice.mechanism == PRECOPY and "writable disk" in choice.reason
    assert colo_refusal("7.2.22", "tcg") is not None


def test_colo_guest_with_a_writable_disk_keeps_precopy(colo: Vmckpt, tmp_path: Path) -> None:
    image = tmp_path / "d.raw"
    image.write_bytes(bytes(1 << 20))
    colo.run_guest("d", extra=("--disk", str(image)))
    colo.wait_states("d", 2)
    guest = next(g for g in colo.listing()["guests"] if g["name"] == "d")
    assert guest["mechanism"] == PRECOPY and "writable disk" in str(guest["mechanism_reason"])
    assert colo.checkpoint("d")["mechanism"] == PRECOPY
    refused = colo("checkpoint", "d", "--store", str(colo.store), "--mechanism", "colo",
                   check=False)  # fmt: skip
    one_line_error(refused, "writable disk", code=2)
