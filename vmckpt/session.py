"""One migration of one QEMU, owned by one object: enter saves, every exit restores.

Every vmckpt operation that moves a guest's state is a QEMU migration:
a checkpoint (out, into vmckpt's receiver), a restore (in, from vmckpt's
writer), a live migration to another host (out over TCP, in on the other
side), a COLO checkpoint session (out, staying in state ``colo``), the
benchmarks' baselines. :class:`MigrationSession` is the one place that

1. checks the QEMU can migrate now (no migration under way, not in a
   migration run state) and remembers whether the guest was running;
2. records the migration settings it is about to change, durably, in a
   journal file *before* changing them (so :func:`recover` can put them
   back after vmckpt itself died: docs/SECURITY.md, "No guest left stopped");
3. sets the capabilities and parameters the caller asked for, hands QEMU a
   socket (``getfd``), starts the migration, waits for its outcome with
   QEMU's MIGRATION events, resumes the guest when the caller says so and
   measures the pause from QEMU's STOP/RESUME timestamps;
4. on every exit — success, error, Ctrl-C — leaves the guest as it found
   it: a COLO session ended (``x-colo-lost-heartbeat``), a migration under
   way cancelled, the settings put back, the descriptor closed, the guest
   running if it ran before (unless the caller handed it over to another
   host), and the journal removed. A setting that cannot be put back is
   reported, never swallowed.

Like qemu.qmp's protocol classes it keeps one run state and refuses a call
made in the wrong one.
"""

from __future__ import annotations

import contextlib
import enum
import os
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from vmckpt import log
from vmckpt.errors import QMPError, VmckptError
from vmckpt.fsutil import read_json, write_json_atomic
from vmckpt.machine.qemu import process_start_time
from vmckpt.qmp import CONT_RETRY_S, Event, Monitor

# Migration states in which a migration is under way (query-migrate "status").
ACTIVE = frozenset(
    {
        "setup", "active", "pre-switchover", "device", "postcopy-active", "postcopy-paused",
        "postcopy-recover", "postcopy-recover-setup", "cancelling", "wait-unplug", "colo",
    }
)  # fmt: skip
FINISHED = frozenset({"completed", "failed", "cancelled"})
# Run states in which QEMU refuses to start a migration.
BUSY_RUN_STATES = frozenset({"inmigrate", "finish-migrate", "save-vm", "restore-vm", "colo"})
FD_NAME = "vmckpt-migration"
JOURNAL = "migration.json"
SETTLE_TIMEOUT_S = 10.0  # waiting for a cancelled migration or a COLO exit to settle
_POLL_S = 0.02

_log = log.get(__name__)


class State(enum.Enum):
    NEW = "new"
    OPEN = "open"  # settings applied, nothing started
    MIGRATING = "migrating"
    COMPLETED = "completed"  # QEMU reported the migration complete (or entered COLO)
    HANDED_OVER = "handed-over"  # the guest runs elsewhere now: never resume it here
    CLOSED = "closed"


