"""Checkpoint benchmark: vmckpt against QEMU's own ways to save a running guest.

For each guest RAM size and dirty rate one test guest is booted (TCG or KVM,
as ``--accel`` says) and checkpointed ``count`` times, one checkpoint a
second while its workload runs, by each method in turn:

- ``colo``: vmckpt's COLO checkpoint session (vmckpt/mechanisms/colo.py; QEMU 11 under
  TCG): the session's first checkpoint is the full opening migration and is
  reported apart; every later one moves only the pages written since.
- ``precopy-diff``: :func:`~vmckpt.checkpoint.take_checkpoint` into a fresh
  store; the first layer is the base and is reported apart.
- ``stop-migrate-cont``: QMP ``stop``, ``migrate`` to ``file:``, ``cont``.
- ``live-migrate``: live ``migrate`` to ``file:`` of the running guest, then
  ``cont`` (the source is left in ``postmigrate``).
- ``savevm``: a ``snapshot-save`` job into a qcow2 node the guest was given
  for it (``-blockdev``), then ``snapshot-delete`` so the image does not grow.
- ``background-snapshot``: the capability on, ``migrate`` to ``file:``.
- ``backup-migrate`` (with ``--disk``): QEMU's own way to save a guest with a
  writable disk: QMP ``stop``, one ``transaction`` (a new dirty bitmap and a
  ``blockdev-backup`` of the clusters dirty since the previous one, in full the
  first time, into a qcow2 file), ``migrate`` to ``file:``, ``cont``; then the
  backup job is waited for.

With ``--disk qcow2|raw`` the guest also has a 64 MiB writable disk and runs the
disk workload (guest/diskload.c, 5 block writes a second, each checked); vmckpt's
methods capture the disk at each checkpoint's instant (colo inside the pause).
Bytes per checkpoint are then reported for memory and disk apart (``--disk`` table).

With ``--encrypt``, vmckpt's own methods run once more into an encrypted store (``vmckpt init
--encrypt``): ``precopy-diff+enc`` into a fresh encrypted store, ``colo+enc`` with the guest
booted again in an encrypted store (the COLO session writes into the guest's own store),
after every other method, the first guest stopped. For each vmckpt method the newest layer
is also composed (what a restore does before it starts QEMU: read, check, decrypt), and a
table sets encrypted against in the clear, measured in the same run.

The migration baselines use vmckpt's own migration parameters (downtime
limit, bandwidth), so they differ from vmckpt only in where the stream goes.
Every pause is measured from QEMU's STOP/RESUME event timestamps (summed if
a method stops the guest more than once); the guest's own view is the
longest gap between two STATE lines on its serial console while a method
ran, timestamped on the host as they appear. Before the methods an ``idle``
window of the same length measures the gaps the workload shows by itself.

Benchmarks print numbers; nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vmckpt.errors import CheckpointError, UsageError, VmckptError
from vmckpt.guests.local import LocalGuest
from vmckpt.images import Store
from vmckpt.machine.binary import parse_memory, qemu_binary, qemu_version
from vmckpt.machine.spec import BootMedium, DiskSpec, GuestSpec
from vmckpt.mechanisms import api
from vmckpt.mechanisms.choice import COLO
from vmckpt.mechanisms.colo import SessionClient, end_session, session_pid
from vmckpt.mechanisms.layers import CheckpointSettings
from vmckpt.mechanisms.precopy import take_checkpoint
from vmckpt.qmp import CONT_RETRY_S, Event, Monitor
from vmckpt.ram import PAGE_SIZE
from vmckpt.session import MigrationSession, leave_as_found

COLO_METHOD = "colo"
PRECOPY_METHOD = "precopy-diff"
ENCRYPTED = "+enc"  # the same method into an encrypted store
COLO_ENC = COLO_METHOD + ENCRYPTED
PRECOPY_ENC = PRECOPY_METHOD + ENCRYPTED
# vmckpt's own: a base layer, then deltas
VMCKPT_METHODS = (COLO_METHOD, PRECOPY_METHOD, COLO_ENC, PRECOPY_ENC)
METHODS = (
    COLO_METHOD, PRECOPY_METHOD, "stop-migrate-cont", "live-migrate", "savevm",
    "background-snapshot",
)  # fmt: skip
BACKUP_MIGRATE = "backup-migrate"  # QEMU's own, for a guest with a writable disk (--disk)
DISK_METHODS = (COLO_METHOD, PRECOPY_METHOD, BACKUP_MIGRATE)
DISK_BYTES = 64 << 20
DISK_NODE = "vmckpt-disk0"
BENCH_BITMAP = "bench-"
ENCRYPTED_METHODS = (COLO_ENC, PRECOPY_ENC)  # --encrypt adds those whose method runs
ON_ENCRYPTED_GUEST = (COLO_ENC,)  # need the guest itself in an encrypted store
COMPOSE_REPEAT = 5
IDLE = "idle"
GUEST = "bench"
SNAP_NODE = "vmckpt-bench-snap"
STEP_MS = 100.0  # the workload's step at vmckpt.hz=10
HZ = 10
BUF_MB = 64
BOOT_WAIT_S = 240.0
JOB_TIMEOUT_S = 900.0
STATE_LINE = re.compile(rb"^STATE seq=\d+ sum=[0-9a-f]{16} ok$")
REPO_GUEST = Path(__file__).resolve().parent.parent / "guest" / "build"


# -- measurements ---------------------------------------------------------------


@dataclass
class Sample:
    """One checkpoint by one method."""

    pause_ms: float
    total_s: float
    bytes: int
    started_s: float  # since the method's first checkpoint began
    stops: int = 1  # STOP/RESUME pairs seen
    pages_stored: int | None = None  # vmckpt's methods
    pages_zeroed: int | None = None  # vmckpt's methods
    base: bool = False  # vmckpt's first (full) layer
    cpu_s: float | None = None  # CPU time vmckpt spent on it (its process, or the session's)
    rss_mib: float | None = None  # vmckpt's resident memory after it (the session's for colo)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class MethodRun:
    """Every checkpoint one method took of one guest, and what the guest saw meanwhile."""

    memory_mib: int
    pages_per_step: int
    method: str
    samples: list[Sample] = field(default_factory=list)
    error: str | None = None
    state_times: list[float] = field(default_factory=list)  # monotonic, per STATE line
    window_s: float = 0.0
    t0: float = 0.0  # monotonic time the method began; Sample.started_s counts from it
    compose_s: list[float] = field(default_factory=list)  # vmckpt: composing the newest layer

    def measured(self) -> list[Sample]:
        """The samples the summary is over: vmckpt's base layer is reported apart."""
        return [s for s in self.samples if not s.base]

    def max_gap_ms(self) -> float | None:
        if len(self.state_times) < 2:
            return None
        return float(np.max(np.diff(np.asarray(self.state_times)))) * 1000.0

    def steps_between(self) -> list[int]:
        """STATE lines (workload steps) between consecutive checkpoint starts."""
        if not self.state_times or len(self.samples) < 2:
            return []
        rel = np.asarray(self.state_times) - self.t0
        starts = [s.started_s for s in self.samples]
        return [
            int(np.count_nonzero((rel >= a) & (rel < b))) for a, b in itertools.pairwise(starts)
        ]

    def to_dict(self) -> dict[str, Any]:
        gaps = np.diff(np.asarray(self.state_times, dtype=np.float64)) * 1000.0
        return {
            "memory_mib": self.memory_mib,
            "pages_per_step": self.pages_per_step,
            "method": self.method,
            "error": self.error,
            "samples": [asdict(s) for s in self.samples],
            "state_lines": len(self.state_times),
            "compose_s": [round(c, 4) for c in self.compose_s],
            "window_s": round(self.window_s, 3),
            "max_state_gap_ms": self.max_gap_ms(),
            "state_gaps_ms": [round(float(g), 2) for g in gaps],
        }


