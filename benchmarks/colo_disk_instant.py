"""Where and how to capture a writable disk's instant in a COLO checkpoint: measured.

vmckpt acknowledges each COLO checkpoint, and QEMU resumes the guest only then,
so the disks' point-in-time capture can be issued inside the pause
(vmckpt/disk_capture.py). This probe boots one test guest with a writable disk
and its disk workload on QEMU 11 and runs a COLO session in this process per
variant, ``--count`` checkpoints each, one per ``--interval``, ``--rounds``
times interleaved:

- ``none``: no disk capture at all (the layers lack the disk: the floor to
  compare with, never a way to checkpoint);
- ``serial``: one ``transaction`` (a new bitmap, a ``sync: bitmap`` backup job
  into a scratch target) after the checkpoint was read, before the
  acknowledgement;
- ``thread``: the same transaction sent and awaited by a thread of its own,
  started as soon as QEMU has stopped the guest (VMSTATE_SEND), while the
  receiving thread reads the pages;
- ``transaction``: the same transaction sent by the receiving thread itself at
  VMSTATE_SEND on the session's directly spoken monitor, its answer taken once
  the pages are read;
- ``prearmed``: as ``transaction``, but the bitmap added before the checkpoint
  is asked for: only the ``sync: bitmap`` backup in the pause;
- ``fleecing``: what vmckpt does: the bitmap added before, and in the pause one
  ``sync: none`` backup into a fleece image (a copy-before-write filter, no
  copying); the dirty clusters are copied out of the instant's snapshot after
  the acknowledgement.

(Waiting for the transaction's answer before reading the pages deadlocks on
QEMU 11: QEMU holds its big lock while it sends the pages, so its monitor runs
the command only once they are read.)

It prints, per variant, the pause (median, p95, from QEMU's STOP/RESUME
timestamps), the instant's time from sending to answer, how long the
acknowledgement waited for it, and the wall time per checkpoint. Benchmarks
never assert.

    python -m benchmarks.colo_disk_instant --qemu $QEMU11 --memory 256M --count 20 --rounds 3

``--pages N``: the guest writes N pages per 100 ms step (default 4; 100 is the 1,000 page
writes a second of ``make bench``'s disk table). ``--breakdown``: the guest's QEMU traces
its own pause, and each variant's pause is cut into its parts (benchmarks/colo_pause_trace.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.colo_pause_trace import Pause, format_breakdown, parse_pauses, trace_args
from vmckpt.errors import VmckptError
from vmckpt.guests.local import LocalGuest
from vmckpt.images import LayerManifest, Store
from vmckpt.machine.binary import parse_memory, qemu_binary, qemu_version
from vmckpt.machine.spec import BootMedium, DiskSpec, GuestSpec
from vmckpt.mechanisms.colo import ColoSession
from vmckpt.mechanisms.disk_capture import DiskTracker
from vmckpt.qmp import Monitor, Pending

REPO_GUEST = Path(__file__).resolve().parent.parent / "guest" / "build"
VARIANTS = ("none", "serial", "thread", "transaction", "prearmed", "fleecing")
DISK_BYTES = 64 << 20
APPEND = "console=ttyS0 quiet panic=-1 vmckpt.buf_mb=16 vmckpt.pages={pages} vmckpt.disk=/dev/vda"


class _PreArmed(DiskTracker):
    """Variant ``prearmed``: the bitmap before the pause, a sync=bitmap backup in it."""

    def arm(self, mon: Monitor) -> None:
        for capture in self._captures:
            if not capture.armed:
                mon.bitmap_add(capture.disk.node, capture.new_bitmap)
                capture.armed = True

    def begin_instant(self, mon: Monitor) -> Pending | None:
        (capture,) = self._captures
        backup: dict[str, object] = {
            "device": capture.disk.node, "target": capture.target_node, "job-id": capture.job,
            "auto-finalize": True, "auto-dismiss": False,
        }  # fmt: skip
        if capture.old_bitmap is None:
            backup["sync"] = "full"
        else:
            backup.update(sync="bitmap", bitmap=capture.old_bitmap, **{"bitmap-mode": "never"})
        return mon.submit("blockdev-backup", backup)


class _Variant(ColoSession):
    """The session with the disks' instant placed as ``variant`` says."""

    def __init__(self, guest: LocalGuest, variant: str) -> None:
        super().__init__(guest)
        self.variant = variant
        self._thread: threading.Thread | None = None
        self._thread_error: VmckptError | None = None

    def _disk_tracker(
        self,
        *,
        parent: LayerManifest | None,
        since: dict[str, str] | None,
        activate: bool = False,
        fleecing: bool = True,
    ) -> DiskTracker:
        if not fleecing or self.variant == "fleecing":  # the opening, or vmckpt's own
            return super()._disk_tracker(
                parent=parent, since=since, activate=activate, fleecing=fleecing
            )
        kind = _PreArmed if self.variant == "prearmed" else DiskTracker
        return kind(self.name, self.guest.spec().disks, parent,
                    self.store.host.scratch_dir(self.name), since=since)  # fmt: skip

    def _begin_disk_instant(self) -> None:
        if self.variant in ("transaction", "prearmed", "fleecing"):
            super()._begin_disk_instant()
        elif self.variant == "thread":
            self._disk_began = time.perf_counter()
            tracker, self._disk_next = self._disk_next, None
            self._disk_now = tracker
            self._thread_error = None

            def mark() -> None:
                assert tracker is not None and self.mon is not None
                try:
                    with self.mon_lock:
                        tracker.mark_instant(self.mon)
                except VmckptError as exc:
                    self._thread_error = exc

            self._thread = threading.Thread(target=mark, daemon=True)
            self._thread.start()

    def _end_disk_instant(
        self,
    ) -> tuple[DiskTracker | None, dict[str, Any], VmckptError | None]:
        if self.variant in ("transaction", "prearmed", "fleecing"):
            return super()._end_disk_instant()
        if self.variant == "none":
            return None, {}, None
        waited = time.perf_counter()
        if self.variant == "serial":
            self._disk_began = waited
            super()._begin_disk_instant()
            return super()._end_disk_instant()
        assert self._thread is not None  # thread
        self._thread.join()
        tracker, self._disk_now = self._disk_now, None
        now = time.perf_counter()
        stats = {
            "disk_instant_ms": round((now - self._disk_began) * 1000, 3),
            "disk_wait_ms": round((now - waited) * 1000, 3),
        }
        return tracker, stats, self._thread_error


