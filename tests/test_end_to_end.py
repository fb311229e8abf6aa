"""The whole path with a real guest: boot, checkpoint while it runs, stop, restore, carry on.

zdtm-style: the guest's workload checks itself (its STATE lines say ``ok``
only while its buffer matches its checksum) and is deterministic, so a
restored guest must print, for every step, the very checksum the original
printed for that step.
"""

from __future__ import annotations

import json

import pytest

from tests.framework.guest import Taken, Vmckpt, assert_continues, take

pytestmark = pytest.mark.qemu


def test_checkpoint_chain_and_restore_from_middle_and_last(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("e2e")
    vmckpt.wait_states("e2e", 5)
    taken: list[Taken] = []
    for _ in range(3):
        taken.append(take(vmckpt, "e2e"))
        vmckpt.wait_states("e2e", len(vmckpt.states("e2e")) + 5)
    original = vmckpt.states("e2e")
    assert "BAD" not in vmckpt.serial("e2e")

    # Each later layer names the previous one as parent.
    listing = json.loads(vmckpt("list", "--store", str(vmckpt.store), "--json").stdout)
    layers = {row["layer"]: row for row in listing["layers"]}
    assert layers[taken[0].layer]["parent"] is None
    assert layers[taken[1].layer]["parent"] == taken[0].layer
    assert layers[taken[2].layer]["parent"] == taken[1].layer
    vmckpt("verify", "--store", str(vmckpt.store))
    vmckpt("stop", "e2e", "--store", str(vmckpt.store))

    for index in (1, 2):
        shot = taken[index]
        vmckpt.restore("--layer", shot.layer, "--name", "e2e")
        restored = vmckpt.wait_states("e2e", 15)
        assert_continues(restored, original, shot)
        assert "BAD" not in vmckpt.serial("e2e")
        vmckpt("stop", "e2e", "--store", str(vmckpt.store))


def test_later_layers_store_far_fewer_pages_than_the_base(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("sizes", pages=4)
    vmckpt.wait_states("sizes", 5)
    base = take(vmckpt, "sizes")
    vmckpt.wait_states("sizes", len(vmckpt.states("sizes")) + 10)
    later = take(vmckpt, "sizes")
    steps = later.after - base.before
    # The base holds every non-zero page (the 64 MiB buffer alone is 16384);
    # the workload writes 4 pages a step, plus what the kernel touches.
    assert base.pages > 16384
    assert later.pages * 10 < base.pages, (base.pages, later.pages, steps)
    assert later.bytes * 10 < base.bytes


def test_restored_guest_can_be_checkpointed_again(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("again")
    vmckpt.wait_states("again", 3)
    first = take(vmckpt, "again")
    vmckpt("stop", "again", "--store", str(vmckpt.store))
    vmckpt.restore("--layer", first.layer, "--name", "again2")
    vmckpt.wait_states("again2", 5)
    second = take(vmckpt, "again2")
    listing = json.loads(vmckpt("list", "--store", str(vmckpt.store), "--json").stdout)
    parents = {row["layer"]: row["parent"] for row in listing["layers"]}
    assert parents[second.layer] == first.layer
    vmckpt("stop", "again2", "--store", str(vmckpt.store))
    vmckpt.restore("--layer", second.layer, "--name", "again3")
    restored = vmckpt.wait_states("again3", 5)
    assert restored[0].seq >= second.before