class StateTail(threading.Thread):
    """Timestamps (time.monotonic) each STATE line as it appears in the serial log."""

    def __init__(self, path: Path, poll_s: float = 0.003) -> None:
        super().__init__(name="vmckpt-bench-tail", daemon=True)
        self.path = path
        self.poll_s = poll_s
        self.times: list[float] = []
        self._stop_event = threading.Event()
        self._ready = threading.Event()

    def run(self) -> None:
        with self.path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            self._ready.set()
            pending = b""
            while not self._stop_event.is_set():
                chunk = handle.read()
                if not chunk:
                    time.sleep(self.poll_s)
                    continue
                now = time.monotonic()
                *lines, pending = (pending + chunk).split(b"\n")
                self.times.extend(now for line in lines if STATE_LINE.match(line.strip()))

    def wait_lines(self, count: int, timeout: float) -> None:
        """Wait until ``count`` STATE lines were seen (or ``timeout`` passed)."""
        deadline = time.monotonic() + timeout
        while len(self.times) < count and time.monotonic() < deadline:
            time.sleep(0.01)

    def __enter__(self) -> StateTail:
        self.start()
        self._ready.wait(5.0)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop_event.set()
        self.join(timeout=5.0)


def pause_from_events(events: Sequence[Event]) -> tuple[float, int]:
    """Sum of the guest's STOP..RESUME intervals (ms) in QEMU's event stream, and how many."""
    total, pairs, stopped_at = 0.0, 0, None
    for event in events:
        if event.name == "STOP" and stopped_at is None:
            stopped_at = event.timestamp
        elif event.name == "RESUME" and stopped_at is not None:
            total += (event.timestamp - stopped_at) * 1000.0
            pairs += 1
            stopped_at = None
    return total, pairs


def _wait_resumed(mon: Monitor, mark: int, timeout: float = 30.0) -> list[Event]:
    """Events since ``mark`` once the guest runs again (its RESUME after the last STOP)."""
    if not mon.is_running():
        mon.cont(retry_s=CONT_RETRY_S)
    events = mon.events_since(mark)
    stops = [e.timestamp for e in events if e.name == "STOP"]
    if stops:
        mon.wait_event({"RESUME"}, timeout, lambda e: e.timestamp >= stops[-1], since=mark)
    return mon.events_since(mark)


def _cpu_s(pid: int) -> float:
    """User + system CPU time of a process so far, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return math.nan


# -- one guest -----------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    sizes_mib: tuple[int, ...] = (256, 1024)
    rates: tuple[int, ...] = (0, 100, 2000)
    count: int = 10
    methods: tuple[str, ...] = METHODS
    interval_s: float = 1.0
    accel: str = "tcg"
    kernel: Path = REPO_GUEST / "vmlinuz"
    initrd: Path = REPO_GUEST / "initrd.img"
    out: Path | None = None
    disk: str | None = None  # "qcow2" or "raw": a writable disk and the disk workload


def _disk_delta_bytes(store: Store, layer_id: str) -> int:
    """The bytes of a layer's disk deltas (data and index), what the disk adds to it."""
    manifest = store.manifest(layer_id)
    return sum(entry.size for name, entry in manifest.files.items() if name.startswith("disk-"))


def _layer_disk_bytes(store: Store, layer_id: str) -> int:
    """The bytes a layer's files take on disk (more than its manifest lists if encrypted)."""
    directory = store.layers_path / layer_id
    return sum(entry.stat().st_size for entry in directory.iterdir() if entry.is_file())


def _time_compose(store: Store, layer_id: str, repeat: int = COMPOSE_REPEAT) -> list[float]:
    """Compose ``layer_id`` once untimed (the allocator, caches), then ``repeat`` times (its
    files in the page cache: just written)."""
    store.compose(layer_id)
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        store.compose(layer_id)
        times.append(time.perf_counter() - began)
    return times