class MigrationSession:
    """The migration choreography for one QEMU (see the module doc). Use as a context manager.

    ``error`` is the caller's error class (CheckpointError, RestoreError, ...):
    every failure the session reports is raised as one, naming the guest and step.
    """

    def __init__(
        self,
        mon: Monitor,
        *,
        vm: str,
        error: type[VmckptError],
        capabilities: Mapping[str, bool] | None = None,
        parameters: Mapping[str, object] | None = None,
        incoming: bool = False,
        journal: Path | None = None,
        timeout_s: float = 300.0,
    ) -> None:
        self.mon = mon
        self.vm = vm
        self.error = error
        self.capabilities = dict(capabilities or {})
        self.parameters = dict(parameters or {})
        self.incoming = incoming
        self.journal = journal
        self.timeout_s = timeout_s
        self.state = State.NEW
        self.was_running = False
        self.status = ""  # the migration's status once it finished (completed, colo, ...)
        self.completed_at: float | None = None  # QEMU's timestamp of that event
        self._mark = 0
        self._old_capabilities: dict[str, bool] = {}
        self._old_parameters: dict[str, Any] = {}
        self._fd_passed = False
        self._our_socket: socket.socket | None = None

    def _fail(self, message: str, step: str) -> VmckptError:
        return self.error(message, vm=self.vm, step=step)

    def _require(self, *states: State) -> None:
        if self.state not in states:
            names = "/".join(s.value for s in states)
            raise self._fail(f"migration session is {self.state.value}, not {names}", "session")

    # -- entering -------------------------------------------------------------------

    def open(self) -> Self:
        """Check QEMU can migrate, record and apply the settings. Nothing else changes yet."""
        self._require(State.NEW)
        mon = self.mon
        try:
            status = mon.execute("query-status")
            self.was_running = bool(status["running"])
            run_state = str(status["status"])
            if not self.incoming:
                if run_state in BUSY_RUN_STATES:
                    raise self._fail(f"the guest is in state {run_state}", "prepare")
                if run_state == "postmigrate":
                    raise self._fail(
                        "the guest was stopped by an earlier migration (state postmigrate) and "
                        "has not run since; resume it (vmckpt resume) before checkpointing it",
                        "prepare",
                    )
            current = mon.query_migrate().status
            if current in ACTIVE:
                raise self._fail(f"a migration is already in progress (state {current})", "prepare")
            capabilities = mon.migrate_capabilities()
            missing = sorted(set(self.capabilities) - set(capabilities))
            if missing:
                raise self._fail(
                    f"QEMU {mon.version} lacks migration capabilities {', '.join(missing)}",
                    "prepare",
                )
            parameters = mon.migrate_parameters()
            self._old_capabilities = {k: capabilities[k] for k in self.capabilities}
            self._old_parameters = {k: parameters[k] for k in self.parameters if k in parameters}
            self._write_journal()
            self.state = State.OPEN
            if self.capabilities:
                mon.set_migrate_capabilities(self.capabilities)
            if self.parameters:
                mon.set_migrate_parameters(self.parameters)
        except QMPError as exc:
            self.close()
            raise self._fail(exc.message, exc.step or "prepare") from exc
        except BaseException:
            self.close()
            raise
        _log.info("%s: migration session open (%s)", self.vm, "in" if self.incoming else "out")
        return self

    def __enter__(self) -> Self:
        if self.state is State.NEW:
            self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(failed=exc is not None)

    # -- the migration ------------------------------------------------------------------

    def socket(self) -> socket.socket:
        """A socket pair: QEMU gets one end (``getfd``), the caller the other to read or write."""
        self._require(State.OPEN)
        ours, theirs = socket.socketpair()
        try:
            self.mon.send_fd(FD_NAME, theirs.fileno())
        except QMPError as exc:
            ours.close()
            raise self._fail(exc.message, "getfd") from exc
        finally:
            theirs.close()
        self._fd_passed = True
        self._our_socket = ours
        return ours

    def start(self, uri: str | None = None) -> None:
        """Start the migration: to/from ``uri``, or over the socket of :meth:`socket`."""
        self._require(State.OPEN)
        target = uri or f"fd:{FD_NAME}"
        self._mark = self.mon.mark()
        try:
            if self.incoming:
                self.mon.migrate_incoming(target)
            else:
                self.mon.migrate(target)
        except QMPError as exc:
            raise self._fail(exc.message, "migrate") from exc
        self.state = State.MIGRATING
        _log.info("%s: migration started (%s)", self.vm, target)

    def wait(
        self, accept: frozenset[str] = frozenset({"completed"}), timeout: float | None = None
    ) -> str:
        """Wait for QEMU to report the migration ``completed`` (or another state in ``accept``,
        e.g. ``colo``); a failed or cancelled migration raises, with QEMU's reason."""
        self._require(State.MIGRATING)
        wanted = accept | FINISHED
        try:
            event = self.mon.wait_event(
                {"MIGRATION"},
                self.timeout_s if timeout is None else timeout,
                lambda e: str(e.data.get("status")) in wanted,
                since=self._mark,
            )
        except QMPError as exc:
            raise self._fail(
                f"QEMU's migration did not finish within {self.timeout_s:.0f} s", "migrate"
            ) from exc
        status = str(event.data["status"])
        if status not in accept:
            reason = "no reason given"
            with contextlib.suppress(QMPError):
                reason = self.mon.query_migrate().error or reason
            raise self._fail(f"QEMU's migration {status}: {reason}", "migrate")
        self.status = status
        self.completed_at = event.timestamp
        self.state = State.COMPLETED
        _log.info("%s: migration %s", self.vm, status)
        return status

    def finished_within(self, timeout: float) -> bool:
        """Whether QEMU reports the migration at an end (any) within ``timeout`` s; False
        otherwise, the migration going on (:meth:`wait` then takes the outcome)."""
        self._require(State.MIGRATING)
        ended = {"completed"} | FINISHED
        try:
            self.mon.wait_event(
                {"MIGRATION"}, timeout, lambda e: str(e.data.get("status")) in ended,
                since=self._mark,
            )  # fmt: skip
        except QMPError:
            return False
        return True

    def retune(self, parameters: dict[str, object]) -> None:
        """Change, while the migration runs, parameters this session set (they are put back
        on close like the others)."""
        self._require(State.MIGRATING)
        unknown = sorted(set(parameters) - set(self.parameters))
        if unknown:
            raise ValueError(f"parameters the session did not set: {unknown}")
        try:
            self.mon.set_migrate_parameters(parameters)
        except QMPError as exc:
            raise self._fail(exc.message, "retune") from exc

    def poll(self) -> str:
        """The migration's status now (``query-migrate``), for callers that watch progress."""
        return self.mon.query_migrate().status

    def resume(self) -> None:
        """Run the guest now (the pause of a checkpoint ends here)."""
        self._require(State.COMPLETED)
        try:
            if self.incoming or self.was_running:
                self.mon.cont(retry_s=CONT_RETRY_S)
        except QMPError as exc:
            raise self._fail(exc.message, "resume") from exc

    def hand_over(self) -> None:
        """The guest runs on another QEMU now: closing must not resume it here (nor may a
        recovery after vmckpt died)."""
        self._require(State.COMPLETED)
        self.state = State.HANDED_OVER
        self.was_running = False
        self._write_journal()

    def pause_window(self) -> tuple[float, float]:
        """QEMU's timestamps of the guest's last STOP before the migration finished and of
        the RESUME after it (waiting briefly for that event if the guest runs)."""
        finished = self.completed_at if self.completed_at is not None else time.time()
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while True:
            events = self.mon.events_since(self._mark)
            stops = [e.timestamp for e in events if e.name == "STOP" and e.timestamp <= finished]
            resumes = [
                e.timestamp for e in events if e.name == "RESUME" and e.timestamp >= finished
            ]
            if resumes or time.monotonic() > deadline or not self._guest_runs():
                break
            with contextlib.suppress(QMPError):
                self.mon.wait_event({"RESUME"}, 0.5, since=self._mark)
        stop = stops[-1] if stops else finished
        return stop, resumes[0] if resumes else finished

    def events(self) -> list[Event]:
        """The events since the migration started."""
        return self.mon.events_since(self._mark)

    def _guest_runs(self) -> bool:
        try:
            return self.mon.is_running()
        except QMPError:
            return False

    # -- leaving ----------------------------------------------------------------------------

    def close(self, *, failed: bool = False) -> None:
        """Leave the guest as found (see the module doc). Raises the caller's error class if a
        setting could not be put back or the guest could not be resumed; everything else
        is still attempted first."""
        if self.state in (State.NEW, State.CLOSED):
            self.state = State.CLOSED
            return
        if self.incoming:
            # A QEMU vmckpt started to receive: nothing of it to put back (the caller runs
            # it, or ends it on failure), and it may be gone already (a guest that died).
            if self._our_socket is not None:
                with contextlib.suppress(OSError):
                    self._our_socket.close()
            self.state = State.CLOSED
            self._clear_journal()
            return
        problems = leave_as_found(
            self.mon,
            vm=self.vm,
            capabilities=self._old_capabilities,
            parameters=self._old_parameters,
            resume=self.was_running and self.state is not State.HANDED_OVER and not self.incoming,
            fd_name=FD_NAME if self._fd_passed else None,
        )
        if self._our_socket is not None:
            with contextlib.suppress(OSError):
                self._our_socket.close()
        self.state = State.CLOSED
        if problems:
            # The journal stays: the next vmckpt command retries what failed here.
            message = "; ".join(problems)
            _log.warning("%s: leaving the migration session: %s", self.vm, message)
            if not failed:
                raise self._fail(message, "restore-settings")
            return
        self._clear_journal()
        _log.info("%s: migration session closed, guest as found", self.vm)

    # -- the journal ---------------------------------------------------------------------------

    def _write_journal(self) -> None:
        if self.journal is None:
            return
        write_json_atomic(
            self.journal,
            {
                "vm": self.vm,
                "owner_pid": os.getpid(),
                "owner_start": process_start_time(os.getpid()),
                "incoming": self.incoming,
                "was_running": self.was_running,
                "capabilities": self._old_capabilities,
                "parameters": self._old_parameters,
                "fd_name": FD_NAME,
            },
        )

    def _clear_journal(self) -> None:
        if self.journal is not None:
            self.journal.unlink(missing_ok=True)


