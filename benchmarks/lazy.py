"""Lazy restore benchmark: how soon a restored guest runs, and how soon all its pages are in.

For each guest RAM size the test guest is booted with its workload buffer filling at least
``--fill`` of its RAM (so that many pages are not zero), checkpointed once (precopy-diff),
saved once more by QEMU itself (``migrate`` to a file, the guest stopped), and stopped. Then,
``--repeat`` times each, the same state is restored by:

- ``lazy``: ``vmckpt restore`` (lazy: the page server serves the pages as the guest touches
  them and pushes the rest), run in its own process as without a helper;
- ``helper``: the same command handed to a ``vmckpt helper`` (vmckpt/helper.py: vmckpt kept
  warm, a process forked per command), started for these runs and ended by its PID;
- ``full``: ``vmckpt restore --no-lazy --watch 0`` (today's restore: compose the chain, load
  every page, then run);
- ``qemu-file``: QEMU's own ``migrate-incoming file:`` of the saved stream, then ``cont``
  (QEMU started by vmckpt's own launcher, like a restore's).

Measured for each: from the command's start until the guest runs (the ``vmckpt`` process
timed from its exec, and inside the command from the start of its work, as its JSON
reports), from ``migrate-incoming`` to QEMU's RESUME event (QEMU's timestamp against the
host's clock at the command), until the restored guest's first console line, and until every
page is in (lazy: the page server's completion; the others load everything first). For the
lazy restore also the pages served on demand and pushed, and the duplicate requests.

It prints tables and, against the goals of the lazy restore (RESUME within 100 ms of
``migrate-incoming``; the command returning a running guest within 250 ms of its exec at 1
and 4 GiB; every page in within non-zero bytes / 500 MB/s + 1 s), whether each was met in
this run. It never asserts. A size whose guest does not fit the host's available memory is
skipped, said so. Times on a shared machine vary: the medians of ``--repeat`` runs are shown.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmckpt.images import Store
from vmckpt.machine.binary import parse_memory, resolve_accel
from vmckpt.machine.qemu import Launch, QemuProcess, rotate_serial_log
from vmckpt.machine.spec import GuestSpec
from vmckpt.mechanisms.pageserver import status_of
from vmckpt.mechanisms.pageserver.records import DONE
from vmckpt.mechanisms.restore_prep import relocate_media

REPO = Path(__file__).resolve().parent.parent
GUEST = REPO / "guest" / "build"
STATE = re.compile(rb"STATE seq=\d+ sum=[0-9a-f]{16} ok")
KERNEL_MIB = 60  # what the test guest's kernel and initramfs take besides the buffer, at least
GOAL_RESUME_MS = 100.0
GOAL_RUNNING_S = 0.25
GOAL_PUSH_BYTES_PER_S = 500e6
METHODS = ("lazy", "helper", "full", "qemu-file")
LAZY_METHODS = ("lazy", "helper")


@dataclass
class Run:
    """One restore, as measured."""

    method: str
    size: str
    process_s: float | None = None  # the vmckpt process, exec to exit (None: not a command)
    running_s: float = 0.0  # from the command's start (its own timer) until the guest ran
    resume_ms: float | None = None  # migrate-incoming -> QEMU's RESUME event
    first_line_s: float | None = None  # from the command's start: the guest's first line
    all_in_s: float | None = None  # from the command's start: every page in
    load: float = 0.0  # the host's 1-minute load average as the run began (a shared host)
    pushed: int = 0
    on_demand: int = 0
    zero_on_demand: int = 0
    requests: int = 0
    duplicates: int = 0
    # The page server's push: where its time went (s; its record: PageServer.record).
    reading_s: float = 0.0
    handing_s: float = 0.0
    starved_s: float = 0.0
    held_s: float = 0.0
    sending_s: float = 0.0


@dataclass
class Setup:
    size: str
    memory_mib: int
    store: Path
    layer: str
    stored_bytes: int
    qemu_file: Path
    runs: list[Run] = field(default_factory=list)


def vmckpt(env: dict[str, str], *args: str, timeout: float = 1800) -> tuple[str, float]:
    """Run the CLI as a user does; its stdout and its wall time from exec to exit."""
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "vmckpt", *args], capture_output=True, text=True, env=env,
        cwd=REPO, timeout=timeout, check=False,
    )  # fmt: skip
    took = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit(f"vmckpt {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout, took


def available_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    return 0


def wait_lines(path: Path, count: int, timeout: float, start: int = 0) -> float | None:
    """Wait for ``count`` STATE lines in a console log (after byte ``start``): when seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(path, "rb") as handle:
            handle.seek(start)
            if len(STATE.findall(handle.read())) >= count:
                return time.monotonic()
        time.sleep(0.005)
    return None


