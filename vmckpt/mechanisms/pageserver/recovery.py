"""A new page server for paused destinations: postcopy recovery.

If a page server dies, its destinations pause (QEMU: ``postcopy-paused``; vCPUs that touch
a missing page wait). Its guard (``python -m vmckpt.mechanisms.pageserver_guard``,
spawned, waiting on a pipe) then starts a new server (:func:`start_recovery`), which gives
each paused destination a new channel (``migrate-recover``), asks it which pages it holds
(RECV_BITMAP) and resumes it (POSTCOPY_RESUME) with the rest.

It does so over the monitor connection the dead server held, handed down through the
guard (server.monitor_of): a vCPU waiting for a page may hold QEMU's big lock, and then
only out-of-band commands on an already negotiated connection are answered. ``vmckpt
resume NAME`` does the same by hand (:func:`resume_restore`) when the guard is gone too,
over a new connection: when QEMU cannot answer that one, the guest cannot be recovered
(the recovery says so, ends that QEMU and records the failure). So does a server that died
before its guest ran: it leaves a migration QEMU cannot resume; and a new server that finds
the chain no longer servable (a layer file damaged or gone since the restore began), whose
paused guests would otherwise wait for their missing pages for ever.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType

from vmckpt import log
from vmckpt.errors import LockError, QMPError, RestoreError, VmckptError
from vmckpt.fsutil import FILE_MODE
from vmckpt.images import Store
from vmckpt.images.pagesource import PageSource
from vmckpt.machine.qemu import QemuProcess, process_start_time
from vmckpt.mechanisms.pageserver import records
from vmckpt.mechanisms.pageserver.server import (
    MODULE,
    MONITOR_TIMEOUT_S,
    PageServer,
    guard_argv,
    guest_process,
    held,
    monitor_of,
    parse_monitors,
    serve,
    settle,
)
from vmckpt.qmp import CommandRefused, Monitor

POLL_S = 0.05
PAUSED_TIMEOUT_S = 60.0  # recovery: a destination reaches postcopy-paused within this
# A new monitor connection (no guard handed one on) is negotiated within this, or QEMU's
# main loop is blocked for good (recovery.py's doc).
NEW_MONITOR_S = 15.0
_log = log.get("vmckpt.pageserver")


def _recover(store: Store, layer: str, names: Sequence[str], handed: Mapping[str, int]) -> int:
    """Give each paused destination a new channel and serve it what it still lacks."""
    alive: list[str] = []
    processes: dict[str, QemuProcess] = {}
    for name in names:
        try:
            processes[name] = guest_process(store, name)
            alive.append(name)
        except VmckptError:
            _log.info("%s: its QEMU is gone; nothing to recover", name)
            with contextlib.suppress(VmckptError):
                records.remove(store, name)
    if not alive:
        return 0
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(held(store, alive, wait_s=2.0))
        except LockError:
            _log.info("another page server serves %s already", ", ".join(alive))
            return 0
        return _recoverheld(store, layer, alive, processes, handed)


def _unservable(
    store: Store, names: Sequence[str], processes: Mapping[str, QemuProcess], exc: VmckptError
) -> None:
    """The chain can no longer be served (a layer file damaged, shortened or gone since the
    restore began): the paused guests would wait for their missing pages for ever. Each one's
    QEMU is ended and its record says why (``vmckpt list``: restore failed)."""
    # As the record's error, it follows "the lazy restore cannot go on: " in `vmckpt resume`.
    why = f"its chain can no longer be served: {exc.one_line()}"
    for name in names:
        _log.error("%s: the lazy restore cannot go on: %s", name, why)
        with contextlib.suppress(OSError, VmckptError):
            data = store.host.read_record(name, records.RECORD) or {}
            data.update(pid=os.getpid(), start_time=process_start_time(os.getpid()),
                        state="failed", error=why)  # fmt: skip
            records.write(store, name, records.RECORD, data)
        processes[name].kill()


def _monitor(name: str, process: QemuProcess, handed: Mapping[str, int]) -> Monitor:
    """The destination's monitor: the connection the guard handed on, or a new one (after
    the guard died too: its ``qmp_capabilities`` needs QEMU's main loop, which a vCPU
    waiting for a page may block for good)."""
    fd = handed.get(name)
    if fd is not None:
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            _log.warning("%s: the monitor connection handed on is unusable: %s", name, exc)
        else:
            _log.info("%s: over the monitor connection its guard held", name)
            return Monitor.adopt(sock, vm=name, description=str(process.session_socket),
                                 timeout=MONITOR_TIMEOUT_S)  # fmt: skip
    _log.info("%s: over a new monitor connection", name)
    try:
        return monitor_of(process, timeout=NEW_MONITOR_S)
    except QMPError as exc:
        raise RestoreError(
            f"QEMU does not answer a new monitor connection ({exc.message}), as when a vCPU "
            "waiting for a page holds QEMU's big lock; the connection that could still reach "
            "it ended with the page server and its guard: the guest cannot be recovered, "
            "restore it again", vm=name, step="recover",
        ) from exc  # fmt: skip


def _recoverheld(
    store: Store,
    layer: str,
    alive: list[str],
    processes: dict[str, QemuProcess],
    handed: Mapping[str, int],
) -> int:
    try:
        source = PageSource.open(store, layer)
    except VmckptError as exc:
        _unservable(store, alive, processes, exc)
        return 1
    server = PageServer(store, source, alive)
    server.mode = "resume"
    sockets: dict[str, socket.socket] = {}
    monitors: dict[str, Monitor] = {}
    try:
        for name in list(alive):
            process = processes[name]
            destination = server.destinations[name]
            destination.process = process
            try:
                mon = _monitor(name, process, handed)
            except RestoreError as exc:
                destination.fail(exc.message)
                continue
            monitors[name] = mon
            listen = _listen_path(store, name)
            status = _take_over(mon, name, listen, PAUSED_TIMEOUT_S)
            if status != "postcopy-paused":
                _log.info("%s: migration is %s; nothing to recover", name, status)
                if status == "completed":
                    settle(mon, name)
                    destination.state = "done"
                else:  # the server died before the guest ran: QEMU cannot be resumed
                    destination.fail(
                        f"the lazy restore cannot be recovered: QEMU's migration is {status} "
                        f"({process.log_tail()})"
                    )
                continue
            try:
                sockets[name] = _connect(listen, name)
            finally:
                with contextlib.suppress(OSError):
                    listen.unlink()
            _log.info("%s: recovering the postcopy migration", name)
        todo = {n: s for n, s in sockets.items()}
        for name in server.names:
            if name in todo:
                continue
            destination = server.destinations.pop(name)
            if name in monitors:
                monitors.pop(name).close()
            with contextlib.suppress(OSError, VmckptError):
                if destination.state == "failed":
                    _log.error("%s: %s", name, destination.error)
                    records.write(store, name, records.RECORD, server.record(destination))
                    processes[name].kill()
                else:
                    records.remove(store, name)
        server.names = list(todo)
        if not todo:
            return 1 if any(d.state == "failed" for d in server.destinations.values()) else 0
        return serve(server, todo, None, monitors=monitors)
    finally:
        for mon in monitors.values():
            mon.close()
        source.close()


def _listen_path(store: Store, name: str) -> Path:
    """Where the destination listens for its new stream: this host's runtime directory."""
    path = store.host.runtime_dir(name) / f"recover-{os.getpid()}.sock"
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    return path


