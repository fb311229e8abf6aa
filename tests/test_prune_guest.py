"""Pruning a store a running guest is being checkpointed into, with a real guest: the
checkpoints go on, the store verifies, and a kept layer (rewritten by the prune to
absorb the layers that went) restores to a guest that continues exactly where it was."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
from typing import Any

import pytest

from tests.framework.guest import REPO, State, Taken, Vmckpt, assert_continues

pytestmark = pytest.mark.qemu


def watch(vmckpt: Vmckpt, name: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "vmckpt", "watch", name, "--store", str(vmckpt.store),
         "--json", *extra],
        stdout=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip


def read_rows(
    watcher: subprocess.Popen[str],
    vmckpt: Vmckpt,
    name: str,
    rows: queue.Queue[tuple[dict[str, Any], int, int] | None],
) -> None:
    """Each row of ``watch --json`` with the guest's position when the previous row arrived
    and when this one did; None at the end."""
    assert watcher.stdout is not None
    before = vmckpt.last_seq(name)
    try:
        for line in watcher.stdout:
            after = vmckpt.last_seq(name)
            rows.put((json.loads(line), before, after))
            before = after
    finally:
        rows.put(None)


def restore_and_check(vmckpt: Vmckpt, name: str, shot: Taken, original: list[State]) -> None:
    vmckpt.restore("--layer", shot.layer, "--name", name)
    restored = vmckpt.wait_states(name, 10)
    assert_continues(restored, original, shot)
    assert "BAD" not in vmckpt.serial(name)
    vmckpt("stop", name, "--store", str(vmckpt.store))


def test_prune_while_watch_runs_then_restore_a_kept_layer(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("pw")
    vmckpt.wait_states("pw", 5)
    store = str(vmckpt.store)
    watcher = watch(vmckpt, "pw", "--interval", "0.4s", "--count", "16")
    # Checkpoints go on while a prune runs: the rows are read, and the guest's position noted,
    # the moment each arrives, on a thread of their own, so that a row's window (the position
    # when the previous row arrived .. when it arrived) holds its checkpoint's instant even
    # while the prunes below hold up this thread for several checkpoints.
    rows: queue.Queue[tuple[dict[str, Any], int, int] | None] = queue.Queue()
    reader = threading.Thread(target=read_rows, args=(watcher, vmckpt, "pw", rows), daemon=True)
    reader.start()
    taken: dict[str, Taken] = {}
    order: list[str] = []
    pruned: list[dict[str, Any]] = []
    while (row := rows.get(timeout=300)) is not None:
        out, before, after = row
        taken[out["layer"]] = Taken(out["layer"], before, after, out["pages_stored"],
                                    out["bytes"], out["pause_ms"])  # fmt: skip
        order.append(out["layer"])
        # A prune that took long (the watch went on meanwhile, its rows queued here) may
        # already have kept the newest layer this row is: the next prune waits for a newer
        # one, or it would have nothing to remove.
        seen = (
            max((order.index(k) for k in pruned[-1]["kept"] if k in order), default=-1)
            if pruned
            else -1
        )
        if len(order) % 5 == 0 and seen < len(order) - 1:  # the next checkpoint under way
            result = vmckpt("prune", "--store", store, "--guest", "pw", "--keep-last", "2",
                            "--json")  # fmt: skip
            pruned.append(json.loads(result.stdout))
    reader.join()
    assert watcher.wait(timeout=120) == 0
    assert len(order) == 16, "watch did not take every checkpoint while prunes ran"
    assert len(pruned) >= 2 and all(p["removed"] for p in pruned), pruned
    # Every prune rewrote the oldest layer it kept into a base layer absorbing the rest.
    assert all(p["rewritten"] for p in pruned)
    vmckpt("verify", "--store", store)
    listing = vmckpt.listing()
    remaining = [str(row["layer"]) for row in listing["layers"]]
    gone = {layer for p in pruned for layer in p["removed"]}
    assert not gone & set(remaining)
    assert set(remaining) == set(order) - gone
    rewritten = [layer for p in pruned for layer in p["rewritten"]]
    survivor = next(layer for layer in order if layer in remaining and layer in rewritten)
    parents = {str(row["layer"]): row["parent"] for row in listing["layers"]}
    assert parents[survivor] is None  # it absorbed everything below it
    original = vmckpt.states("pw")
    vmckpt("stop", "pw", "--store", store)
    restore_and_check(vmckpt, "pw", taken[survivor], original)
    restore_and_check(vmckpt, "pw", taken[order[-1]], original)


def test_watch_prunes_as_it_goes(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("pk")
    vmckpt.wait_states("pk", 5)
    store = str(vmckpt.store)
    watcher = watch(
        vmckpt, "pk", "--interval", "0.4s", "--count", "8", "--keep-last", "3",
        "--prune-every", "0s",
    )  # fmt: skip
    assert watcher.stdout is not None
    taken: dict[str, Taken] = {}
    notes = []
    before = vmckpt.last_seq("pk")
    for line in watcher.stdout:
        out = json.loads(line)
        after = vmckpt.last_seq("pk")
        taken[out["layer"]] = Taken(out["layer"], before, after, out["pages_stored"],
                                    out["bytes"], out["pause_ms"])  # fmt: skip
        notes.append(out["note"])
        before = after
    assert watcher.wait(timeout=120) == 0
    assert len(taken) == 8
    assert sum("pruned 1 layer(s)" in note for note in notes) == 5, notes
    vmckpt("verify", "--store", store)
    remaining = [str(row["layer"]) for row in vmckpt.listing()["layers"]]
    assert remaining == list(taken)[-3:]
    original = vmckpt.states("pk")
    vmckpt("stop", "pk", "--store", store)
    restore_and_check(vmckpt, "pk", taken[remaining[0]], original)