def _checkpoint_source(
    size: str, memory: int, work: Path, store: Path, env: dict[str, str]
) -> tuple[dict[str, Any], Path]:
    """The running source guest checkpointed once, then saved by QEMU to a file."""
    serial = Store(store).host.runtime_path("src") / "serial.log"
    if wait_lines(serial, 3, 60 + memory / 20) is None:
        raise SystemExit(f"{size}: the guest printed no STATE line: {serial.read_text()[-300:]}")
    row = json.loads(vmckpt(env, "checkpoint", "src", "--store", str(store), "--json",
                            "--mechanism", "precopy-diff")[0])  # fmt: skip
    qemu_file = work / f"qemu-{size}.mig"
    from vmckpt.guests.local import LocalGuest

    with LocalGuest(Store(store), "src").monitor() as mon:
        mon.stop()
        mon.execute("migrate", {"uri": f"file:{qemu_file}"})
        deadline = time.monotonic() + 600
        while mon.query_migrate().status not in ("completed", "failed"):
            if time.monotonic() > deadline:
                raise SystemExit(f"{size}: QEMU's migrate to a file did not finish")
            time.sleep(0.05)
    return row, qemu_file


def setup(size: str, work: Path, env: dict[str, str], fill: float) -> Setup | None:
    memory = parse_memory(size)
    need = int(memory * 2.3)
    if available_mib() < need:
        print(f"{size}: skipped: a checkpoint and a full restore of it need ~{need} MiB, "
              f"{available_mib()} MiB are available")  # fmt: skip
        return None
    buf = max(16, int(memory * fill) - KERNEL_MIB)
    store = work / f"store-{size}"
    # No full-buffer verification (check_every=0): it reads every page, so the guest's first
    # console line after a lazy restore would wait for the whole push.
    append = f"console=ttyS0 quiet panic=-1 vmckpt.buf_mb={buf} vmckpt.pages=4 vmckpt.check_every=0"
    print(f"{size}: booting the test guest ({buf} MiB of workload buffer)", flush=True)
    vmckpt(env, "run", "src", "--store", str(store), "--create", "--kernel",
           str(GUEST / "vmlinuz"), "--initrd", str(GUEST / "initrd.img"), "--append", append,
           "--memory", size, "--accel", "tcg", "--detach")  # fmt: skip
    try:
        row, qemu_file = _checkpoint_source(size, memory, work, store, env)
    finally:  # a failure (a full disk) leaves no guest of its own running
        stop = [sys.executable, "-m", "vmckpt", "stop", "src", "--store", str(store)]
        subprocess.run(stop, env=env, cwd=REPO, capture_output=True, check=False, timeout=120)
    stored = int(row["pages_stored"]) * 4096
    print(f"{size}: layer {row['layer']}: {stored / 2**20:.0f} MiB in "
          f"{int(row['pages_stored'])} non-zero pages ({100 * stored / (memory << 20):.1f} % of "
          f"RAM); QEMU's file {qemu_file.stat().st_size / 2**20:.0f} MiB", flush=True)  # fmt: skip
    return Setup(size, memory, store, str(row["layer"]), stored, qemu_file)


def restore_run(setup: Setup, env: dict[str, str], method: str, number: int) -> Run:
    name = f"{method}-{number}"
    args = ["restore", "--store", str(setup.store), "--layer", setup.layer, "--name", name,
            "--detach", "--json"]  # fmt: skip
    if method == "full":
        args += ["--no-lazy", "--watch", "0"]
    else:
        args += ["--lazy"]
    wall = time.time()
    out, took = vmckpt(env, *args)
    row = json.loads(out)
    run = Run(method, setup.size, process_s=took, running_s=float(row["total_s"]),
              resume_ms=row.get("resume_ms"))  # fmt: skip
    start = wall + (took - float(row["total_s"]))  # the command's own start, roughly
    serial = Store(setup.store).host.runtime_path(name) / "serial.log"
    seen = wait_lines(serial, 1, 120)
    if seen is not None:
        run.first_line_s = time.time() - (time.monotonic() - seen) - start
    if method in LAZY_METHODS:
        store = Store(setup.store)
        deadline = time.monotonic() + 1800
        while status_of(store, name) is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        done = json.loads((store.host.runtime_path(name) / DONE).read_text())
        run.all_in_s = float(done["completed"]) - start
        for key in ("pushed", "on_demand", "zero_on_demand", "requests", "duplicates"):
            setattr(run, key, int(done[key]))
        for key in ("reading_s", "handing_s", "starved_s", "held_s", "sending_s"):
            setattr(run, key, float(done.get(key) or 0.0))
    else:
        run.all_in_s = run.running_s
    vmckpt(env, "stop", name, "--store", str(setup.store))
    return run


