"""Restored disks in O(changes): a qcow2 overlay on the disk's base, written out once per host
and shared, with the later layers' deltas written into the overlay (no guest is booted:
qemu-img and qemu-storage-daemon only).

Each test builds a chain of layers whose disk it knows byte for byte at every layer, so what
a restore gives can be compared with what the disk was.
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.test_images import content, mutate, random_image
from vmckpt.errors import CorruptLayerError, StoreError
from vmckpt.images import DiskDelta, Store, maintenance
from vmckpt.images.disks import BASES_DIR, OVERLAY_SUFFIX, backing_name, disk_plan
from vmckpt.machine.nbd import ImageWriter
from vmckpt.machine.spec import DiskSpec
from vmckpt.mechanisms.disk_restore import DiskRestoreStats, build_overlay, materialize

SIZE = 8 << 20


def layer_tree(store: Store) -> dict[str, str]:
    """The SHA-256 of every file of the store's layers, by path."""
    result = {}
    for path in sorted((store.path / "layers").rglob("*")):
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            result[str(path.relative_to(store.path))] = digest
    return result


def read_disk(image: Path, tmp: Path) -> bytes:
    out = tmp / f"read-{image.name}.raw"
    out.unlink(missing_ok=True)
    subprocess.run(
        ["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(out)], check=True
    )
    data = out.read_bytes()
    out.unlink()
    return data


def make_chain(
    store: Store, tmp: Path, rng: np.random.Generator, layers: int = 6
) -> tuple[list[str], list[bytes]]:
    """A chain of ``layers`` layers with one disk ``vda``: the base holds it in full, each later
    layer rewrites a few ranges (aligned to 512 bytes, not to clusters) and zeroes one.
    Returns the layer ids and the disk at each."""
    disk = bytearray(SIZE)
    disk[: SIZE // 2] = rng.integers(0, 256, SIZE // 2, dtype=np.uint8).tobytes()
    images = [random_image(rng)]
    ids: list[str] = []
    states: list[bytes] = []
    parent = None
    for number in range(layers):
        zeroed: list[tuple[int, int]] = []
        if number:
            images.append(mutate(images[-1], rng))
            stored: list[tuple[int, int]] = []
            for start in sorted(int(x) * 512 for x in rng.choice(SIZE // 512 // 4, 3, False) * 4):
                length = int(rng.integers(1, 300)) * 512
                if stored and stored[-1][0] + stored[-1][1] >= start:
                    continue
                length = min(length, SIZE - start)
                disk[start : start + length] = rng.integers(0, 256, length, np.uint8).tobytes()
                stored.append((start, length))
            zero_at = int(rng.integers(0, SIZE // 65536)) * 65536
            if not any(s < zero_at + 65536 and zero_at < s + n for s, n in stored):
                disk[zero_at : zero_at + 65536] = bytes(65536)
                zeroed.append((zero_at, 65536))
        else:
            stored = [(0, SIZE // 2)]
        scratch = tmp / f"delta-{number}.bin"
        scratch.write_bytes(b"".join(bytes(disk[o : o + n]) for o, n in stored))
        layer = content(images[-1], parent, images[-2] if number else None, tag=str(number))
        layer.disks = [
            DiskDelta(
                id="vda", format="qcow2", size=SIZE, path="/images/vda.qcow2", full=not number,
                stored=tuple(stored), zeroed=tuple(zeroed), data_path=scratch, bitmap=None,
            )
        ]  # fmt: skip
        parent = store.write_layer(layer).id
        ids.append(parent)
        states.append(bytes(disk))
    return ids, states


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(23)


@pytest.fixture(params=["clear", "encrypted"])
def store(tmp_path: Path, store_keys: Path, request: pytest.FixtureRequest) -> Store:
    return Store.create(tmp_path / "store", encrypt=request.param == "encrypted")


def spec_disk() -> DiskSpec:
    return DiskSpec(id="vda", path="/images/vda.qcow2", format="qcow2", size=SIZE)


def test_each_layer_restores_to_its_disk_over_one_shared_base(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    ids, states = make_chain(store, tmp_path, rng)
    before = layer_tree(store)
    overlays: list[Path] = []
    bases: set[str] = set()
    for number, layer_id in enumerate(ids):
        stats = DiskRestoreStats()
        overlay = tmp_path / f"restored-{number}.qcow2"
        base = build_overlay(store, layer_id, "vda", overlay, vm="t", stats=stats)
        bases.add(str(base))
        assert read_disk(overlay, tmp_path) == states[number], f"layer {number}"
        # The base is made by the first restore only; later ones write their deltas alone.
        assert stats.bases_made == (1 if number == 0 else 0)
        plan = disk_plan(store, layer_id, "vda")
        assert len(plan.deltas) == number
        assert stats.delta_bytes == plan.delta_bytes
        info = os.lstat(base)
        assert stat.S_IMODE(info.st_mode) == 0o400 and info.st_nlink == 1
        assert base.parent.name == BASES_DIR and base.parent.parent == store.host.data
        overlays.append(overlay)
    assert len(bases) == 1
    base = Path(bases.pop())
    assert base.read_bytes() == states[0]  # the base holds the base layer's disk, unchanged
    assert layer_tree(store) == before  # the store's files untouched
    # The overlay holds the changes, not the disk (a cluster per changed range at most).
    last = overlays[-1]
    assert last.stat().st_blocks * 512 < SIZE // 4


def test_two_restores_are_independent_and_leave_the_base_alone(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    ids, states = make_chain(store, tmp_path, rng, layers=3)
    first_dir = store.host.fresh(store.host.data_dir("g1"), "disks-")
    second_dir = store.host.fresh(store.host.data_dir("g2"), "disks-")
    manifest = store.manifest(ids[-1])
    (first,) = materialize(store, manifest, [spec_disk()], first_dir, vm="g1")
    (second,) = materialize(store, manifest, [spec_disk()], second_dir, vm="g2")
    assert first.backing == second.backing and first.path != second.path
    base = Path(first.backing)
    base_digest = hashlib.sha256(base.read_bytes()).hexdigest()
    # The first restored guest writes over its disk; the second sees none of it.
    with ImageWriter(Path(first.path), "qcow2", vm="g1") as writer:
        writer.write(4096, b"\xa5" * 65536)
        writer.write_zeroes(SIZE - 65536, 65536)
    changed = bytearray(states[-1])
    changed[4096 : 4096 + 65536] = b"\xa5" * 65536
    changed[SIZE - 65536 :] = bytes(65536)
    assert read_disk(Path(first.path), tmp_path) == bytes(changed)
    assert read_disk(Path(second.path), tmp_path) == states[-1]
    assert hashlib.sha256(base.read_bytes()).hexdigest() == base_digest
    assert base.read_bytes() == states[0]


def test_a_damaged_delta_removes_the_overlay_and_keeps_the_base(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    ids, states = make_chain(store, tmp_path, rng, layers=3)
    build_overlay(store, ids[0], "vda", tmp_path / "first.qcow2", vm="t")
    data = store.path / "layers" / ids[2] / "disk-vda.bin"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 1
    data.chmod(0o600)
    data.write_bytes(bytes(raw))
    directory = store.host.fresh(store.host.data_dir("g"), "disks-")
    with pytest.raises((CorruptLayerError, StoreError)) as info:
        materialize(store, store.manifest(ids[2]), [spec_disk()], directory, vm="g")
    assert ids[2] in info.value.one_line()
    assert list(directory.iterdir()) == []  # the overlay is gone
    bases = list((store.host.data / BASES_DIR).glob("*.raw"))
    assert len(bases) == 1 and bases[0].read_bytes() == states[0]


@pytest.mark.parametrize("damage", ["mode", "link", "symlink", "size"])
def test_a_base_that_is_not_what_vmckpt_left_is_refused(
    store: Store, tmp_path: Path, rng: np.random.Generator, damage: str
) -> None:
    ids, _states = make_chain(store, tmp_path, rng, layers=2)
    base = build_overlay(store, ids[1], "vda", tmp_path / "first.qcow2", vm="t")
    if damage == "mode":
        base.chmod(0o600)
    elif damage == "link":
        os.link(base, tmp_path / "another-name")
    elif damage == "symlink":
        elsewhere = tmp_path / "elsewhere.raw"
        elsewhere.write_bytes(base.read_bytes())
        elsewhere.chmod(0o400)
        base.unlink()
        base.symlink_to(elsewhere)
    else:
        base.chmod(0o600)
        with base.open("ab") as grow:
            grow.write(b"x" * 512)
        base.chmod(0o400)
    with pytest.raises(StoreError) as info:
        build_overlay(store, ids[1], "vda", tmp_path / "second.qcow2", vm="t")
    assert str(base) in info.value.one_line() and "refused" in info.value.one_line()


def test_gc_removes_only_the_bases_nothing_needs(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    ids, _states = make_chain(store, tmp_path, rng, layers=2)
    directory = store.host.fresh(store.host.data_dir("g"), "disks-")
    (disk,) = materialize(store, store.manifest(ids[1]), [spec_disk()], directory, vm="g")
    base = Path(disk.backing)
    bases = base.parent
    # Bases of layers no longer in the store: one a restored disk still runs on, one not.
    used, unused = bases / ("a" * 40 + ".raw"), bases / ("b" * 40 + ".raw")
    for path in (used, unused):
        path.write_bytes(bytes(SIZE))
        path.chmod(0o400)
    on_used = directory / "disk-old.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(used),
                    str(on_used)], check=True)  # fmt: skip
    # An empty overlay kept for a base that is gone goes too; the one of a kept base stays.
    template = base.with_name(base.name + OVERLAY_SUFFIX)
    orphan = bases / ("c" * 40 + ".raw" + OVERLAY_SUFFIX)
    orphan.write_bytes(template.read_bytes())
    removed = {Path(g.path) for g in maintenance.gc(store, [])}
    assert unused in removed and not unused.exists()
    assert orphan in removed and not orphan.exists()
    assert used.exists() and base.exists() and used not in removed and base not in removed
    assert template.exists()
    # Without the restored disk on it, the layer's own base stays (the next restore uses it).
    Path(disk.path).unlink()
    on_used.unlink()
    removed = {Path(g.path) for g in maintenance.gc(store, [])}
    assert base.exists() and removed == {used}


def test_the_empty_overlay_is_made_once_and_one_naming_another_file_is_made_again(
    store: Store, tmp_path: Path, rng: np.random.Generator
) -> None:
    ids, states = make_chain(store, tmp_path, rng, layers=3)
    base = build_overlay(store, ids[2], "vda", tmp_path / "first.qcow2", vm="t")
    template = base.with_name(base.name + OVERLAY_SUFFIX)
    assert stat.S_IMODE(template.lstat().st_mode) == 0o400
    assert backing_name(template) == str(base)
    made = template.stat().st_ino
    build_overlay(store, ids[1], "vda", tmp_path / "second.qcow2", vm="t")
    assert template.stat().st_ino == made  # copied, not made again
    assert read_disk(tmp_path / "second.qcow2", tmp_path) == states[1]
    # A template that names another backing file is not used.
    planted = tmp_path / "planted.qcow2"
    elsewhere = str(tmp_path / "delta-0.bin")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", elsewhere,
                    str(planted), str(SIZE)], check=True)  # fmt: skip
    template.chmod(0o600)
    template.write_bytes(planted.read_bytes())
    template.chmod(0o400)
    build_overlay(store, ids[2], "vda", tmp_path / "third.qcow2", vm="t")
    assert backing_name(tmp_path / "third.qcow2") == str(base)
    assert backing_name(template) == str(base)
    assert read_disk(tmp_path / "third.qcow2", tmp_path) == states[2]


def test_writes_in_flight_at_once_land_as_written_in_order(tmp_path: Path) -> None:
    """The writer keeps several writes in flight; one to a place a write in flight covers
    must still land after it (the server may complete those in any order)."""
    image = tmp_path / "w.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "4M"], check=True)
    expected = bytearray(4 << 20)
    with ImageWriter(image, "qcow2", vm="t", durable=False) as writer:
        for number in range(40):
            writer.write(0, bytes([number + 1]) * 65536)  # one place, over and over
            writer.write_zeroes(65536, 65536)
            writer.write(65536 + 512 * number, bytes([number + 1]) * 512)
            at = (2 + number) * 65536  # and ones that overlap nothing
            writer.write(at, bytes([number + 7]) * 4096)
            expected[at : at + 4096] = bytes([number + 7]) * 4096
    expected[:65536] = bytes([40]) * 65536
    expected[65536 + 512 * 39 : 65536 + 512 * 40] = bytes([40]) * 512
    assert read_disk(image, tmp_path) == bytes(expected)
