"""The only code in vmckpt that speaks QMP.

A small synchronous facade over qemu.qmp's asyncio ``QMPClient``: every call
has a timeout, every failure becomes a :class:`~vmckpt.errors.QMPError`
naming the guest and the command, and events are kept in arrival order with
QEMU's own timestamps (which is how vmckpt measures the guest's pause).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from qemu.qmp import ConnectError, ExecuteError, QMPClient
from qemu.qmp import QMPError as LibQMPError

from vmckpt.errors import QMPError

DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Event:
    """A QMP event with QEMU's timestamp (seconds since the epoch, as a float)."""

    name: str
    data: Mapping[str, Any]
    timestamp: float


@dataclass(frozen=True)
class MigrationInfo:
    """The parts of ``query-migrate`` vmckpt uses."""

    status: str
    downtime_ms: int | None
    total_time_ms: int | None
    transferred: int | None
    error: str | None


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


class Monitor:
    """One QMP connection to one QEMU.

    Use as a context manager; :meth:`close` is safe to call twice. The
    connection is not thread safe: one thread drives it.
    """

    def __init__(
        self,
        address: str | Path | socket.socket,
        *,
        vm: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.address = address
        self.vm = vm
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(vm)
        self._events: list[Event] = []
        self._connected = False
        self.greeting_version: str = ""

    # -- connection ---------------------------------------------------------

    def connect(self) -> Monitor:
        """Connect and negotiate capabilities; raise QMPError if this is not QEMU's QMP."""
        where = self.address if isinstance(self.address, socket.socket) else str(self.address)
        if isinstance(self.address, str | Path) and not Path(self.address).exists():
            raise QMPError(f"no QMP socket at {where}", vm=self.vm, step="connect")
        try:
            self._run(
                self._client.connect(
                    self.address if isinstance(self.address, socket.socket) else str(self.address)
                ),
                self.timeout,
            )
        except TimeoutError as exc:
            raise QMPError(
                f"{where} did not answer as a QMP monitor within {self.timeout:.0f} s "
                "(is it QEMU's QMP socket, and is no other client connected to it?)",
                vm=self.vm,
                step="connect",
            ) from exc
        except ConnectError as exc:
            cause = exc.exc if isinstance(exc.exc, Exception) else exc
            if isinstance(cause, ConnectionRefusedError | FileNotFoundError):
                detail = "nobody listens there (is the guest running?)"
            elif isinstance(cause, LibQMPError | ValueError | KeyError):
                detail = f"it is not QEMU's QMP ({exc})"
            else:
                detail = str(exc)
            raise QMPError(
                f"cannot connect to {where}: {detail}", vm=self.vm, step="connect"
            ) from exc
        except (OSError, LibQMPError) as exc:
            raise QMPError(f"cannot connect to {where}: {exc}", vm=self.vm, step="connect") from exc
        greeting = self._client.greeting
        try:
            assert greeting is not None
            qemu: Any = greeting.QMP.version["qemu"]
            self.greeting_version = f"{qemu['major']}.{qemu['minor']}.{qemu['micro']}"
        except (AssertionError, AttributeError, KeyError, TypeError) as exc:
            self.close()
            raise QMPError(
                f"{where} greeted without a QEMU version: not a QEMU monitor",
                vm=self.vm,
                step="connect",
            ) from exc
        self._connected = True
        return self

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):
            self._run(self._client.disconnect(), 5.0)
        self._loop.close()
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
        try:
            return self._run(
                self._client.execute(command, dict(arguments) if arguments else None),
                self.timeout if timeout is None else timeout,
            )
        except ExecuteError as exc:
            raise QMPError(
                f"QEMU refused {command}: {exc} ({exc.error_class})",
                vm=self.vm,
                step=command,
            ) from exc
        except TimeoutError as exc:
            raise QMPError(
                f"QEMU did not answer {command} in time", vm=self.vm, step=command
            ) from exc
        except (LibQMPError, OSError, EOFError) as exc:
            raise QMPError(
                f"lost the monitor connection during {command}: {exc}", vm=self.vm, step=command
            ) from exc

    def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a file descriptor under ``name`` (QMP ``getfd``)."""
        try:
            self._client.send_fd_scm(fd)
        except (LibQMPError, OSError) as exc:
            raise QMPError(
                f"cannot pass a file descriptor: {exc}", vm=self.vm, step="getfd"
            ) from exc
        self.execute("getfd", {"fdname": name})

    def close_fd(self, name: str) -> None:
        with contextlib.suppress(QMPError):
            self.execute("closefd", {"fdname": name})

    # -- events ---------------------------------------------------------------

    def mark(self) -> int:
        """A position in the event history, for :meth:`wait_event` and :meth:`events_since`."""
        return len(self._events)

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
        scanned = since
        while True:
            for event in self._events[scanned:]:
                if event.name in names and predicate(event):
                    return event
            scanned = max(scanned, len(self._events))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise QMPError(
                    f"no {'/'.join(sorted(names))} event within {timeout:.0f} s",
                    vm=self.vm,
                    step="wait-event",
                )
            self._pull_one(remaining)

    def events_since(self, since: int) -> list[Event]:
        """Every event received after position ``since``, pulling what already arrived."""
        with contextlib.suppress(TimeoutError):
            self._run(asyncio.sleep(0), 1.0)
        while not self._client.events.empty():
            self._pull_one(0.1)
        return self._events[since:]

    def _pull_one(self, timeout: float) -> None:
        try:
            raw = self._run(self._client.events.get(), timeout)
        except TimeoutError:
            return
        stamp = raw.get("timestamp", {})
        when = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
        self._events.append(Event(str(raw["event"]), dict(raw.get("data", {})), when))

    # -- typed helpers ----------------------------------------------------------

    def status(self) -> str:
        """The VM's run state, e.g. ``running``, ``paused``, ``postmigrate``."""
        return str(self.execute("query-status")["status"])

    def is_running(self) -> bool:
        return bool(self.execute("query-status")["running"])

    def stop(self) -> None:
        self.execute("stop")

    def cont(self, *, retry_s: float = 0.0) -> None:
        """Resume the guest.

        Right after a MIGRATION ``completed`` event QEMU may still be tidying
        up its migration thread and refuse with "Migration is not finalized
        yet"; ``retry_s`` retries for that long (QEMU gives no error class
        for it other than GenericError, hence the text match).
        """
        deadline = time.monotonic() + retry_s
        while True:
            try:
                self.execute("cont")
                return
            except QMPError as exc:
                if "not finalized" not in exc.message or time.monotonic() > deadline:
                    raise
            time.sleep(0.0005)

    def quit(self) -> None:
        with contextlib.suppress(QMPError):
            self.execute("quit", timeout=5.0)

    def qemu_version(self) -> str:
        info = self.execute("query-version")["qemu"]
        return f"{info['major']}.{info['minor']}.{info['micro']}"

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
        info = self.execute("query-migrate")
        ram = info.get("ram", {})
        return MigrationInfo(
            status=str(info.get("status", "none")),
            downtime_ms=info.get("downtime"),
            total_time_ms=info.get("total-time"),
            transferred=ram.get("transferred"),
            error=info.get("error-desc"),
        )

    def commands(self) -> set[str]:
        return {c["name"] for c in self.execute("query-commands")}

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
        self.execute(
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

    # -- plumbing --------------------------------------------------------------

    def _run(self, awaitable: Any, timeout: float | None) -> Any:
        return self._loop.run_until_complete(asyncio.wait_for(awaitable, timeout))
