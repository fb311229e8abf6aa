"""Guests as the commands see them: one interface, one implementation per kind of guest.

- :class:`LocalGuest`: a QEMU that vmckpt started on this host (``vmckpt run``,
  ``vmckpt restore``), with its record, sockets and console in the store;
- :class:`vmckpt.libvirt.LibvirtGuest`: a running libvirt domain, reached through
  libvirt's monitor passthrough;
- :class:`vmckpt.remote.RemoteGuest`: a guest vmckpt runs on another host, whose
  commands run there over SSH.

:func:`open_guest` picks the implementation; the CLI only dispatches to the
methods of :class:`Guest`. A method a kind of guest cannot offer raises a
UsageError saying so.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from vmckpt import log
from vmckpt.checkpoint import CheckpointResult, CheckpointSettings, take_checkpoint
from vmckpt.colo import SessionClient, end_session, session_pid
from vmckpt.errors import MachineError, QMPError, StoreError, UsageError
from vmckpt.guard import Guard
from vmckpt.hostdirs import host_id
from vmckpt.images import Store
from vmckpt.images.retention import parse_created
from vmckpt.machine.binary import qemu_binary, qemu_version, resolve_accel
from vmckpt.machine.diagnose import GuestFacts, probe_facts
from vmckpt.machine.liveness import Observation, observe
from vmckpt.machine.qemu import SERIAL_LOG, Launch, QemuProcess, rotate_serial_log
from vmckpt.machine.spec import GuestSpec, check_name
from vmckpt.mechanisms import COLO, PRECOPY, Choice, choose_mechanism
from vmckpt.progress import NO_PROGRESS, Progress
from vmckpt.qmp import CONT_RETRY_S, Monitor
from vmckpt.session import JOURNAL, recover
from vmckpt.watch import WatchSettings, prune_note, stop_on_signals, watch

RECORD = "guest.json"
STATUS_TIMEOUT_S = 3.0
CONSOLE_POLL_S = 0.1
_log = log.get(__name__)


@dataclass(frozen=True)
class GuestStatus:
    """One guest's row in ``vmckpt list`` (the JSON vocabulary of the README)."""

    name: str
    kind: str  # guest (vmckpt runs it here), libvirt, remote
    state: str  # QEMU's run state, "stopped", "unknown", "unreachable"
    pid: int | None
    head: str | None
    host: str = "local"
    mechanism: str = ""  # what its next checkpoint uses
    mechanism_reason: str = ""
    session: str = ""  # its COLO checkpoint session, if one is open

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "pid": self.pid,
            "head": self.head,
            "host": self.host,
            "mechanism": self.mechanism,
            "mechanism_reason": self.mechanism_reason,
            "session": self.session,
        }


