"""Chain maintenance without QEMU: prune, squash, delete, gc and the retention rules.

The one property everything rests on: every layer that is kept composes, after
the change, to the very bytes it composed to before (RAM, prelude, device state,
disks), compared byte for byte. Crash safety is tested with kill -9 at each
fault point of a real ``vmckpt prune`` process.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.test_images import content, mutate, random_image
from vmckpt import faults
from vmckpt import locks as locks_module
from vmckpt.cli import build_parser
from vmckpt.cli.maintenance import keep_rules
from vmckpt.errors import StoreError, UsageError
from vmckpt.images import LayerManifest, Store, layerio, maintenance
from vmckpt.images.retention import KeepRules, keep_arguments, select
from vmckpt.ram import RamImage

REPO = Path(__file__).resolve().parent.parent

Composed = tuple[RamImage, bytes, bytes]


def compose_all(store: Store) -> dict[str, Composed]:
    return {layer_id: store.compose(layer_id) for layer_id in store.layer_ids()}


def assert_same(got: Composed, want: Composed, layer_id: str) -> None:
    assert [b.idstr for b in got[0].blocks] == [b.idstr for b in want[0].blocks]
    for block in want[0].blocks:
        assert np.array_equal(got[0].data[block.idstr], want[0].data[block.idstr]), (
            f"layer {layer_id}: RAM block {block.idstr} differs after the change"
        )
    assert got[1:] == want[1:], f"layer {layer_id}: prelude or device state differs"


def assert_kept_layers_unchanged(store: Store, before: dict[str, Composed]) -> None:
    """Every layer still in the store verifies and composes byte for byte as before."""
    assert store.verify() == store.layer_ids()
    for layer_id in store.layer_ids():
        assert_same(store.compose(layer_id), before[layer_id], layer_id)


def layer_bytes(store: Store) -> int:
    return sum(p.stat().st_size for p in store.layers_path.rglob("*") if p.is_file())


def leftovers(store: Store) -> list[str]:
    return sorted(p.name for p in store.layers_path.iterdir() if p.name.startswith("."))


@pytest.fixture
def forked(tmp_path: Path) -> tuple[Store, dict[str, str]]:
    """A (base) <- B <- C <- D <- E (head of guest tiny); C <- F <- G (head of guest fork):
    a chain that forked at C, as a guest restored from C and run on would make it."""
    store = Store.create(tmp_path / "store")
    rng = np.random.default_rng(13)
    images: dict[str, RamImage] = {"A": random_image(rng)}
    ids: dict[str, str] = {}
    parents = {"B": "A", "C": "B", "D": "C", "E": "D", "F": "C", "G": "F"}
    ids["A"] = store.write_layer(content(images["A"], None, None, tag="A")).id
    for name, parent in parents.items():
        images[name] = mutate(images[parent], rng)
        layer = content(images[name], ids[parent], images[parent], tag=name)
        if name in "FG":
            layer.guest = "fork"
        ids[name] = store.write_layer(layer).id
    store.set_head("tiny", ids["E"])
    store.set_head("fork", ids["G"])
    return store, ids


# --- retention rules ---------------------------------------------------------------------


def test_rules_keep_last_within_and_periods() -> None:
    now = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    # One layer every 6 hours for 20 days, newest first ids l000 (now) .. l079.
    layers = [(f"l{i:03d}", now - timedelta(hours=6 * i)) for i in range(80)]
    kept = select(layers, KeepRules(last=3), now, UTC)
    assert set(kept) == {"l000", "l001", "l002"} and kept["l000"] == "last 1"
    kept = select(layers, KeepRules(within_s=13 * 3600), now, UTC)
    assert set(kept) == {"l000", "l001", "l002"}
    kept = select(layers, KeepRules(daily=3), now, UTC)
    # Days 10 (l000..l002: 12:00, 06:00, 00:00), 9 (l003: 18:00 ...), 8: the newest of each.
    assert kept == {"l000": "daily 1", "l003": "daily 2", "l007": "daily 3"}
    kept = select(layers, KeepRules(weekly=2, monthly=2), now, UTC)
    # 2026-03-10 is in ISO week 11; week 10 starts on 03-02 (its newest: 03-08 18:00).
    newest_week_10 = next(i for i, t in layers if t < datetime(2026, 3, 9, tzinfo=UTC))
    assert kept["l000"] == "weekly 1" and kept[newest_week_10] == "weekly 2"
    newest_february = next(i for i, t in layers if t < datetime(2026, 3, 1, tzinfo=UTC))
    assert kept[newest_february] == "monthly 2"
    assert len(kept) == 3  # l000 is both the newest of its week and of its month
    # Hourly and minutely: one layer per 6 hours means each layer is its own hour/minute.
    assert set(select(layers, KeepRules(hourly=4), now, UTC)) == {"l000", "l001", "l002", "l003"}
    assert select(layers, KeepRules(), now, UTC) == {}


def test_rules_refuse_nonsense() -> None:
    with pytest.raises(UsageError):
        KeepRules(last=-1)
    assert not KeepRules().any() and KeepRules(daily=1).any()


# --- prune ---------------------------------------------------------------------------------


def test_prune_keeps_every_kept_layer_byte_for_byte(forked: tuple[Store, dict[str, str]]) -> None:
    store, ids = forked
    before = compose_all(store)
    created = {layer_id: m.created for layer_id, m in before_manifests(store).items()}
    size_before = layer_bytes(store)
    # Per guest: tiny keeps its newest (E, its head); fork keeps G (head).
    result = maintenance.prune(store, KeepRules(last=1))
    assert set(result.removed) == {ids[n] for n in "ABCDF"}
    assert set(result.rewritten) == {ids["E"], ids["G"]}
    assert result.kept[ids["E"]] == "last 1, head of guest tiny"
    assert store.layer_ids() == sorted([ids["E"], ids["G"]])
    assert_kept_layers_unchanged(store, before)
    # Both became base layers, written in the current format with page digests, and keep
    # their creation time (each is the same checkpoint).
    for name in "EG":
        manifest = store.manifest(ids[name])
        assert manifest.parent is None and manifest.has_page_sums
        assert manifest.created == created[ids[name]]
    assert store.head("tiny") == ids["E"] and store.head("fork") == ids["G"]
    # The bytes reported freed are those that went (the manifests' sizes may differ a bit).
    freed = size_before - layer_bytes(store)
    assert abs(freed - result.bytes_freed) < 4096, (freed, result.bytes_freed)
    assert leftovers(store) == []


def test_prune_of_a_middle_run_keeps_the_fork(forked: tuple[Store, dict[str, str]]) -> None:
    store, ids = forked
    before = compose_all(store)
    created = {layer_id: m.created for layer_id, m in before_manifests(store).items()}
    # Keep the 2 newest of guest tiny (D, E) and leave guest fork alone: B, C go, but C
    # has a child of the other guest (F): it absorbs C and B too.
    result = maintenance.prune(store, KeepRules(last=2), guest="tiny")
    assert set(result.removed) == {ids["A"], ids["B"], ids["C"]}
    assert set(result.rewritten) == {ids["D"], ids["F"]}
    assert store.manifest(ids["D"]).parent is None
    assert store.manifest(ids["F"]).parent is None
    assert store.manifest(ids["E"]).parent == ids["D"]
    assert store.manifest(ids["G"]).parent == ids["F"]
    assert_kept_layers_unchanged(store, before)
    for layer_id in store.layer_ids():
        assert store.manifest(layer_id).created == created[layer_id]


def before_manifests(store: Store) -> dict[str, LayerManifest]:
    return {layer_id: store.manifest(layer_id) for layer_id in store.layer_ids()}


def test_dry_run_changes_nothing_and_says_what_would_go(
    forked: tuple[Store, dict[str, str]],
) -> None:
    store, _ = forked
    files = {p: p.read_bytes() for p in store.layers_path.rglob("*") if p.is_file()}
    dry = maintenance.prune(store, KeepRules(last=1), dry_run=True)
    assert dry.dry_run and dry.removed
    assert {p: p.read_bytes() for p in store.layers_path.rglob("*") if p.is_file()} == files
    done = maintenance.prune(store, KeepRules(last=1))
    assert (done.removed, done.rewritten, done.bytes_freed) == (
        dry.removed, dry.rewritten, dry.bytes_freed,
    )  # fmt: skip


def test_prune_without_rules_is_refused(forked: tuple[Store, dict[str, str]]) -> None:
    store, _ = forked
    with pytest.raises(UsageError, match="at least one --keep"):
        maintenance.prune(store, KeepRules())


def test_prune_never_removes_a_head(forked: tuple[Store, dict[str, str]]) -> None:
    store, ids = forked
    store.set_head("old", ids["B"])  # a guest restored from B, not checkpointed since
    before = compose_all(store)
    result = maintenance.prune(store, KeepRules(last=1))
    assert ids["B"] not in result.removed and ids["B"] in store.layer_ids()
    assert result.kept[ids["B"]] == "head of guest old"
    assert_kept_layers_unchanged(store, before)


# --- squash and delete ---------------------------------------------------------------------


def test_squash_layer_to_a_base(forked: tuple[Store, dict[str, str]]) -> None:
    store, ids = forked
    before = compose_all(store)
    result = maintenance.squash(store, None, ids["E"][:6])
    assert result.rewritten == (ids["E"],) and result.removed == ()
    assert store.manifest(ids["E"]).parent is None
    assert len(store.layer_ids()) == 7  # the layers below stay
    assert_kept_layers_unchanged(store, before)
    # A base layer already: nothing to do.
    assert maintenance.squash(store, None, ids["A"]).rewritten == ()


def test_squash_a_run_with_a_branch_off_it(forked: tuple[Store, dict[str, str]]) -> None:
    store, ids = forked
    before = compose_all(store)
    # B..E: B, C, D go into E; F (child of C, off the run) absorbs C and B.
    result = maintenance.squash(store, ids["B"], ids["E"])
    assert set(result.removed) == {ids["B"], ids["C"], ids["D"]}
    assert set(result.rewritten) == {ids["E"], ids["F"]}
    assert store.manifest(ids["E"]).parent == ids["A"]
    assert store.manifest(ids["F"]).parent == ids["A"]
    assert_kept_layers_unchanged(store, before)


def test_squash_refuses_what_is_not_a_run(forked: tuple[Store, dict[str, str]]) -> None:
    store, ids = forked
    with pytest.raises(UsageError, match="not an older layer"):
        maintenance.squash(store, ids["F"], ids["E"])  # another branch
    with pytest.raises(UsageError, match="not an older layer"):
        maintenance.squash(store, ids["E"], ids["B"])  # the wrong way round
    store.set_head("old", ids["C"])
    with pytest.raises(StoreError, match=rf"layer {ids['C']}.*head of guest old"):
        maintenance.squash(store, ids["B"], ids["E"])


def test_delete_a_leaf_and_a_layer_with_children(forked: tuple[Store, dict[str, str]]) -> None:
    store, ids = forked
    before = compose_all(store)
    with pytest.raises(StoreError, match="head of guest tiny"):
        maintenance.delete(store, ids["E"])
    store.set_head("tiny", ids["D"])  # as if guest tiny had been restored from D
    leaf = maintenance.delete(store, ids["E"])
    assert leaf.removed == (ids["E"],) and leaf.rewritten == ()
    middle = maintenance.delete(store, ids["C"])  # two children: D and F absorb it
    assert middle.removed == (ids["C"],) and set(middle.rewritten) == {ids["D"], ids["F"]}
    assert store.manifest(ids["D"]).parent == ids["B"]
    assert_kept_layers_unchanged(store, before)


def test_exclusive_bytes_is_what_delete_frees(forked: tuple[Store, dict[str, str]]) -> None:
    store, ids = forked
    only = maintenance.exclusive_bytes(store)
    assert set(only) == set(ids.values())
    store.set_head("tiny", ids["D"])
    for name in ("E", "C"):  # a leaf, then a layer with two children
        size = layer_bytes(store)
        expected = maintenance.exclusive_bytes(store)[ids[name]]
        maintenance.delete(store, ids[name])
        assert abs((size - layer_bytes(store)) - expected) < 1024, name
    # A leaf frees exactly its own files and manifest.
    assert only[ids["G"]] == store.manifest(ids["G"]).bytes_total + os.path.getsize(
        store.layer_path(ids["G"], "manifest.json")
    )


# --- concurrency and failures ---------------------------------------------------------------


def test_a_layer_whose_parent_was_removed_meanwhile_is_not_published(
    forked: tuple[Store, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, ids = forked
    rng = np.random.default_rng(5)
    parent = ids["G"]
    image = store.compose(parent)[0]
    real = Store._make_temporary

    def and_remove_the_parent(self: Store, layer_id: str | None) -> Any:
        made = real(self, layer_id)
        store.set_head("fork", ids["F"])
        maintenance.delete(store, parent)  # while the new layer is being written
        return made

    monkeypatch.setattr(Store, "_make_temporary", and_remove_the_parent)
    with pytest.raises(StoreError, match=rf"parent layer {parent} was removed meanwhile"):
        store.write_layer(content(mutate(image, rng), parent, image))
    monkeypatch.undo()
    assert leftovers(store) == []
    assert store.verify() == store.layer_ids()


def test_a_layer_added_onto_one_that_goes_stops_the_switch(
    forked: tuple[Store, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer published (e.g. copied from another host) onto a layer the plan removes,
    between the plan and the switch: the prune stops, and nothing is changed."""
    store, ids = forked
    before = compose_all(store)
    image = before[ids["B"]][0]
    real = maintenance._build

    def build_and_add(*args: Any) -> Any:
        made = real(*args)
        if not getattr(build_and_add, "done", False):
            build_and_add.done = True  # type: ignore[attr-defined]
            store.write_layer(content(image, ids["B"], image, tag="late"))
        return made

    monkeypatch.setattr(maintenance, "_build", build_and_add)
    files = sorted(p.name for p in store.layers_path.iterdir())
    with pytest.raises(StoreError, match=rf"changed meanwhile \(new layer .* builds on {ids['B']}"):
        maintenance.prune(store, KeepRules(last=1))
    assert leftovers(store) == []
    assert set(files) < {p.name for p in store.layers_path.iterdir()}
    for layer_id, composed in before.items():
        assert_same(store.compose(layer_id), composed, layer_id)


