"""Lazy restore (vmckpt/mechanisms/lazy_restore.py, vmckpt/mechanisms/pageserver/) with real
QEMU 10 and 11 under TCG: the guest runs at once and goes on with the original checksums while
the page server brings its pages in; a page server killed mid-push is replaced and the restore
completes; clones each get their own identity; where lazy cannot be, the full restore says why.

Timings are the benchmark's business (benchmarks/lazy.py): these tests check what can fail."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import short_tmp
from tests.framework.guest import (
    Taken,
    Vmckpt,
    assert_continues,
    guest_append,
    one_line_error,
    tail,
    wait_for,
)
from tests.framework.helper import running_helper
from tests.framework.mechanisms import QEMU11_DEFAULT, SYSTEM_QEMU, qemu11
from tests.test_images import as_1_1
from vmckpt.errors import RestoreError
from vmckpt.images import Store, keys
from vmckpt.machine.qemu import QemuProcess, process_start_time
from vmckpt.mechanisms.pageserver import records, status_of
from vmckpt.mechanisms.pageserver_fork import fork_server
from vmckpt.mechanisms.restore_prep import NOT_STEPPED

pytestmark = pytest.mark.qemu

PACE = {"VMCKPT_FAULT": "push-pace-ms:300"}  # 8 MiB per 300 ms: a push of seconds
RESTORE_S = 120.0
IDENTITY = re.compile(r"^IDENTITY gpe05=(\S+) forks=(\d+) driver=(\w+)$", re.M)
QEMUS = [
    pytest.param(SYSTEM_QEMU, id="qemu10"),
    pytest.param(qemu11(), id="qemu11", marks=pytest.mark.qemu11),
]


@dataclass
class Original:
    """A guest checkpointed twice, stopped: its store, layers and console, for the module."""

    store: Path
    qemu: str
    taken: list[Taken]
    states: list[Any]
    serial: str


@pytest.fixture(scope="module", params=QEMUS)
def original(request: pytest.FixtureRequest, guest_images: Path) -> Iterator[Original]:
    qemu = str(request.param)
    if shutil.which(qemu) is None:
        pytest.fail(f"no QEMU at {qemu} (make deps-test installs QEMU 11 at {QEMU11_DEFAULT})")
    path = short_tmp("vk-lazy-")
    runner = Vmckpt(path / "store", media=guest_images, env={"VMCKPT_QEMU": qemu})
    try:
        runner.run_guest(
            "lz", extra=("--append", guest_append(pages=4, buf_mb=64) + " vmckpt.identity=1")
        )
        runner.wait_states("lz", 5)
        wait_for(lambda: "IDENTITY" in runner.serial("lz"), "the identity report", 60)
        taken = []
        for _ in range(2):
            # precopy-diff on both QEMUs: no checkpoint session to end (test_colo restores
            # colo layers, lazily as every restore)
            before = runner.last_seq("lz")
            row = runner.checkpoint("lz", "--mechanism", "precopy-diff")
            after = runner.last_seq("lz")
            taken.append(Taken(str(row["layer"]), before, after, int(str(row["pages_stored"])),
                               int(str(row["bytes"])), float(str(row["pause_ms"]))))  # fmt: skip
            runner.wait_states("lz", len(runner.states("lz")) + 5)
        states = runner.states("lz")
        serial = runner.serial("lz")
        runner("stop", "lz", "--store", str(runner.store))
        yield Original(runner.store, qemu, taken, states, serial)
    finally:
        runner.kill_all()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lazy(original: Original, store_dir: Path, guest_images: Path) -> Iterator[Vmckpt]:
    """A copy of the original store for one test, with the original's QEMU. Each copy is the
    original put back on purpose: the catalog generations an earlier test's copy reached are
    forgotten (what `vmckpt init --adopt --accept-rollback` does), or the copy would be
    refused as a store rolled back."""
    shutil.copytree(original.store, store_dir, symlinks=True)
    with Store(store_dir) as store:
        assert store.store_id is not None
        keys.forget_generation(store.store_id)
    runner = Vmckpt(store_dir, media=guest_images, env={"VMCKPT_QEMU": original.qemu})
    try:
        yield runner
    finally:
        runner.kill_all()  # the page servers end with their QEMUs


def record(runner: Vmckpt, name: str) -> dict[str, Any] | None:
    return status_of(Store(runner.store), name)


def restore(runner: Vmckpt, *args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    out = runner.restore(*args, env=env)
    row = json.loads(out.stdout)
    assert isinstance(row, dict)
    return row


def wait_all_in(runner: Vmckpt, name: str) -> dict[str, Any]:
    """The page server finished: every page in, the migration completed, its record gone
    and what it did kept (restored.json)."""
    log = runner.runtime(name) / records.LOG
    wait_for(
        lambda: record(runner, name) is None, f"{name}'s pages all in", RESTORE_S,
        evidence=lambda: tail(log.read_text(errors="replace") if log.exists() else ""),
    )  # fmt: skip
    with runner.monitor(name) as mon:
        assert mon.query_migrate().status == "completed"
        capabilities = mon.migrate_capabilities()
    assert not capabilities["postcopy-ram"] and not capabilities["events"], capabilities
    done = json.loads((runner.runtime(name) / "restored.json").read_text())
    assert done["state"] == "done" and done["pages_in"] == done["pages_total"] > 0, done
    with Store(runner.store) as store:  # the layer is its head once its pages are all in
        assert store.head(name) == done["layer"], (store.head(name), done)
    return dict(done)


def test_lazy_restore_runs_at_once_and_continues_with_the_original_checksums(
    original: Original, lazy: Vmckpt
) -> None:
    for shot in original.taken:
        row = restore(lazy, "--layer", shot.layer, "--name", "lz")
        assert row["lazy"] is True and row["page_server"], row
        assert row["resume_ms"] is not None and row["resume_ms"] >= 0
        # The test guest has the agent's channel but no agent: restore says so, at once.
        no_agent = "no guest agent runs in the guest (install qemu-guest-agent in it)"
        assert NOT_STEPPED.format(why=no_agent) in row["notes"], row["notes"]
        restored = lazy.wait_states("lz", 12)
        assert_continues(restored, original.states, shot)
        wait_all_in(lazy, "lz")
        more = lazy.wait_states("lz", len(lazy.states("lz")) + 5)
        assert_continues(more, original.states, shot)
        assert "BAD" not in lazy.serial("lz")
        lazy("stop", "lz", "--store", str(lazy.store))


def test_a_lazy_restore_handed_to_the_helper_runs_and_continues_with_the_original_checksums(
    original: Original, lazy: Vmckpt
) -> None:
    shot = original.taken[-1]
    with running_helper() as helper:  # this session's runtime root: the runner's commands'
        row = restore(lazy, "--layer", shot.layer, "--name", "lz")
        helper.wait_said(": exit 0")
        assert len(helper.command_pids()) == 1, helper.lines
    assert row["lazy"] is True and row["page_server"], row
    assert_continues(lazy.wait_states("lz", 12), original.states, shot)
    wait_all_in(lazy, "lz")
    assert_continues(lazy.wait_states("lz", len(lazy.states("lz")) + 5), original.states, shot)
    assert "BAD" not in lazy.serial("lz")
    lazy("stop", "lz", "--store", str(lazy.store))


def test_a_guest_being_restored_is_listed_so_and_checkpointed_once_all_is_in(
    original: Original, lazy: Vmckpt
) -> None:
    shot = original.taken[1]
    restore(lazy, "--layer", shot.layer, "--name", "slow", env=PACE)

    def restoring() -> bool:
        rows = [g for g in lazy.listing()["guests"] if g["name"] == "slow"]
        return bool(rows) and bool(re.fullmatch(r"restoring \(\d+ %\)", str(rows[0]["state"])))

    wait_for(restoring, "vmckpt list showing the guest restoring (NN %)", 30)
    # A checkpoint meanwhile waits for the last pages, then is a delta against the layer.
    row = lazy.checkpoint("slow", "--mechanism", "precopy-diff")
    assert record(lazy, "slow") is None, "the checkpoint did not wait for the restore"
    assert row["parent"] == shot.layer
    assert_continues(lazy.wait_states("slow", 10), original.states, shot)
    lazy("verify", "--store", str(lazy.store))


def test_killing_the_page_server_mid_push_and_a_new_one_completes_the_restore(
    original: Original, lazy: Vmckpt
) -> None:
    shot = original.taken[1]
    row = restore(lazy, "--layer", shot.layer, "--name", "k", env=PACE)
    first = int(row["page_server"])
    # The server starts its guard once the guest runs; the command returns only after.
    returned = record(lazy, "k")
    assert returned is not None and returned["guard_pid"], returned
    assert process_start_time(int(returned["guard_pid"])) is not None, "no guard runs"

    def mid_push() -> bool:
        now = record(lazy, "k")
        return now is not None and 5 <= int(now["percent"]) <= 70

    wait_for(mid_push, "the push half way", 60, poll=0.02)
    before = record(lazy, "k")
    assert before is not None and before["pid"] == first and before["mode"] == "initial"
    os.kill(first, signal.SIGKILL)  # the page server this test's restore started
    # Its guard starts a new one, which resumes the paused migration (postcopy recovery).
    wait_for(
        lambda: (now := record(lazy, "k")) is None or now["pid"] != first,
        "a new page server",
        60,
    )
    wait_all_in(lazy, "k")
    log = (lazy.runtime("k") / "pageserver.log").read_text()
    assert "died: starting another" in log and "recovering the postcopy migration" in log, log
    # Over the connection the dead server had negotiated (out of band), held by its guard.
    assert "k: over the monitor connection its guard held" in log, log
    resumed = re.search(r"k: resumed: (\d+) of (\d+) stored pages were in", log)
    assert resumed and 0 < int(resumed[1]) < int(resumed[2]), log
    restored = lazy.wait_states("k", len(lazy.states("k")) + 10)
    assert_continues(restored, original.states, shot)
    assert "BAD" not in lazy.serial("k")


def test_a_new_page_server_that_finds_the_chain_damaged_ends_the_guest_and_says_why(
    original: Original, lazy: Vmckpt
) -> None:
    """The server dies mid-push and, meanwhile, the layer's digest file was damaged: the new
    server cannot serve the missing pages, so the paused guest is ended (not left waiting
    for them for ever) and its record says why."""
    shot = original.taken[1]
    row = restore(lazy, "--layer", shot.layer, "--name", "dmgrec", env=PACE)
    first = int(row["page_server"])
    qemu = lazy.guest("dmgrec").process()
    wait_for(
        lambda: (now := record(lazy, "dmgrec")) is not None and now["guard_pid"]
        and 5 <= int(now["percent"]) <= 70,
        "the push under way, guarded", 60, poll=0.02,
    )  # fmt: skip
    sums = lazy.store / "layers" / shot.layer / "pages.sum"
    kept = sums.read_bytes()
    sums.chmod(0o600)
    try:
        sums.write_bytes(kept[:-1] + bytes([kept[-1] ^ 0x01]))
        os.kill(first, signal.SIGKILL)  # the page server this test's restore started
        wait_for(lambda: not qemu.alive(), "the guest's end", 60)
        failed = record(lazy, "dmgrec")
        assert failed is not None and failed["state"] == "failed", failed
        error = str(failed["error"])
        assert "can no longer be served" in error, error
        assert "pages.sum" in error and shot.layer in error, error
        log = (lazy.runtime("dmgrec") / "pageserver.log").read_text()
        assert "died: starting another" in log and "cannot go on" in log, log
        with Store(lazy.store) as store:
            assert store.head("dmgrec") is None
    finally:
        sums.write_bytes(kept)
        sums.chmod(0o400)


def orphaned(lazy: Vmckpt, shot: Taken, name: str) -> QemuProcess:
    """A lazy restore of ``shot`` as ``name`` whose page server and guard were killed
    mid-push (first the guard, then its server: nothing recovers); its QEMU."""
    row = restore(lazy, "--layer", shot.layer, "--name", name, env=PACE)
    wait_for(lambda: (r := record(lazy, name)) is not None and r["guard_pid"], "a guard", 30)
    now = record(lazy, name)
    assert now is not None
    server, guard = int(row["page_server"]), int(now["guard_pid"])
    started = process_start_time(guard)
    qemu = lazy.guest(name).process()
    os.kill(guard, signal.SIGKILL)
    os.kill(server, signal.SIGKILL)
    wait_for(lambda: process_start_time(server) is None, "the server's end", 10)
    wait_for(lambda: process_start_time(guard) != started, "the guard's end", 10)
    return qemu


def assert_lost(lazy: Vmckpt, name: str, resumed: subprocess.CompletedProcess[str],
                qemu: QemuProcess) -> None:  # fmt: skip
    """``vmckpt resume`` said in one line that the guest cannot be recovered, ended its
    QEMU and recorded the failure."""
    one_line_error(resumed, f"guest {name}", "does not answer a new monitor connection",
                   "cannot be recovered, restore it again")  # fmt: skip
    wait_for(lambda: not qemu.alive(), "the unrecoverable QEMU's end", 30)
    failed = record(lazy, name)
    assert failed is not None and failed["state"] == "failed", failed
    assert "cannot be recovered" in str(failed["error"]), failed


def test_without_server_or_guard_a_checkpoint_is_refused_and_resume_starts_one(
    original: Original, lazy: Vmckpt
) -> None:
    shot = original.taken[0]
    qemu = orphaned(lazy, shot, "orphan")
    refused = lazy("checkpoint", "orphan", "--store", str(lazy.store), check=False, timeout=120)
    one_line_error(refused, "guest orphan", "still being restored", "vmckpt resume orphan")
    states = [g["state"] for g in lazy.listing()["guests"] if g["name"] == "orphan"]
    assert states and "no page server" in str(states[0]), states
    resumed = lazy("resume", "orphan", "--store", str(lazy.store), check=False, timeout=180)
    if resumed.returncode == 0:
        wait_all_in(lazy, "orphan")
        assert_continues(lazy.wait_states("orphan", 10), original.states, shot)
    else:
        # The other outcome QEMU allows: a vCPU waiting for a page holds QEMU's big lock,
        # so a new monitor connection is never negotiated (the one that could still reach
        # QEMU, out of band, ended with the guard).
        assert_lost(lazy, "orphan", resumed, qemu)


def test_a_guest_whose_qemu_cannot_answer_a_new_monitor_is_said_lost_and_ended(
    original: Original, lazy: Vmckpt
) -> None:
    shot = original.taken[0]
    qemu = orphaned(lazy, shot, "lost")
    # A QEMU that answers no new connection, as one whose main loop a vCPU waiting for a
    # page blocks: this test's own QEMU, stopped.
    os.kill(qemu.pid, signal.SIGSTOP)
    resumed = lazy("resume", "lost", "--store", str(lazy.store), check=False, timeout=180)
    assert_lost(lazy, "lost", resumed, qemu)
    with Store(lazy.store) as store:  # its pages never all came in: not its head
        assert store.head("lost") != shot.layer


def identity(runner: Vmckpt, name: str) -> tuple[str, int, str]:
    """The last IDENTITY line the guest printed in this life: gpe05, forks, driver."""
    found = IDENTITY.findall(runner.serial(name))
    assert found, runner.serial(name)[-500:]
    gpe, forks, driver = found[-1]
    return gpe, int(forks), driver


def test_clones_each_get_their_own_identity_and_reseed_unless_told_not_to(
    original: Original, lazy: Vmckpt
) -> None:
    shot = original.taken[1]
    assert identity_before(original) == ("0", 0, "yes")
    out = json.loads(lazy.restore("--layer", shot.layer, "--clones", "2").stdout)
    names = [row["name"] for row in out["clones"]]
    assert names == ["lz-1", "lz-2"]
    assert {row["page_server"] for row in out["clones"]} == {out["clones"][0]["page_server"]}
    lazy.started.update(names)
    restore(lazy, "--layer", shot.layer, "--name", "same", "--same-identity")
    layer_guid = Store(lazy.store).manifest(shot.layer).spec["generation_id"]
    guids = {}
    for name in (*names, "same"):
        wait_for(reported(lazy, name), f"{name}'s identity report", 60)
        with lazy.monitor(name) as mon:
            guids[name] = mon.execute("query-vm-generation-id")["guid"]
    for name in names:  # a new generation ID: QEMU raised GPE 05, the kernel reseeded
        wait_for(reseeded(lazy, name), f"{name}'s reseed", 60)
        assert identity(lazy, name) == ("1", 1, "yes")
        assert_continues(lazy.wait_states(name, 5), original.states, shot)
    wait_for(lambda: identity(lazy, "same")[0] == "1", "the GPE in the same-identity guest", 60)
    lazy.wait_states("same", len(lazy.states("same")) + 3)  # a report or more later
    assert identity(lazy, "same") == ("1", 0, "yes")  # the same ID: notified, no reseed
    assert len({guids["lz-1"], guids["lz-2"], layer_guid}) == 3
    assert guids["same"] == layer_guid
    for name in names:
        wait_all_in(lazy, name)
    # The new identity is the restored guest's own: its next layer records it.
    row = lazy.checkpoint("lz-1", "--mechanism", "precopy-diff")
    assert Store(lazy.store).manifest(str(row["layer"])).spec["generation_id"] == guids["lz-1"]


def test_clones_restored_in_full_each_get_their_own_identity_too(
    original: Original, lazy: Vmckpt
) -> None:
    """--clones --no-lazy: one full restore after the other, each clone a new machine."""
    shot = original.taken[0]
    out = json.loads(lazy.restore("--layer", shot.layer, "--clones", "2", "--name", "fc",
                                  "--no-lazy").stdout)  # fmt: skip
    names = [row["name"] for row in out["clones"]]
    assert names == ["fc-1", "fc-2"]
    assert all(row["lazy"] is False and not row["page_server"] for row in out["clones"]), out
    lazy.started.update(names)
    layer_guid = Store(lazy.store).manifest(shot.layer).spec["generation_id"]
    guids = set()
    for name in names:
        wait_for(reseeded(lazy, name), f"{name}'s reseed", 60)
        assert identity(lazy, name) == ("1", 1, "yes")
        assert_continues(lazy.wait_states(name, 5), original.states, shot)
        with lazy.monitor(name) as mon:
            guids.add(mon.execute("query-vm-generation-id")["guid"])
    assert len(guids) == 2 and layer_guid not in guids
    for name in names:
        lazy("stop", name, "--store", str(lazy.store))


def reported(runner: Vmckpt, name: str) -> Callable[[], bool]:
    return lambda: IDENTITY.search(runner.serial(name)) is not None


def reseeded(runner: Vmckpt, name: str) -> Callable[[], bool]:
    """Whether the guest reported a fork (a reseed); not yet, before its first report."""
    return lambda: reported(runner, name)() and identity(runner, name)[1] == 1


def identity_before(original: Original) -> tuple[str, int, str]:
    found = IDENTITY.findall(original.serial)
    gpe, forks, driver = found[-1]
    return gpe, int(forks), driver


def page_servers(store: Path, name: str) -> list[int]:
    """The page servers (by the name they give themselves) of restores of ``name`` into
    ``store``: their command line is the restore's, which forked them."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if comm == "vmckpt-pageserv" and str(store).encode() in argv and name.encode() in argv:
            found.append(int(entry.name))
    return found


