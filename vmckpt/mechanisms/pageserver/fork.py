"""The first page server of a restore, forked by the restore command.

QEMU loads the device state only while pages are served (its main thread reads guest RAM
while loading some devices, e.g. ``kvm-tpr-opt``), and a freshly spawned Python would
spend a few hundred milliseconds importing before serving the first page. So
:func:`fork_server` forks the server before the restore starts any thread or QMP
connection; it detaches at once (a new session, no terminal, its output to
``pageserver.log``, the command's pipes left alone) and names itself ``vmckpt-pageserv``.
The restore command keeps its side, a :class:`ForkedServer`: one socket per destination
to hand to QEMU, a pipe on which it says ``go NAME`` once a QEMU is receiving (or
``abort``), and one on which the server says ``ready PID`` once its records are written
and its guard runs (or ``failed`` and the error, as it crosses processes, if it could not
open the chain: the restore raises that error). Its guard and every later server are
spawned (recovery.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmckpt import log
from vmckpt.errors import RestoreError, VmckptError, from_wire
from vmckpt.fsutil import FILE_MODE
from vmckpt.images import Store
from vmckpt.images.format import INDEX, SUMS
from vmckpt.images.pagesource import STEP, PageSource, SourceHead
from vmckpt.lazy_numpy import np
from vmckpt.mechanisms.pageserver import records

# The server's own modules (and numpy, through them) are imported by the forked server,
# while the restore command starts the QEMUs: not by the command before it forks.
if TYPE_CHECKING:
    from vmckpt.mechanisms.pageserver.server import PageServer

READY_TIMEOUT_S = 30.0
FAILURE_WAIT_S = 1.0  # a failed restore: how long the server may take to say why
PR_SET_NAME = 15  # linux/prctl.h
_log = log.get("vmckpt.pageserver")


@dataclass
class ForkedServer:
    """The restore command's side of a page server it forked."""

    pid: int
    sockets: dict[str, socket.socket]  # QEMU's ends, one per destination (hand them over)
    _go: int  # pipe: "go NAME" once a destination's QEMU has its socket, "abort"
    # pipe: the server says "ready PID" (serving, its records written), then "guarded" (its
    # guard runs); or, instead of either, "failed {error}" or "error ..."
    _ready: int

    _said: list[str] = field(default_factory=list)  # its lines read so far
    _unread: bytes = b""
    _ended: bool = False  # the pipe ended (or was closed here)

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
        for fd in (self._go, self._ready):
            with contextlib.suppress(OSError):
                os.close(fd)
        for sock in self.sockets.values():
            sock.close()

    def abort(self) -> None:
        """The restore failed: the server ends at once (its QEMUs are the caller's to end)."""
        with contextlib.suppress(OSError):
            os.write(self._go, b"abort\n")
        self.done()


def fork_server(store: Store, head: SourceHead, preambles: dict[str, bytes]) -> ForkedServer:
    """Fork the page server of a restore (module doc): it detaches, opens the chain ``head``
    checked as a page source (an error, a chain that is no longer that one, is said on the
    ready pipe), serves it to one destination per name of ``preambles``, and waits for
    :meth:`ForkedServer.go` to watch each. Call it before any thread or QMP connection
    exists in this process."""
    names = list(preambles)
    pairs = {name: socket.socketpair() for name in names}
    go_read, go_write = os.pipe()
    ready_read, ready_write = os.pipe()
    log_path = store.host.runtime_dir(names[0]) / records.LOG
    first = os.fork()
    if first == 0:  # the intermediate child: a new session, then the server itself
        code = 1
        try:
            os.setsid()
            if os.fork() == 0:
                code = _forked_main(store, head, pairs, preambles, go_read, ready_write, log_path)
            else:
                code = 0
        except BaseException:  # never return into the restore command's stack
            code = 1
        finally:
            os._exit(code)
    os.waitpid(first, 0)
    os.close(go_read)
    os.close(ready_write)
    theirs = {}
    for name, (ours, peer) in pairs.items():
        ours.close()
        theirs[name] = peer
    return ForkedServer(0, theirs, go_write, ready_read)