def test_without_atomic_exchange_nothing_changes(
    forked: tuple[Store, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = forked
    files = {p: p.read_bytes() for p in store.layers_path.rglob("*") if p.is_file()}

    def no_exchange(*args: Any) -> None:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(layerio, "exchange_at", no_exchange)
    with pytest.raises(StoreError, match=r"RENAME_EXCHANGE\) is not available here.*nothing was"):
        maintenance.prune(store, KeepRules(last=1))
    assert {p: p.read_bytes() for p in store.layers_path.rglob("*") if p.is_file()} == files


def test_readers_wait_for_the_switch(forked: tuple[Store, dict[str, str]]) -> None:
    store, ids = forked
    with store.switching("test"):
        from vmckpt.errors import LockError

        with pytest.raises(LockError, match="switching layers"), store.reading("x", wait_s=0.1):
            pass
    assert store.compose(ids["E"])[0] is not None


# --- kill -9 at each step ----------------------------------------------------------------


def run_prune(
    store: Store, *rules: str, fault: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = f"kill-at:{fault}"
    return subprocess.run(
        [sys.executable, "-m", "vmckpt", "prune", "--store", str(store.path), "--json", *rules],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize("point", faults.MAINTENANCE_POINTS)
def test_kill_at_each_step_of_a_prune(forked: tuple[Store, dict[str, str]], point: str) -> None:
    """kill -9 at each step: the store verifies, every layer in it composes as before (kept
    ones and not yet removed ones alike), gc removes the leftovers, and a second prune
    finishes the job with the result an uninterrupted one has."""
    store, ids = forked
    before = compose_all(store)
    rules = ("--keep-last", "1", "--guest", "tiny")  # removes A..D; rewrites E, and F (fork)
    killed = run_prune(store, *rules, fault=point)
    assert killed.returncode == -9, killed.stderr
    assert_kept_layers_unchanged(store, before)
    left = leftovers(store)
    assert left, "a kill mid-way leaves temporary directories"
    cleaned = maintenance.gc(store, ())
    assert sorted(g.path for g in cleaned) == [f"layers/{name}" for name in left]
    assert leftovers(store) == []
    done = run_prune(store, *rules)
    assert done.returncode == 0, done.stderr
    assert store.layer_ids() == sorted([ids["E"], ids["F"], ids["G"]])
    assert_kept_layers_unchanged(store, before)
    assert json.loads(done.stdout)["dry_run"] is False


# --- gc ------------------------------------------------------------------------------------


def test_gc_removes_leftovers_and_leaves_live_work(
    forked: tuple[Store, dict[str, str]],
) -> None:
    store, ids = forked
    layers = store.layers_path
    dead = layers / f".tmp-{ids['E']}-dead"
    dead.mkdir()
    (dead / "pages.bin").write_bytes(b"x" * 5000)
    live = layers / ".tmp-0099-abcdef-live"
    live.mkdir()
    fd = locks_module.lock_directory(live)  # a writer at work
    scratch = store.host.scratch_dir("tiny")
    scratch.mkdir()
    (scratch / "backup-vda-1.qcow2").write_bytes(b"y" * 100)
    gone = store.host.runtime_dir("ghost")
    (gone / "guest.json").write_text("{}")
    try:
        dry = maintenance.gc(store, [("guest", "ghost")], dry_run=True)
        assert (dead.exists(), gone.exists()) == (True, True)
        found = maintenance.gc(store, [("guest", "ghost")])
        assert [g.path for g in found] == [g.path for g in dry]
        paths = {g.path: g for g in found}
        assert paths[f"layers/{dead.name}"].bytes == 5000
        # This host's files of the store are named by their whole path (not in the store).
        assert str(gone) in paths and str(scratch / "backup-vda-1.qcow2") in paths
        assert live.exists() and not dead.exists() and not gone.exists()
        assert not (scratch / "backup-vda-1.qcow2").exists()
        assert scratch.is_dir() and store.head("tiny") == ids["E"]
    finally:
        os.close(fd)
    # Its writer gone, the directory is garbage too.
    assert [g.path for g in maintenance.gc(store, ())] == [f"layers/{live.name}"]
    assert store.verify() == store.layer_ids()


# --- the commands ---------------------------------------------------------------------


def test_keep_rules_round_trip_through_the_command_line() -> None:
    rules = KeepRules(last=3, within_s=7200, daily=7, monthly=2)
    args = build_parser().parse_args(["prune", *keep_arguments(rules)])
    assert keep_rules(args) == rules
    args = build_parser().parse_args(["watch", "x", *keep_arguments(rules), "--prune-every", "0"])
    assert keep_rules(args) == rules and args.prune_every == "0"


def cli(store: Store, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmckpt", *args, "--store", str(store.path)],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip


def test_the_commands_say_what_they_do(forked: tuple[Store, dict[str, str]]) -> None:
    store, ids = forked
    listing = json.loads(cli(store, "list", "--json").stdout)
    only = {row["layer"]: row["exclusive_bytes"] for row in listing["layers"]}
    assert only == maintenance.exclusive_bytes(store)
    assert listing["store_bytes"] >= layer_bytes(store)
    dry = cli(store, "prune", "--keep-last", "1", "--dry-run", "--list")
    assert dry.returncode == 0, dry.stderr
    assert f"keep     {ids['E']}  last 1, head of guest tiny" in dry.stdout
    assert f"would remove {ids['A']}" in dry.stdout and "[dry run: nothing changed]" in dry.stdout
    assert len(store.layer_ids()) == 7
    refused = cli(store, "delete", ids["E"][:6])
    assert refused.returncode == 3 and len(refused.stderr.strip().splitlines()) == 1
    assert "head of guest tiny" in refused.stderr
    bad = cli(store, "squash", f"{ids['B']}..")
    assert bad.returncode == 2 and "FROM..TO with both ends" in bad.stderr
    squashed = cli(store, "squash", f"{ids['B'][:4]}..{ids['D'][:4]}")
    assert squashed.returncode == 0, squashed.stderr
    assert "squash: 2 layer(s) removed, 2 rewritten" in squashed.stdout
    no_rules = cli(store, "prune")
    assert no_rules.returncode == 2 and "at least one --keep" in no_rules.stderr
    swept = cli(store, "gc", "--json")
    assert swept.returncode == 0 and json.loads(swept.stdout)["removed"] == []


def test_a_store_with_a_damaged_layer_is_not_pruned(forked: tuple[Store, dict[str, str]]) -> None:
    store, ids = forked
    path = store.layer_path(ids["C"], "manifest.json")
    path.write_bytes(path.read_bytes().replace(b'"guest"', b'"gueSt"'))
    files = sorted(p.name for p in store.layers_path.iterdir())
    with pytest.raises(StoreError, match=rf"damaged layer \(layer {ids['C']}.*run vmckpt verify"):
        maintenance.prune(store, KeepRules(last=1))
    assert sorted(p.name for p in store.layers_path.iterdir()) == files


def test_which_guests_are_gone(tmp_path: Path) -> None:
    from vmckpt.guests.local import RECORD, GuestRecord, gone_guests
    from vmckpt.machine.qemu import QemuProcess, process_start_time
    from vmckpt.machine.spec import GuestSpec

    store = Store.create(tmp_path / "store")
    image = random_image(np.random.default_rng(7))
    layer = store.write_layer(content(image, None, None, tag="0"))
    me = os.getpid()
    running = QemuProcess(
        name="up", pid=me, start_time=process_start_time(me) or 0, qmp_socket=tmp_path / "q",
        serial_log=tmp_path / "s", log=tmp_path / "l",
    )  # fmt: skip
    store.host.write_record("up", RECORD, GuestRecord("up", GuestSpec(), running).to_dict())
    store.host.write_record("down", RECORD, GuestRecord("down", GuestSpec(), None).to_dict())
    store.host.write_record("damaged", RECORD, {"name": "damaged"})
    store.host.write_record("away", RECORD, GuestRecord("away", GuestSpec(), None).to_dict())
    store.host.write_record(
        "away", "remote.json", {"name": "away", "host": "elsewhere"}, durable=True
    )
    # A guest of this host known only by its head (its runtime files went with a reboot).
    store.set_head("headonly", layer.id)
    assert gone_guests(store, 0.0) == [("guest", "down"), ("guest", "headonly")]
    assert gone_guests(store, 3600.0) == []  # all of them changed just now
    with store.host.guest_lock("down", what="test", wait_s=0):
        assert gone_guests(store, 0.0) == [("guest", "headonly")]  # a checkpoint is under way


def test_a_reader_holds_off_the_switch(
    forked: tuple[Store, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore or verify reading a chain: the prune waits for it, then gives up with
    nothing changed (watch's prune waits briefly, so its checkpoints are not held up)."""
    from vmckpt.errors import LockError

    store, _ = forked
    monkeypatch.setattr(maintenance, "SWITCH_WAIT_MIN_S", 0.2)
    files = {p: p.read_bytes() for p in store.layers_path.rglob("*") if p.is_file()}
    with store.reading("a restore"), pytest.raises(LockError, match="being read"):
        maintenance.prune(store, KeepRules(last=1), wait_s=0.0)
    assert {p: p.read_bytes() for p in store.layers_path.rglob("*") if p.is_file()} == files
    assert maintenance.prune(store, KeepRules(last=1), wait_s=0.0).removed


def test_a_failed_write_of_a_new_version_changes_nothing(
    forked: tuple[Store, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, ids = forked
    files = {p: p.read_bytes() for p in store.layers_path.rglob("*") if p.is_file()}
    real = os.fsync
    calls = 0

    def full_disk(fd: int) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:  # the first new version's third file
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(StoreError, match=r"cannot write its new version \(No space left"):
        maintenance.prune(store, KeepRules(last=1))
    monkeypatch.undo()
    assert {p: p.read_bytes() for p in store.layers_path.rglob("*") if p.is_file()} == files
    assert store.verify() == store.layer_ids()
    assert ids["A"] in store.layer_ids()
