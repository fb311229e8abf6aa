"""precopy-diff in bounded memory: vmckpt's peak RSS per checkpoint against guest RAM, before
and after, and the pause under ``watch``, in one run.

For each RAM size one test guest is booted (the workload writing ``--rate`` pages a step in
a 64 MiB buffer) on the QEMU given (default: the system's, QEMU 10, where precopy-diff is
what vmckpt uses), and checkpointed ``--count`` + 1 times each way, every checkpoint in a
process of its own whose peak RSS (``ru_maxrss``, from ``wait4``) is its figure:

- ``before``: the way precopy-diff worked until bounded memory (kept here to measure it
  against): the whole migration received into a `RamImage`, the parent composed into a
  second one, diffed in memory, the layer written from the image; the migration driven
  through the general (asyncio) monitor, QEMU's downtime limit 50 ms from the start;
- ``after``: ``vmckpt checkpoint`` (each batch of pages diffed against this host's copy of
  the parent, read a batch at a time; the changed pages spilled to an unnamed file).

The first checkpoint of each is a base layer (``after``'s first composes the parent the
``before`` runs left, as after a restore). Then, on the ``--watch-size`` guest, the watch
pause: ``vmckpt watch --interval 1s`` for ``--watch-count`` checkpoints, and the same
number of ``before`` checkpoints in one process that keeps the previous image as the next
diff's base (how watch worked before). Pauses come from QEMU's STOP/RESUME events.

Benchmarks print numbers; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmckpt.errors import VmckptError
from vmckpt.guests import open_guest
from vmckpt.guests.local import LocalGuest
from vmckpt.images import Store
from vmckpt.machine.binary import parse_memory, qemu_binary, qemu_version
from vmckpt.machine.spec import BootMedium, GuestSpec
from vmckpt.mechanisms import precopy
from vmckpt.mechanisms.layers import (
    CheckpointSettings,
    LayerParts,
    diff_against_parent,
    write_checkpoint_layer,
)
from vmckpt.mechanisms.precopy import MECHANISM_PRECOPY, receive_precopy
from vmckpt.ram import RamImage
from vmckpt.session import JOURNAL

GUEST = "membench"
BUF_MB = 64
BOOT_WAIT_S = 300.0
REPO = Path(__file__).resolve().parent.parent
REPO_GUEST = REPO / "guest" / "build"


@dataclass
class Point:
    """One checkpoint in a process of its own."""

    rss_mib: float
    pause_ms: float
    total_s: float
    base: bool


@dataclass
class SizeRun:
    memory_mib: int
    before: list[Point] = field(default_factory=list)
    after: list[Point] = field(default_factory=list)
    error: str | None = None


@dataclass
class WatchRun:
    memory_mib: int
    before_ms: list[float] = field(default_factory=list)
    after_ms: list[float] = field(default_factory=list)
    before_rss_mib: float = 0.0
    after_rss_mib: float = 0.0
    error: str | None = None


def _run_measured(argv: list[str], env: dict[str, str]) -> tuple[str, float]:
    """Run a child to its end; its stdout and its peak RSS in MiB."""
    with tempfile.TemporaryFile() as out:
        child = subprocess.Popen(argv, stdout=out, env=env, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}… exited with {child.returncode}")
    return text, usage.ru_maxrss / 1024


def _boot(store: Store, memory_mib: int, rate: int) -> LocalGuest:
    spec = GuestSpec(
        memory_mib=memory_mib,
        accel="tcg",
        media=(
            BootMedium.of("kernel", REPO_GUEST / "vmlinuz"),
            BootMedium.of("initrd", REPO_GUEST / "initrd.img"),
        ),
        append=f"console=ttyS0 quiet panic=-1 vmckpt.buf_mb={BUF_MB} vmckpt.pages={rate}",
    )
    guest = LocalGuest.start(store, GUEST, spec)
    serial = store.host.runtime_dir(GUEST) / "serial.log"
    deadline = time.monotonic() + BOOT_WAIT_S
    try:
        while time.monotonic() < deadline:
            if serial.exists() and serial.read_bytes().count(b"STATE seq=") >= 5:
                return guest
            time.sleep(0.5)
    except BaseException:
        guest.stop()
        raise
    guest.stop()
    raise RuntimeError(f"the {memory_mib} MiB guest printed no STATE lines in time")


def _checkpoints(store: Path, count: int, env: dict[str, str]) -> tuple[list[Point], list[Point]]:
    before: list[Point] = []
    after: list[Point] = []
    for index in range(count + 1):
        argv = [sys.executable, "-m", "benchmarks.precopy_memory", "--before-one", str(store)]
        text, rss = _run_measured(argv, env)
        row = json.loads(text)
        before.append(Point(rss, row["pause_ms"], row["total_s"], index == 0))
    # The first after: a head the before runs wrote, so the parent is composed on this host.
    for index in range(count + 1):
        argv = [sys.executable, "-m", "vmckpt", "checkpoint", GUEST, "--store", str(store),
                "--json"]  # fmt: skip
        text, rss = _run_measured(argv, env)
        row = json.loads(text)  # checkpoint --json: one object
        after.append(Point(rss, row["pause_ms"], row["total_s"], index == 0))
    return before, after


def _watch(store: Path, count: int, env: dict[str, str], run: WatchRun) -> None:
    argv = [sys.executable, "-m", "benchmarks.precopy_memory", "--before-watch", str(store),
            "--watch-count", str(count)]  # fmt: skip
    text, run.before_rss_mib = _run_measured(argv, env)
    run.before_ms = [json.loads(line)["pause_ms"] for line in text.splitlines() if line]
    argv = [sys.executable, "-m", "vmckpt", "watch", GUEST, "--store", str(store),
            "--interval", "1s", "--count", str(count), "--json"]  # fmt: skip
    text, run.after_rss_mib = _run_measured(argv, env)
    run.after_ms = [json.loads(line)["pause_ms"] for line in text.splitlines() if line]


# -- the way precopy-diff was (two whole images), to measure against ----------------------


def before_checkpoint(store: Store, base: RamImage | None) -> tuple[dict[str, Any], RamImage]:
    """One precopy-diff checkpoint as it was: the whole RAM received into an image, the
    parent composed into another (or ``base``: the previous checkpoint's image), diffed;
    the migration driven through the guest's general monitor (asyncio)."""
    started = time.monotonic()
    target = open_guest(store, GUEST)
    parent_id = store.head(GUEST, target.kind)
    journal = store.host.journal_path(GUEST, JOURNAL, target.kind)
    settings = CheckpointSettings()
    with store.host.guest_lock(GUEST, what="checkpoint", wait_s=0.0, kind=target.kind):
        with target.guard(), target.monitor() as mon:
            received = receive_precopy(
                mon, GUEST, settings, journal=journal, on_blocks=RamImage.zeroed
            )
        pages, zeroed = diff_against_parent(store, GUEST, parent_id, received.ram, base=base)
        result = write_checkpoint_layer(
            target,
            parent_id,
            LayerParts(received.envelope, received.ram, pages, zeroed, received.qemu_version),
            mechanism=MECHANISM_PRECOPY,
            stats={"pause_ms": round(received.pause_ms, 3), "benchmark": "before"},
            started=started,
        )
    row = {"pause_ms": result.pause_ms, "total_s": result.total_s}
    return row, received.ram


def before_main(store_path: Path, watch_count: int | None) -> int:
    # As it was: the waiting thread at Python's default switch interval, QEMU's downtime
    # limit the configured one (50 ms) from the start.
    precopy._prompt_threads = contextlib.nullcontext  # type: ignore[assignment]
    precopy.TIGHT_DOWNTIME_MS = 1 << 30
    store = Store(store_path)
    if watch_count is None:
        print(json.dumps(before_checkpoint(store, None)[0]))
        return 0
    base: RamImage | None = None
    next_at = time.monotonic()
    for _ in range(watch_count):
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at = time.monotonic() + 1.0
        row, base = before_checkpoint(store, base)
        print(json.dumps(row), flush=True)
    return 0


# -- the run and its tables ---------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def format_rss(runs: Sequence[SizeRun]) -> str:
    lines = [
        "precopy-diff peak RSS per checkpoint against guest RAM (each checkpoint a process of "
        "its own; max over the base layer and the deltas)",
        "",
        "| guest RAM | bound (0.25 x RAM + 256 MiB) | before: base | before: deltas (max) "
        "| after: base | after: deltas (max) | after within bound | pause median before / "
        "after | time median before / after |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        if run.error:
            lines.append(f"| {run.memory_mib} MiB | error: {run.error} |")
            continue
        bound = 0.25 * run.memory_mib + 256

        def peak(points: list[Point], base: bool) -> float:
            return max((p.rss_mib for p in points if p.base == base), default=float("nan"))

        after_max = max(p.rss_mib for p in run.after)
        deltas_b = [p for p in run.before if not p.base]
        deltas_a = [p for p in run.after if not p.base]
        lines.append(
            f"| {run.memory_mib} MiB | {bound:.0f} MiB | {peak(run.before, True):.0f} MiB "
            f"| {peak(run.before, False):.0f} MiB | {peak(run.after, True):.0f} MiB "
            f"| {peak(run.after, False):.0f} MiB | {'yes' if after_max <= bound else 'NO'} "
            f"| {_median([p.pause_ms for p in deltas_b]):.1f} / "
            f"{_median([p.pause_ms for p in deltas_a]):.1f} ms "
            f"| {_median([p.total_s for p in deltas_b]):.2f} / "
            f"{_median([p.total_s for p in deltas_a]):.2f} s |"
        )
    return "\n".join(lines)


def format_watch(run: WatchRun, qemu: str) -> str:
    if run.error:
        return f"watch at {run.memory_mib} MiB: error: {run.error}"
    return "\n".join(
        [
            f"precopy-diff pause under watch --interval 1s, {run.memory_mib} MiB guest, {qemu}",
            "",
            "| | checkpoints | pause median | p95 | max | peak RSS |",
            "|---|---|---|---|---|---|",
            *(
                f"| {name} | {len(ms)} | {_median(ms):.1f} ms | "
                f"{sorted(ms)[int(0.95 * (len(ms) - 1))]:.1f} ms | {max(ms):.1f} ms | "
                f"{rss:.0f} MiB |"
                for name, ms, rss in (
                    ("before (two images)", run.before_ms, run.before_rss_mib),
                    ("after (bounded)", run.after_ms, run.after_rss_mib),
                )
                if ms
            ),
        ]
    )


def write_plot(runs: Sequence[SizeRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [run for run in runs if not run.error]
    sizes = [run.memory_mib for run in done]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(sizes, [max(p.rss_mib for p in r.before) for r in done], "o-", label="before")
    ax.plot(sizes, [max(p.rss_mib for p in r.after) for r in done], "s-", label="after")
    ax.plot(sizes, [0.25 * s + 256 for s in sizes], "k--", label="0.25 x RAM + 256 MiB")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("guest RAM (MiB)")
    ax.set_ylabel("peak RSS per checkpoint (MiB)")
    ax.set_title("precopy-diff memory")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.precopy_memory", description=__doc__)
    p.add_argument("--sizes", default="256M,1G,2G", help="guest RAM sizes (4G: add it)")
    p.add_argument("--count", type=int, default=3, help="delta checkpoints per way and size")
    p.add_argument("--rate", type=int, default=100, help="pages the workload writes a step")
    p.add_argument("--watch-size", default="1G", help="the guest of the watch ('' for none)")
    p.add_argument("--watch-count", type=int, default=30)
    p.add_argument("--qemu", help="QEMU binary (default: as vmckpt chooses)")
    p.add_argument("--json", type=Path)
    p.add_argument("--plot", type=Path)
    p.add_argument("--before-one", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--before-watch", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.before_one:
        return before_main(args.before_one, None)
    if args.before_watch:
        return before_main(args.before_watch, args.watch_count)

    env = dict(os.environ)
    if args.qemu:
        env["VMCKPT_QEMU"] = args.qemu
        os.environ["VMCKPT_QEMU"] = args.qemu
    qemu = f"QEMU {qemu_version(qemu_binary())} ({qemu_binary()})"
    sizes = [parse_memory(size) for size in args.sizes.split(",") if size]
    watch_mib = parse_memory(args.watch_size) if args.watch_size else None
    runs: list[SizeRun] = []
    watch: WatchRun | None = None
    for memory_mib in sorted(set(sizes) | ({watch_mib} if watch_mib else set())):
        with tempfile.TemporaryDirectory(prefix="vk-membench-", dir="/tmp") as work:
            store = Store.create(Path(work) / "store")
            try:
                guest = _boot(store, memory_mib, args.rate)
            except (RuntimeError, VmckptError) as exc:
                runs.append(SizeRun(memory_mib, error=str(exc)))
                continue
            try:
                if memory_mib in sizes:
                    run = SizeRun(memory_mib)
                    try:
                        run.before, run.after = _checkpoints(store.path, args.count, env)
                    except (RuntimeError, ValueError) as exc:
                        run.error = str(exc)
                    runs.append(run)
                    print(format_rss([run]), flush=True)
                if memory_mib == watch_mib:
                    watch = WatchRun(memory_mib)
                    try:
                        _watch(store.path, args.watch_count, env, watch)
                    except (RuntimeError, ValueError) as exc:
                        watch.error = str(exc)
            finally:
                with contextlib.suppress(VmckptError):
                    guest.stop()
    print()
    print(format_rss(runs))
    if watch is not None:
        print()
        print(format_watch(watch, qemu))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "qemu": qemu,
                    "sizes": [asdict(r) for r in runs],
                    "watch": asdict(watch) if watch else None,
                },
                indent=2,
            )
        )
    if args.plot:
        write_plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