def _take_over(mon: Monitor, name: str, listen: Path, timeout: float) -> str:
    """``postcopy-paused`` once the destination listens on ``listen`` for a new stream
    (``migrate-recover``, out of band: it is answered even while a vCPU waiting for a page
    holds QEMU's big lock); otherwise the migration's end (``completed``, ``failed``). QEMU
    refuses ``migrate-recover`` until it noticed the old stream broke; meanwhile an
    in-band ``query-migrate`` (answered once the main loop runs) tells whether the
    migration ended instead."""
    deadline = time.monotonic() + timeout
    query = None
    refused = ""
    while time.monotonic() < deadline:
        try:
            mon.recover_migration(f"unix:{listen}")
            return "postcopy-paused"
        except CommandRefused as exc:
            refused = exc.message
        if query is None:
            query = mon.submit_query_migrate()
        if mon.answered(query, POLL_S):
            status = mon.migration_reply(query).status
            query = None
            if status in ("completed", "failed", "cancelled"):
                return status
    raise RestoreError(
        f"QEMU did not let its migration be recovered within {timeout:.0f} s ({refused})",
        vm=name, step="recover",
    )  # fmt: skip


def _connect(path: Path, name: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(MONITOR_TIMEOUT_S)
        sock.connect(str(path))
        sock.settimeout(None)
    except OSError as exc:
        sock.close()
        raise RestoreError(f"cannot connect to QEMU's recovery socket {path}: {exc}", vm=name,
                           step="recover") from exc  # fmt: skip
    return sock


def start_recovery(
    store: Store, layer: str, names: Sequence[str], handed: Mapping[str, int] | None = None
) -> subprocess.Popen[bytes]:
    """Spawn a page server that resumes the paused restore of ``names`` (detached); it
    inherits the monitor connections ``handed`` (per guest, a descriptor)."""
    log_path = store.host.runtime_dir(names[0]) / records.LOG
    handed = handed or {}
    with open(log_path, "ab") as log_handle:
        os.fchmod(log_handle.fileno(), FILE_MODE)
        argv = [sys.executable, "-m", MODULE, "resume",
                *guard_argv(store, layer, names, handed)]  # fmt: skip
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT,
            start_new_session=True, pass_fds=tuple(handed.values()),
        )  # fmt: skip


