"""Restore of a disk guest: before (every restore composes the whole disk as a new raw image,
benchmarks/disk_restore_before.py) against after (a qcow2 overlay on the disk's base, written
out once per host and shared, with the later deltas written into the overlay).

For each virtual disk size (``--disks``, default 2G and 20G): a qcow2 image with ``--fill`` of
data written across its first gigabytes (as an installed system's root disk holds), the test
guest (``--memory``, TCG) running its disk workload on the disk's first 256 MiB
(guest/diskload.c: random 4 KiB writes, checked against its memory; the data lies after
that), checkpointed ``--layers`` + 1 times (precopy-diff): the base and ``--layers`` deltas.
Then each of the base and the last layer is restored ``--repeat`` times each way, and, as
the reference, the same guest without a disk, checkpointed as often, its layer at the same
place (base or last) restored right after each "after" restore (so both compose a chain as
long and see the same load on a shared machine). "of it the disk": the part of the time to
running spent rebuilding the disks; "vs no disk": the median over the "after" restores of
each one's time to running over that of the diskless restore right after it.

Per restore: time to running (``restore_guest``'s compose + load, up to the moment the guest
resumes; the 1 s it then watches the guest is left out) and bytes written (the blocks the
rebuilt disks allocate in this host's data directory of the store, the restored disk
directory and any base written now, measured as the rebuild returns, before the guest
runs). "after, first" is a restore on a host without the base (it writes the base once);
"after" is a later one. Each restored guest must run on with its disk as its memory expects
(no DISKBAD before it is stopped).

    python -m benchmarks.disk_restore --disks 2G,20G --json /tmp/disk-restore.json

Benchmarks print numbers; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import vmckpt.mechanisms.lazy_restore as lazy_restore_module
import vmckpt.mechanisms.restore as restore_module
from benchmarks import disk_restore_before
from vmckpt.guests.local import LocalGuest
from vmckpt.images import Store
from vmckpt.images.disks import BASES_DIR
from vmckpt.machine.binary import parse_memory
from vmckpt.machine.spec import BootMedium, DiskSpec, GuestSpec
from vmckpt.mechanisms.precopy import take_checkpoint
from vmckpt.mechanisms.restore import restore_guest

REPO_GUEST = Path(__file__).resolve().parent.parent / "guest" / "build"
GUEST = "dk"
APPEND = "console=ttyS0 quiet panic=-1 vmckpt.buf_mb=16 vmckpt.pages=4"
WORKLOAD = 256 << 20  # the disk workload's part of the disk (its first 256 MiB); data after it


@dataclass
class Row:
    disk: str  # virtual size
    layer: str  # "base", "layer 10", "no disk"
    mode: str  # "before", "after, first", "after", "no disk"
    deltas_bytes: int  # data the layers above the base hold for the disk
    running_s: list[float] = field(default_factory=list)
    written: list[int] = field(default_factory=list)
    rebuild_s: list[float] = field(default_factory=list)  # of the time to running: the disks
    # "after": each restore's time to running over that of the diskless restore right after it
    vs_no_disk: list[float] = field(default_factory=list)

    @property
    def median_running_s(self) -> float:
        return statistics.median(self.running_s)

    @property
    def median_written(self) -> int | None:
        """None for a row that writes no disk (the reference without one)."""
        return int(statistics.median(self.written)) if self.written else None


def allocated(root: Path) -> int:
    """Bytes allocated by the files under ``root``."""
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def serial(store: Store) -> str:
    path = store.host.runtime_path(GUEST) / "serial.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_lines(store: Store, marker: str, count: int, timeout: float) -> str:
    """Wait (polling the console log) until it holds ``count`` lines starting ``marker``."""
    deadline = time.monotonic() + timeout
    while True:
        text = serial(store)
        if "DISKBAD" in text or " BAD" in text:
            raise SystemExit(f"the guest reports BAD:\n{text[-2000:]}")
        if text.count(marker) >= count:
            return text
        if time.monotonic() > deadline:
            raise SystemExit(f"fewer than {count} {marker!r} lines in {timeout:.0f} s")
        time.sleep(0.2)


def make_disk(path: Path, size: int, fill: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    chunk = 64 << 20
    spread = (min(size, 4 << 30) - WORKLOAD) // max(1, fill // chunk)
    commands = []
    for number in range(fill // chunk):
        at = WORKLOAD + number * spread
        commands += ["-c", f"write -q -P {0x11 + number % 200} {at} {chunk}"]
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(path)], check=True)


@contextlib.contextmanager
def rebuilding(before: bool, row: Row, data: Path) -> Iterator[None]:
    """Restores rebuild disks as vmckpt does now, or (``before``) as it did before (the whole
    disk per restore); what each rebuild allocated in ``data`` is appended to ``written``,
    measured as the rebuild returns (before the restored guest runs and writes itself)."""
    # Both restores (the full one, and the lazy one a restore is by default) rebuild disks
    # through the name each imported.
    spaces = [vars(restore_module), vars(lazy_restore_module)]
    current = spaces[0]["materialize"]
    chosen = disk_restore_before.materialize if before else current

    def measured(*args: Any, **kwargs: Any) -> Any:
        start = allocated(data)
        started = time.monotonic()
        result = chosen(*args, **kwargs)
        row.rebuild_s.append(time.monotonic() - started)
        row.written.append(allocated(data) - start)
        return result

    for names in spaces:
        names["materialize"] = measured
    try:
        yield
    finally:
        for names in spaces:
            names["materialize"] = current


def one_restore(store: Store, layer: str, row: Row) -> None:
    """Restore ``layer``, check the guest runs on, record time to running and bytes written."""
    with rebuilding(row.mode == "before", row, store.host.data):
        result = restore_guest(store, layer, GUEST)
    row.running_s.append(result.compose_s + result.load_s)
    try:
        seen = serial(store).count("STATE seq=")
        wait_lines(store, "STATE seq=", seen + 2, 120)
    finally:
        LocalGuest(store, GUEST).stop()
    for stale in store.host.data_dir(GUEST).glob("disks-*"):
        shutil.rmtree(stale)


def checkpoints(store: Store, guest: LocalGuest, count: int) -> list[str]:
    ids = []
    for _ in range(count):
        seen = serial(store).count("STATE seq=")
        wait_lines(store, "STATE seq=", seen + 2, 120)
        ids.append(take_checkpoint(guest).layer.id)
    return ids


def bench_disk(
    args: argparse.Namespace, size_text: str, scratch: Path, nodisk: Reference
) -> list[Row]:
    size = parse_memory(size_text) << 20
    store = Store.create(scratch / f"store-{size_text}")
    image = scratch / f"disk-{size_text}.qcow2"
    make_disk(image, size, parse_memory(args.fill) << 20)
    spec = GuestSpec(
        memory_mib=parse_memory(args.memory),
        accel="tcg",
        media=(BootMedium.of("kernel", args.kernel), BootMedium.of("initrd", args.initrd)),
        append=f"{APPEND} vmckpt.disk=/dev/vda vmckpt.disk_blocks={WORKLOAD // 4096}",
        disks=(DiskSpec.of("disk0", image),),
    )
    guest = LocalGuest.start(store, GUEST, spec)
    try:
        wait_lines(store, "DISK seq=", 1, 300)
        ids = checkpoints(store, guest, args.layers + 1)
    finally:
        guest.stop()
    rows = []
    for label, layer in (("base", ids[0]), (f"layer {args.layers}", ids[-1])):
        manifest = store.manifest(layer)
        deltas = 0
        for step in store.chain(layer)[1:]:
            record = step.disk("disk0")
            deltas += record.bytes_stored if record else 0
        before = Row(size_text, label, "before", deltas)
        first = Row(size_text, label, "after, first", deltas)
        after = Row(size_text, label, "after", deltas)
        for _ in range(args.repeat if "before" in args.modes else 0):
            one_restore(store, manifest.id, before)
        for _ in range(args.repeat if "after" in args.modes else 0):
            shutil.rmtree(store.host.data / BASES_DIR, ignore_errors=True)
            one_restore(store, manifest.id, first)
            one_restore(store, manifest.id, after)
            nodisk.restore(label, size_text)
            after.vs_no_disk.append(after.running_s[-1] / nodisk.rows[label].running_s[-1])
        rows += [row for row in (before, first, after) if row.running_s]
        print(format_table([*rows, *nodisk.rows.values()], ""), file=sys.stderr)
    shutil.rmtree(store.path)
    shutil.rmtree(store.host.data, ignore_errors=True)
    image.unlink()
    return rows


@dataclass
class Reference:
    """The same guest without a disk, checkpointed as often: its layer at the same place in
    its chain (base or last) restored right after each "after" restore of a disk guest, so
    that both compose a chain as long and see the same load on a shared machine."""

    store: Store
    ids: list[str]
    rows: dict[str, Row] = field(default_factory=dict)

    def restore(self, label: str, size: str) -> None:
        row = self.rows.setdefault(label, Row("-", label, "no disk", 0))
        one_restore(self.store, self.ids[0] if label == "base" else self.ids[-1], row)
        row.disk = size if row.disk in ("-", size) else "all"


def reference(args: argparse.Namespace, scratch: Path) -> Reference:
    store = Store.create(scratch / "store-nodisk")
    spec = GuestSpec(
        memory_mib=parse_memory(args.memory),
        accel="tcg",
        media=(BootMedium.of("kernel", args.kernel), BootMedium.of("initrd", args.initrd)),
        append=APPEND,
    )
    guest = LocalGuest.start(store, GUEST, spec)
    try:
        ids = checkpoints(store, guest, args.layers + 1)
    finally:
        guest.stop()
    return Reference(store, ids)


def format_table(rows: Sequence[Row], title: str) -> str:
    lines = [
        title, "",
        "| disk | layer | disk rebuilt | time to running (median) | of it the disk "
        "| bytes written (median) | deltas above the base | written / deltas | vs no disk |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for row in rows:
        if not row.running_s:
            continue
        written = row.median_written
        ratio = f"{written / row.deltas_bytes:.2f}" if row.deltas_bytes and written else "-"
        rebuild = f"{statistics.median(row.rebuild_s):.2f} s" if row.rebuild_s else "-"
        shown = f"{written / 1e6:.1f} MB" if written is not None else "-"
        versus = f"{statistics.median(row.vs_no_disk):.2f}x" if row.vs_no_disk else "-"
        lines.append(
            f"| {row.disk} | {row.layer} | {row.mode} | {row.median_running_s:.2f} s "
            f"({len(row.running_s)}) | {rebuild} | {shown} | "
            f"{row.deltas_bytes / 1e6:.1f} MB | {ratio} | {versus} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disk_restore", description=__doc__.split("\n")[0])
    p.add_argument("--disks", default="2G,20G", help="virtual disk sizes (default 2G,20G)")
    p.add_argument("--fill", default="512M", help="data written into each disk first")
    p.add_argument("--memory", default="1G")
    p.add_argument("--layers", type=int, default=10, help="deltas above the base (default 10)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--modes",
        default="before,after",
        type=lambda text: set(text.split(",")),
        help="before, after or both (default; the no-disk reference always runs)",
    )
    p.add_argument("--kernel", type=Path, default=REPO_GUEST / "vmlinuz")
    p.add_argument("--initrd", type=Path, default=REPO_GUEST / "initrd.img")
    p.add_argument("--scratch", type=Path, default=None, help="where stores and disks go")
    p.add_argument("--json", type=Path, default=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="vk-diskbench-", dir=args.scratch))
    os.environ.setdefault("VMCKPT_DATA_DIR", str(scratch / "data"))
    os.environ.setdefault("VMCKPT_RUNTIME_DIR", str(scratch / "run"))
    os.environ.setdefault("VMCKPT_KEYS_DIR", str(scratch / "keys"))
    try:
        rows: list[Row] = []
        nodisk = reference(args, scratch)
        for size in args.disks.split(","):
            rows += bench_disk(args, size, scratch, nodisk)
        rows += nodisk.rows.values()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    title = (
        f"vmckpt restore of a disk guest: the test guest ({args.memory}, TCG) with its disk "
        f"workload on a qcow2 disk holding {args.fill} of data, {args.layers + 1} precopy-diff "
        f"checkpoints; {args.repeat} restores each (medians); before = the whole disk composed "
        "per restore, after = an overlay on the shared base with the deltas written into it "
        "(first: the base written now)"
    )
    print(format_table(rows, title))
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
