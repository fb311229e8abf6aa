"""Writable disks: captured at the memory's instant, one delta per layer, restored from any layer.

The guest's disk workload (guest/diskload.c) writes raw 4 KiB blocks to
/dev/vda with O_DIRECT and keeps in memory which block holds which write; it
re-reads every written block every 20 steps and prints DISKBAD on any
mismatch. A restore whose disk is not that of the memory's instant (older or
newer) therefore shows up as DISKBAD, and its DISK sums must match the
original run's for the same seq.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.framework.guest import GUEST_BUILD, Vmckpt, guest_append, tail, wait_for

DISK_LINE = re.compile(r"^DISK seq=(\d+) sum=([0-9a-f]{16}) ok$", re.MULTILINE)
DISK_SIZE = 64 << 20
FULL_PASS = 20  # diskload's default vmckpt.disk_check_every


def disk_states(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for m in DISK_LINE.finditer(text)}


def run_disk_guest(vmckpt: Vmckpt, name: str, image: Path) -> None:
    vmckpt.started.add(name)
    vmckpt(
        "run", name, "--store", str(vmckpt.store), "--create",
        "--kernel", str(GUEST_BUILD / "vmlinuz"),
        "--initrd", str(GUEST_BUILD / "initrd.img"),
        "--append", guest_append(pages=4, buf_mb=16) + " vmckpt.disk=/dev/vda",
        "--memory", "256M", "--accel", "tcg", "--detach", "--disk", str(image),
    )  # fmt: skip


def wait_disk(vmckpt: Vmckpt, name: str, count: int, timeout: float = 150.0) -> dict[int, str]:
    return wait_for(
        lambda: states if len(states := disk_states(vmckpt.serial(name))) >= count else None,
        f"guest {name} printing {count} DISK lines",
        timeout,
        evidence=lambda: f"console of {name}:\n{tail(vmckpt.serial(name))}",
    )


def checkpoint(vmckpt: Vmckpt, name: str) -> str:
    out = vmckpt("checkpoint", name, "--store", str(vmckpt.store), "--json")
    return str(json.loads(out.stdout)["layer"])


def bitmaps(vmckpt: Vmckpt, name: str) -> tuple[str, ...]:
    record = vmckpt.guest(name).record
    assert record.process is not None
    with vmckpt.monitor(name) as mon:
        nodes = {node.node_name: node for node in mon.block_nodes()}
        assert not any(n.startswith("vmckpt-backup") for n in nodes), nodes
        assert mon.jobs() == {}
        return nodes["vmckpt-disk0"].bitmaps


@pytest.mark.qemu
@pytest.mark.parametrize("image_format", ["qcow2", "raw"])
def test_disk_restored_from_middle_and_last_layer(
    vmckpt: Vmckpt, tmp_path: Path, image_format: str
) -> None:
    image = tmp_path / f"disk.{image_format}"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", image_format, str(image), str(DISK_SIZE)], check=True
    )
    run_disk_guest(vmckpt, "dk", image)
    wait_disk(vmckpt, "dk", 10)
    layers = []
    for _ in range(3):
        layers.append(checkpoint(vmckpt, "dk"))
        wait_disk(vmckpt, "dk", len(disk_states(vmckpt.serial("dk"))) + 15)
    original = disk_states(vmckpt.serial("dk"))
    assert "DISKBAD" not in vmckpt.serial("dk")
    vmckpt("verify", "--store", str(vmckpt.store))
    vmckpt("stop", "dk", "--store", str(vmckpt.store))

    # Each layer records the disk; later ones only what was written since the parent.
    records = []
    for layer in layers:
        shown = json.loads(vmckpt("inspect", "--store", str(vmckpt.store), layer, "--json").stdout)
        assert shown["format_version"] == "1.3"  # disks since 1.1, page digests 1.2, seals 1.3
        (disk,) = shown["disks"]
        assert disk["size"] == DISK_SIZE and disk["format"] == image_format
        records.append(disk)
    assert records[0]["full"] and not records[1]["full"] and not records[2]["full"]
    for disk in records[1:]:
        assert 0 < disk["bytes_stored"] * 10 < DISK_SIZE, disk
    human = vmckpt("inspect", "--store", str(vmckpt.store), layers[1]).stdout
    assert "disk disk0" in human and "delta" in human

    for layer in (layers[1], layers[2]):
        vmckpt.restore("--layer", layer, "--name", "dk")
        restored = wait_disk(vmckpt, "dk", FULL_PASS + 5)
        text = vmckpt.serial("dk")
        assert "DISKBAD" not in text, text[-1500:]
        overlap = [seq for seq in restored if seq in original]
        assert overlap, "the restored run does not overlap the original one"
        for seq in overlap:
            assert restored[seq] == original[seq], f"DISK seq {seq} differs from the original"
        # A full verification pass over every written block ran after the restore.
        assert any(seq % FULL_PASS == 0 for seq in restored)
        # The restored guest tracks its disk again: its next layer is a delta.
        again = checkpoint(vmckpt, "dk")
        shown = json.loads(vmckpt("inspect", "--store", str(vmckpt.store), again, "--json").stdout)
        assert shown["parent"] == layer
        assert not shown["disks"][0]["full"]
        vmckpt("stop", "dk", "--store", str(vmckpt.store))


@pytest.mark.qemu
def test_failed_checkpoint_keeps_disk_tracking(vmckpt: Vmckpt, tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M"], check=True)
    run_disk_guest(vmckpt, "df", image)
    wait_disk(vmckpt, "df", 5)
    first = checkpoint(vmckpt, "df")
    tracked = bitmaps(vmckpt, "df")
    assert len(tracked) == 1
    failed = vmckpt(
        "checkpoint", "df", "--store", str(vmckpt.store),
        check=False, env={"VMCKPT_FAULT": "receiver-dies-after:1000000"},
    )  # fmt: skip
    assert failed.returncode != 0
    # Nothing the failed checkpoint added is left; the parent's bitmap is intact.
    assert bitmaps(vmckpt, "df") == tracked
    seen = len(disk_states(vmckpt.serial("df")))
    wait_disk(vmckpt, "df", seen + 3)
    second = checkpoint(vmckpt, "df")
    shown = json.loads(vmckpt("inspect", "--store", str(vmckpt.store), second, "--json").stdout)
    assert shown["parent"] == first and not shown["disks"][0]["full"]
    wait_disk(vmckpt, "df", len(disk_states(vmckpt.serial("df"))) + 3)
    vmckpt("stop", "df", "--store", str(vmckpt.store))
    vmckpt.restore("--layer", second, "--name", "df")
    wait_disk(vmckpt, "df", FULL_PASS + 3)
    assert "DISKBAD" not in vmckpt.serial("df")