class GuestBench:
    """One booted guest of one (size, rate) and the methods run against it."""

    def __init__(
        self, settings: BenchSettings, memory_mib: int, rate: int, work: Path,
        *, encrypt: bool = False,
    ) -> None:  # fmt: skip
        self.settings = settings
        self.memory_mib = memory_mib
        self.rate = rate
        self.work = work
        self.store = Store.create(work / "run", parents=True, encrypt=encrypt)
        self.qcow2 = work / "snap.qcow2"
        self.ckpt = CheckpointSettings()
        self.guest = LocalGuest(self.store, GUEST)
        self.backup_bitmap: str | None = None  # backup-migrate: tracks writes since its last

    def boot(self) -> None:
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(self.qcow2), "64M"],
            check=True,
            capture_output=True,
        )
        append = f"console=ttyS0 quiet panic=-1 vmckpt.buf_mb={BUF_MB} vmckpt.pages={self.rate}"
        disks: tuple[DiskSpec, ...] = ()
        if self.settings.disk:
            image = self.work / f"disk.{self.settings.disk}"
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", self.settings.disk, str(image),
                 str(DISK_BYTES)],
                check=True, capture_output=True,
            )  # fmt: skip
            disks = (DiskSpec("disk0", str(image), self.settings.disk, DISK_BYTES),)
            append += " vmckpt.disk=/dev/vda"
        spec = GuestSpec(
            memory_mib=self.memory_mib,
            accel=self.settings.accel,
            media=(
                BootMedium.of("kernel", self.settings.kernel),
                BootMedium.of("initrd", self.settings.initrd),
            ),
            append=append,
            disks=disks,
        )
        snapshot_node = (
            "-blockdev",
            f"driver=qcow2,node-name={SNAP_NODE},file.driver=file,file.filename={self.qcow2}",
        )
        self.guest = LocalGuest.start(self.store, GUEST, spec, extra_args=snapshot_node)
        serial = self.runtime / "serial.log"
        deadline = time.monotonic() + BOOT_WAIT_S
        while time.monotonic() < deadline:
            if serial.read_bytes().count(b"STATE seq=") >= 5:
                return
            if not self._process_alive():
                raise RuntimeError(f"the guest's QEMU ended while booting: {self._log_tail()}")
            time.sleep(0.5)
        raise RuntimeError(f"the guest printed no STATE lines within {BOOT_WAIT_S:.0f} s")

    @property
    def runtime(self) -> Path:
        return self.store.host.runtime_dir(GUEST)

    def _process_alive(self) -> bool:
        process = self.guest.record.process
        return process is not None and process.alive()

    def _log_tail(self) -> str:
        process = self.guest.record.process
        return process.log_tail() if process else "(no process)"

    def monitor(self) -> Monitor:
        return self.guest.process().monitor(timeout=60.0)

    def stop(self) -> None:
        with contextlib.suppress(VmckptError):
            if self._process_alive():
                self.guest.stop()

    # -- running a method -------------------------------------------------------

    def run(self, method: str) -> MethodRun:
        scratch = self.work / method
        scratch.mkdir()
        with StateTail(self.runtime / "serial.log") as tail:
            # Lead-in and lead-out: a pause at either end of the window still lies
            # between two STATE lines the tail saw.
            tail.wait_lines(1, 5.0)
            started = time.monotonic()
            run = MethodRun(self.memory_mib, self.rate, method, t0=started)
            try:
                if method == IDLE:
                    time.sleep(self.settings.count * self.settings.interval_s)
                elif method in (PRECOPY_METHOD, PRECOPY_ENC):
                    self._vmckpt(run, scratch, started, encrypt=method == PRECOPY_ENC)
                elif method in (COLO_METHOD, COLO_ENC):
                    self._colo(run, started)
                else:
                    take = self._take_function(method)
                    for index in range(self.settings.count):
                        self._wait_slot(started, index)
                        with self.monitor() as mon:
                            sample = take(mon, scratch, index)
                        sample.started_s = round(sample.started_s - started, 3)
                        run.samples.append(sample)
            except (VmckptError, OSError, RuntimeError) as exc:
                run.error = exc.one_line() if isinstance(exc, VmckptError) else str(exc)
                self._recover()
            finally:
                run.window_s = time.monotonic() - started
                tail.wait_lines(len(tail.times) + 2, 5.0)
        run.state_times = list(tail.times)
        shutil.rmtree(scratch, ignore_errors=True)
        return run

    def _wait_until(self, when: float) -> float:
        """Wait until ``when``; return when the next checkpoint is due: one interval after
        this one starts, or at once if this one took longer (the base layer often does)."""
        delay = when - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        return max(when, time.monotonic()) + self.settings.interval_s

    def _wait_slot(self, started: float, index: int) -> None:
        delay = started + index * self.settings.interval_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)

    def _take_function(self, method: str) -> Callable[[Monitor, Path, int], Sample]:
        return {
            "stop-migrate-cont": lambda m, d, i: self._migrate(m, d / f"{i}.mig", stop=True),
            "live-migrate": lambda m, d, i: self._migrate(m, d / f"{i}.mig"),
            "background-snapshot": lambda m, d, i: self._migrate(
                m, d / f"{i}.mig", background=True
            ),
            "savevm": lambda m, _d, i: self._savevm(m, i),
            BACKUP_MIGRATE: lambda m, d, i: self._backup_migrate(m, d, i),
        }[method]

    def _recover(self) -> None:
        """After a failed method: no migration in progress, settings back, guest running."""
        if not self._process_alive():
            return
        with contextlib.suppress(VmckptError), self.monitor() as mon:
            leave_as_found(
                mon, vm=GUEST, capabilities={"background-snapshot": False, "events": False},
                parameters={}, resume=True, fd_name=None,
            )  # fmt: skip
            for job in mon.jobs().values():
                with contextlib.suppress(VmckptError):
                    mon.job_dismiss(job.id)

    # -- the methods ---------------------------------------------------------------

    def _vmckpt(self, run: MethodRun, scratch: Path, started: float, *, encrypt: bool) -> None:
        store = Store.create(scratch / "store", encrypt=encrypt)
        # The guest, checkpointed into another store than its own (a fresh one per run).
        target = LocalGuest(store, self.guest.name, self.guest.record)
        try:
            next_at = started
            for index in range(self.settings.count + 1):  # the base layer, then `count`
                next_at = self._wait_until(next_at)
                began = time.monotonic()
                cpu = time.process_time()  # this process: the receiver thread included
                result = take_checkpoint(target, self.ckpt)
                cpu = time.process_time() - cpu
                if index == 0:  # the layers after the base are an interval apart
                    next_at = time.monotonic() + self.settings.interval_s
                run.samples.append(
                    Sample(
                        pause_ms=result.pause_ms,
                        total_s=result.total_s,
                        bytes=result.bytes_written,
                        started_s=round(began - started, 3),
                        pages_stored=result.pages_stored,
                        pages_zeroed=result.pages_zeroed,
                        base=index == 0,
                        cpu_s=round(cpu, 4),
                        rss_mib=_rss_mib(os.getpid()),
                        extra={
                            "qemu_downtime_ms": result.layer.stats.get("qemu_downtime_ms"),
                            "layer": result.layer.id,
                            "disk_bytes": _layer_disk_bytes(store, result.layer.id),
                            "disk_delta_bytes": _disk_delta_bytes(store, result.layer.id),
                        },
                    )
                )
            run.compose_s = _time_compose(store, str(run.samples[-1].extra["layer"]))
        finally:
            shutil.rmtree(store.path, ignore_errors=True)

    def _colo(self, run: MethodRun, started: float) -> None:
        choice = api.mechanism_of(self.guest)
        if choice.mechanism != COLO:
            run.error = f"refused: {choice.reason}"
            return
        client = SessionClient.ensure(self.guest)
        try:
            pid = session_pid(self.store, GUEST)
            assert pid is not None
            next_at = started
            for index in range(self.settings.count + 1):  # the opening, then `count`
                next_at = self._wait_until(next_at)
                began = time.monotonic()
                cpu = _cpu_s(pid)
                row = client.request("checkpoint")["row"]
                wall = time.monotonic() - began
                if index == 0:  # the layers after the opening are an interval apart
                    next_at = time.monotonic() + self.settings.interval_s
                pause = row.get("pause_ms")
                run.samples.append(
                    Sample(
                        pause_ms=float(pause) if pause is not None else math.nan,
                        total_s=wall,
                        bytes=int(row["bytes"]),
                        started_s=round(began - started, 3),
                        pages_stored=int(row["pages_stored"]),
                        pages_zeroed=int(row["pages_zeroed"]),
                        base=index == 0,
                        cpu_s=round(_cpu_s(pid) - cpu, 4),
                        rss_mib=_rss_mib(pid),
                        extra={
                            "layer": row["layer"],
                            "disk_bytes": _layer_disk_bytes(self.store, str(row["layer"])),
                            "disk_delta_bytes": _disk_delta_bytes(self.store, str(row["layer"])),
                        },
                    )
                )
        finally:
            client.close()
            end_session(self.store, GUEST)
        if run.samples:
            run.compose_s = _time_compose(self.store, str(run.samples[-1].extra["layer"]))

    def _migrate(
        self, mon: Monitor, path: Path, *, stop: bool = False, background: bool = False
    ) -> Sample:
        caps = {"events": True, **({"background-snapshot": True} if background else {})}
        session = MigrationSession(
            mon,
            vm=GUEST,
            error=CheckpointError,
            capabilities=caps,
            parameters={
                "downtime-limit": self.ckpt.downtime_limit_ms,
                "max-bandwidth": self.ckpt.max_bandwidth,
            },
            timeout_s=self.ckpt.timeout_s,
        )
        try:
            with session:
                mark = mon.mark()
                began = time.monotonic()
                if stop:
                    mon.stop()
                session.start(f"file:{path}")
                session.wait()
                session.resume()
                events = _wait_resumed(mon, mark)
                total = time.monotonic() - began
                info = mon.query_migrate()
            pause, pairs = pause_from_events(events)
            size = path.stat().st_size
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
        return Sample(
            pause_ms=pause,
            total_s=total,
            bytes=size,
            started_s=began,
            stops=pairs,
            extra={"qemu_downtime_ms": info.downtime_ms, "transferred": info.transferred},
        )

    def _backup_migrate(self, mon: Monitor, scratch: Path, index: int) -> Sample:
        """QEMU's own: stop, bitmap + backup in one transaction, migrate to a file, cont;
        then wait for the backup job (the guest runs meanwhile)."""
        target = scratch / f"{index}.backup.qcow2"
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(target), str(DISK_BYTES)],
            check=True, capture_output=True,
        )  # fmt: skip
        node = f"bench-target-{index}"
        mon.blockdev_add({"driver": "qcow2", "node-name": node,
                          "file": {"driver": "file", "filename": str(target)}})  # fmt: skip
        bitmap = f"{BENCH_BITMAP}{index}"
        job = f"bench-backup-{index}"
        backup: dict[str, object] = {"device": DISK_NODE, "target": node, "job-id": job,
                                     "auto-dismiss": False}  # fmt: skip
        if self.backup_bitmap is None:
            backup["sync"] = "full"
        else:
            backup.update(sync="bitmap", bitmap=self.backup_bitmap, **{"bitmap-mode": "never"})
        path = scratch / f"{index}.mig"
        session = MigrationSession(
            mon, vm=GUEST, error=CheckpointError, capabilities={"events": True},
            parameters={"downtime-limit": self.ckpt.downtime_limit_ms,
                        "max-bandwidth": self.ckpt.max_bandwidth},
            timeout_s=self.ckpt.timeout_s,
        )  # fmt: skip
        try:
            with session:
                mark = mon.mark()
                began = time.monotonic()
                mon.stop()
                mon.transaction(
                    [("block-dirty-bitmap-add", {"node": DISK_NODE, "name": bitmap}),
                     ("blockdev-backup", backup)]
                )  # fmt: skip
                session.start(f"file:{path}")
                session.wait()
                session.resume()
                events = _wait_resumed(mon, mark)
                mon.wait_event(
                    {"JOB_STATUS_CHANGE"}, JOB_TIMEOUT_S,
                    lambda e: e.data.get("id") == job and e.data.get("status") == "concluded",
                    since=mark,
                )  # fmt: skip
                total = time.monotonic() - began
            mon.job_dismiss(job)
            mon.blockdev_del(node)
            if self.backup_bitmap is not None:
                mon.bitmap_remove(DISK_NODE, self.backup_bitmap)
            self.backup_bitmap = bitmap
            pause, pairs = pause_from_events(events)
            memory, disk = path.stat().st_size, target.stat().st_size
        finally:
            for leftover in (path, target):
                with contextlib.suppress(OSError):
                    leftover.unlink()
        return Sample(
            pause_ms=pause, total_s=total, bytes=memory + disk, started_s=began, stops=pairs,
            extra={"memory_bytes": memory, "disk_delta_bytes": disk},
        )  # fmt: skip

    def _run_job(self, mon: Monitor, command: str, arguments: dict[str, object]) -> None:
        job = str(arguments["job-id"])
        mark = mon.mark()
        mon.execute(command, arguments)
        mon.wait_event(
            {"JOB_STATUS_CHANGE"},
            JOB_TIMEOUT_S,
            lambda e: e.data.get("id") == job and e.data.get("status") == "concluded",
            since=mark,
        )
        info = mon.jobs().get(job)
        mon.job_dismiss(job)
        if info is not None and info.error:
            raise RuntimeError(f"{command} failed: {info.error}")

    def _savevm(self, mon: Monitor, index: int) -> Sample:
        tag = f"bench-{index}"
        before = self.qcow2.stat().st_size
        mark = mon.mark()
        began = time.monotonic()
        self._run_job(
            mon,
            "snapshot-save",
            {"job-id": f"save-{index}", "tag": tag, "vmstate": SNAP_NODE, "devices": [SNAP_NODE]},
        )
        events = _wait_resumed(mon, mark)
        total = time.monotonic() - began
        pause, pairs = pause_from_events(events)
        vmstate = _vm_state_size(mon, tag)
        grown = self.qcow2.stat().st_size - before
        deleting = time.monotonic()
        self._run_job(
            mon,
            "snapshot-delete",
            {"job-id": f"delete-{index}", "tag": tag, "devices": [SNAP_NODE]},
        )
        return Sample(
            pause_ms=pause,
            total_s=total,
            bytes=vmstate,
            started_s=began,
            stops=pairs,
            extra={"qcow2_growth": grown, "delete_s": round(time.monotonic() - deleting, 3)},
        )


