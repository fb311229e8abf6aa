"""Crashes and races: vmckpt killed at each step of a checkpoint, commands at the same time.

Whatever point vmckpt dies at, the guest ends up running with its migration
settings as they were, the store verifies, the chain does not fork, and the
next checkpoint works (docs/SECURITY.md, "No guest left stopped").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.framework.guest import (
    REPO,
    Vmckpt,
    assert_continues,
    assert_guest_untouched,
    one_line_error,
    take,
    wait_for,
)
from vmckpt import faults
from vmckpt.fsutil import read_json, write_json_atomic
from vmckpt.images import Store
from vmckpt.session import JOURNAL

RECOVERY_S = 60.0


@pytest.mark.parametrize("point", faults.POINTS)
def test_checkpoint_killed_at_each_point_loses_nothing(vmckpt: Vmckpt, point: str) -> None:
    vmckpt.run_guest("kp")
    vmckpt.wait_states("kp", 3)
    store = str(vmckpt.store)
    first = take(vmckpt, "kp")
    killed = vmckpt(
        "checkpoint", "kp", "--store", store, env={"VMCKPT_FAULT": f"kill-at:{point}"},
        check=False,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    journal = vmckpt.runtime("kp") / JOURNAL
    wait_for(lambda: not journal.exists(), "the guard's recovery", RECOVERY_S)
    assert_guest_untouched(vmckpt, "kp")
    listing = vmckpt.listing()
    layers = {row["layer"]: row for row in listing["layers"]}
    # The catalog's write is the commit point: before it the layer is not the store's.
    assert list(layers) == [first.layer], layers
    if point == faults.BEFORE_HEAD:  # renamed into place, never committed: gc removes it
        assert len(listing["uncatalogued"]) == 1, listing
        swept = json.loads(vmckpt("gc", "--json", "--store", store).stdout)
        assert [g["path"] for g in swept["removed"]] == [f"layers/{listing['uncatalogued'][0]}"]
    after = take(vmckpt, "kp")  # works, and continues the chain: no fork
    parents = {row["layer"]: row["parent"] for row in vmckpt.listing()["layers"]}
    chain = [after.layer]
    while parents.get(chain[-1]):
        chain.append(str(parents[chain[-1]]))
    assert len(chain) == len(parents), f"the chain forked: {parents}"
    leftovers = [
        p.name for p in Store(vmckpt.store).layers_path.iterdir() if p.name.startswith(".")
    ]
    assert leftovers == [], f"a dead writer's temporary layer was left: {leftovers}"
    vmckpt("verify", "--store", store)
    original = vmckpt.wait_states("kp", len(vmckpt.states("kp")) + 5)
    vmckpt("stop", "kp", "--store", store)
    vmckpt.restore("--layer", after.layer, "--name", "kp")
    assert_continues(vmckpt.wait_states("kp", 8), original, after)


def test_two_checkpoints_of_one_guest_are_serialised(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("two", memory="512M")
    vmckpt.wait_states("two", 3)
    store = str(vmckpt.store)
    vmckpt.checkpoint("two")
    command = [sys.executable, "-m", "vmckpt", "checkpoint", "two", "--store", store, "--json"]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=REPO)
        for _ in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    a, b = (json.loads(out) for out, _ in outs)
    # One after the other: one's parent is the other's layer (no fork from a shared parent).
    assert a["parent"] != b["parent"], (a, b)
    assert b["parent"] == a["layer"] or a["parent"] == b["layer"], (a, b)
    # Not waiting: while another checkpoint holds the guest (here this test holds the guest's
    # checkpoint lock, as a checkpoint does for its whole run: a real one may end before a
    # second vmckpt has even started), a checkpoint told not to wait says a checkpoint is
    # under way, in one line.
    with Store(vmckpt.store) as opened, opened.host.guest_lock("two", what="test", wait_s=0):
        busy = vmckpt("checkpoint", "two", "--store", store, "--wait", "0", check=False)
    one_line_error(busy, "a checkpoint is under way", code=14)
    vmckpt("verify", "--store", store)


def test_two_guests_in_one_store_get_distinct_layer_ids(vmckpt: Vmckpt) -> None:
    for name in ("ga", "gb"):
        vmckpt.run_guest(name)
    for name in ("ga", "gb"):
        vmckpt.wait_states(name, 3)
    store = str(vmckpt.store)
    for _ in range(2):
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "vmckpt", "checkpoint", name, "--store", store, "--json"],
                stdout=subprocess.PIPE, cwd=REPO, text=True,
            )
            for name in ("ga", "gb")
        ]  # fmt: skip
        for proc in procs:
            assert proc.wait(timeout=300) == 0
    ids = [row["layer"] for row in vmckpt.listing()["layers"]]
    sequences = [str(layer).split("-")[0] for layer in ids]
    assert len(set(sequences)) == len(ids) == 4, ids
    for prefix in sequences:
        vmckpt("inspect", "--store", store, prefix)  # every sequence number is unambiguous


def test_records_survive_concurrent_writers_and_readers(tmp_path: Path) -> None:
    path = tmp_path / "guest.json"
    write_json_atomic(path, {"n": 0})
    errors: list[BaseException] = []
    bad_reads = 0
    stop = threading.Event()

    def writer(tag: int) -> None:
        try:
            for n in range(1500):
                write_json_atomic(path, {"n": n, "writer": tag, "pad": "x" * 512})
        except BaseException as exc:
            errors.append(exc)

    def reader() -> None:
        # As vmckpt reads records: a file renamed away after it was opened has no link left
        # (not a second one), and is read whole.
        nonlocal bad_reads
        while not stop.is_set():
            try:
                read_json(path)
            except (ValueError, OSError):
                bad_reads += 1

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    watcher = threading.Thread(target=reader)
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    assert errors == [] and bad_reads == 0
    assert [p.name for p in tmp_path.iterdir()] == ["guest.json"]


def test_bad_command_line_values_are_refused_in_one_line(vmckpt: Vmckpt, tmp_path: Path) -> None:
    store = str(vmckpt.store)
    vmckpt("init", store)
    cases = [
        ["watch", "g", "--store", store, "--count", "0"],
        ["watch", "g", "--store", store, "--count", "-3"],
        ["watch", "g", "--store", store, "--interval", "nan"],
        ["watch", "g", "--store", store, "--interval", "inf"],
        ["watch", "g", "--store", store, "--pause-budget", "nan"],
        ["watch", "g", "--store", store, "--pause-budget", "inf"],
        ["watch", "g", "--store", store, "--pause-budget", "-5"],
        ["run", "a,b", "--store", store, "--kernel", "/dev/null"],
        ["run", "a\nb", "--store", store, "--kernel", "/dev/null"],
        ["run", "g", "--store", store, "--kernel", "/dev/null", "--machine", "pc,usb=on"],
        ["run", "g", "--store", store, "--kernel", "/dev/null", "--cpu", "max -S"],
        ["run", "g", "--store", store, "--kernel", "/dev/null", "--cpus", "0"],
        ["run", "g", "--store", store, "--kernel", "/dev/null", "--memory", "1"],
        ["checkpoint", "g", "--store", store, "--mechanism", "fast"],
    ]
    for args in cases:
        result = vmckpt(*args, check=False)
        one_line_error(result, code=2)
    assert Store(vmckpt.store).host.names() == []


def test_symlinks_in_a_store_are_never_followed(vmckpt: Vmckpt, tmp_path: Path) -> None:
    vmckpt.run_guest("ln")
    vmckpt.wait_states("ln", 3)
    store = str(vmckpt.store)
    layer = take(vmckpt, "ln").layer
    vmckpt("stop", "ln", "--store", store)
    secret = tmp_path / "secret"
    secret.write_bytes(b"not the store's" * 1000)
    pages = Store(vmckpt.store).layer_path(layer, "pages.bin")
    pages.unlink()
    pages.symlink_to(secret)
    line = one_line_error(vmckpt("verify", "--store", store, check=False), layer, "pages.bin")
    assert "not a regular file" in line and "sha256" not in line
    line = one_line_error(vmckpt("restore", "--store", store, check=False), layer)
    assert "not a regular file" in line
    # A whole layer directory replaced by a link to another directory is refused too.
    moved = tmp_path / "elsewhere"
    directory = Store(vmckpt.store).layer_path(layer)
    os.rename(directory, moved)
    os.symlink(moved, directory)
    # A link is not a layer: not listed, not resolved, never read through.
    one_line_error(vmckpt("verify", "--store", store, layer, check=False), "no layer matches")
    assert vmckpt.listing()["layers"] == []


def test_a_store_that_cannot_be_written_is_refused_before_the_guest_is_paused(
    vmckpt: Vmckpt, root: None
) -> None:
    vmckpt.run_guest("ro")
    vmckpt.wait_states("ro", 3)
    layers = str(Store(vmckpt.store).layers_path)
    # A read-only file system under the layers (root ignores mode bits).
    subprocess.run(["mount", "--bind", layers, layers], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", layers], check=True)
        result = vmckpt(
            "checkpoint", "ro", "--store", str(vmckpt.store), check=False,
            env={"VMCKPT_FAULT": "kill-at:after-settings"},
        )  # fmt: skip
        # Refused before any migration setting changed (else the fault would have killed it).
        one_line_error(result, "cannot write into")
    finally:
        subprocess.run(["umount", layers], check=True)
    assert_guest_untouched(vmckpt, "ro")
    assert Store(vmckpt.store).layer_ids() == []
