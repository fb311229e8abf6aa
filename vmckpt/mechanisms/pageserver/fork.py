"""The first page server of a restore, forked by the restore command as it begins.

QEMU loads the device state only while pages are served (its main thread reads guest RAM
while loading some devices, e.g. ``kvm-tpr-opt``), and a server must import numpy and its
own modules (~60 ms) and build the chain's page index (~0.1 s at 8 GiB) before it serves.
So a lazy restore forks its server first thing, before it checks the layer (no thread or
QMP connection exists yet), and that work runs beside the command's: :func:`fork_server`.
The server detaches at once (a new session, no terminal, its output nowhere until it has a
guest's ``pageserver.log``, the command's pipes left alone), names itself
``vmckpt-pageserv`` and imports. The command keeps its side, a :class:`ForkedServer`:

- a control socket, on which the command, once its checks passed, sends the order
  (:meth:`ForkedServer.order`: the layer, the guests' names, the log, the digest of the
  preamble it built) with one socket per destination (the server's ends; the command hands
  the other ends to the QEMUs). The server then opens the chain as a page source, builds
  the preamble itself and compares it: a layer that changed meanwhile fails the restore;
- a pipe on which it says ``go NAME`` once a QEMU is receiving (or ``abort``);
- one on which the server says ``ready PID`` once its records are written, then
  ``guarded`` once its guard runs (or ``failed`` and the error, as it crosses processes, if
  it could not open the chain: the restore raises that error).

A command that restores in full after all (:meth:`ForkedServer.abort`), fails or dies
closes the control socket first: a server that has no order by then exits, having touched
nothing. Its guard and every later server are spawned (recovery.py).
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
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from vmckpt import log
from vmckpt.errors import RestoreError, StreamError, VmckptError, from_wire
from vmckpt.fsutil import FILE_MODE
from vmckpt.images import Store
from vmckpt.images.format import INDEX, SUMS
from vmckpt.images.pagesource import STEP, PageSource, SourceHead
from vmckpt.lazy_numpy import np
from vmckpt.stream import StreamEnvelope
from vmckpt.stream import postcopy as pc

# The server's own modules (and numpy, through them) are imported by the forked server,
# while the restore command starts the QEMUs: not by the command before it forks.
if TYPE_CHECKING:
    from vmckpt.mechanisms.pageserver.server import PageServer

READY_TIMEOUT_S = 30.0
ORDER_LIMIT = 64 * 1024  # the order's bytes, at most (a few hundred names' worth)
FAILURE_WAIT_S = 1.0  # a failed restore: how long the server may take to say why
PR_SET_NAME = 15  # linux/prctl.h
_log = log.get("vmckpt.pageserver")


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

    def order(self, layer_id: str, names: list[str], log_path: Path, preamble: bytes) -> None:
        """Have the server serve ``layer_id`` to one destination per name (:attr:`sockets`
        then holds their QEMUs' ends): the command's checks passed. ``preamble`` is what the
        command built from the layer it checked; the server builds its own from the chain it
        opens and serves only if both are the same."""
        assert self._control is not None, "a server is ordered once"
        pairs = {name: socket.socketpair() for name in names}
        order = {
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


def fork_server(store: Store) -> ForkedServer:
    """Fork the page server of a restore about to begin (module doc): it detaches, imports
    what it serves with, and waits for :meth:`ForkedServer.order`. Call it before any
    thread or QMP connection exists in this process."""
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
                code = _forked_main(store, theirs, go_read, ready_write)
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


def preamble_of(head: SourceHead) -> bytes:
    """What a destination of ``head`` is sent first (vmckpt/stream/postcopy.py): the stored
    device state cut for postcopy. StreamError if it is not as vmckpt stores it."""
    manifest = head.manifest
    envelope = StreamEnvelope(
        prelude=head.prelude,
        machine_type=manifest.machine_type,
        ram_section_id=manifest.ram_section[0],
        ram_instance_id=manifest.ram_section[1],
        ram_version_id=manifest.ram_section[2],
        epilogue=head.device_state,
    )
    return pc.preamble(envelope, head.blocks, pc.split_device_state(head.device_state))


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


def _log_to(log_path: Path) -> None:
    """Stdout and stderr to the guest's pageserver.log (the command's terminal never)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, FILE_MODE)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