def _vm_state_size(mon: Monitor, tag: str) -> int:
    """The vm-state-size of snapshot ``tag`` on the bench's qcow2 node."""
    for node in mon.execute("query-named-block-nodes", {"flat": True}):
        if node.get("node-name") != SNAP_NODE:
            continue
        for snap in node.get("image", {}).get("snapshots", []):
            if snap.get("name") == tag:
                return int(snap.get("vm-state-size", 0))
    raise RuntimeError(f"snapshot {tag} not found on node {SNAP_NODE}")


def run_bench(
    settings: BenchSettings, report: Callable[[list[MethodRun]], None] | None = None
) -> tuple[list[MethodRun], Path]:
    """Every method on one guest per (size, rate); ``report`` gets each guest's runs."""
    qemu_binary()  # fail early without QEMU
    if shutil.which("qemu-img") is None:
        raise UsageError("qemu-img is needed for the savevm baseline (install qemu-utils)")
    out = settings.out or Path(tempfile.mkdtemp(prefix="vk-bench-", dir="/tmp"))
    out.mkdir(parents=True, exist_ok=True)
    runs: list[MethodRun] = []
    for memory in settings.sizes_mib:
        for rate in settings.rates:
            work = out / f"m{memory}p{rate}"
            if work.exists():
                shutil.rmtree(work)
            plain = [m for m in settings.methods if m not in ON_ENCRYPTED_GUEST]
            these = _run_guest(GuestBench(settings, memory, rate, work), (IDLE, *plain))
            # Then (the first guest stopped) the methods that need the guest itself in an
            # encrypted store: the same guest booted again.
            encrypted = [m for m in settings.methods if m in ON_ENCRYPTED_GUEST]
            if encrypted:
                again = GuestBench(settings, memory, rate, work / "encrypted", encrypt=True)
                these += _run_guest(again, encrypted)
            runs.extend(these)
            if report is not None:
                report(these)
    return runs, out