class Guest:
    """A guest the commands act on (see the module doc)."""

    kind = "guest"  # the store's name space for its head and runtime files

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name

    # What a checkpoint needs (vmckpt.checkpoint.CheckpointTarget).

    def spec(self) -> GuestSpec:
        raise self._unsupported("has no spec")

    def monitor(self) -> Monitor:
        raise self._unsupported("has no monitor here")

    def guard(self) -> Guard:
        raise self._unsupported("cannot be guarded from here")

    @property
    def accel(self) -> str:
        return ""

    def head(self) -> str | None:
        return self.store.head(self.name, self.kind)

    def mechanism(self) -> Choice:
        """The checkpoint mechanism this guest gets, and why."""
        with self.monitor() as mon:
            version = mon.version
        return choose_mechanism(version, self.accel, self.spec(), local=False)

    # The commands.

    def checkpoint(
        self, settings: CheckpointSettings | None = None, *, progress: Progress = NO_PROGRESS
    ) -> CheckpointResult:
        return take_checkpoint(self, settings, progress=progress)

    def checkpoint_row(
        self,
        settings: CheckpointSettings | None = None,
        *,
        progress: Progress = NO_PROGRESS,
        mechanism: str = "auto",
    ) -> dict[str, Any]:
        """One checkpoint, as the row ``checkpoint --json`` prints."""
        self._choose(mechanism)
        return {**self.checkpoint(settings, progress=progress).to_dict(), "host": "local"}

    def watch_rows(
        self,
        settings: WatchSettings,
        report: Callable[[dict[str, Any]], None],
        *,
        progress: Progress = NO_PROGRESS,
        mechanism: str = "auto",
    ) -> int:
        """Periodic checkpoints; ``report`` gets each one's row (with a ``note``)."""
        self._choose(mechanism)

        def row(result: CheckpointResult, note: str) -> None:
            report({**result.to_dict(), "host": "local", "note": note})

        return watch(self, settings, row, progress=progress)

    def _choose(self, requested: str) -> Choice:
        """The mechanism to use: the guest's own (auto), or the one asked for if allowed."""
        choice = self.mechanism()
        if requested in ("auto", choice.mechanism):
            return choice
        if requested == COLO:
            raise UsageError(f"guest {self.name}: COLO is refused here: {choice.reason}")
        if requested != PRECOPY:
            raise UsageError(f"unknown mechanism {requested!r} (auto, {COLO} or {PRECOPY})")
        return Choice(PRECOPY, "asked for")

    def status(self) -> GuestStatus:
        raise self._unsupported("has no status here")

    def console(self, follow: bool) -> Iterator[str]:
        raise self._unsupported("has no console here")

    def stop(self) -> str:
        raise self._unsupported("is not stopped by vmckpt")

    def pause(self) -> None:
        with self.monitor() as mon:
            mon.stop()

    def resume(self) -> bool:
        """Run the guest (after a pause, or a checkpoint a dead vmckpt left half done).
        Returns whether a left-over migration session was recovered."""
        lock = self.store.host.guest_lock(self.name, what="resume", wait_s=30, kind=self.kind)
        with lock, self.monitor() as mon:
            recovered = recover(
                mon, self.store.host.journal_path(self.name, JOURNAL, self.kind), vm=self.name
            )
            if not mon.is_running():
                mon.cont(retry_s=CONT_RETRY_S)
        return recovered

    def _unsupported(self, what: str) -> UsageError:
        return UsageError(f"guest {self.name} ({self.kind}) {what}")


