"""A QEMU that lives in memory: QEMU's side of QMP, scripted, for tests that boot nothing.

:class:`FakeQemu` keeps what QMP shows of a QEMU -- its run state, the migration's
status and settings, the file descriptors it was handed, its block jobs -- and answers
the commands vmckpt sends as QEMU does: the same replies, refusals with QEMU's error
classes (a capability set while a migration runs, ``x-colo-lost-heartbeat`` outside
COLO, an unknown ``closefd``...), events stamped with a clock the test controls. A test
scripts it:

- ``outcome``: what a started migration does (:data:`COMPLETED`, :data:`FAILED`,
  :data:`COLO` or :data:`STALL`). It moves on one step whenever a client *waits* for an
  event, as QEMU's migration thread moves while vmckpt waits, so nothing sleeps;
- :meth:`FakeQemu.fail`: a command refused (an error class and text) or the connection
  lost, for the n-th call, a number of calls, or every call;
- :meth:`FakeQemu.forbid`: a command that must not come (it raises at once);
- :meth:`FakeQemu.before`: a check run when a command arrives ("the journal exists now");
- :attr:`FakeQemu.log`: every command with its arguments and what became of it.

A command the fake does not play, or arguments QEMU would not parse, raise
:class:`UnexpectedCommand`, an AssertionError: a fake that answered anything would let a
wrong test pass (tests/test_fakeqmp.py checks that it does not).

Three ways in, one QEMU behind them:

- :meth:`FakeQemu.transport` -- a :class:`vmckpt.qmp.Transport`: ``Monitor(fake.transport())``;
- :class:`FakeChannel` -- a libvirt-style :class:`vmckpt.qmp.Passthrough` (JSON text in and out);
- :class:`FakeQmpServer` -- a real Unix socket speaking QMP (greeting, negotiation, ids,
  SCM_RIGHTS), for code that connects by path or runs in another process (the guard).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import queue
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from vmckpt.errors import QMPError
from vmckpt.qmp import CommandRefused, RawEvent

# What a migration the fake runs does once started.
COMPLETED = "completed"  # active, then the guest stops, then completed (run state postmigrate)
FAILED = "failed"  # active, then failed with ``error_desc`` (the guest runs on)
COLO = "colo"  # active, then the guest stops, COLO is entered and the guest runs again
STALL = "stall"  # active, and stays so until cancelled
OUTCOMES = (COMPLETED, FAILED, COLO, STALL)

# QEMU's migration_is_running(): states in which a new migration, or a capability change,
# is refused (QEMU's own list, kept here apart from vmckpt's).
MIGRATION_RUNNING = frozenset(
    {
        "setup", "active", "pre-switchover", "device", "wait-unplug", "cancelling", "colo",
        "postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-recover-setup",
    }
)  # fmt: skip

DEFAULT_CAPABILITIES: dict[str, bool] = {
    "xbzrle": False, "rdma-pin-all": False, "auto-converge": False, "zero-blocks": False,
    "events": False, "postcopy-ram": False, "x-colo": False, "release-ram": False,
    "return-path": False, "pause-before-switchover": False, "multifd": False,
    "dirty-bitmaps": False, "postcopy-blocktime": False, "late-block-activate": False,
    "x-ignore-shared": False, "validate-uuid": False, "background-snapshot": False,
    "zero-copy-send": False, "postcopy-preempt": False, "switchover-ack": False,
    "dirty-limit": False, "mapped-ram": False,
}  # fmt: skip
DEFAULT_PARAMETERS: dict[str, Any] = {
    "announce-initial": 50, "announce-max": 550, "announce-rounds": 5, "announce-step": 100,
    "throttle-trigger-threshold": 50, "cpu-throttle-initial": 20,
    "cpu-throttle-increment": 10, "cpu-throttle-tailslow": False, "tls-creds": "",
    "tls-hostname": "", "max-bandwidth": 134217728, "avail-switchover-bandwidth": 0,
    "downtime-limit": 300, "x-checkpoint-delay": 20000, "multifd-channels": 2,
    "xbzrle-cache-size": 67108864, "max-postcopy-bandwidth": 0,
    "max-cpu-throttle": 99, "multifd-compression": "none", "multifd-zlib-level": 1,
    "multifd-qatzip-level": 1, "multifd-zstd-level": 1, "mode": "normal",
    "zero-page-detection": "multifd",
}  # fmt: skip

START_CLOCK = 1_750_000_000.0  # QEMU's clock at the fake's start (seconds since the epoch)
EVENT_STEP_S = 0.001  # the clock moves this much after each event
CHUNK_BYTES = 1 << 20  # what a migration step "sends"


class UnexpectedCommand(AssertionError):
    """The fake was sent a command it does not play, one the test forbade, or arguments
    QEMU would not have parsed: the test (or the code under test) is wrong."""


class Refusal(Exception):
    """QEMU's error reply to one command: its class and text."""

    def __init__(self, error_class: str, desc: str) -> None:
        super().__init__(f"{desc} ({error_class})")
        self.error_class = error_class
        self.desc = desc