def leave_as_found(
    mon: Monitor,
    *,
    vm: str,
    capabilities: Mapping[str, bool],
    parameters: Mapping[str, Any],
    resume: bool,
    fd_name: str | None,
) -> list[str]:
    """End whatever migration runs, put the settings back, resume the guest if asked.

    Every step is attempted even if an earlier one failed; returns what failed.
    """
    problems: list[str] = []

    def attempt(what: str, action: Any) -> None:
        try:
            action()
        except QMPError as exc:
            problems.append(f"{what}: {exc.message}")

    def end_migration() -> None:
        status = mon.query_migrate().status
        if status == "colo":
            # COLO ends only by failover; the primary (the guest) goes on running.
            mon.execute("x-colo-lost-heartbeat")
        elif status in ACTIVE:
            mon.migrate_cancel()
        else:
            return
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while mon.query_migrate().status in ACTIVE:
            if time.monotonic() > deadline:
                raise QMPError(f"the migration is still {mon.query_migrate().status}", vm=vm)
            time.sleep(_POLL_S)

    attempt("ending the migration", end_migration)
    if capabilities:
        attempt(
            "restoring migration capabilities", lambda: mon.set_migrate_capabilities(capabilities)
        )
    if parameters:
        attempt("restoring migration parameters", lambda: mon.set_migrate_parameters(parameters))
    if fd_name is not None:
        attempt("closing the migration descriptor", lambda: mon.close_fd(fd_name))

    def run_again() -> None:
        if not mon.is_running():
            mon.cont(retry_s=CONT_RETRY_S)

    if resume:
        attempt("resuming the guest", run_again)
    return problems


