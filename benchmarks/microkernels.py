"""The microkernel rows of the benchmark: Genode, Fiasco.OC and GNU Mach beside the Linux
test guest.

Each system is booted under vmckpt (``vmckpt run``, TCG, 512 MiB, the machine
and CPU it needs), checkpointed ``--count`` times one ``--interval`` apart
while it runs, stopped, and its last layer restored; the restored system must
print its next tick (or STATE line). Everything goes through the ``vmckpt``
command as a user runs it, and the figures are the ones vmckpt reports
(``--json``): the pause from QEMU's STOP/RESUME timestamps, the layer's bytes,
the checkpoint's total time; for the restore the time until the guest runs
(compose + load) and the whole command's (with its one-second watch). The
first layer (the base, a full copy of the RAM in use) is reported apart.

Benchmarks print numbers; nothing here asserts a timing.

    python -m benchmarks.microkernels [--systems genode-iso,genode-multiboot,fiasco,gnumach,linux]
        [--count 5] [--interval 1] [--qemu PATH] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests.framework.guest import GUEST_BUILD, Vmckpt, guest_append, parse_states
from tests.framework.microkernel import SYSTEMS, MissingImage, console_lines
from vmckpt.machine.binary import qemu_binary, qemu_version

MEMORY = "512M"
BOOT_TIMEOUT_S = 180.0
RESTORE_TIMEOUT_S = 60.0
POLL_S = 0.02
NAME = "bench"


@dataclass(frozen=True)
class Subject:
    """A guest the benchmark runs: its ``vmckpt run`` arguments and its tick numbers."""

    name: str
    title: str
    run_args: Callable[[], list[str]]
    ticks: Callable[[bytes], list[int]]


def _microkernel(name: str) -> Subject:
    system = SYSTEMS[name]
    return Subject(
        name,
        system.title,
        system.run_args,
        lambda raw: [t.n for t in system.ticks(console_lines(raw))],
    )


def _linux_args() -> list[str]:
    kernel, initrd = GUEST_BUILD / "vmlinuz", GUEST_BUILD / "initrd.img"
    if not kernel.is_file() or not initrd.is_file():
        raise MissingImage("no Linux test guest in guest/build: run `make -C guest`")
    return [
        "--kernel", str(kernel), "--initrd", str(initrd),
        "--append", guest_append(pages=4, buf_mb=64), "--memory", MEMORY,
    ]  # fmt: skip


def _mach_args() -> list[str]:
    kernel, bootstrap = GUEST_BUILD / "gnumach", GUEST_BUILD / "mach-bootstrap"
    if not kernel.is_file() or not bootstrap.is_file():
        raise MissingImage("no GNU Mach guest in guest/build: run `make -C guest mach`")
    module = f"{bootstrap} ${{device-port}} pages=4 hz=10 $(task-create) $(task-resume)"
    return ["--kernel", str(kernel), "--append", "console=com0", "--initrd", module]


SUBJECTS = {
    "genode-iso": _microkernel("genode-iso"),
    "genode-multiboot": _microkernel("genode-multiboot"),
    "fiasco": _microkernel("fiasco"),
    "gnumach": Subject(
        "gnumach",
        "GNU Mach 1.8 (Debian i386) with vmckpt's bootstrap task, 4 pages/step",
        _mach_args,
        lambda raw: [s.seq for s in parse_states(raw.decode("latin-1"))],
    ),
    "linux": Subject(
        "linux",
        "Linux test guest (Debian kernel, busybox, 4 pages/step)",
        _linux_args,
        lambda raw: [s.seq for s in parse_states(raw.decode("latin-1"))],
    ),
}


@dataclass
class Result:
    """One system's run: every checkpoint row vmckpt printed, the restore, and the timings."""

    system: str
    title: str
    qemu: str
    boot_s: float = 0.0  # `vmckpt run` to the first tick
    layers: list[dict[str, Any]] = field(default_factory=list)
    restore: dict[str, Any] = field(default_factory=dict)
    error: str = ""

    def later(self, key: str) -> list[float]:
        return [float(row[key]) for row in self.layers[1:]]


def _ticks(runner: Vmckpt, subject: Subject, name: str) -> list[int]:
    log = runner.store / "guests" / name / "serial.log"
    return subject.ticks(log.read_bytes() if log.exists() else b"")


def _wait_tick(runner: Vmckpt, subject: Subject, name: str, timeout: float) -> float:
    """Seconds until the guest's console shows a tick line (from the call)."""
    started = time.monotonic()
    while not _ticks(runner, subject, name):
        if time.monotonic() - started > timeout:
            raise RuntimeError(f"{subject.name}: no tick line within {timeout:.0f} s")
        time.sleep(POLL_S)
    return time.monotonic() - started