def _run_guest(guest: GuestBench, methods: Sequence[str]) -> list[MethodRun]:
    """Boot ``guest``, run ``methods`` against it one after the other, stop it."""
    memory, rate = guest.memory_mib, guest.rate
    these: list[MethodRun] = []
    try:
        guest.boot()
        for method in methods:
            if not guest._process_alive():
                these.append(MethodRun(memory, rate, method, error="the guest ended"))
                continue
            print(f"  {memory} MiB, {rate} pages/step: {method} ...", flush=True)
            these.append(guest.run(method))
    except (VmckptError, OSError, RuntimeError, subprocess.CalledProcessError) as exc:
        error = exc.one_line() if isinstance(exc, VmckptError) else str(exc)
        these.append(MethodRun(memory, rate, "boot", error=error))
    finally:
        guest.stop()
        with contextlib.suppress(OSError):
            guest.qcow2.unlink()
    return these


# -- output ------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def _mib(count: float) -> str:
    return f"{count / (1 << 20):.1f} MiB"


def expected_distinct_pages(writes: float, buffer_pages: int = BUF_MB * 256) -> float:
    """Distinct buffer pages hit by ``writes`` uniformly random page writes."""
    return buffer_pages * (1.0 - math.exp(-writes / buffer_pages)) if writes > 0 else 0.0


def format_table(runs: Sequence[MethodRun]) -> str:
    """One (size, rate) row's methods: pause, total time, bytes, the guest's longest gap."""
    if not runs:
        return ""
    first = runs[0]
    rate = first.pages_per_step
    lines = [
        f"== {first.memory_mib} MiB guest, {rate} pages/step "
        f"({rate * HZ} page writes/s, {_mib(rate * HZ * PAGE_SIZE)}/s) ==",
        f"{'method':<20} {'n':>3} {'pause med':>9} {'p95':>8} {'max':>8} {'total s':>8} "
        f"{'bytes/ckpt med':>15} {'max gap ms':>10} {'stall ms':>9}",
    ]
    for run in runs:
        gap = run.max_gap_ms()
        stall = None if gap is None else gap - STEP_MS
        samples = run.measured()
        if run.error and not samples:
            lines.append(
                f"{run.method:<20} {'-':>3} {'error: ' + run.error}"
                + (f"  [max gap {_ms(gap)} ms]" if gap is not None else "")
            )
            continue
        if not samples:
            lines.append(
                f"{run.method:<20} {'-':>3} {'-':>9} {'-':>8} {'-':>8} {'-':>8} {'-':>15} "
                f"{_ms(gap):>10} {_ms(stall):>9}"
            )
            continue
        pause = np.asarray([s.pause_ms for s in samples])
        total = np.median([s.total_s for s in samples])
        size = np.median([s.bytes for s in samples])
        lines.append(
            f"{run.method:<20} {len(samples):>3} {np.median(pause):>9.1f} "
            f"{np.percentile(pause, 95):>8.1f} {np.max(pause):>8.1f} {total:>8.2f} "
            f"{_mib(float(size)):>15} {_ms(gap):>10} {_ms(stall):>9}"
        )
        if run.error:
            lines.append(f"{'':<20}     stopped early: {run.error}")
    for run in runs:
        if run.method in VMCKPT_METHODS:
            lines.extend(_vmckpt_notes(run))
    return "\n".join(lines)