def _boot(
    store: Store,
    memory_mib: int,
    disk: Path,
    image_format: str,
    pages: int,
    qemu_args: Sequence[str] = (),
) -> LocalGuest:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", image_format, str(disk), str(DISK_BYTES)], check=True
    )
    spec = GuestSpec(
        memory_mib=memory_mib,
        accel="tcg",
        media=(
            BootMedium.of("kernel", REPO_GUEST / "vmlinuz"),
            BootMedium.of("initrd", REPO_GUEST / "initrd.img"),
        ),
        append=APPEND.format(pages=pages),
        disks=(DiskSpec("disk0", str(disk), image_format, DISK_BYTES),),
    )
    guest = LocalGuest.start(store, "probe", spec, extra_args=tuple(qemu_args))
    serial = store.host.runtime_dir("probe") / "serial.log"
    deadline = time.monotonic() + 240
    while serial.read_bytes().count(b"DISK seq=") < 5:
        if time.monotonic() > deadline:
            raise RuntimeError("the guest's disk workload did not start")
        time.sleep(0.5)
    return guest


def _run(guest: LocalGuest, variant: str, count: int, interval: float) -> list[dict[str, Any]]:
    store = guest.store
    rows = []
    with store.host.guest_lock(guest.name, what="probe", wait_s=30), guest.guard():
        session = _Variant(guest, variant)
        try:
            session.open()
            next_at = time.monotonic()
            for _ in range(count):
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
                row = session.checkpoint()
                stats = store.manifest(str(row["layer"])).stats
                rows.append({**stats, "total_s": row["total_s"], "bytes": row["bytes"]})
        finally:
            session.close()
    return rows


def _summary(variant: str, rows: Sequence[dict[str, Any]]) -> str:
    def med(key: str) -> str:
        values = [float(r[key]) for r in rows if r.get(key) is not None]
        return f"{np.median(values):.2f}" if values else "-"

    pauses = [float(r["pause_ms"]) for r in rows if r.get("pause_ms") is not None]
    p95 = f"{np.percentile(pauses, 95):.2f}" if pauses else "-"
    return (
        f"{variant:<11} {len(rows):>3} {med('pause_ms'):>9} {p95:>7} {med('disk_instant_ms'):>11} "
        f"{med('disk_wait_ms'):>9} {med('pages_sent'):>6} {float(med('total_s')) * 1000:>8.0f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.colo_disk_instant",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--qemu", help="QEMU 11 (default: $VMCKPT_QEMU)")
    p.add_argument("--memory", default="256M")
    p.add_argument("--count", type=int, default=30)
    p.add_argument("--interval", type=float, default=0.5)
    p.add_argument("--format", default="qcow2", choices=["qcow2", "raw"])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--json", type=Path, help="write every checkpoint's layer stats here")
    p.add_argument("--rounds", type=int, default=3, help="each variant this often, interleaved")
    p.add_argument("--pages", type=int, default=4, help="pages the guest writes per 100 ms step")
    p.add_argument(
        "--breakdown",
        action="store_true",
        help="trace the guest's QEMU and print where each variant's pause goes",
    )
    args = p.parse_args(argv)
    if args.qemu:
        os.environ["VMCKPT_QEMU"] = args.qemu
    binary = qemu_binary()
    variants = [v for v in args.variants.split(",") if v]
    work = Path(tempfile.mkdtemp(prefix="vk-instant-"))
    store = Store.create(work / "store")
    disk = work / f"disk.{args.format}"
    trace_log = work / "qemu-trace.log"
    qemu_args = trace_args(work / "trace-events", trace_log) if args.breakdown else []
    guest = _boot(store, parse_memory(args.memory), disk, args.format, args.pages, qemu_args)
    results: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    windows: list[tuple[str, float, float]] = []  # variant, wall clock from, to
    pauses: list[Pause] = []
    try:
        for _ in range(args.rounds):
            for variant in variants:
                began = time.time()
                results[variant] += _run(guest, variant, args.count, args.interval)
                windows.append((variant, began, time.time()))
    finally:
        guest.stop()  # QEMU has then written all of its trace
        if args.breakdown and trace_log.exists():
            with trace_log.open(errors="replace") as log:
                pauses = parse_pauses(log)
        shutil.rmtree(work, ignore_errors=True)
    print(f"QEMU {qemu_version(binary)}, {args.memory} guest, {args.format} disk, "
          f"{args.count} checkpoints x {args.rounds} rounds per variant, one per "
          f"{args.interval} s")  # fmt: skip
    print(f"{'variant':<11} {'n':>3} {'pause ms':>9} {'p95':>7} {'instant ms':>11} "
          f"{'wait ms':>9} {'pages':>6} {'wall ms':>8}")  # fmt: skip
    for variant in variants:
        print(_summary(variant, results[variant]))
    if args.breakdown:
        for variant in variants:
            mine = [
                p for p in pauses
                if any(v == variant and a <= p.started <= b for v, a, b in windows)
            ]  # fmt: skip
            print(format_breakdown(variant, mine))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
