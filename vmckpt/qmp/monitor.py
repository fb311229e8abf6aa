"""The QMP commands and events vmckpt uses, typed, over any transport.

A :class:`Monitor` is one connection to one QEMU. Every call has a timeout,
every failure is a :class:`~vmckpt.errors.QMPError` naming the guest and the
command, and events are kept in arrival order with QEMU's own timestamps
(which is how vmckpt measures a guest's pause). Every command, reply and
event is logged at DEBUG on ``vmckpt.qmp``. Not thread safe: one thread
drives a monitor.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from vmckpt import log
from vmckpt.errors import QMPError
from vmckpt.qmp.transport import (
    CommandRefused,
    LineTransport,
    RawEvent,
    Transport,
)

DEFAULT_TIMEOUT = 10.0
# Right after a MIGRATION "completed" event QEMU may still be tidying up its migration
# thread and refuse `cont` with "Migration is not finalized yet"; retried for this long.
CONT_RETRY_S = 5.0
_CONT_RETRY_STEP_S = 0.0005

_log = log.get("vmckpt.qmp")

Event = RawEvent  # an event as vmckpt keeps it: name, data, QEMU's timestamp


@dataclass(frozen=True)
class MigrationInfo:
    """The parts of ``query-migrate`` vmckpt uses."""

    status: str
    downtime_ms: int | None
    total_time_ms: int | None
    transferred: int | None
    error: str | None
    dirty_sync_count: int | None = None  # RAM passes QEMU has synced its dirty log for


@dataclass(frozen=True)
class BlockNode:
    """The parts of one ``query-named-block-nodes`` entry vmckpt uses."""

    node_name: str
    driver: str
    file: str
    read_only: bool
    size: int  # virtual size in bytes
    bitmaps: tuple[str, ...]  # names of its dirty bitmaps


@dataclass(frozen=True)
class JobInfo:
    """One ``query-jobs`` entry: id, status (e.g. running, concluded) and error, if any."""

    id: str
    status: str
    error: str | None


@dataclass
class Pending:
    """A command sent with :meth:`Monitor.submit`, its reply still to be taken."""

    command: str
    token: int | None  # the transport's; None: already answered (``result``)
    result: Any = None


def _brief(value: Any, limit: int = 300) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class Monitor:
    """One QMP connection to one QEMU, over a :class:`Transport`."""

    def __init__(
        self, transport: Transport, *, vm: str | None = None, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        self.transport = transport
        self.vm = vm
        self.timeout = timeout
        self.version = ""  # QEMU's major.minor.micro, known once connected
        self._events: list[Event] = []
        self._forgotten = 0  # events dropped from the front of the history (forget_before)
        self._connected = False
        self._closed = False

    @classmethod
    def unix(
        cls,
        address: str | Path | socket.socket,
        *,
        vm: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Monitor:
        """A connected monitor on QEMU's QMP socket (a path, or a connected socket)."""
        from vmckpt.qmp.asyncqmp import SocketTransport  # asyncio: imported by its users only

        return cls(SocketTransport(address, vm=vm), vm=vm, timeout=timeout).connect()

    @classmethod
    def lines(
        cls,
        path: str | Path,
        *,
        vm: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        oob: bool = False,
    ) -> Monitor:
        """A connected monitor on QEMU's QMP socket that speaks QMP directly
        (:class:`~vmckpt.qmp.transport.LineTransport`: cheaper per command, and
        :meth:`submit` sends a command whose reply is taken later); with ``oob``, one that
        negotiated out-of-band commands where QEMU offers them (:meth:`execute_oob`)."""
        return cls(LineTransport(path, vm=vm, oob=oob), vm=vm, timeout=timeout).connect()

    @classmethod
    def adopt(
        cls, sock: socket.socket, *, vm: str | None, description: str,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> Monitor:  # fmt: skip
        """A connection with out-of-band commands that another process negotiated and
        handed on (:meth:`LineTransport.adopt`); its QEMU version is not asked for."""
        monitor = cls(LineTransport.adopt(sock, vm=vm, description=description), vm=vm,
                      timeout=timeout)  # fmt: skip
        monitor._connected = True
        return monitor

    @property
    def oob(self) -> bool:
        """Whether out-of-band commands were negotiated on this connection."""
        return isinstance(self.transport, LineTransport) and self.transport.oob

    def handover_socket(self) -> socket.socket:
        """The connection's socket, to hand the connection to another process (a
        :meth:`lines` monitor only)."""
        if not isinstance(self.transport, LineTransport):
            raise QMPError("only a direct monitor connection can be handed on", vm=self.vm,
                           step="handover")  # fmt: skip
        return self.transport.connection()

    # -- connection ---------------------------------------------------------

    def connect(self) -> Self:
        """Connect and negotiate; QMPError if the other end is not QEMU's QMP. A connect
        that fails (or is interrupted) leaves nothing open: no caller holds the monitor yet
        to close it."""
        try:
            self.version = self.transport.connect(self.timeout)
        except BaseException:
            self.transport.close()
            raise
        self._connected = True
        _log.debug(
            "%s: connected to QEMU %s at %s", self.vm, self.version, self.transport.description
        )
        return self

    def close(self) -> None:
        """Disconnect; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.transport.close()
        self._connected = False

    def __enter__(self) -> Self:
        if not self._connected:
            self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- commands -----------------------------------------------------------

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one QMP command; its error becomes a QMPError naming the command."""
        _log.debug("%s -> %s %s", self.vm, command, _brief(arguments or {}))
        try:
            result = self.transport.execute(
                command, arguments, self.timeout if timeout is None else timeout
            )
        except QMPError as exc:
            _log.debug("%s <- %s failed: %s", self.vm, command, exc.message)
            raise
        _log.debug("%s <- %s", self.vm, _brief(result))
        return result

    def submit(
        self, command: str, arguments: Mapping[str, object] | None = None, *, oob: bool = False
    ) -> Pending:
        """Send a command now (out of band with ``oob``); :meth:`reply` takes its reply
        later (meanwhile the thread may do other work: QEMU runs the command). A transport
        that cannot send ahead runs the command here and keeps the reply. Nothing else may
        use the monitor between."""
        _log.debug("%s -> %s %s (reply later)", self.vm, command, _brief(arguments or {}))
        if isinstance(self.transport, LineTransport):
            return Pending(command, self.transport.submit(command, arguments, oob=oob))
        if oob:
            raise QMPError(f"{command} out of band: not over this monitor", vm=self.vm,
                           step=command)  # fmt: skip
        return Pending(command, None, self.execute(command, arguments))

    def execute_oob(
        self, command: str, arguments: Mapping[str, object] | None = None,
        *, timeout: float | None = None,
    ) -> Any:  # fmt: skip
        """Run a command that QEMU allows out of band in the monitor's own thread: it is
        answered even while QEMU's main loop is blocked (:meth:`lines` with ``oob``)."""
        return self.reply(self.submit(command, arguments, oob=True), timeout=timeout)

    def answered(self, pending: Pending, timeout: float) -> bool:
        """Whether the reply to ``pending`` came (waiting up to ``timeout``); then
        :meth:`reply` returns at once."""
        if pending.token is None:
            return True
        assert isinstance(self.transport, LineTransport)
        return self.transport.answered(pending.token, timeout)

    def reply(self, pending: Pending, *, timeout: float | None = None) -> Any:
        """The reply to a command :meth:`submit` sent; QMPError as :meth:`execute` raises."""
        if pending.token is None:
            return pending.result
        assert isinstance(self.transport, LineTransport)
        try:
            result = self.transport.collect(
                pending.token, self.timeout if timeout is None else timeout
            )
        except QMPError as exc:
            _log.debug("%s <- %s failed: %s", self.vm, pending.command, exc.message)
            raise
        _log.debug("%s <- %s", self.vm, _brief(result))
        return result

    def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a file descriptor under ``name`` (QMP ``getfd``)."""
        _log.debug("%s -> getfd %s (fd %d)", self.vm, name, fd)
        self.transport.execute_with_fd("getfd", {"fdname": name}, fd, self.timeout)

    def add_fd(self, fd: int, opaque: str) -> int:
        """Put a file descriptor into a new fd set (QMP ``add-fd``), so that a block node
        can open it as ``/dev/fdset/<id>`` (QEMU may run as a user who cannot open the file
        by its path: a libvirt domain's). Returns the set's id."""
        reply = self.transport.execute_with_fd("add-fd", {"opaque": opaque}, fd, self.timeout)
        fdset = reply.get("fdset-id") if isinstance(reply, dict) else None
        if type(fdset) is not int:
            raise QMPError(f"add-fd answered {reply!r}", vm=self.vm, step="add-fd")
        return fdset

    def remove_fdset(self, fdset: int) -> None:
        """``remove-fd`` of a whole fd set (QEMU closes it once no node uses it)."""
        self.execute("remove-fd", {"fdset-id": fdset})

    def fdsets(self) -> dict[int, list[str]]:
        """The fd sets (``query-fdsets``): per set id, the opaque strings of its descriptors."""
        result: dict[int, list[str]] = {}
        for entry in self.execute("query-fdsets") or []:
            result[int(entry["fdset-id"])] = [str(f.get("opaque", "")) for f in entry["fds"]]
        return result

    def close_fd(self, name: str) -> None:
        """``closefd``; quiet if QEMU has no such descriptor (any more)."""
        with contextlib.suppress(CommandRefused):
            self.execute("closefd", {"fdname": name})

    # -- events ---------------------------------------------------------------

    def mark(self) -> int:
        """A position in the event history, for :meth:`wait_event` and :meth:`events_since`."""
        self._drain()
        return self._forgotten + len(self._events)

    def forget_before(self, mark: int) -> None:
        """Drop the events before ``mark`` (a long-lived monitor keeps its history small)."""
        drop = min(len(self._events), max(0, mark - self._forgotten))
        del self._events[:drop]
        self._forgotten += drop

    def wait_event(
        self,
        names: set[str],
        timeout: float,
        predicate: Callable[[Event], bool] = lambda _event: True,
        *,
        since: int = 0,
    ) -> Event:
        """The first event at or after position ``since`` with a name in ``names``."""
        deadline = time.monotonic() + timeout
        scanned = max(since, self._forgotten)
        while True:
            for event in self._events[scanned - self._forgotten :]:
                if event.name in names and predicate(event):
                    return event
            scanned = max(scanned, self._forgotten + len(self._events))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPError(
                    f"no {'/'.join(sorted(names))} event within {timeout:.0f} s",
                    vm=self.vm,
                    step="wait-event",
                )
            self._pull(remaining)

    def events_since(self, since: int) -> list[Event]:
        """Every event received after position ``since``, pulling what already arrived."""
        self._drain()
        return self._events[max(0, since - self._forgotten) :]

    def _pull(self, timeout: float) -> bool:
        event = self.transport.next_event(timeout)
        if event is None:
            return False
        _log.debug("%s event %s %s", self.vm, event.name, _brief(dict(event.data)))
        self._events.append(event)
        return True

    def _drain(self) -> None:
        while self._pull(0.0):
            pass

    # -- run state -------------------------------------------------------------

    def status(self) -> str:
        """The VM's run state, e.g. ``running``, ``paused``, ``postmigrate``."""
        return str(self.execute("query-status")["status"])

    def is_running(self) -> bool:
        return bool(self.execute("query-status")["running"])

    def stop(self) -> None:
        self.execute("stop")

    def cont(self, *, retry_s: float = 0.0) -> None:
        """Resume the guest, retrying for ``retry_s`` while QEMU finalizes a migration (or
        still stands in the COLO checkpoint a failover interrupted: its migration thread
        resumes the guest a moment after the migration left state ``colo``).

        QEMU gives no error class for those refusals other than GenericError,
        hence the text match.
        """
        deadline = time.monotonic() + retry_s
        while True:
            try:
                self.execute("cont")
                return
            except CommandRefused as exc:
                transient = "not finalized" in exc.message or "COLO checkpoint" in exc.message
                if not transient or time.monotonic() > deadline:
                    raise
            time.sleep(_CONT_RETRY_STEP_S)
            if self.is_running():  # QEMU resumed it itself meanwhile
                return

    def quit(self) -> None:
        with contextlib.suppress(QMPError):  # QEMU may close the connection before it answers
            self.execute("quit", timeout=5.0)

    def commands(self) -> set[str]:
        return {c["name"] for c in self.execute("query-commands")}

    def machine_type(self) -> str:
        """The running machine's versioned type, e.g. ``pc-i440fx-10.0``."""
        name = str(self.execute("qom-get", {"path": "/machine", "property": "type"}))
        return name.removesuffix("-machine")

    def cpu_model(self) -> tuple[str, str]:
        """The first vCPU's QOM path and model, e.g. ``("/machine/unattached/device[0]",
        "qemu64")`` (the model from its QOM type, ``qemu64-x86_64-cpu``)."""
        cpus = self.execute("query-cpus-fast")
        if not cpus:
            raise QMPError("QEMU reports no vCPU", vm=self.vm, step="query-cpus-fast")
        path = str(cpus[0]["qom-path"])
        kind = str(self.execute("qom-get", {"path": path, "property": "type"}))
        return path, kind.removesuffix("-cpu").rsplit("-", 1)[0]

    def cpu_flags(self, path: str, names: Sequence[str]) -> dict[str, bool]:
        """Which of the CPU features ``names`` (QOM property names such as ``sse4.2``) the
        vCPU at ``path`` has; a name this QEMU does not know is left out."""
        flags = {}
        for name in names:
            with contextlib.suppress(CommandRefused):
                flags[name] = bool(self.execute("qom-get", {"path": path, "property": name}))
        return flags

    # -- migration -------------------------------------------------------------

    def migrate_capabilities(self) -> dict[str, bool]:
        return {
            c["capability"]: bool(c["state"]) for c in self.execute("query-migrate-capabilities")
        }

    def set_migrate_capabilities(self, capabilities: Mapping[str, bool]) -> None:
        self.execute(
            "migrate-set-capabilities",
            {"capabilities": [{"capability": k, "state": v} for k, v in capabilities.items()]},
        )

    def migrate_parameters(self) -> dict[str, Any]:
        return dict(self.execute("query-migrate-parameters"))

    def set_migrate_parameters(self, parameters: Mapping[str, object]) -> None:
        self.execute("migrate-set-parameters", dict(parameters))

    def migrate(self, uri: str) -> None:
        self.execute("migrate", {"uri": uri})

    def migrate_incoming(self, uri: str) -> None:
        self.execute("migrate-incoming", {"uri": uri})

    def migrate_cancel(self) -> None:
        self.execute("migrate_cancel")

    def query_migrate(self) -> MigrationInfo:
        return _migration_info(self.execute("query-migrate"))

    def submit_query_migrate(self) -> Pending:
        """``query-migrate`` sent now, in band; :meth:`migration_reply` takes its answer
        once :meth:`answered` (QEMU answers it only when its main loop runs)."""
        return self.submit("query-migrate")

    def migration_reply(self, pending: Pending) -> MigrationInfo:
        return _migration_info(self.reply(pending))

    def recover_migration(self, uri: str) -> None:
        """``migrate-recover`` out of band (a destination in ``postcopy-paused`` listens on
        ``uri`` for a new stream): answered even while QEMU's main loop is blocked."""
        self.execute_oob("migrate-recover", {"uri": uri})

    def incoming_port(self) -> int:
        """The TCP port of a ``migrate-incoming tcp:HOST:0`` (from ``query-migrate``)."""
        info = self.execute("query-migrate")
        return int(info["socket-address"][0]["port"])

    # -- block layer: nodes, dirty bitmaps, backup jobs ---------------------------

    def block_nodes(self) -> list[BlockNode]:
        """Every named block node (``query-named-block-nodes``, flat), with its dirty bitmaps."""
        return [
            BlockNode(
                node_name=str(node.get("node-name", "")),
                driver=str(node.get("drv", "")),
                file=str(node.get("file", "")),
                read_only=bool(node.get("ro", False)),
                size=int(node.get("image", {}).get("virtual-size", 0)),
                bitmaps=tuple(str(b["name"]) for b in node.get("dirty-bitmaps", [])),
            )
            for node in self.execute("query-named-block-nodes", {"flat": True})
        ]

    def blockdev_add(self, options: Mapping[str, object]) -> None:
        self.execute("blockdev-add", dict(options))

    def blockdev_del(self, node_name: str) -> None:
        self.execute("blockdev-del", {"node-name": node_name})

    def blockdev_set_active(self, active: bool = True) -> None:
        """Activate (or inactivate) every block node (QEMU 10+); a completed migration
        leaves the source's nodes inactive until ``cont``."""
        self.execute("blockdev-set-active", {"active": active})

    def bitmap_remove(self, node: str, name: str) -> None:
        self.execute("block-dirty-bitmap-remove", {"node": node, "name": name})

    def bitmap_add(self, node: str, name: str) -> None:
        self.execute("block-dirty-bitmap-add", {"node": node, "name": name})

    def transaction(self, actions: Sequence[tuple[str, Mapping[str, object]]]) -> None:
        """Run QMP ``transaction``: every action takes effect at the same instant, or none."""
        self.reply(self.submit_transaction(actions))

    def submit_transaction(self, actions: Sequence[tuple[str, Mapping[str, object]]]) -> Pending:
        """Send a QMP ``transaction`` now, its reply taken later with :meth:`reply`."""
        return self.submit(
            "transaction",
            {"actions": [{"type": kind, "data": dict(data)} for kind, data in actions]},
        )

    def jobs(self) -> dict[str, JobInfo]:
        """The block jobs QEMU knows (``query-jobs``), by id."""
        return {
            str(job["id"]): JobInfo(str(job["id"]), str(job["status"]), job.get("error"))
            for job in self.execute("query-jobs")
        }

    def job_cancel(self, job_id: str) -> None:
        self.execute("job-cancel", {"id": job_id})

    def job_dismiss(self, job_id: str) -> None:
        self.execute("job-dismiss", {"id": job_id})


def _migration_info(info: Any) -> MigrationInfo:
    """The parts of a ``query-migrate`` answer vmckpt uses."""
    info = info if isinstance(info, dict) else {}
    ram = info.get("ram") or {}
    return MigrationInfo(
        status=str(info.get("status", "none")),
        downtime_ms=info.get("downtime"),
        total_time_ms=info.get("total-time"),
        transferred=ram.get("transferred"),
        error=info.get("error-desc"),
        dirty_sync_count=ram.get("dirty-sync-count"),
    )