def _vmckpt_notes(run: MethodRun) -> list[str]:
    notes: list[str] = []
    base = [s for s in run.samples if s.base]
    if base:
        b = base[0]
        notes.append(
            f"  {run.method} base layer: {b.pages_stored} pages, {_mib(b.bytes)}, "
            f"pause {b.pause_ms:.1f} ms, total {b.total_s:.2f} s"
        )
    layers = run.measured()
    if layers:
        stored = np.asarray([s.pages_stored or 0 for s in layers])
        steps = run.steps_between()
        steps_med = float(np.median(steps[1:] if len(steps) > 1 else steps)) if steps else 0.0
        writes = steps_med * run.pages_per_step
        distinct = expected_distinct_pages(writes)
        notes.append(
            f"  {run.method} layers: pages stored median {np.median(stored):.0f} "
            f"(min {stored.min()}, max {stored.max()}); workload steps between checkpoints "
            f"median {steps_med:.0f} = {writes:.0f} page writes, "
            f"~{distinct:.0f} distinct buffer pages expected (random pages in a "
            f"{BUF_MB * 256}-page buffer)"
        )
    return notes


def format_vmckpt_summary(runs: Sequence[MethodRun]) -> str:
    """vmckpt's layers against the dirty rate, one line per (size, rate)."""
    lines = [
        "== vmckpt layers vs dirty rate ==",
        f"{'MiB':>5} {'pages/step':>10} {'base pages':>10} {'base MiB':>9} {'pages/layer':>11} "
        f"{'MiB/layer':>9} {'writes/layer':>12} {'~distinct':>9}",
    ]
    for run in runs:
        if run.method not in VMCKPT_METHODS or not run.measured():
            continue
        base = next((s for s in run.samples if s.base), None)
        layers = run.measured()
        steps = run.steps_between()
        steps_med = float(np.median(steps[1:] if len(steps) > 1 else steps)) if steps else 0.0
        writes = steps_med * run.pages_per_step
        lines.append(
            f"{run.memory_mib:>5} {run.pages_per_step:>10} "
            f"{(base.pages_stored if base else 0):>10} "
            f"{(base.bytes if base else 0) / (1 << 20):>9.1f} "
            f"{np.median([s.pages_stored or 0 for s in layers]):>11.0f} "
            f"{np.median([s.bytes for s in layers]) / (1 << 20):>9.2f} "
            f"{writes:>12.0f} {expected_distinct_pages(writes):>9.0f}"
        )
    return "\n".join(lines)


def _median(values: Sequence[float | None]) -> float:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.median(present)) if present else math.nan


def format_sweep(runs: Sequence[MethodRun]) -> str:
    """vmckpt's own methods against guest RAM: what a checkpoint costs as RAM grows.

    Per method and size: median pause, p95, wall time per checkpoint (request to
    layer written), vmckpt's CPU time per checkpoint, bytes per layer, and vmckpt's
    resident memory (the session's for colo) once the base layer is written; then
    the ratio of the largest size's figures to the smallest's.
    """
    lines = [
        "== vmckpt per checkpoint against guest RAM (layers after the base; medians) ==",
        f"{'method':<16} {'pages/step':>10} {'MiB':>5} {'pause ms':>8} {'p95':>6} "
        f"{'wall ms':>8} {'CPU ms':>7} {'pages':>6} {'KiB/layer':>9} {'RSS MiB':>8}",
    ]
    table: dict[tuple[str, int], dict[int, list[float]]] = {}
    for run in runs:
        if run.method not in VMCKPT_METHODS or not run.measured():
            continue
        layers = run.measured()
        pause = [s.pause_ms for s in layers]
        figures = [
            _median(pause),
            float(np.percentile([p for p in pause if not math.isnan(p)] or [math.nan], 95)),
            _median([s.total_s * 1000 for s in layers]),
            _median([(s.cpu_s * 1000) if s.cpu_s is not None else None for s in layers]),
            _median([float(s.pages_stored or 0) for s in layers]),
            _median([s.bytes / 1024 for s in layers]),
            max((s.rss_mib or 0.0) for s in layers),
        ]
        table.setdefault((run.method, run.pages_per_step), {})[run.memory_mib] = figures
        lines.append(
            f"{run.method:<16} {run.pages_per_step:>10} {run.memory_mib:>5} {figures[0]:>8.1f} "
            f"{figures[1]:>6.1f} {figures[2]:>8.0f} {figures[3]:>7.0f} {figures[4]:>6.0f} "
            f"{figures[5]:>9.0f} {figures[6]:>8.0f}"
        )
    for (method, rate), sizes in table.items():
        if len(sizes) < 2:
            continue
        small, large = min(sizes), max(sizes)
        ratios = [
            f"{name} {sizes[large][i] / sizes[small][i]:.2f}x"
            for i, name in ((0, "pause"), (2, "wall"), (3, "CPU"), (5, "bytes"), (6, "RSS"))
            if sizes[small][i] and not math.isnan(sizes[small][i])
        ]
        lines.append(
            f"  {method}, {rate} pages/step, {large} MiB against {small} MiB: " + ", ".join(ratios)
        )
    return "\n".join(lines)


def format_encryption(runs: Sequence[MethodRun]) -> str:
    """vmckpt's methods into an encrypted store against the same into one in the clear,
    per (size, rate): per checkpoint (layers after the base, medians) wall and CPU time,
    pause, the layer's bytes on disk; and composing the newest layer; then the ratios."""
    lines = [
        "== encryption at rest: an encrypted store against one in the clear, same run "
        "(layers after the base; medians) ==",
        f"{'method':<17} {'MiB':>5} {'pages/step':>10} {'wall ms':>8} {'CPU ms':>7} "
        f"{'pause ms':>8} {'KiB on disk':>11} {'compose s':>9}",
    ]
    names = ("wall", "CPU", "pause", "on disk", "compose")
    found: dict[tuple[str, int, int], list[float]] = {}
    for run in runs:
        if run.method not in VMCKPT_METHODS or not run.measured():
            continue
        layers = run.measured()
        figures = [
            _median([s.total_s * 1000 for s in layers]),
            _median([(s.cpu_s * 1000) if s.cpu_s is not None else None for s in layers]),
            _median([s.pause_ms for s in layers]),
            _median([float(s.extra.get("disk_bytes") or s.bytes) / 1024 for s in layers]),
            _median(list(run.compose_s)),
        ]
        found[(run.method, run.memory_mib, run.pages_per_step)] = figures
    pairs = 0
    for (method, memory, rate), clear in found.items():
        if method.endswith(ENCRYPTED):
            continue
        sealed = found.get((method + ENCRYPTED, memory, rate))
        if sealed is None:
            continue
        pairs += 1
        for name, figures in ((method, clear), (method + ENCRYPTED, sealed)):
            lines.append(
                f"{name:<17} {memory:>5} {rate:>10} {figures[0]:>8.0f} {figures[1]:>7.0f} "
                f"{figures[2]:>8.1f} {figures[3]:>11.0f} {figures[4]:>9.3f}"
            )
        ratios = [
            f"{name} {sealed[i] / clear[i]:.2f}x"
            for i, name in enumerate(names)
            if clear[i] and not math.isnan(clear[i]) and not math.isnan(sealed[i])
        ]
        lines.append(f"  {method}{ENCRYPTED} / {method}: " + ", ".join(ratios))
    return "\n".join(lines) if pairs else ""


