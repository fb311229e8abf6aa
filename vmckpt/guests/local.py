"""A guest vmckpt runs on this host: a QEMU it started (``vmckpt run``, ``vmckpt restore``),
whose record — spec, QEMU process (PID, start time, command line, sockets), accelerator and
free-form QEMU arguments — lives in the store's runtime directory on this host."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmckpt.errors import MachineError, QMPError, StoreError, UsageError, VmckptError
from vmckpt.guard import Guard
from vmckpt.guests.base import Guest, GuestStatus
from vmckpt.hostdirs import host_id
from vmckpt.images import Store
from vmckpt.images.retention import parse_created
from vmckpt.machine.binary import qemu_binary, qemu_version, resolve_accel
from vmckpt.machine.diagnose import GuestFacts, probe_facts
from vmckpt.machine.liveness import Observation, observe
from vmckpt.machine.qemu import SERIAL_LOG, Launch, QemuProcess, rotate_serial_log
from vmckpt.machine.spec import GuestSpec, check_name
from vmckpt.qmp import Monitor

RECORD = "guest.json"
REMOTE_RECORD = "remote.json"  # a guest of this name runs on another host (guests/remote.py)
STATUS_TIMEOUT_S = 3.0
CONSOLE_POLL_S = 0.1


@dataclass
class GuestRecord:
    """What the store remembers about a guest vmckpt runs here: its spec and its QEMU."""

    name: str
    spec: GuestSpec
    process: QemuProcess | None
    accel: str = ""  # the accelerator QEMU runs it with (the spec may say "auto")
    trusted_args: tuple[str, ...] = ()  # free-form QEMU arguments its QEMU was started with

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "spec": self.spec.to_dict(),
            "process": self.process.to_dict() if self.process else None,
            "accel": self.accel,
            "trusted_args": list(self.trusted_args),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], name: str) -> GuestRecord:
        try:
            process = data.get("process")
            return cls(
                name=str(data["name"]),
                spec=GuestSpec.from_dict(data["spec"]),
                process=QemuProcess.from_dict(process) if process else None,
                accel=str(data.get("accel", "")),
                trusted_args=tuple(str(a) for a in data.get("trusted_args", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MachineError(f"its record is damaged ({exc})", vm=name) from exc


class LocalGuest(Guest):
    """A QEMU vmckpt started on this host; its record (spec, QEMU process) is this host's
    (vmckpt/hostdirs.py), never the store's."""

    owns_qemu = True

    def __init__(self, store: Store, name: str, record: GuestRecord | None = None) -> None:
        super().__init__(store, name)
        self._record = record

    @property
    def record(self) -> GuestRecord:
        if self._record is None:
            data = self.store.host.read_record(self.name, RECORD)
            if data is None:
                raise MachineError(
                    "no such guest in this store (start one with `vmckpt run`)", vm=self.name
                )
            self._record = GuestRecord.from_dict(data, self.name)
        return self._record

    def save(self) -> None:
        self.store.host.write_record(self.name, RECORD, self.record.to_dict())

    @property
    def runtime_dir(self) -> Path:
        return self.store.host.runtime_dir(self.name)

    def resume(self) -> bool:
        _ = self.record  # an unknown guest is said so before its lock would make its directory
        return super().resume()

    def process(self) -> QemuProcess:
        """The guest's QEMU, if it runs; MachineError otherwise."""
        process = self.record.process
        if process is None or not process.alive():
            raise MachineError("is not running", vm=self.name)
        return process

    def spec(self) -> GuestSpec:
        return self.record.spec

    @property
    def accel(self) -> str:
        return self.record.accel

    def monitor(self) -> Monitor:
        return self.process().monitor()

    def checkpoint_monitor(self) -> Monitor:
        """The guest's monitor, spoken directly (:meth:`Monitor.lines`): the event that
        ends the migration and the command that ends the pause go without a hop through
        another thread (a ``watch`` pause median of 14 against 23 ms through asyncio)."""
        return Monitor.lines(self.process().qmp_socket, vm=self.name, timeout=10.0)

    def guard(self) -> Guard:
        return Guard.for_qmp(
            store=self.store.path, name=self.name, kind=self.kind,
            qmp_socket=self.process().qmp_socket,
        )  # fmt: skip

    def qemu_version(self) -> str:
        process = self.process()
        return qemu_version(process.command[0]) if process.command else ""

    @classmethod
    def start(
        cls,
        store: Store,
        name: str,
        spec: GuestSpec,
        *,
        extra_args: tuple[str, ...] = (),
        machine_type: str | None = None,
        incoming: bool = False,
    ) -> LocalGuest:
        """Start QEMU for ``spec``; the record is written before QEMU starts, so an
        interrupted start leaves a guest that ``stop`` and ``list`` know."""
        check_name(name)
        guest = cls(store, name)
        guest.refuse_if_running()
        qemu_binary()  # a missing QEMU is said before anything is written
        accel = resolve_accel(spec.accel)
        runtime = store.host.runtime_dir(name)
        guest._record = GuestRecord(name, spec, None, accel, extra_args)
        guest.save()
        serial = rotate_serial_log(runtime)
        launch = Launch(
            name=name, accel=accel, serial_log=serial, machine_type=machine_type,
            incoming=incoming, extra_args=extra_args,
        )  # fmt: skip

        def remember(process: QemuProcess) -> None:
            guest.record.process = process
            guest.save()

        try:
            process = QemuProcess.launch(spec, launch, runtime_dir=runtime, on_spawn=remember)
        except BaseException:
            guest._forget_if_never_ran()
            raise
        try:
            guest.save()
            if not incoming:
                with process.monitor() as mon:
                    if not mon.is_running():
                        mon.cont()
        except BaseException:
            process.kill()
            guest._forget_if_never_ran()
            raise
        return guest

    def _forget_if_never_ran(self) -> None:
        """A start that failed with no QEMU left running: no guest for ``list`` to show (its
        logs stay in its runtime directory). A QEMU that may still run keeps its record."""
        process = self.record.process
        if process is None or not process.alive():
            with contextlib.suppress(OSError, VmckptError):
                self.store.host.remove_record(self.name, RECORD)

    def observe(
        self,
        seconds: float,
        *,
        until: Callable[[Observation], bool] | None = None,
        stop: threading.Event | None = None,
    ) -> tuple[Observation, GuestFacts | None]:
        """Watch the running guest for ``seconds`` (vmckpt/machine/liveness.py: events from now on,
        its console from the start of this life), then ask QEMU what it emulates for it
        (vmckpt/machine/diagnose.py; None if QEMU is gone). Holds the guest's QMP monitor meanwhile,
        so ``stop`` (the guest is about to be stopped) ends the watch within one poll and
        asks QEMU nothing more (facts None)."""
        process = self.process()
        facts = None
        with process.monitor() as mon:
            mark = mon.mark()
            observation = observe(
                process, mon, since=mark, seconds=seconds, console_from=0, until=until, stop=stop
            )
            if not observation.exited and not (stop is not None and stop.is_set()):
                with contextlib.suppress(QMPError):
                    facts = probe_facts(mon)
        return observation, facts

    def refuse_if_running(self) -> None:
        with contextlib.suppress(MachineError, StoreError):
            process = self.record.process
            if process is not None and process.alive():
                raise UsageError(
                    f"guest {self.name} is running (PID {process.pid}); stop it first, "
                    "or use another name"
                )

    def status(self, *, ask_qemu: bool | None = None) -> GuestStatus:
        """Stopped, or QEMU's run state (``checkpointing`` while a checkpoint holds the
        guest's monitor: not waited for, unless ``ask_qemu``)."""
        head = self.head()
        process = self.record.process
        if process is None or not process.alive():
            return GuestStatus(self.name, self.kind, "stopped", None, head)
        state = "unknown"
        if ask_qemu is None:
            ask_qemu = not self.store.host.guest_locked(self.name)
        if not ask_qemu:
            state = "checkpointing"
        else:
            with contextlib.suppress(QMPError), process.monitor(timeout=STATUS_TIMEOUT_S) as mon:
                state = mon.status()
        return GuestStatus(self.name, self.kind, state, process.pid, head)

    def console(self, follow: bool, *, stop: threading.Event | None = None) -> Iterator[str]:
        """The serial output of the guest's current life; with ``follow``, until it ends or
        ``stop`` is set (checked before every read, so a guest that never stops talking
        does not keep it going)."""
        process = self.record.process  # an unknown guest is said so, and nothing is made
        log_path = self.store.host.runtime_path(self.name) / SERIAL_LOG
        if not log_path.exists():
            raise MachineError("has no console output yet", vm=self.name)
        alive = process if process is not None and process.alive() else None
        with log_path.open("r", errors="replace") as handle:
            while stop is None or not stop.is_set():
                chunk = handle.read()
                if chunk:
                    yield chunk
                    continue
                if not follow or alive is None or not alive.alive():
                    return
                if stop is None:
                    time.sleep(CONSOLE_POLL_S)
                else:
                    stop.wait(CONSOLE_POLL_S)

    def stop(self) -> str:
        process = self.process()
        started = time.monotonic()
        process.shutdown()
        self.record.process = None
        self.save()
        return f"guest {self.name} stopped (PID {process.pid}, {time.monotonic() - started:.1f} s)"