def resume_restore(store: Store, name: str) -> bool:
    """``vmckpt resume`` of a guest whose lazy restore lost its page server (and guard):
    start a new server for it (and the clones it served with it) and wait until it serves
    (or failed: RestoreError). Whether one was started."""
    record = records.status_of(store, name)
    if record is None or record["alive"] or record.get("state") not in records.ACTIVE_STATES:
        return False
    names = [str(n) for n in record.get("guests") or [name]]
    _log.info("%s: its page server is gone; starting another", name)
    process = start_recovery(store, str(record.get("layer")), names)
    deadline = time.monotonic() + NEW_MONITOR_S + PAUSED_TIMEOUT_S + 10
    while time.monotonic() < deadline:
        exited = process.poll() is not None
        now = records.status_of(store, name)
        if now is not None and now.get("pid") == process.pid:
            if now.get("state") == "failed":
                raise RestoreError(f"the lazy restore cannot go on: {now.get('error')}",
                                   vm=name, step="resume")  # fmt: skip
            if now.get("state") in records.ACTIVE_STATES:
                return True
        if exited:
            if now is None or now["alive"]:  # all in already, or another server serves
                return True
            raise RestoreError(
                f"the new page server ended ({process.returncode}) without serving; see "
                f"{store.host.runtime_path(name) / records.LOG}", vm=name, step="resume",
            )  # fmt: skip
        time.sleep(POLL_S)
    raise RestoreError("the new page server did not start serving in time", vm=name,
                       step="resume")  # fmt: skip


def recover_for_guard(
    store_path: Path, layer: str, names: Sequence[str], handed: Mapping[str, int]
) -> int:
    """What the guard (vmckpt/mechanisms/pageserver_guard.py) does when the server of
    ``names`` died without a release: start a new one, handing it the monitors it holds."""
    log.configure(1)
    store = Store(store_path)
    if not any(store.host.has_runtime(name) for name in names):
        return 0  # the guests are gone, and with them what this host kept for them
    _log.warning("the page server of %s died: starting another", ", ".join(names))
    start_recovery(store, layer, names, handed)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("mode", choices=["resume"])
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--layer", required=True)
    parser.add_argument("--guest", action="append", required=True)
    parser.add_argument("--monitor", action="append")
    args = parser.parse_args(argv)
    log.configure(1)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(3)  # as if killed: the guard recovers

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return _recover(Store(args.store), args.layer, args.guest,
                        parse_monitors(args.monitor))  # fmt: skip
    except VmckptError as exc:
        _log.error("%s", exc.one_line())
        return exc.exit_code