def format_disk_table(runs: Sequence[MethodRun]) -> str:
    """A guest with a writable disk (``--disk``): per method and guest RAM, the pause
    (median, p95), wall and vmckpt CPU per checkpoint, the receiver's RSS, and the bytes
    per checkpoint of memory and of disk apart (medians of the checkpoints after the first);
    then each method's largest RAM against its smallest."""
    lines = [
        "== a guest with a writable disk, checkpointed while it writes memory and disk "
        "(after the first checkpoint; medians) ==",
        f"{'method':<16} {'MiB':>5} {'n':>3} {'pause ms':>8} {'p95':>6} {'wall ms':>8} "
        f"{'CPU ms':>7} {'RSS MiB':>8} {'memory KiB':>10} {'disk KiB':>9}",
    ]
    table: dict[str, dict[int, list[float]]] = {}
    for run in runs:
        if run.method not in DISK_METHODS or not run.measured():
            if run.error and run.method in DISK_METHODS:
                lines.append(f"{run.method:<16} {run.memory_mib:>5}   - error: {run.error}")
            continue
        layers = run.measured()
        pause = [s.pause_ms for s in layers if not math.isnan(s.pause_ms)]
        disk = [float(s.extra.get("disk_delta_bytes") or 0) for s in layers]
        memory = [
            float(s.extra.get("memory_bytes", s.bytes - (s.extra.get("disk_delta_bytes") or 0)))
            for s in layers
        ]
        figures = [
            _median(pause),
            float(np.percentile(pause, 95)) if pause else math.nan,
            _median([s.total_s * 1000 for s in layers]),
            _median([(s.cpu_s * 1000) if s.cpu_s is not None else None for s in layers]),
            max((s.rss_mib or 0.0) for s in layers),
            _median(memory) / 1024,
            _median(disk) / 1024,
        ]
        table.setdefault(run.method, {})[run.memory_mib] = figures
        lines.append(
            f"{run.method:<16} {run.memory_mib:>5} {len(layers):>3} {figures[0]:>8.1f} "
            f"{figures[1]:>6.1f} {figures[2]:>8.0f} {_ms(figures[3]):>7} {figures[4]:>8.0f} "
            f"{figures[5]:>10.0f} {figures[6]:>9.0f}"
        )
    for method, sizes in table.items():
        if len(sizes) < 2:
            continue
        small, large = min(sizes), max(sizes)
        ratios = [
            f"{name} {sizes[large][i] / sizes[small][i]:.2f}x"
            for i, name in ((0, "pause"), (2, "wall"), (3, "CPU"), (4, "RSS"), (5, "memory"))
            if sizes[small][i] and not math.isnan(sizes[small][i])
        ]
        lines.append(f"  {method}, {large} MiB against {small} MiB: " + ", ".join(ratios))
    return "\n".join(lines)