def owner_alive(journal: Mapping[str, Any]) -> bool:
    """Whether the process that wrote a journal still runs (PID and start time match)."""
    pid, start = journal.get("owner_pid"), journal.get("owner_start")
    return isinstance(pid, int) and start is not None and process_start_time(pid) == start


def read_journal(path: Path) -> dict[str, Any] | None:
    """A session journal, or None if there is none (or it is unreadable: then it is removed,
    since it cannot be acted on)."""
    try:
        data = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        _log.warning("removing unreadable migration journal %s", path)
        path.unlink(missing_ok=True)
        return None
    return data if isinstance(data, dict) else None


def recover(mon: Monitor, path: Path, *, vm: str) -> bool:
    """If a dead vmckpt left a migration session open on this QEMU, close it as it would
    have: end the migration, restore the recorded settings, resume the guest. Returns
    whether there was anything to recover; QMPError if a step failed (journal kept)."""
    journal = read_journal(path)
    if journal is None or owner_alive(journal):
        return False
    capabilities = journal.get("capabilities") or {}
    parameters = journal.get("parameters") or {}
    if not isinstance(capabilities, dict) or not isinstance(parameters, dict):
        capabilities, parameters = {}, {}
    _log.warning("%s: recovering a migration session left by PID %s", vm, journal.get("owner_pid"))
    problems = leave_as_found(
        mon,
        vm=vm,
        capabilities={str(k): bool(v) for k, v in capabilities.items()},
        parameters=parameters,
        resume=bool(journal.get("was_running")) and not journal.get("incoming"),
        fd_name=str(journal.get("fd_name") or FD_NAME),
    )
    if problems:
        raise QMPError("; ".join(problems), vm=vm, step="recover")
    path.unlink(missing_ok=True)
    return True
