"""`vmckpt watch`: periodic layers that restore like any others, and a clean stop."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import time

from tests.conftest import REPO, Vmckpt
from tests.test_end_to_end import Taken, assert_continues
from tests.test_failures import assert_guest_untouched
from vmckpt.qmp import Monitor


def test_watch_layers_restore_from_first_middle_and_last(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("w")
    vmckpt.wait_states("w", 5)
    store = str(vmckpt.store)
    watcher = subprocess.Popen(
        [sys.executable, "-m", "vmckpt", "watch", "w", "--store", store,
         "--interval", "0.5s", "--count", "21", "--json"],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip
    assert watcher.stdout is not None
    taken: list[Taken] = []
    before = vmckpt.last_seq("w")
    for line in watcher.stdout:
        out = json.loads(line)
        after = vmckpt.last_seq("w")
        pages, size = out["pages_stored"], out["bytes_written"]
        taken.append(Taken(out["layer"], before, after, pages, size, out["pause_ms"]))
        before = after
    assert watcher.wait(timeout=60) == 0
    assert len(taken) == 21
    assert all(t.pause_ms >= 0 for t in taken)
    # A chain: every layer's parent is the one before it.
    listing = json.loads(vmckpt("list", "--store", store, "--json").stdout)
    parents = {row["id"]: row["parent"] for row in listing["layers"]}
    for previous, layer in itertools.pairwise(taken):
        assert parents[layer.layer] == previous.layer
    # Later layers hold only what the workload wrote.
    assert max(t.pages for t in taken[1:]) * 10 < taken[0].pages
    vmckpt("verify", "--store", store)
    original = vmckpt.states("w")
    vmckpt("stop", "w", "--store", store)

    for shot in (taken[0], taken[10], taken[-1]):
        vmckpt.restore("--layer", shot.layer, "--name", "w")
        restored = vmckpt.wait_states("w", 10)
        assert_continues(restored, original, shot)
        assert "BAD" not in vmckpt.serial("w")
        vmckpt("stop", "w", "--store", store)


def test_stopping_watch_mid_checkpoint_leaves_the_guest_running(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("ws", memory="512M")
    vmckpt.wait_states("ws", 3)
    store = str(vmckpt.store)
    for delay in (0.3, 1.1):
        watcher = subprocess.Popen(
            [sys.executable, "-m", "vmckpt", "watch", "ws", "--store", store,
             "--interval", "0.1s", "--json"],
            stdout=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        assert watcher.stdout is not None
        watcher.stdout.readline()  # the first layer is written
        time.sleep(delay)  # the next checkpoint is under way
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=60) == 0
        watcher.stdout.read()
        assert_guest_untouched(vmckpt, "ws")
        vmckpt("verify", "--store", store)
    leftovers = [p.name for p in (vmckpt.store / "layers").iterdir() if p.name.startswith(".")]
    assert leftovers == [], "an interrupted checkpoint left a temporary layer"


def test_colo_request_on_this_qemu_falls_back_and_leaves_no_trace(vmckpt: Vmckpt) -> None:
    """QEMU 10.0 completes an x-colo migration instead of entering COLO (see README)."""
    vmckpt.run_guest("wc")
    vmckpt.wait_states("wc", 3)
    store = str(vmckpt.store)
    result = vmckpt(
        "watch", "wc", "--store", store, "--interval", "0.5s", "--count", "3", "--colo", "--json"
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == 3
    assert "COLO unavailable" in lines[0]["note"]
    assert {line["mechanism"] for line in lines} == {"precopy-diff"}
    assert_guest_untouched(vmckpt, "wc")
    with Monitor(vmckpt.store / "guests" / "wc" / "qmp.sock", vm="wc") as mon:
        assert mon.migrate_capabilities()["x-colo"] is False
    vmckpt("verify", "--store", store)