def local_guest_names(store: Store) -> list[str]:
    return store.host.names_with(RECORD)


def gone_guests(store: Store, idle_s: float) -> list[tuple[str, str]]:
    """The guests of this host that are gone, as (kind, name): no QEMU of theirs runs here, no
    checkpoint of theirs is under way, they are not running on another host, and nothing in
    their runtime directory changed for ``idle_s`` (or they have none left here, as after a
    reboot, but this host still keeps their files, or owns their head and its layer is older
    than ``idle_s``). ``gc`` removes their files on this host and their head: their layers
    are no longer kept for them."""
    away = set(store.host.names_with(REMOTE_RECORD, durable=True))
    me = host_id()
    heads = {name: head.layer for (kind, name), head in store.head_records().items()
             if kind == "guest" and head.host == me}  # fmt: skip
    names = set(store.host.names()) | set(store.host.names("guest", data=True)) | set(heads)
    gone = []
    for name in sorted(names):
        if name in away or store.host.guest_locked(name):
            continue
        if store.host.has_runtime(name):
            if store.host.runtime_idle_s(name) < idle_s:
                continue
        elif name in heads and _layer_age_s(store, heads[name]) < idle_s:
            continue
        try:
            data = store.host.read_record(name, RECORD)
            process = GuestRecord.from_dict(data, name).process if data is not None else None
        except (MachineError, StoreError):
            continue  # a damaged record: whether its QEMU runs cannot be told, leave it
        if process is None or not process.alive():
            gone.append(("guest", name))
    return gone


def _layer_age_s(store: Store, layer_id: str) -> float:
    try:
        created = parse_created(store.manifest(layer_id).created)
    except (StoreError, ValueError):
        return 0.0  # cannot tell: not gone
    return (datetime.now(UTC) - created).total_seconds()