# -- guests vmckpt runs here -------------------------------------------------------------


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
    """A QEMU vmckpt started on this host."""

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

    def guard(self) -> Guard:
        return Guard.for_qmp(
            store=self.store.path, name=self.name, kind=self.kind,
            qmp_socket=self.process().qmp_socket,
        )  # fmt: skip

    def mechanism(self) -> Choice:
        process = self.process()
        version = qemu_version(process.command[0]) if process.command else ""
        return choose_mechanism(version, self.accel, self.spec(), local=True)

    # -- checkpoints: a COLO session where the mechanism is colo -----------------------

    def checkpoint_row(
        self,
        settings: CheckpointSettings | None = None,
        *,
        progress: Progress = NO_PROGRESS,
        mechanism: str = "auto",
    ) -> dict[str, Any]:
        if self._choose(mechanism).mechanism == COLO:
            client = SessionClient.ensure(self)
            try:
                row: dict[str, Any] = client.request("checkpoint")["row"]
            finally:
                client.close()
            return row
        self.end_session()
        return super().checkpoint_row(settings, progress=progress, mechanism=PRECOPY)

    def watch_rows(
        self,
        settings: WatchSettings,
        report: Callable[[dict[str, Any]], None],
        *,
        progress: Progress = NO_PROGRESS,
        mechanism: str = "auto",
    ) -> int:
        if self._choose(mechanism).mechanism != COLO:
            self.end_session()
            return super().watch_rows(settings, report, progress=progress, mechanism=PRECOPY)
        client = SessionClient.ensure(self)
        taken = 0
        pruned_at: float | None = None
        try:
            with stop_on_signals() as stop:
                for row in client.watch(
                    stop,
                    interval_s=settings.interval_s,
                    count=settings.count,
                    pause_budget_ms=settings.pause_budget_ms,
                ):
                    keep = settings.keep
                    if keep and (
                        pruned_at is None or time.monotonic() - pruned_at >= settings.prune_every_s
                    ):
                        # The session writes on meanwhile: a prune keeps every head.
                        pruned_at = time.monotonic()
                        notes = [row.get("note", ""), prune_note(self, keep)]
                        row = {**row, "note": "; ".join(filter(None, notes))}
                    report(row)
                    taken += 1
        finally:
            client.close()
        return taken

    def end_session(self) -> bool:
        """End the guest's COLO checkpoint session, if one runs (before anything that needs
        the guest to itself: a precopy-diff checkpoint, a migration, a pause, a stop)."""
        return end_session(self.store, self.name)

    # -- life cycle --------------------------------------------------------------------

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

        process = QemuProcess.launch(spec, launch, runtime_dir=runtime, on_spawn=remember)
        try:
            guest.save()
            if not incoming:
                with process.monitor() as mon:
                    if not mon.is_running():
                        mon.cont()
        except BaseException:
            process.kill()
            raise
        return guest

    def observe(
        self,
        seconds: float,
        *,
        until: Callable[[Observation], bool] | None = None,
        stop: threading.Event | None = None,
    ) -> tuple[Observation, GuestFacts | None]:
        """Watch the running guest for ``seconds`` (vmckpt/liveness.py: events from now on,
        its console from the start of this life), then ask QEMU what it emulates for it
        (vmckpt/diagnose.py; None if QEMU is gone). Holds the guest's QMP monitor meanwhile,
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

    def status(self) -> GuestStatus:
        head = self.head()
        process = self.record.process
        if process is None or not process.alive():
            return GuestStatus(self.name, self.kind, "stopped", None, head)
        state = "unknown"
        mechanism = Choice("", "")
        session = session_pid(self.store, self.name)
        if session is None and self.store.host.guest_locked(self.name):
            state = "checkpointing"  # its monitor is busy; not waited for
        else:
            with contextlib.suppress(QMPError), process.monitor(timeout=STATUS_TIMEOUT_S) as mon:
                state = mon.status()
        with contextlib.suppress(MachineError, OSError):
            mechanism = self.mechanism()
        return GuestStatus(
            self.name, self.kind, state, process.pid, head,
            mechanism=mechanism.mechanism, mechanism_reason=mechanism.reason,
            session=f"open, PID {session}" if session else "",
        )  # fmt: skip

    def console(self, follow: bool, *, stop: threading.Event | None = None) -> Iterator[str]:
        """The serial output of the guest's current life; with ``follow``, until it ends or
        ``stop`` is set (checked before every read, so a guest that never stops talking
        does not keep it going)."""
        log_path = self.store.host.runtime_dir(self.name) / SERIAL_LOG
        if not log_path.exists():
            raise MachineError("has no console output yet", vm=self.name)
        process = self.record.process
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

    def pause(self) -> None:
        self.end_session()  # a COLO checkpoint would run the guest again
        super().pause()

    def stop(self) -> str:
        process = self.process()
        self.end_session()
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
    from vmckpt.remote import remote_names

    away = set(remote_names(store))
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


def open_guest(
    store: Store, name: str | None = None, *, libvirt: str | None = None, uri: str | None = None
) -> Guest:
    """The guest a command names: a libvirt domain (``libvirt``), a guest recorded as
    running on another host, or one vmckpt runs here."""
    if libvirt is not None:
        from vmckpt.libvirt import LibvirtGuest

        return LibvirtGuest(store, libvirt, uri)
    if name is None:
        raise UsageError("name a guest (or --libvirt DOMAIN)")
    check_name(name)
    from vmckpt.remote import RemoteGuest

    remote = RemoteGuest.load(store, name)
    if remote is not None:
        return remote
    return LocalGuest(store, name)
