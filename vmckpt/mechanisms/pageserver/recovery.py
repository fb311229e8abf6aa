"""A new page server for paused destinations: postcopy recovery.

If a page server dies, its destinations pause (QEMU: ``postcopy-paused``; vCPUs that touch
a missing page wait). Its guard (``python -m vmckpt.mechanisms.pageserver_guard``,
spawned, waiting on a pipe) then starts a new server (:func:`start_recovery`), which gives
each paused destination a new channel (``migrate-recover``), asks it which pages it holds
(RECV_BITMAP) and resumes it (POSTCOPY_RESUME) with the rest. ``vmckpt resume NAME`` does
the same by hand (:func:`resume_restore`) when the guard is gone too. A server that died
before its guest ran leaves a migration QEMU cannot resume: the recovery ends that QEMU and
records the failure.
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
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from vmckpt import log
from vmckpt.errors import LockError, VmckptError
from vmckpt.fsutil import FILE_MODE
from vmckpt.images import Store
from vmckpt.images.pagesource import PageSource
from vmckpt.machine.qemu import QemuProcess
from vmckpt.mechanisms.pageserver import records
from vmckpt.mechanisms.pageserver.server import (
    MODULE,
    PageServer,
    guard_argv,
    guest_process,
    held,
    monitor_of,
    serve,
    settle,
)
from vmckpt.qmp import Monitor

FD_NAME = "vmckpt-postcopy"
POLL_S = 0.05
PAUSED_TIMEOUT_S = 60.0  # recovery: a destination reaches postcopy-paused within this
_log = log.get("vmckpt.pageserver")


def _recover(store: Store, layer: str, names: Sequence[str]) -> int:
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
        return _recoverheld(store, layer, alive, processes)


def _recoverheld(
    store: Store, layer: str, alive: list[str], processes: dict[str, QemuProcess]
) -> int:
    source = PageSource.open(store, layer)
    server = PageServer(store, source, alive)
    server.mode = "resume"
    sockets: dict[str, socket.socket] = {}
    monitors: dict[str, Monitor] = {}
    try:
        for name in list(alive):
            process = processes[name]
            mon = monitor_of(process)
            monitors[name] = mon
            status = _wait_status(mon, {"postcopy-paused", "completed", "failed"}, PAUSED_TIMEOUT_S)
            server.destinations[name].process = process
            if status != "postcopy-paused":
                _log.info("%s: migration is %s; nothing to recover", name, status)
                destination = server.destinations[name]
                if status == "completed":
                    settle(mon, name)
                    destination.state = "done"
                else:  # the server died before the guest ran: QEMU cannot be resumed
                    destination.fail(
                        f"the lazy restore cannot be recovered: QEMU's migration is {status} "
                        f"({process.log_tail()})"
                    )
                continue
            ours, theirs = socket.socketpair()
            try:
                mon.send_fd(FD_NAME, theirs.fileno())
            finally:
                theirs.close()
            mon.execute("migrate-recover", {"uri": f"fd:{FD_NAME}"})
            sockets[name] = ours
            _log.info("%s: recovering the postcopy migration", name)
        for mon in monitors.values():
            mon.close()
        todo = {n: s for n, s in sockets.items()}
        for name in server.names:
            if name in todo:
                continue
            destination = server.destinations.pop(name)
            with contextlib.suppress(OSError, VmckptError):
                if destination.state == "failed":
                    records.write(store, name, records.RECORD, server.record(destination))
                    processes[name].kill()
                else:
                    records.remove(store, name)
        server.names = list(todo)
        if not todo:
            return 0
        return serve(server, todo, None)
    finally:
        source.close()


def _wait_status(mon: Monitor, wanted: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    status = mon.query_migrate().status
    while status not in wanted and time.monotonic() < deadline:
        time.sleep(POLL_S)
        status = mon.query_migrate().status
    return status


def start_recovery(store: Store, layer: str, names: Sequence[str]) -> subprocess.Popen[bytes]:
    """Spawn a page server that resumes the paused restore of ``names`` (detached)."""
    log_path = store.host.runtime_dir(names[0]) / records.LOG
    with open(log_path, "ab") as log_handle:
        os.fchmod(log_handle.fileno(), FILE_MODE)
        argv = [sys.executable, "-m", MODULE, "resume",
                *guard_argv(store, layer, names)]  # fmt: skip
        return subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def resume_restore(store: Store, name: str) -> bool:
    """``vmckpt resume`` of a guest whose lazy restore lost its page server (and guard):
    start a new server for it (and the clones it served with it). Whether one was started."""
    record = records.status_of(store, name)
    if record is None or record["alive"] or record.get("state") not in records.ACTIVE_STATES:
        return False
    names = [str(n) for n in record.get("guests") or [name]]
    _log.warning("%s: its page server is gone; starting another", name)
    start_recovery(store, str(record.get("layer")), names)
    return True


def recover_for_guard(store_path: Path, layer: str, names: Sequence[str]) -> int:
    """What the guard (vmckpt/mechanisms/pageserver_guard.py) does when the server of
    ``names`` died without a release: start a new one."""
    log.configure(1)
    _log.warning("the page server of %s died: starting another", ", ".join(names))
    start_recovery(Store(store_path), layer, names)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}", description=__doc__)
    parser.add_argument("mode", choices=["resume"])
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--layer", required=True)
    parser.add_argument("--guest", action="append", required=True)
    args = parser.parse_args(argv)
    log.configure(1)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(3)  # as if killed: the guard recovers

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        return _recover(Store(args.store), args.layer, args.guest)
    except VmckptError as exc:
        _log.error("%s", exc.one_line())
        return exc.exit_code
