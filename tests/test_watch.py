"""`vmckpt watch`: periodic layers that restore like any others, and a clean stop."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys

import pytest

from tests.framework.guest import (
    REPO,
    Taken,
    Vmckpt,
    assert_continues,
    assert_guest_untouched,
    wait_for,
)
from vmckpt.images import Store
from vmckpt.session import JOURNAL

pytestmark = pytest.mark.qemu


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
        pages, size = out["pages_stored"], out["bytes"]
        taken.append(Taken(out["layer"], before, after, pages, size, out["pause_ms"]))
        before = after
    assert watcher.wait(timeout=60) == 0
    assert len(taken) == 21
    assert all(t.pause_ms >= 0 for t in taken)
    # A chain: every layer's parent is the one before it.
    listing = json.loads(vmckpt("list", "--store", store, "--json").stdout)
    parents = {row["layer"]: row["parent"] for row in listing["layers"]}
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
    """SIGINT while a checkpoint is under way (the session's journal exists only then): that
    checkpoint is finished and written, then watch stops; the guest runs on untouched."""
    vmckpt.run_guest("ws", memory="512M")
    vmckpt.wait_states("ws", 3)
    store = str(vmckpt.store)
    journal = vmckpt.runtime("ws") / JOURNAL
    for _ in range(2):
        watcher = subprocess.Popen(
            [sys.executable, "-m", "vmckpt", "watch", "ws", "--store", store,
             "--interval", "0.1s", "--json"],
            stdout=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        assert watcher.stdout is not None
        json.loads(watcher.stdout.readline())  # the first layer is written
        wait_for(journal.exists, "the next checkpoint's migration session", 60, poll=0.005)
        watcher.send_signal(signal.SIGINT)
        assert watcher.wait(timeout=60) == 0
        # The checkpoint that was under way was completed and reported.
        rest = [json.loads(line) for line in watcher.stdout.read().splitlines()]
        assert rest, "the checkpoint under way at the signal was not reported"
        assert not journal.exists(), "the session was not closed"
        assert_guest_untouched(vmckpt, "ws")
        vmckpt("verify", "--store", store)
    leftovers = [
        p.name for p in Store(vmckpt.store).layers_path.iterdir() if p.name.startswith(".")
    ]
    assert leftovers == [], "an interrupted checkpoint left a temporary layer"