@contextlib.contextmanager
def helper_running(env: dict[str, str]) -> Iterator[None]:
    """A ``vmckpt helper`` serving the runtime root of ``env``, ended by its PID after."""
    process = subprocess.Popen(
        [sys.executable, "-m", "vmckpt", "helper"], env=env, cwd=REPO, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert process.stdout is not None
        said = process.stdout.readline()  # "serving ..." once it listens, or why it cannot
        if "serving" not in said:
            raise SystemExit(f"vmckpt helper did not start: {said.strip() or 'it exited'}")
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def qemu_file_run(setup: Setup, number: int) -> Run:
    """QEMU's own: migrate-incoming of the file QEMU saved, then cont."""
    store = Store(setup.store)
    manifest = store.manifest(setup.layer)
    spec = relocate_media(GuestSpec.from_dict(manifest.spec), store)
    directory = store.host.runtime_dir(f"qemu-file-{number}")
    launch = Launch(
        name=f"qemu-file-{number}", accel=resolve_accel(spec.accel),
        serial_log=rotate_serial_log(directory), machine_type=manifest.machine_type,
        incoming=True,
    )  # fmt: skip
    started = time.monotonic()
    process = QemuProcess.launch(spec, launch, runtime_dir=directory)
    try:
        with process.monitor(timeout=60) as mon:
            mon.set_migrate_capabilities({"events": True})
            mark = mon.mark()
            incoming = time.time()
            mon.migrate_incoming(f"file:{setup.qemu_file}")
            mon.wait_event({"MIGRATION"}, 1800, lambda e: e.data.get("status") == "completed",
                           since=mark)  # fmt: skip
            mon.cont()
            event = mon.wait_event({"RESUME"}, 60, since=mark)
            running = time.monotonic() - started
            run = Run("qemu-file", setup.size, running_s=running,
                      resume_ms=round((event.timestamp - incoming) * 1000, 3))  # fmt: skip
        seen = wait_lines(launch.serial_log, 1, 120)
        if seen is not None:
            run.first_line_s = seen - started
        run.all_in_s = run.running_s
        return run
    finally:
        process.kill()


def median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f} s"


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def report(setups: list[Setup]) -> list[str]:
    lines = [
        "| RAM | in use | method | vmckpt process | to running | migrate-incoming to RESUME "
        "| first console line | all pages in |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for each in setups:
        for method in METHODS:
            runs = [r for r in each.runs if r.method == method]
            if not runs:
                continue
            lines.append(
                f"| {each.size} | {each.stored_bytes / 2**30:.2f} GiB | {method} | "
                f"{fmt_s(median([r.process_s for r in runs]))} | "
                f"{fmt_s(median([r.running_s for r in runs]))} | "
                f"{fmt_ms(median([r.resume_ms for r in runs]))} | "
                f"{fmt_s(median([r.first_line_s for r in runs]))} | "
                f"{fmt_s(median([r.all_in_s for r in runs]))} |"
            )
    lines += ["", "| RAM (lazy, helper) | pushed | on demand (zero) | requests | duplicates |",
              "|---|---|---|---|---|"]  # fmt: skip
    for each in setups:
        runs = [r for r in each.runs if r.method in LAZY_METHODS]
        if runs:
            lines.append(
                f"| {each.size} | {median([r.pushed for r in runs]):.0f} | "
                f"{median([r.on_demand for r in runs]):.0f} "
                f"({median([r.zero_on_demand for r in runs]):.0f}) | "
                f"{median([r.requests for r in runs]):.0f} | "
                f"{median([r.duplicates for r in runs]):.0f} |"
            )
    lines += [
        "",
        "Where the push's time went (s; the reader: reading and checking pages, waiting for "
        "a full queue; its sender: starved of them, holding pushed pages back while the "
        "guest faulted, in send at the destination's pace):",
        "",
        "| RAM | method | reading | reader waiting | starved | held | sending |",
        "|---|---|---|---|---|---|---|",
    ]
    for each, method in itertools.product(setups, LAZY_METHODS):
        runs = [r for r in each.runs if r.method == method]
        if runs:
            lines.append(
                f"| {each.size} | {method} | {median([r.reading_s for r in runs]):.2f} | "
                f"{median([r.handing_s for r in runs]):.2f} | "
                f"{median([r.starved_s for r in runs]):.2f} | "
                f"{median([r.held_s for r in runs]):.2f} | "
                f"{median([r.sending_s for r in runs]):.2f} |"
            )
    loads = [r.load for each in setups for r in each.runs]
    if loads:
        lines += ["", f"Host load average during the runs: {min(loads):.1f} to {max(loads):.1f} "
                  f"({os.cpu_count()} CPUs)"]  # fmt: skip
    lines += ["", "Against the goals (medians; this run, this machine):"]
    for each, method in itertools.product(setups, LAZY_METHODS):
        runs = [r for r in each.runs if r.method == method]
        if not runs:
            continue
        resume = median([r.resume_ms for r in runs])
        # The command's start as its user sees it: the vmckpt process, from exec (Python's
        # start and imports included) until it returned the running guest and exited.
        running = median([r.process_s for r in runs])
        all_in = median([r.all_in_s for r in runs])
        budget = each.stored_bytes / GOAL_PUSH_BYTES_PER_S + 1.0
        checks = [
            (f"RESUME {fmt_ms(resume)} after migrate-incoming (goal <= {GOAL_RESUME_MS:.0f} ms)",
             resume is not None and resume <= GOAL_RESUME_MS),
            (f"the command returned a running guest {fmt_s(running)} after its exec (goal <= "
             f"{GOAL_RUNNING_S:.2f} s)", running is not None and running <= GOAL_RUNNING_S),
            (f"every page in after {fmt_s(all_in)} (goal <= {budget:.2f} s: "
             f"{each.stored_bytes / 1e6:.0f} MB / 500 MB/s + 1 s)",
             all_in is not None and all_in <= budget),
        ]  # fmt: skip
        for text, met in checks:
            lines.append(f"- {each.size} {method}: {text}: {'met' if met else 'NOT met'}")
    return lines


def plot(setups: list[Setup], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    sizes = [s.size for s in setups]
    width = 0.25
    for axis, key, title in (
        (axes[0], "running_s", "until the guest runs"),
        (axes[1], "all_in_s", "until every page is in"),
    ):
        for offset, method in enumerate(METHODS):
            values = [
                median([getattr(r, key) for r in s.runs if r.method == method]) or 0.0
                for s in setups
            ]
            axis.bar([i + (offset - 1) * width for i in range(len(sizes))], values, width,
                     label=method)  # fmt: skip
        axis.set_xticks(range(len(sizes)), sizes)
        axis.set_xlabel("guest RAM (>= 90 % in use)")
        axis.set_ylabel("seconds (median)")
        axis.set_title(title)
        axis.legend()
    fig.suptitle("vmckpt restore: lazy (postcopy from the store) vs full vs QEMU's own")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lazy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--sizes", default="1G,4G,8G", help="guest RAM sizes")
    parser.add_argument("--repeat", type=int, default=3, help="restores per method and size")
    parser.add_argument("--fill", type=float, default=0.9, help="share of RAM in use, at least")
    parser.add_argument("--qemu", help="the QEMU to use (VMCKPT_QEMU)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--json", type=Path, help="write every run here")
    parser.add_argument("--plot", type=Path, help="draw the medians here (PNG)")
    parser.add_argument("--work", type=Path, help="scratch directory (default: a new one)")
    args = parser.parse_args(argv)  # fmt: skip
    if args.qemu:  # the vmckpt commands' QEMU, and the one qemu-file starts here itself
        os.environ["VMCKPT_QEMU"] = args.qemu
    env = dict(os.environ)
    work = args.work or Path(tempfile.mkdtemp(prefix="vk-lazy-bench-", dir="/tmp"))
    keys = work / "keys"
    keys.mkdir(parents=True, exist_ok=True)
    env.setdefault("VMCKPT_KEYS_DIR", str(keys))
    methods = args.methods.split(",")
    setups: list[Setup] = []
    try:
        for size in args.sizes.split(","):
            each = setup(size, work, env, args.fill)
            if each is None:
                continue
            setups.append(each)
            for number in range(args.repeat):
                for method in methods:
                    load = os.getloadavg()[0]
                    with helper_running(env) if method == "helper" else contextlib.nullcontext():
                        run = (
                            qemu_file_run(each, number) if method == "qemu-file"
                            else restore_run(each, env, method, number)
                        )  # fmt: skip
                    run.load = load
                    each.runs.append(run)
                    print(f"{size} {method} #{number}: running {fmt_s(run.running_s)}, RESUME "
                          f"{fmt_ms(run.resume_ms)}, all in {fmt_s(run.all_in_s)} (load "
                          f"{load:.1f})", flush=True)  # fmt: skip
            each.qemu_file.unlink(missing_ok=True)
            shutil.rmtree(each.store, ignore_errors=True)
            print("\n".join(report(setups)), flush=True)
    finally:
        for each in setups:
            each.qemu_file.unlink(missing_ok=True)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(report(setups)))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for s in setups for r in s.runs], indent=1))
    if args.plot and setups:
        plot(setups, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
