"""A lazy restore's page server, forked as early as the restore command can: the command's side.

QEMU loads the device state only while pages are served (its main thread reads guest RAM
while loading some devices, e.g. ``kvm-tpr-opt``), and a page server must import vmckpt's
store and numpy (~0.1 s) and build the chain's page index (~30 ms at 8 GiB) before it
serves. So the page server of a ``vmckpt restore`` is forked first thing: by the CLI as the
command starts (:func:`fork_early`, before it imports the rest of vmckpt), else by the lazy
restore as it begins; never once a thread or QMP connection exists. It detaches at once (a
new session, no terminal, its output nowhere until it has a guest's ``pageserver.log``),
names itself ``vmckpt-pageserv`` and imports its side (vmckpt/mechanisms/pageserver/fork.py)
while the command imports, checks the layer and starts the QEMUs. This module is the
command's side, and light: the CLI imports it before anything else of vmckpt. Outside the
``pageserver`` package, whose ``__init__`` imports it all.

The command keeps a :class:`ForkedServer`:

- a control socket, on which, once its checks passed, it sends the order
  (:meth:`ForkedServer.order`: the store, the layer, the guests' names, the log, the digest
  of the preamble it built) with one socket per destination (the server's ends; the command
  hands the other ends to the QEMUs). The server then opens the chain as a page source,
  builds the preamble itself and compares it: a layer that changed meanwhile fails the
  restore;
- a pipe on which it says ``go NAME`` once a QEMU is receiving (or ``abort``);
- one on which the server says ``ready PID`` once its records are written, then
  ``guarded`` once its guard runs (or ``failed`` and the error, as it crosses processes, if
  it could not open the chain: the restore raises that error).

A command that restores in full after all (:meth:`ForkedServer.abort`), fails or dies
closes the control socket first: a server that has no order by then exits, having touched
nothing. Its guard and every later server are spawned (pageserver/recovery.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmckpt.errors import RestoreError, VmckptError, from_wire

if TYPE_CHECKING:
    from vmckpt.images import Store

READY_TIMEOUT_S = 30.0
FAILURE_WAIT_S = 1.0  # a failed restore: how long the server may take to say why
PR_SET_NAME = 15  # linux/prctl.h


@dataclass
class ForkedServer:
    """The restore command's side of a page server it forked."""

    pid: int
    _control: socket.socket | None  # the order goes here (closed once sent, or to abort)
    _go: int  # pipe: "go NAME" once a destination's QEMU has its socket, "abort"
    # pipe: the server says "ready PID" (serving, its records written), then "guarded" (its
    # guard runs); or, instead of either, "failed {error}" or "error ..."
    _ready: int

    # QEMU's ends of the destinations' sockets, one per name (hand them over), once ordered
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    _said: list[str] = field(default_factory=list)  # its lines read so far
    _unread: bytes = b""
    _ended: bool = False  # the pipe ended (or was closed here)
    _let_go: bool = False  # done: its descriptors are closed (their numbers may be reused)

    def order(
        self, store: Store, layer_id: str, names: list[str], log_path: Path, preamble: bytes
    ) -> None:
        """Have the server serve ``layer_id`` of ``store`` to one destination per name
        (:attr:`sockets` then holds their QEMUs' ends): the command's checks passed.
        ``preamble`` is what the command built from the layer it checked; the server builds
        its own from the chain it opens and serves only if both are the same."""
        assert self._control is not None, "a server is ordered once"
        pairs = {name: socket.socketpair() for name in names}
        order = {
            "store": str(store.path),
            "layer": layer_id,
            "names": names,
            "log": str(log_path),
            "preamble": hashlib.sha256(preamble).hexdigest(),
        }
        try:
            socket.send_fds(
                self._control, [json.dumps(order).encode()],
                [ours.fileno() for ours, _peer in pairs.values()],
            )  # fmt: skip
        except OSError as exc:  # it has ended: it says why on its ready pipe, if it could
            for ours, peer in pairs.values():
                ours.close()
                peer.close()
            raise self.failure() or RestoreError(
                f"the page server is gone ({exc.strerror})", step="page-server"
            ) from exc
        finally:
            self._control.close()
            self._control = None
        for name, (ours, peer) in pairs.items():
            ours.close()
            self.sockets[name] = peer

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> int:
        """The server's PID once it is serving (its records written)."""
        line = self._line(0, timeout)
        if line is None:
            raise RestoreError("the page server did not start in time", step="page-server")
        failure = self._failure(line, "ready ")
        if failure is not None:
            raise failure
        self.pid = int(line.split()[1])
        return self.pid

    def wait_guarded(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Once the server's guard runs (it starts it once the guests run)."""
        line = self._line(1, timeout)
        if line is None:
            raise RestoreError("the page server did not start its guard in time",
                               step="page-server")  # fmt: skip
        failure = self._failure(line, "guarded")
        if failure is not None:
            raise failure

    def failure(self, timeout: float = FAILURE_WAIT_S) -> VmckptError | None:
        """Why the server could not go on, if it said so (within ``timeout``): a restore that
        failed otherwise asks, since a server that cannot open the chain ends the QEMUs'
        incoming migrations, and that is what the restore then sees first."""
        deadline = time.monotonic() + timeout
        for index in range(2):
            line = self._line(index, max(0.0, deadline - time.monotonic()))
            if line is None:
                return None
            failure = self._failure(line, ("ready ", "guarded")[index])
            if failure is not None:
                return failure
        return None

    def _line(self, index: int, timeout: float) -> str | None:
        """The server's line ``index`` ("" if it exited before saying it), None if not said
        in time."""
        deadline = time.monotonic() + timeout
        self._ended = self._ended or self._let_go  # its pipe is closed here
        while len(self._said) <= index:
            if b"\n" in self._unread or (self._ended and self._unread):
                line, _, self._unread = self._unread.partition(b"\n")
                self._said.append(line.decode(errors="replace").strip())
                continue
            if self._ended:
                return ""
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                ready, _, _ = select.select([self._ready], [], [], remaining)
                chunk = os.read(self._ready, 4096) if ready else None
            except OSError:  # the pipe is closed: done() was called
                chunk = b""
            if chunk == b"":
                self._ended = True
            self._unread += chunk or b""
        return self._said[index]

    @staticmethod
    def _failure(line: str, expected: str) -> VmckptError | None:
        if line.startswith(expected):
            return None
        if line.startswith("failed "):
            with contextlib.suppress(ValueError):
                wire = json.loads(line.removeprefix("failed "))
                if isinstance(wire, dict):
                    return from_wire(wire, default=RestoreError)
        return RestoreError(
            f"the page server did not start: {line or 'it exited'}", step="page-server"
        )

    def go(self, name: str) -> None:
        """The destination ``name`` has its socket and is receiving: watch it. (A server
        that has ended says why on its ready pipe: :meth:`wait_ready`.)"""
        with contextlib.suppress(OSError):
            os.write(self._go, f"go {name}\n".encode())

    def done(self) -> None:
        """Every destination is launched; the restore command lets go of the server."""
        if self._let_go:
            return
        self._let_go = True
        if self._control is not None:  # never ordered: it exits
            self._control.close()
            self._control = None
        for fd in (self._go, self._ready):
            with contextlib.suppress(OSError):
                os.close(fd)
        for sock in self.sockets.values():
            sock.close()

    def abort(self) -> None:
        """The restore failed, or is not lazy after all: the server ends at once (its QEMUs
        are the caller's to end). Nothing once the command let go of it (done)."""
        if self._let_go:
            return
        with contextlib.suppress(OSError):
            os.write(self._go, b"abort\n")
        self.done()


def fork_server() -> ForkedServer:
    """Fork a page server (module doc): it detaches, imports what it serves with, and waits
    for :meth:`ForkedServer.order`. Call it before any thread or QMP connection exists in
    this process."""
    control, theirs = socket.socketpair()
    go_read, go_write = os.pipe()
    ready_read, ready_write = os.pipe()
    first = os.fork()
    if first == 0:  # the intermediate child: a new session, then the server itself
        code = 1
        try:
            os.setsid()
            if os.fork() == 0:
                for fd in (go_write, ready_read):  # the command's ends: its own to close
                    os.close(fd)
                control.close()
                _detach()
                from vmckpt.mechanisms.pageserver.fork import forked_main

                code = forked_main(theirs, go_read, ready_write)
            else:
                code = 0
        except BaseException:  # never return into the restore command's stack
            code = 1
        finally:
            os._exit(code)
    os.waitpid(first, 0)
    for fd in (go_read, ready_write):
        os.close(fd)
    theirs.close()
    return ForkedServer(0, control, go_write, ready_read)


class _Early:
    """The server the CLI forked as the command started, until the restore takes it."""

    server: ForkedServer | None = None


def fork_early() -> None:
    """``vmckpt restore``'s first step (the CLI's): its page server, forked before the
    command imports the rest of vmckpt. Taken by :func:`take_server`, or ended by
    :func:`discard_early` (a restore that is not lazy after all). Not in a process that
    runs other threads (main() called by a program): one of them may hold a lock the forked
    server would need; the restore forks its server later, as it would anyway."""
    if _Early.server is None and threading.active_count() == 1:
        _Early.server = fork_server()


def take_server() -> ForkedServer:
    """The page server the CLI forked early, else one forked now."""
    server, _Early.server = _Early.server, None
    return server if server is not None else fork_server()


def discard_early() -> None:
    """End the early server if no restore took it (it exits untouched)."""
    server, _Early.server = _Early.server, None
    if server is not None:
        server.abort()


def _detach() -> None:
    """Stdio to nothing until the server has a log; signals and name of a daemon."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Its command line is still the restore's; its name (ps -o comm, top) says what it is.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, b"vmckpt-pageserv", 0, 0, 0)
