"""Guests that vmckpt runs from a store: start, find, stop, read their console."""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vmckpt.errors import MachineError, QMPError, UsageError
from vmckpt.images import Store
from vmckpt.machine import GuestRecord, GuestSpec, QemuProcess, qemu_binary, qemu_version
from vmckpt.qmp import Monitor


@dataclass(frozen=True)
class GuestStatus:
    name: str
    running: bool
    pid: int | None
    head: str | None
    state: str  # QEMU's run state, or "stopped"


def start_guest(store: Store, name: str, spec: GuestSpec) -> GuestRecord:
    runtime_dir = store.guest_dir(name)
    with contextlib.suppress(MachineError):
        old = GuestRecord.load(runtime_dir, name)
        if old.process is not None and old.process.alive():
            raise UsageError(f"guest {name} is already running (PID {old.process.pid})")
    process = QemuProcess.launch(spec, name=name, runtime_dir=runtime_dir)
    try:
        with process.monitor() as mon:
            if not mon.is_running():
                mon.cont()
    except BaseException:
        process.kill()
        raise
    record = GuestRecord(name, spec, process, head=None)
    record.save(runtime_dir)
    return record


def load_guest(store: Store, name: str) -> tuple[GuestRecord, Path]:
    runtime_dir = store.path / "guests" / name
    return GuestRecord.load(runtime_dir, name), runtime_dir


def stop_guest(store: Store, name: str) -> int:
    record, runtime_dir = load_guest(store, name)
    if record.process is None or not record.process.alive():
        raise MachineError("is not running", vm=name, step="stop")
    pid = record.process.pid
    record.process.shutdown()
    record.process = None
    record.save(runtime_dir)
    return pid


def guest_names(store: Store) -> list[str]:
    root = store.path / "guests"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / GuestRecord.FILE).exists())


def guest_status(store: Store, name: str) -> GuestStatus:
    record, _ = load_guest(store, name)
    process = record.process
    if process is None or not process.alive():
        return GuestStatus(name, False, None, record.head, "stopped")
    state = "unknown"
    with contextlib.suppress(QMPError), Monitor(process.qmp_socket, vm=name, timeout=3) as mon:
        state = mon.status()
    return GuestStatus(name, True, process.pid, record.head, state)


def follow_console(path: Path, follow: bool, alive: QemuProcess | None) -> Iterator[str]:
    """Yield the serial output so far; with ``follow``, keep yielding until the guest ends."""
    with path.open("r", errors="replace") as handle:
        while True:
            chunk = handle.read()
            if chunk:
                yield chunk
                continue
            if not follow or alive is None or not alive.alive():
                return
            time.sleep(0.1)


def _colo_state(version: str, has_x_colo: bool) -> str:
    from vmckpt.watch import colo_refusal

    if not has_x_colo:
        return "no: QEMU lacks x-colo"
    refusal = colo_refusal(version)
    if refusal:
        return f"no: {refusal}"
    if version.startswith(("10.0.", "10.1.")):
        return "no: QEMU 10.0/10.1 complete the migration instead of entering COLO (falls back)"
    return "experimental (watch --colo)"


@dataclass(frozen=True)
class Capabilities:
    binary: str
    version: str
    accelerators: dict[str, str]  # name -> "yes" or why not
    mechanisms: dict[str, str]  # name -> "yes" or why not


def probe_capabilities() -> Capabilities:
    """Start a throw-away QEMU with no guest and ask it what it supports."""
    from vmckpt.machine import kvm_usable

    binary = qemu_binary()
    version = qemu_version(binary)
    kvm_ok, why = kvm_usable()
    accelerators = {"kvm": "yes" if kvm_ok else f"no: {why}", "tcg": "yes"}
    spec = GuestSpec(memory_mib=16, accel="tcg", machine="none")
    with tempfile.TemporaryDirectory(prefix="vmckpt-check-") as scratch:
        process = QemuProcess.launch(spec, name="vmckpt-check", runtime_dir=Path(scratch))
        try:
            with process.monitor() as mon:
                caps = mon.migrate_capabilities()
                commands = mon.commands()
        finally:
            process.shutdown()
    mechanisms = {
        "precopy-diff": "yes"
        if "migrate" in commands and "getfd" in commands and "events" in caps
        else "no: QEMU lacks migrate/getfd/events",
        "colo-incremental": _colo_state(version, "x-colo" in caps),
        "background-snapshot (baseline)": "yes"
        if "background-snapshot" in caps
        else "no: QEMU lacks it",
        "mapped-ram (baseline)": "yes" if "mapped-ram" in caps else "no: QEMU lacks it",
        "savevm (baseline)": "yes"
        if "snapshot-save" in commands
        else "no: QEMU lacks snapshot-save",
    }
    return Capabilities(binary, version, accelerators, mechanisms)