def write_disk_plot(runs: Sequence[MethodRun], path: Path) -> None:
    """With ``--disk``: median pause, wall time and bytes per checkpoint against guest RAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels: tuple[tuple[str, Callable[[Sample], float]], ...] = (
        ("guest pause (ms)", lambda s: s.pause_ms),
        ("wall time per checkpoint (ms)", lambda s: s.total_s * 1000),
        ("bytes per checkpoint (KiB)", lambda s: s.bytes / 1024),
    )
    for method in DISK_METHODS:
        points = sorted((r.memory_mib, r.measured()) for r in runs
                        if r.method == method and r.measured())  # fmt: skip
        if not points:
            continue
        for ax, (title, value) in zip(axes, panels, strict=True):
            ax.plot([size for size, _ in points],
                    [_median([value(s) for s in layers]) for _, layers in points],
                    marker="o", label=method)  # fmt: skip
            ax.set_title(title)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("guest RAM (MiB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle("a guest writing memory and its disk: cost per checkpoint against guest RAM")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_sweep_plot(runs: Sequence[MethodRun], path: Path) -> None:
    """vmckpt's per-checkpoint wall time, CPU time and pause against guest RAM."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels: tuple[tuple[str, Callable[[Sample], float]], ...] = (
        ("wall time per checkpoint (ms)", lambda s: s.total_s * 1000),
        ("vmckpt CPU per checkpoint (ms)", lambda s: (s.cpu_s or 0.0) * 1000),
        ("guest pause (ms)", lambda s: s.pause_ms),
    )
    for method in VMCKPT_METHODS:
        for rate in sorted({r.pages_per_step for r in runs if r.method == method}):
            points = sorted(
                (r.memory_mib, r.measured())
                for r in runs
                if r.method == method and r.pages_per_step == rate and r.measured()
            )
            if len(points) < 2:
                continue
            for ax, (title, value) in zip(axes, panels, strict=True):
                ax.plot(
                    [size for size, _ in points],
                    [_median([value(s) for s in layers]) for _, layers in points],
                    marker="o",
                    label=f"{method}, {rate} pages/step",
                )
                ax.set_title(title)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("guest RAM (MiB)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle("vmckpt: cost of a checkpoint as guest RAM grows (medians, layers after the base)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plot(runs: Sequence[MethodRun], path: Path) -> None:
    """Median pause and bytes per checkpoint against the dirty rate; a column per size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({r.memory_mib for r in runs})
    methods = [m for m in (*METHODS, *ENCRYPTED_METHODS) if any(r.method == m for r in runs)]
    fig, axes = plt.subplots(
        2, len(sizes), figsize=(5.5 * len(sizes), 8), squeeze=False, sharex=True
    )
    for col, size in enumerate(sizes):
        pause_ax, bytes_ax = axes[0][col], axes[1][col]
        for method in methods:
            points = sorted(
                (r.pages_per_step, r.measured())
                for r in runs
                if r.memory_mib == size and r.method == method and r.measured()
            )
            if not points:
                continue
            rates = [p[0] for p in points]
            pause_ax.plot(
                rates,
                [np.median([s.pause_ms for s in p[1]]) for p in points],
                marker="o",
                label=method,
            )
            bytes_ax.plot(
                rates,
                [np.median([s.bytes for s in p[1]]) / (1 << 20) for p in points],
                marker="o",
                label=method,
            )
        pause_ax.set_title(f"{size} MiB guest")
        pause_ax.set_ylabel("median guest pause (ms)")
        bytes_ax.set_ylabel("median bytes per checkpoint (MiB)")
        bytes_ax.set_xlabel("dirty rate (pages per 100 ms step)")
        for ax in (pause_ax, bytes_ax):
            ax.set_xscale("symlog", linthresh=10)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
        pause_ax.legend(fontsize="small")
    fig.suptitle("vmckpt vs QEMU baselines (vmckpt: layers after the base)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m benchmarks.checkpoint",
        description="benchmark checkpoints against QEMU's own baselines",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--sizes", default="256M,1G", help="guest RAM sizes, e.g. 256M,1G")
    p.add_argument("--rates", default="0,100,2000", help="pages written per 100 ms step")
    p.add_argument("--count", type=int, default=10, help="checkpoints per method")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between checkpoints")
    p.add_argument(
        "--methods", help="comma-separated subset (default: every method; with --disk: "
        + ",".join(DISK_METHODS) + ")",
    )  # fmt: skip
    p.add_argument(
        "--disk", choices=["qcow2", "raw"],
        help="give the guest a writable disk of this format and run its disk workload",
    )  # fmt: skip
    p.add_argument(
        "--encrypt", action="store_true",
        help=f"also run vmckpt's methods into an encrypted store ({', '.join(ENCRYPTED_METHODS)})"
        " and compare them with the same in the clear",
    )  # fmt: skip
    p.add_argument("--accel", default="tcg", choices=["auto", "kvm", "tcg"])
    p.add_argument(
        "--qemu",
        metavar="BINARY",
        help="the QEMU to run (default: $VMCKPT_QEMU, else qemu-system-x86_64); colo needs 11",
    )
    p.add_argument("--kernel", type=Path, default=REPO_GUEST / "vmlinuz")
    p.add_argument("--initrd", type=Path, default=REPO_GUEST / "initrd.img")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write a PNG (needs matplotlib)")
    p.add_argument("--json", type=Path, metavar="FILE", help="dump every raw measurement")
    p.add_argument("--out", type=Path, metavar="DIR", help="scratch directory (default: /tmp)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_bench(args)
    except VmckptError as exc:
        print(f"benchmarks.checkpoint: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code


def cmd_bench(args: argparse.Namespace) -> int:
    default = DISK_METHODS if args.disk else METHODS
    methods = tuple(_split(args.methods)) if args.methods else default
    known = (*METHODS, *ENCRYPTED_METHODS, BACKUP_MIGRATE)
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise UsageError(f"unknown method(s) {', '.join(unknown)} (use {', '.join(known)})")
    if args.encrypt:  # each of vmckpt's methods asked for, once more into an encrypted store
        extra = [m + ENCRYPTED for m in methods if m + ENCRYPTED in ENCRYPTED_METHODS]
        methods += tuple(m for m in extra if m not in methods)
    try:
        rates = tuple(int(r) for r in _split(args.rates))
    except ValueError:
        raise UsageError(f"cannot read --rates {args.rates!r} (use e.g. 0,100,2000)") from None
    if BACKUP_MIGRATE in methods and not args.disk:
        raise UsageError(f"{BACKUP_MIGRATE} needs --disk")
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    if any(r < 0 or r > BUF_MB * 256 for r in rates):
        raise UsageError(f"rates must be between 0 and {BUF_MB * 256} pages per step")
    if args.count < 1:
        raise UsageError("--count must be at least 1")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install '.[bench]'") from None
    settings = BenchSettings(
        sizes_mib=tuple(parse_memory(s) for s in _split(args.sizes)),
        rates=rates,
        count=args.count,
        methods=methods,
        accel=args.accel,
        kernel=args.kernel,
        initrd=args.initrd,
        out=args.out,
        interval_s=args.interval,
        disk=args.disk,
    )
    if args.qemu:
        os.environ["VMCKPT_QEMU"] = args.qemu  # read by vmckpt wherever it starts QEMU
    binary = qemu_binary()
    print(
        f"benchmarks.checkpoint: QEMU {qemu_version(binary)} ({binary}), accel {settings.accel}, "
        f"{os.cpu_count()} host CPUs, {settings.count} checkpoints per method, "
        f"one per {settings.interval_s:g} s"
        + (f", a {settings.disk} disk" if settings.disk else ""),
        flush=True,
    )

    def report(these: list[MethodRun]) -> None:
        print(format_table(these), end="\n\n", flush=True)

    runs, out = run_bench(settings, report)
    if any(r.method in VMCKPT_METHODS and r.measured() for r in runs):
        print(format_vmckpt_summary(runs), end="\n\n")
        print(format_sweep(runs), end="\n\n")
        encryption = format_encryption(runs)
        if encryption:
            print(encryption, end="\n\n")
    if settings.disk:
        print(format_disk_table(runs), end="\n\n")
    print(f"scratch directory: {out}")
    if args.json is not None:
        data = {
            "qemu_version": qemu_version(binary),
            "accel": settings.accel,
            "host_cpus": os.cpu_count(),
            "count": settings.count,
            "interval_s": settings.interval_s,
            "checkpoint_settings": asdict(CheckpointSettings()),
            "argv": sys.argv,
            "runs": [r.to_dict() for r in runs],
        }
        args.json.write_text(json.dumps(data, indent=1))
        print(f"raw measurements: {args.json}")
    if args.plot is not None:
        write_plot(runs, args.plot)
        print(f"plot: {args.plot}")
        if len(settings.sizes_mib) > 1:
            sweep = args.plot.with_name(args.plot.stem + "-ram" + args.plot.suffix)
            write_sweep_plot(runs, sweep)
            print(f"plot: {sweep}")
        if settings.disk:
            disk_plot = args.plot.with_name(args.plot.stem + "-disk" + args.plot.suffix)
            write_disk_plot(runs, disk_plot)
            print(f"plot: {disk_plot}")
    return 0 if not any(r.method == "boot" for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