def no_page_server_is_left(lazy: Vmckpt, name: str) -> None:
    """A restore that went in full after all leaves no page server behind (each lazy-capable
    restore forks one first thing)."""
    wait_for(lambda: not page_servers(lazy.store, name), f"the page server of {name} ending", 10)


def test_the_full_restore_says_why_where_lazy_cannot_be(original: Original, lazy: Vmckpt) -> None:
    shot = original.taken[1]
    no_uffd = {"VMCKPT_FAULT": "no-userfaultfd"}
    row = restore(lazy, "--layer", shot.layer, "--name", "full", env=no_uffd)
    assert row["lazy"] is False
    assert row["notes"][0].startswith("full restore: no userfaultfd on this host"), row
    assert_continues(lazy.wait_states("full", 8), original.states, shot)
    lazy("stop", "full", "--store", str(lazy.store))
    refused = lazy(
        "restore", "--store", str(lazy.store), "--layer", shot.layer, "--lazy", "--detach",
        check=False, env=no_uffd,
    )  # fmt: skip
    one_line_error(refused, "cannot restore lazily: no userfaultfd", code=10)
    no_page_server_is_left(lazy, shot.layer)  # of a restore that failed, or went in full
    # QEMU's own refusal to be a postcopy destination (its checks of the host and the RAM).
    refusing = {"VMCKPT_FAULT": "qemu-refuses-postcopy"}
    row = restore(lazy, "--layer", shot.layer, "--name", "qemu", env=refusing)
    assert row["lazy"] is False
    assert "cannot be a postcopy destination here" in row["notes"][0], row
    no_page_server_is_left(lazy, "qemu")  # ordered, then told to end
    assert_continues(lazy.wait_states("qemu", 8), original.states, shot)
    # A layer without page digests (format 1.1) is composed whole.
    as_1_1(Store(lazy.store), original.taken[0].layer)
    row = restore(lazy, "--layer", shot.layer, "--name", "old")
    assert row["lazy"] is False
    assert "has no page digests" in row["notes"][0], row
    no_page_server_is_left(lazy, "old")  # never ordered
    assert_continues(lazy.wait_states("old", 8), original.states, shot)
    # --no-lazy is the full restore, asked for.
    row = restore(lazy, "--layer", shot.layer, "--name", "asked", "--no-lazy")
    assert row["lazy"] is False and not any("full restore" in n for n in row["notes"])