class ConnectionLost(Exception):
    """The monitor connection broke during a command (the reply never came)."""


@dataclass(frozen=True)
class Call:
    """One command as the fake received it, and what became of it: ``ok``,
    ``refused <ErrorClass>``, ``lost``, or (an UnexpectedCommand) ``forbidden``, ``unknown``,
    ``malformed``."""

    command: str
    arguments: dict[str, Any]
    outcome: str


@dataclass
class Fault:
    """A scripted failure of ``command``: after ``skip`` calls that succeed, ``times`` calls
    fail (None: every later call); each is refused (``error_class``, ``desc``) or ``lost``."""

    command: str
    error_class: str = "GenericError"
    desc: str = ""
    lost: bool = False
    skip: int = 0
    times: int | None = 1
    seen: int = 0  # calls of ``command`` so far
    fired: int = 0  # calls it failed

    def applies(self) -> bool:
        self.seen += 1
        if self.seen <= self.skip or (self.times is not None and self.fired >= self.times):
            return False
        self.fired += 1
        return True


Handler = Callable[[dict[str, Any], int | None], Any]


@dataclass
class FakeQemu:
    """QEMU's side of QMP, in memory (see the module doc)."""

    name: str = "fake"
    version: tuple[int, int, int] = (10, 0, 2)
    run_state: str = "running"  # "inmigrate" for a QEMU started with -incoming defer
    outcome: str = COMPLETED
    error_desc: str = "Unable to write to socket: Connection reset by peer"
    downtime_s: float = 0.004  # the guest's pause at the end of a migration (STOP to completed)
    capabilities: dict[str, bool] = field(default_factory=lambda: dict(DEFAULT_CAPABILITIES))
    parameters: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PARAMETERS))
    qom: dict[tuple[str, str], Any] = field(default_factory=dict)  # (path, property) -> value
    cpus: list[dict[str, Any]] = field(default_factory=list)  # query-cpus-fast
    block_nodes: list[dict[str, Any]] = field(default_factory=list)  # query-named-block-nodes
    jobs: list[dict[str, Any]] = field(default_factory=list)  # query-jobs
    clock: float = START_CLOCK
    migration_status: str = "none"
    transferred: int = 0
    fds: dict[str, int] = field(default_factory=dict)  # getfd name -> inode of the socket
    log: list[Call] = field(default_factory=list)
    autostart: bool = False  # an incoming QEMU runs the guest once it arrived (after `cont`)
    quit_requested: bool = False

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome {self.outcome!r} is not one of {OUTCOMES}")
        self._lock = threading.RLock()
        self._faults: list[Fault] = []
        self._forbidden: dict[str, str] = {}
        self._checks: dict[str, list[Callable[[dict[str, Any]], None]]] = {}
        self._listeners: list[Callable[[RawEvent], None]] = []
        self._steps: deque[Callable[[], None]] = deque()  # what the migration does next
        self._settle: deque[Callable[[], None]] = deque()  # a cancel or failover finishing
        self._incoming_port = 0
        self.downtime_ms: int | None = None
        self._handlers: dict[str, Handler] = {
            "query-version": self._query_version,
            "query-commands": self._query_commands,
            "query-status": self._query_status,
            "stop": self._stop,
            "cont": self._cont,
            "quit": self._quit,
            "query-migrate": self._query_migrate,
            "query-migrate-capabilities": self._query_capabilities,
            "migrate-set-capabilities": self._set_capabilities,
            "query-migrate-parameters": self._query_parameters,
            "migrate-set-parameters": self._set_parameters,
            "migrate": self._migrate,
            "migrate-incoming": self._migrate_incoming,
            "migrate_cancel": self._migrate_cancel,
            "x-colo-lost-heartbeat": self._colo_lost_heartbeat,
            "getfd": self._getfd,
            "closefd": self._closefd,
            "qom-get": self._qom_get,
            "query-cpus-fast": lambda _args, _fd: list(self.cpus),
            "query-named-block-nodes": lambda _args, _fd: list(self.block_nodes),
            "query-jobs": lambda _args, _fd: list(self.jobs),
            "query-fdsets": lambda _args, _fd: [],  # no fd sets: vmckpt added none here
            "transaction": self._transaction,
            "job-dismiss": self._job_dismiss,
        }

    # -- scripting ---------------------------------------------------------------------

    def fail(
        self,
        command: str,
        *,
        error_class: str = "GenericError",
        desc: str | None = None,
        lost: bool = False,
        skip: int = 0,
        times: int | None = 1,
    ) -> Fault:
        """Make ``command`` fail: after ``skip`` good calls, ``times`` calls (None: all)."""
        self._known(command)
        fault = Fault(command, error_class, desc or f"fake: {command} failed", lost, skip, times)
        self._faults.append(fault)
        return fault

    def forbid(self, command: str, why: str) -> None:
        """``command`` must not be sent from now on: it raises UnexpectedCommand saying ``why``."""
        self._known(command)
        self._forbidden[command] = why

    def allow(self, command: str) -> None:
        self._forbidden.pop(command, None)

    def before(self, command: str, check: Callable[[dict[str, Any]], None]) -> None:
        """Run ``check(arguments)`` whenever ``command`` arrives, before it takes effect."""
        self._known(command)
        self._checks.setdefault(command, []).append(check)

    def _known(self, command: str) -> None:
        if command not in self._handlers:
            raise UnexpectedCommand(f"the fake QEMU does not play {command!r}: cannot script it")

    def subscribe(self, listener: Callable[[RawEvent], None]) -> None:
        """``listener`` gets every event from now on (a monitor connection)."""
        with self._lock:
            self._listeners.append(listener)

    def unsubscribe(self, listener: Callable[[RawEvent], None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._listeners.remove(listener)

    def emit(self, name: str, data: Mapping[str, Any] | None = None) -> RawEvent:
        """Send an event to every connection, stamped with the clock (which then moves on)."""
        with self._lock:
            event = RawEvent(name, dict(data or {}), self.clock)
            self.clock += EVENT_STEP_S
            for listener in list(self._listeners):
                listener(event)
            return event

    def advance(self, seconds: float) -> None:
        """Move QEMU's clock (the next event's timestamp) on."""
        self.clock += seconds

    def progress(self) -> bool:
        """QEMU moves on by one step while a client waits: a cancel or a COLO failover
        settles, else the migration takes its next step. False if nothing is left to do."""
        with self._lock:
            if self._settle:
                self._settle.popleft()()
                return True
            if self._steps:
                self._steps.popleft()()
                return True
            return False

    # -- what the log shows ------------------------------------------------------------------

    def commands(self) -> list[str]:
        """The commands received, in order (refused and lost ones too)."""
        return [call.command for call in self.log]

    def calls(self, command: str) -> list[Call]:
        return [call for call in self.log if call.command == command]

    @property
    def running(self) -> bool:
        return self.run_state == "running"

    # -- the one entry point ----------------------------------------------------------------

    def handle(self, command: str, arguments: Mapping[str, Any] | None, fd: int | None) -> Any:
        """Answer one command: its return value; Refusal, ConnectionLost or UnexpectedCommand."""
        with self._lock:
            args = dict(arguments or {})
            if command in self._forbidden:
                self.log.append(Call(command, args, "forbidden"))
                raise UnexpectedCommand(f"{command} was sent, but {self._forbidden[command]}")
            handler = self._handlers.get(command)
            if handler is None:
                self.log.append(Call(command, args, "unknown"))
                raise UnexpectedCommand(
                    f"the fake QEMU does not play {command!r} (arguments {args}); "
                    "add it to tests/framework/fakeqmp.py if QEMU has it"
                )
            for check in self._checks.get(command, []):
                check(args)
            for fault in self._faults:
                if fault.command == command and fault.applies():
                    if fault.lost:
                        self.log.append(Call(command, args, "lost"))
                        raise ConnectionLost(f"the monitor connection broke during {command}")
                    self.log.append(Call(command, args, f"refused {fault.error_class}"))
                    raise Refusal(fault.error_class, fault.desc)
            try:
                result = handler(args, fd)
            except Refusal as refusal:
                self.log.append(Call(command, args, f"refused {refusal.error_class}"))
                raise
            except UnexpectedCommand:
                self.log.append(Call(command, args, "malformed"))
                raise
            self.log.append(Call(command, args, "ok"))
            return result

    # -- the commands -------------------------------------------------------------------------

    @staticmethod
    def _only(command: str, args: dict[str, Any], *allowed: str) -> None:
        unknown = set(args) - set(allowed)
        if unknown:
            raise UnexpectedCommand(f"{command}: QEMU takes no argument {sorted(unknown)}")

    @staticmethod
    def _string(command: str, args: dict[str, Any], name: str) -> str:
        value = args.get(name)
        if not isinstance(value, str):
            raise UnexpectedCommand(f"{command}: argument {name!r} must be a string: {value!r}")
        return value

    def _query_version(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("query-version", args)
        major, minor, micro = self.version
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": ""}

    def _query_commands(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("query-commands", args)
        return [{"name": name} for name in sorted(self._handlers)]

    def _query_status(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("query-status", args)
        return {"status": self.run_state, "running": self.running, "singlestep": False}

    def _stop(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("stop", args)
        if self.run_state == "inmigrate":
            self.autostart = False
        elif self.running:
            self.run_state = "paused"
            self.emit("STOP")
        return {}

    def _cont(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("cont", args)
        if self.run_state == "inmigrate":
            self.autostart = True  # QEMU runs the guest once the incoming migration is in
        elif not self.running:
            self.run_state = "running"
            self.emit("RESUME")
        return {}

    def _quit(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("quit", args)
        self.quit_requested = True
        return {}

    def _query_migrate(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("query-migrate", args)
        if self._settle:
            self._settle.popleft()()
        status = self.migration_status
        if status == "none":
            return {}  # QEMU says nothing about a migration that never was
        info: dict[str, Any] = {"status": status}
        if status != "setup":
            info["ram"] = {"transferred": self.transferred, "total": 256 << 20}
            info["total-time"] = 100
        if status == "completed" and self.downtime_ms is not None:
            info["downtime"] = self.downtime_ms
        if status == "failed":
            info["error-desc"] = self.error_desc
        if self._incoming_port:
            port = str(self._incoming_port)
            info["socket-address"] = [{"type": "inet", "host": "127.0.0.1", "port": port}]
        return info

    def _query_capabilities(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("query-migrate-capabilities", args)
        return [{"capability": k, "state": v} for k, v in self.capabilities.items()]

    def _set_capabilities(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("migrate-set-capabilities", args, "capabilities")
        entries = args.get("capabilities")
        if not isinstance(entries, list):
            raise UnexpectedCommand(f"migrate-set-capabilities: capabilities is {entries!r}")
        changes = {}
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != {"capability", "state"}:
                raise UnexpectedCommand(f"migrate-set-capabilities: entry {entry!r}")
            if not isinstance(entry["state"], bool):
                raise UnexpectedCommand(f"migrate-set-capabilities: state {entry['state']!r}")
            if entry["capability"] not in self.capabilities:
                raise Refusal(
                    "GenericError",
                    f"Parameter 'capability' does not accept value '{entry['capability']}'",
                )
            changes[str(entry["capability"])] = entry["state"]
        if self.migration_status in MIGRATION_RUNNING:
            raise Refusal("GenericError", "There's a migration process in progress")
        self.capabilities.update(changes)
        return {}

    def _query_parameters(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("query-migrate-parameters", args)
        return dict(self.parameters)

    def _set_parameters(self, args: dict[str, Any], _fd: int | None) -> Any:
        for key, value in args.items():
            if key not in self.parameters:
                raise Refusal("GenericError", f"Parameter '{key}' is unexpected")
            if type(value) is not type(self.parameters[key]):
                raise Refusal("GenericError", f"Parameter '{key}' expects another type")
        self.parameters.update(args)  # allowed while migrating (e.g. max-bandwidth)
        return {}

    def _migrate(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("migrate", args, "uri")
        uri = self._string("migrate", args, "uri")
        if self.migration_status in MIGRATION_RUNNING:
            raise Refusal("GenericError", "There's a migration process in progress")
        if self.run_state in ("inmigrate", "postmigrate"):
            raise Refusal("GenericError", f"Guest in state {self.run_state}: cannot migrate")
        if uri.startswith("fd:") and uri[3:] not in self.fds:
            raise Refusal("GenericError", f"File descriptor named '{uri[3:]}' has not been found")
        self.transferred = 0
        self.downtime_ms = None
        self._status("setup")
        self._steps.extend(self._outgoing_steps())
        return {}

    def _outgoing_steps(self) -> list[Callable[[], None]]:
        def active() -> None:
            self.transferred += CHUNK_BYTES
            self._status("active")

        def switchover() -> None:
            self.transferred += CHUNK_BYTES
            if self.running:
                self.run_state = "finish-migrate"
                self.emit("STOP")
            self.advance(self.downtime_s)
            self.downtime_ms = round(self.downtime_s * 1000)
            if self.outcome == COLO:
                self._status("colo")
                self.run_state = "running"
                self.emit("RESUME")
            else:
                self.run_state = "postmigrate"
                self._status("completed")

        def fail() -> None:
            self._status("failed")

        if self.outcome == STALL:
            return [active]
        if self.outcome == FAILED:
            return [active, fail]
        return [active, switchover]

    def _migrate_incoming(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("migrate-incoming", args, "uri")
        uri = self._string("migrate-incoming", args, "uri")
        if self.run_state != "inmigrate":
            raise Refusal("GenericError", "'-incoming' was not specified on the command line")
        if uri.startswith("tcp:") and uri.endswith(":0"):
            self._incoming_port = 45678
        self._status("setup")

        def arrive() -> None:
            self._status("active")
            self.run_state = "running" if self.autostart else "paused"
            self._status("completed")
            if self.autostart:
                self.emit("RESUME")

        self._steps.append(arrive)
        return {}

    def _migrate_cancel(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("migrate_cancel", args)
        if self.migration_status not in MIGRATION_RUNNING - {"colo"}:
            return {}  # nothing to cancel: QEMU says nothing either
        self._steps.clear()
        self._status("cancelling")

        def cancelled() -> None:
            if self.run_state == "finish-migrate":
                self.run_state = "running"
                self.emit("RESUME")
            self._status("cancelled")

        self._settle.append(cancelled)
        return {}

    def _colo_lost_heartbeat(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("x-colo-lost-heartbeat", args)
        if self.migration_status != "colo":
            raise Refusal("GenericError", "The feature 'colo' is not enabled")
        self._settle.append(lambda: self._status("completed"))  # the primary runs on
        return {}

    def _getfd(self, args: dict[str, Any], fd: int | None) -> Any:
        self._only("getfd", args, "fdname")
        name = self._string("getfd", args, "fdname")
        if fd is None:
            raise Refusal("GenericError", "No file descriptor supplied via SCM_RIGHTS")
        try:
            self.fds[name] = os.fstat(fd).st_ino
        except OSError as exc:
            raise UnexpectedCommand(f"getfd {name}: {fd} is not an open descriptor") from exc
        return {}

    def _closefd(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("closefd", args, "fdname")
        name = self._string("closefd", args, "fdname")
        if name not in self.fds:
            raise Refusal("GenericError", f"File descriptor named '{name}' not found")
        del self.fds[name]
        return {}

    def _qom_get(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("qom-get", args, "path", "property")
        path = self._string("qom-get", args, "path")
        prop = self._string("qom-get", args, "property")
        if not any(known == path for known, _ in self.qom):
            raise Refusal("DeviceNotFound", f"Device '{path}' not found")
        if (path, prop) not in self.qom:
            raise Refusal("GenericError", f"Property '{prop}' not found")
        return self.qom[(path, prop)]

    def _transaction(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("transaction", args, "actions")
        actions = args.get("actions")
        if not isinstance(actions, list) or not all(
            isinstance(a, dict) and set(a) == {"type", "data"} for a in actions
        ):
            raise UnexpectedCommand(f"transaction: actions {actions!r}")
        return {}

    def _job_dismiss(self, args: dict[str, Any], _fd: int | None) -> Any:
        self._only("job-dismiss", args, "id")
        job_id = self._string("job-dismiss", args, "id")
        if not any(job.get("id") == job_id for job in self.jobs):
            raise Refusal("GenericError", f"Job not found: '{job_id}'")
        self.jobs = [job for job in self.jobs if job.get("id") != job_id]
        return {}

    def _status(self, status: str) -> None:
        self.migration_status = status
        if self.capabilities.get("events"):
            self.emit("MIGRATION", {"status": status})

    # -- the ways in -----------------------------------------------------------------------------

    def transport(self, vm: str | None = None) -> FakeTransport:
        """A new monitor connection to this QEMU, as a vmckpt Transport."""
        return FakeTransport(self, vm)

    def version_text(self) -> str:
        return ".".join(str(part) for part in self.version)


class FakeTransport:
    """One monitor connection to a :class:`FakeQemu` (a :class:`vmckpt.qmp.Transport`).

    Errors are those SocketTransport raises: a refusal is a CommandRefused with QEMU's error
    class, a lost connection a QMPError (and every later command fails too)."""

    def __init__(self, qemu: FakeQemu, vm: str | None) -> None:
        self.qemu = qemu
        self.vm = vm
        self.description = f"the fake QEMU {qemu.name}"
        self.connected = False
        self.closed = False
        self.broken = False
        self._events: deque[RawEvent] = deque()

    def connect(self, timeout: float) -> str:
        del timeout
        if self.closed:
            raise UnexpectedCommand("connect on a transport that was closed")
        self.qemu.subscribe(self._events.append)
        self.connected = True
        return self.qemu.version_text()

    def execute(self, command: str, arguments: Mapping[str, object] | None, timeout: float) -> Any:
        return self._call(command, arguments, None)

    def execute_with_fd(
        self, command: str, arguments: Mapping[str, object], fd: int, timeout: float
    ) -> Any:
        return self._call(command, arguments, fd)

    def _call(self, command: str, arguments: Mapping[str, object] | None, fd: int | None) -> Any:
        if not self.connected or self.closed:
            raise UnexpectedCommand(f"{command} sent on a monitor that is not connected")
        if self.broken:
            raise QMPError(
                f"lost the monitor connection before {command}", vm=self.vm, step=command
            )
        try:
            return self.qemu.handle(command, arguments, fd)
        except Refusal as refusal:
            raise CommandRefused(
                f"QEMU refused {command}: {refusal.desc} ({refusal.error_class})",
                refusal.error_class,
                vm=self.vm,
                step=command,
            ) from refusal
        except ConnectionLost as lost:
            self.broken = True
            raise QMPError(
                f"lost the monitor connection during {command}: {lost}", vm=self.vm, step=command
            ) from lost

    def next_event(self, timeout: float) -> RawEvent | None:
        """An event already sent; if there is none and the caller waits, QEMU moves on."""
        while not self._events:
            if timeout <= 0 or not self.qemu.progress():
                return None
        return self._events.popleft()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.qemu.unsubscribe(self._events.append)


class FakeChannel:
    """A :class:`vmckpt.qmp.Passthrough` to a :class:`FakeQemu`, as libvirt's monitor
    passthrough is: QMP JSON text in, QEMU's reply as JSON text out, events queued as
    (name, seconds, microseconds, data JSON). ``garble(command, text)`` makes the reply
    to ``command`` that text, to test what the reader does with a bad reply."""

    def __init__(self, qemu: FakeQemu) -> None:
        self.qemu = qemu
        self.description = f"fake libvirt domain {qemu.name}"
        self.opened = False
        self.closed = False
        self._events: queue.SimpleQueue[tuple[str, int, int, str | None]] = queue.SimpleQueue()
        self._garbled: dict[str, str] = {}

    def garble(self, command: str, text: str) -> None:
        self._garbled[command] = text

    def _queue(self, event: RawEvent) -> None:
        seconds = int(event.timestamp)
        micros = round((event.timestamp - seconds) * 1e6)
        data = json.dumps(dict(event.data)) if event.data else None
        self._events.put((event.name, seconds, micros, data))

    def open(self) -> None:
        self.opened = True
        self.qemu.subscribe(self._queue)

    def command(self, text: str) -> str:
        return self._command(text, None)

    def command_with_fd(self, text: str, fd: int) -> str:
        return self._command(text, fd)

    def _command(self, text: str, fd: int | None) -> str:
        if not self.opened or self.closed:
            raise UnexpectedCommand(f"command {text} on a channel that is not open")
        request = json.loads(text)
        if not isinstance(request, dict) or set(request) - {"execute", "arguments"}:
            raise UnexpectedCommand(f"not a QMP command: {text}")
        command = str(request["execute"])
        if command in self._garbled:
            return self._garbled[command]
        try:
            result = self.qemu.handle(command, request.get("arguments"), fd)
        except Refusal as refusal:
            return json.dumps({"error": {"class": refusal.error_class, "desc": refusal.desc}})
        except ConnectionLost as lost:
            raise QMPError(f"{self.description}: {lost}", step=command) from lost
        return json.dumps({"return": result})

    @property
    def events(self) -> queue.SimpleQueue[tuple[str, int, int, str | None]]:
        return self._events

    def close(self) -> None:
        self.closed = True
        self.qemu.unsubscribe(self._queue)


class FakeQmpServer:
    """A :class:`FakeQemu` behind a real QMP socket at ``path`` (one client at a time, like
    QEMU's): the greeting, ``qmp_capabilities``, replies with the request's ``id``, events,
    file descriptors by SCM_RIGHTS. A context manager; its thread ends on exit.

    ``connections`` counts the clients that connected; ``errors`` holds what went wrong in
    the server thread (a test checks it is empty)."""

    def __init__(self, qemu: FakeQemu, path: Path) -> None:
        self.qemu = qemu
        self.path = path
        self.connections = 0
        self.errors: list[str] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._thread = threading.Thread(target=self._serve, name="fake-qmp", daemon=True)
        self._stopping = threading.Event()
        self._current: socket.socket | None = None

    def __enter__(self) -> Self:
        self._listener.bind(str(self.path))
        self._listener.listen(4)
        self._listener.settimeout(0.05)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stopping.set()
        current = self._current
        if current is not None:
            with contextlib.suppress(OSError):
                current.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self._listener.close()
        self.path.unlink(missing_ok=True)

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            self._current = conn
            try:
                with conn:
                    conn.settimeout(None)
                    self._session(conn)
            except Exception as exc:  # reported to the test, which checks `errors`
                self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                self._current = None

    def _session(self, conn: socket.socket) -> None:
        write_lock = threading.Lock()

        def send(message: Mapping[str, Any]) -> None:
            with write_lock, contextlib.suppress(OSError):
                conn.sendall(json.dumps(message).encode() + b"\n")

        def event(raw: RawEvent) -> None:
            seconds = int(raw.timestamp)
            stamp = {"seconds": seconds, "microseconds": round((raw.timestamp - seconds) * 1e6)}
            send({"event": raw.name, "data": dict(raw.data), "timestamp": stamp})

        major, minor, micro = self.qemu.version
        version = {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": ""}
        send({"QMP": {"version": version, "capabilities": []}})
        negotiated = False
        try:
            for request, fd in self._requests(conn):
                command = str(request.get("execute"))
                reply: dict[str, Any] = {"id": request["id"]} if "id" in request else {}
                if command == "qmp_capabilities":
                    negotiated = True
                    self.qemu.subscribe(event)
                    send({**reply, "return": {}})
                    continue
                if not negotiated:
                    send({**reply, "error": {"class": "CommandNotFound", "desc": "negotiate"}})
                    continue
                try:
                    result = self.qemu.handle(command, request.get("arguments"), fd)
                except Refusal as refusal:
                    error = {"class": refusal.error_class, "desc": refusal.desc}
                    send({**reply, "error": error})
                    continue
                except ConnectionLost:
                    return  # the client sees its connection end mid-command
                except UnexpectedCommand as wrong:
                    self.errors.append(str(wrong))
                    send({**reply, "error": {"class": "CommandNotFound", "desc": str(wrong)}})
                    continue
                finally:
                    if fd is not None:
                        os.close(fd)
                send({**reply, "return": result})
        finally:
            self.qemu.unsubscribe(event)

    def _requests(self, conn: socket.socket) -> Iterator[tuple[dict[str, Any], int | None]]:
        """Each JSON request the client sends, with the descriptor that came before it."""
        decoder = json.JSONDecoder()
        buffer = ""
        pending_fd: int | None = None
        while True:
            try:
                data, ancillary, _flags, _addr = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 4))
            except OSError:
                return
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    received = array.array("i")
                    received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
                    for fd in received:
                        if pending_fd is not None:
                            os.close(pending_fd)  # QEMU keeps only the last one, too
                        pending_fd = fd
            if not data:
                if pending_fd is not None:
                    os.close(pending_fd)
                return
            buffer += data.decode()
            while True:
                stripped = buffer.lstrip()
                if not stripped:
                    buffer = ""
                    break
                try:
                    message, end = decoder.raw_decode(stripped)
                except ValueError:
                    buffer = stripped
                    break
                buffer = stripped[end:]
                if not isinstance(message, dict):
                    raise UnexpectedCommand(f"not a QMP message: {message!r}")
                yield message, pending_fd
                pending_fd = None