@dataclass(frozen=True)
class _Order:
    layer: str
    names: list[str]
    log: Path
    preamble: str  # its SHA-256, as the command built it
    sockets: dict[str, socket.socket]


def _receive_order(control: socket.socket) -> _Order | None:
    """The command's order, or None if it closed the socket instead (no lazy restore)."""
    data, fds, _flags, _addr = socket.recv_fds(control, ORDER_LIMIT, 64)
    control.close()
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    order = json.loads(data)
    names = list(order["names"])
    if len(fds) != len(names):
        for fd in fds:
            os.close(fd)
        raise RestoreError(f"{len(fds)} sockets came for {len(names)} guests", step="page-server")
    sockets = {name: socket.socket(fileno=fd) for name, fd in zip(names, fds, strict=True)}
    return _Order(str(order["layer"]), names, Path(order["log"]), str(order["preamble"]), sockets)


def _forked_main(store: Store, control: socket.socket, go_read: int, ready_write: int) -> int:
    pipe = _ReadyPipe(ready_write)
    try:
        _detach()
        # The order comes once the command's checks passed; meanwhile this thread imports
        # (numpy: ~60 ms). Once it came, the chain's indexes and page digests are read and
        # hashed (30-60 ms at 8 GiB) beside the rest of the import and the index's build.
        ordering = _Ordering(store, control)
        ordering.start()
        from vmckpt.mechanisms.pageserver.server import PageServer, held, serve

        np.ndarray  # noqa: B018  (numpy itself, now: PageSource.open needs it)
        order = ordering.result()
        if order is None:
            return 0  # the command restores in full, failed or is gone: nothing was touched
        _log_to(order.log)
        log.configure(1)
        try:
            source = PageSource.open(store, order.layer)
        finally:
            store.reader.drop_prefetched()
        try:
            preamble = preamble_of(SourceHead(source.chain, source.blocks, source.prelude,
                                              source.device_state))  # fmt: skip
        except StreamError as exc:
            source.close()
            raise RestoreError(exc.message, layer=order.layer, step="page-server") from exc
        if hashlib.sha256(preamble).hexdigest() != order.preamble:
            source.close()
            raise RestoreError(
                "the layer changed while the restore started", layer=order.layer,
                step="page-server",
            )  # fmt: skip
        server = PageServer(store, source, order.names)
        preambles = dict.fromkeys(order.names, preamble)

        follower = threading.Thread(
            target=_follow_go, args=(server, go_read), name="go", daemon=True
        )
        follower.start()
        _log.info("page server %d: layer %s for %s", os.getpid(), source.manifest.id,
                  ", ".join(order.names))  # fmt: skip
        with held(store, order.names):
            return serve(
                server, order.sockets, preambles,
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


class _Ordering(threading.Thread):
    """Waits for the command's order, then reads the chain's indexes and digests ahead."""

    def __init__(self, store: Store, control: socket.socket) -> None:
        super().__init__(name="order", daemon=True)
        self._store = store
        self._control = control
        self._order: _Order | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            self._order = _receive_order(self._control)
        except BaseException as exc:  # raised by result(), in the server's main thread
            self._error = exc
            return
        if self._order is not None:
            with contextlib.suppress(VmckptError, OSError):  # the open reports it, if needed
                chain = self._store.chain(self._order.layer, STEP)
                self._store.reader.prefetch(reversed(chain), (INDEX, SUMS), STEP)

    def result(self) -> _Order | None:
        self.join()
        if self._error is not None:
            raise self._error
        return self._order


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