def _detach(log_path: Path) -> None:
    """Stdio to the server's log (the restore command's pipes and terminal are left alone)."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, FILE_MODE)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # Its command line is still the restore's; its name (ps -o comm, top) says what it is.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, b"vmckpt-pageserv", 0, 0, 0)


def _forked_main(
    store: Store,
    head: SourceHead,
    pairs: dict[str, tuple[socket.socket, socket.socket]],
    preambles: dict[str, bytes],
    go_read: int,
    ready_write: int,
    log_path: Path,
) -> int:
    pipe = _ReadyPipe(ready_write)
    try:
        _detach(log_path)
        log.configure(1)
        # The chain's indexes and page digests are read and hashed (30-60 ms at 8 GiB) in a
        # thread while this one imports numpy and the server (~60 ms): the second core works.
        ahead = threading.Thread(
            target=store.reader.prefetch, args=(reversed(head.chain), (INDEX, SUMS), STEP),
            name="prefetch", daemon=True,
        )  # fmt: skip
        ahead.start()
        from vmckpt.mechanisms.pageserver.server import PageServer, held, serve

        np.ndarray  # noqa: B018  (numpy itself, now: PageSource.open needs it)
        ahead.join()
        sockets = {}
        for name, (ours, peer) in pairs.items():
            peer.close()
            sockets[name] = ours
        try:
            source = PageSource.open(store, head.manifest.id)
        finally:
            store.reader.drop_prefetched()
        if source.manifest != head.manifest or source.device_state != head.device_state:
            source.close()
            raise RestoreError(
                "the layer changed while the restore started", layer=head.manifest.id,
                step="page-server",
            )  # fmt: skip
        server = PageServer(store, source, list(preambles))

        follower = threading.Thread(
            target=_follow_go, args=(server, go_read), name="go", daemon=True
        )
        follower.start()
        _log.info("page server %d: layer %s for %s", os.getpid(), source.manifest.id,
                  ", ".join(preambles))  # fmt: skip
        with held(store, list(preambles)):
            return serve(
                server, sockets, preambles,
                announce=lambda: pipe.say(f"ready {os.getpid()}"),
                guarded=lambda: pipe.say("guarded", last=True),
            )  # fmt: skip
    except VmckptError as exc:
        _log.error("%s", exc.one_line())
        pipe.say(f"failed {json.dumps(exc.to_wire())}", last=True)  # raised as it is
        return exc.exit_code
    except BaseException as exc:
        _log.exception("page server failed: %r", exc)
        pipe.say(f"error {exc!r}", last=True)
        return 1


class _ReadyPipe:
    """The server's side of its ready pipe: lines until the last, then closed (and never
    written again: its descriptor's number may be another file's by then)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def say(self, line: str, *, last: bool = False) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # the restore command is gone: nobody to tell
            os.write(self.fd, f"{line}\n".encode())
        if last:
            os.close(self.fd)
            self.fd = None


def _follow_go(server: PageServer, fd: int) -> None:
    """The restore command's word on each destination: go (its QEMU is receiving) or abort."""
    from vmckpt.mechanisms.pageserver.server import guest_process

    pending = set(server.names)
    aborted = False
    with os.fdopen(fd, "rb") as lines:
        for raw in lines:
            words = raw.decode(errors="replace").split()
            if words[:1] == ["go"] and len(words) == 2 and words[1] in pending:
                pending.discard(words[1])
                destination = server.destinations[words[1]]
                with contextlib.suppress(VmckptError):
                    destination.process = guest_process(server.store, words[1])
            elif words[:1] == ["abort"]:
                aborted = True
                break
    if pending or aborted:  # the restore failed (or died) before its guests all ran
        _log.info("the restore did not go ahead; ending")
        for destination in server.destinations.values():
            destination.state = "gone"
            destination.close()
        server.stop.set()