def test_a_server_whose_layer_is_not_the_one_the_command_checked_serves_nothing(
    original: Original, lazy: Vmckpt, tmp_path: Path
) -> None:
    """The page server is forked before the command checks the layer and builds the chain's
    preamble itself from what it opens: unless both are the same, it refuses, in one line,
    before it writes a record or takes a lock."""
    store = Store(lazy.store)
    server = fork_server()
    try:
        server.order(store, original.taken[1].layer, ["nobody"], tmp_path / "pageserver.log",
                     b"the preamble of another layer")  # fmt: skip
        with pytest.raises(RestoreError) as caught:
            server.wait_ready()
    finally:
        server.abort()
    line = caught.value.one_line()
    assert "the layer changed while the restore started" in line, line
    assert f"layer {original.taken[1].layer}" in line, line
    assert status_of(store, "nobody") is None
    assert not (store.host.runtime_path("nobody") / "pageserver.json").exists()


def test_a_damaged_page_found_while_serving_ends_the_restored_guest(
    original: Original, lazy: Vmckpt
) -> None:
    shot = original.taken[0]
    pages = lazy.store / "layers" / shot.layer / "pages.bin"
    data = bytearray(pages.read_bytes())
    data[len(data) * 3 // 4] ^= 0x10
    pages.write_bytes(bytes(data))
    restore(lazy, "--layer", shot.layer, "--name", "dmg")  # it runs at once...
    # ...and the server, pushing, finds the page: it ends the guest and says why.
    process = lazy.guest("dmg").record.process
    assert process is not None
    wait_for(lambda: not process.alive(), "the guest's end", RESTORE_S)
    now = record(lazy, "dmg")
    assert now is not None and now["state"] == "failed", now
    assert shot.layer in str(now["error"]) and "does not match its digest" in str(now["error"])
    with Store(lazy.store) as store:  # a damaged layer never became its head
        assert store.head("dmg") is None
    assert [g["state"] for g in lazy.listing()["guests"] if g["name"] == "dmg"] == ["stopped"]


def test_a_damaged_digest_file_fails_the_restore_before_the_guest_runs(
    original: Original, lazy: Vmckpt
) -> None:
    """The page server opens the chain's index and digests while the QEMU starts: a digest
    file that does not match its manifest fails the restore as the full restore would (one
    line, exit 4), with no QEMU left running and no guest listed; the store is untouched."""
    shot = original.taken[1]
    sums = lazy.store / "layers" / shot.layer / "pages.sum"
    sums.chmod(0o600)
    data = bytearray(sums.read_bytes())
    data[len(data) // 2] ^= 0x01
    sums.write_bytes(bytes(data))
    sums.chmod(0o400)
    before = {p: p.read_bytes() for p in sorted((lazy.store / "layers").rglob("*")) if p.is_file()}
    result = lazy("restore", "--store", str(lazy.store), "--layer", shot.layer, "--name", "bad",
                  "--detach", "--json", check=False)  # fmt: skip
    lazy.started.add("bad")
    one_line_error(result, "pages.sum: sha256 mismatch", shot.layer, code=4)
    runtime = str(lazy.runtime("bad"))
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            assert runtime.encode() not in cmdline.read_bytes(), f"{cmdline.parent} still runs"
    assert "bad" not in [g["name"] for g in lazy.listing()["guests"]]
    after = {p: p.read_bytes() for p in sorted((lazy.store / "layers").rglob("*")) if p.is_file()}
    assert after == before


@pytest.mark.parametrize("memory", ["1G", "4G"])
@pytest.mark.parametrize("qemu", QEMUS)
def test_lazy_restores_of_1_and_4_gib_guests_continue_with_their_checksums(
    qemu: str, memory: str, guest_images: Path
) -> None:
    """The sizes the issue names (their timings: benchmarks/lazy.py): a guest with 256 MiB of
    its workload's data in use, restored lazily, runs on where it was checkpointed."""
    qemu = str(qemu)
    if shutil.which(qemu) is None:
        pytest.fail(f"no QEMU at {qemu} (make deps-test installs QEMU 11 at {QEMU11_DEFAULT})")
    path = short_tmp("vk-lazy-size-")
    runner = Vmckpt(path / "store", media=guest_images, env={"VMCKPT_QEMU": qemu})
    try:
        runner.run_guest("big", memory=memory, buf_mb=256)
        runner.wait_states("big", 4)
        before = runner.last_seq("big")
        row = runner.checkpoint("big", "--mechanism", "precopy-diff")
        shot = Taken(str(row["layer"]), before, runner.last_seq("big"),
                     int(str(row["pages_stored"])), int(str(row["bytes"])),
                     float(str(row["pause_ms"])))  # fmt: skip
        assert shot.pages * 4096 >= 256 << 20, row  # the workload's data is in the layer
        original = runner.wait_states("big", len(runner.states("big")) + 4)
        runner("stop", "big", "--store", str(runner.store))
        restored_row = restore(runner, "--layer", shot.layer, "--name", "big")
        assert restored_row["lazy"] is True, restored_row
        assert_continues(runner.wait_states("big", 6), original, shot)
        done = wait_all_in(runner, "big")
        assert done["pages_in"] * 4096 >= 256 << 20, done
        assert "BAD" not in runner.serial("big")
    finally:
        runner.kill_all()
        shutil.rmtree(path, ignore_errors=True)