def bench_one(subject: Subject, count: int, interval: float, env: dict[str, str]) -> Result:
    """Boot, ``count`` checkpoints, stop, restore the last layer; the store is thrown away."""
    result = Result(subject.name, subject.title, "")
    scratch = Path(tempfile.mkdtemp(prefix="vk-mk-", dir="/tmp"))
    runner = Vmckpt(scratch / "store", env=env)
    try:
        run_args = subject.run_args()
        args = ["--memory", MEMORY] if "--memory" not in run_args else []
        runner.started.add(NAME)
        started = time.monotonic()
        runner(
            "run", NAME, "--store", str(runner.store), "--create", *run_args, *args,
            "--accel", "tcg", "--detach",
        )  # fmt: skip
        result.boot_s = (time.monotonic() - started) + _wait_tick(
            runner, subject, NAME, BOOT_TIMEOUT_S
        )
        for _ in range(count):
            time.sleep(interval)
            result.layers.append(runner.checkpoint(NAME))
        runner("stop", NAME, "--store", str(runner.store))
        last = str(result.layers[-1]["layer"])
        manifest = json.loads(
            runner("inspect", "--store", str(runner.store), last, "--json").stdout
        )
        result.qemu = str(manifest["qemu_version"])
        restored = runner.restore("--layer", last, "--name", "again")
        result.restore = json.loads(restored.stdout)
        _wait_tick(runner, subject, "again", RESTORE_TIMEOUT_S)  # it goes on
        runner("stop", "again", "--store", str(runner.store))
    except (MissingImage, RuntimeError, AssertionError) as exc:
        result.error = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
    finally:
        runner.kill_all()
        shutil.rmtree(scratch, ignore_errors=True)
    return result


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def format_table(results: Sequence[Result]) -> str:
    """The benchmark's table: one row per system (later layers; the base layer apart)."""
    headers = [
        "system", "QEMU", "boot", "base layer", "layers", "pause median", "pause p95",
        "bytes/layer", "ckpt time", "restore", "restore total",
    ]  # fmt: skip
    rows: list[list[str]] = []
    notes: list[str] = []
    for r in results:
        if r.error:
            rows.append([r.system, r.qemu or "-", *["-"] * (len(headers) - 3), "error"])
            notes.append(f"{r.system}: {r.error}")
            continue
        pauses, sizes, totals = r.later("pause_ms"), r.later("bytes"), r.later("total_s")
        base = r.layers[0] if r.layers else {}
        restore = float(r.restore.get("compose_s", 0)) + float(r.restore.get("load_s", 0))
        rows.append(
            [
                r.system, r.qemu, f"{r.boot_s:.1f} s",
                _fmt(float(base.get("bytes", 0)) / 1e6, ".1f", " MB"), str(len(pauses)),
                _fmt(_median(pauses), ".1f", " ms"), _fmt(_p95(pauses), ".1f", " ms"),
                _fmt((_median(sizes) or 0) / 1e6, ".2f", " MB"),
                _fmt(_median(totals), ".2f", " s"), f"{restore:.2f} s",
                f"{float(r.restore.get('total_s', 0)):.2f} s",
            ]
        )  # fmt: skip
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines += [f"note: {note}" for note in notes]
    lines += [
        "boot: `vmckpt run` to the first tick line. base layer: the first checkpoint (the RAM",
        "in use). pause, bytes/layer, ckpt time: medians over the later layers, as vmckpt",
        "reports them. restore: compose + load of the last layer until the guest runs; restore",
        "total: vmckpt's total, with its one-second watch of the restored guest.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks.microkernels", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--systems", default=",".join(SUBJECTS), help=f"comma-separated, of {', '.join(SUBJECTS)}"
    )
    parser.add_argument("--count", type=int, default=6, help="checkpoints per system")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between them")
    parser.add_argument("--qemu", help="the QEMU binary (VMCKPT_QEMU); default: the system's")
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in SUBJECTS]
    if unknown or args.count < 2:
        print(f"unknown systems {unknown} or --count below 2", file=sys.stderr)
        return 2
    env = {"VMCKPT_QEMU": args.qemu} if args.qemu else {}
    binary = shutil.which(args.qemu) if args.qemu else qemu_binary()
    if binary is None:
        print(f"no QEMU binary {args.qemu}", file=sys.stderr)
        return 2
    print(
        f"QEMU {qemu_version(binary)} ({binary}), TCG, {MEMORY}, {args.count} checkpoints "
        f"{args.interval:g} s apart",
        flush=True,
    )
    results = []
    for name in names:
        print(f"  {name} ...", flush=True)
        results.append(bench_one(SUBJECTS[name], args.count, args.interval, env))
    print(format_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1) + "\n")
    return 1 if any(r.error for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
