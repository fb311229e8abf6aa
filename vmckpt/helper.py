"""``vmckpt helper``: a vmckpt kept warm on this host, that runs the commands its launcher hands
it (vmckpt/launcher.py), each in a process of its own forked with everything imported.

A lazy restore's guest runs some 10 ms after QEMU asks for it, but a ``vmckpt restore``
process first spends ~0.2 s of CPU importing vmckpt, and its page server as much again
beside it, on a host where QEMU starts at the same time (measured: README, *lazy restore*).
The helper imports once what a restore and a run need (numpy included, with the one BLAS
thread vmckpt loads it with), then waits on a SOCK_SEQPACKET socket in this host's runtime
root. For each request it checks that the peer is this user (``SO_PEERCRED``), that the
client is this installation of vmckpt and that no module it loaded has changed on disk
since (else it says so and the client runs the command itself; changed code also ends the
helper), and forks: the child takes the client's standard input, output and error, working
directory, umask and environment, and runs :func:`vmckpt.cli.main` on its command line as
the client would have, in a session of its own; the helper sends the client the child's
PID and a pidfd (to forward signals to), then its exit status. A client that goes away
before its child ended (killed) has its child killed too: a command dies with its process.

The helper holds no thread, no QMP connection and no store open: a fork copies a process
that only waits on sockets. It serves until SIGTERM or SIGINT, then removes its socket and
waits for the commands it runs to end (their clients get their exit statuses).
What it reads from a client is that user's own input, as a command line is.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import io
import json
import logging
import os
import selectors
import signal
import socket
import struct
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from vmckpt import hostdirs, launcher, log
from vmckpt.errors import LockError, UsageError

# What a helped command (restore or run, --detach) and a lazy restore's page server import;
# their children import anything else themselves, as a command does.
WARM_MODULES = (
    "vmckpt.cli",
    "vmckpt.cli.restore_cmds",
    "vmckpt.cli.guest_cmds",
    "vmckpt.mechanisms.api",
    "vmckpt.mechanisms.restore",
    "vmckpt.mechanisms.restore_prep",
    "vmckpt.mechanisms.lazy_restore",
    "vmckpt.mechanisms.lazy_host",
    "vmckpt.mechanisms.choice",
    "vmckpt.mechanisms.disk_restore",
    "vmckpt.mechanisms.pageserver_guard",
    "vmckpt.mechanisms.pageserver.fork",
    "vmckpt.mechanisms.pageserver.server",
    "vmckpt.mechanisms.pageserver.destination",
    "vmckpt.mechanisms.pageserver.records",
    "vmckpt.guests.local",
    "vmckpt.images.pagesource",
    "vmckpt.guard",
    # imported where they are first used: an encrypted store's pages, page digests hashed by
    # several threads (a host of more than 2 CPUs), progress on a terminal
    "cryptography.hazmat.primitives.ciphers.aead",
    "cryptography.hazmat.primitives.kdf.hkdf",
    "concurrent.futures",
    "rich.progress",
)
STEP = "helper"
STOP_POLL_S = 1.0  # how soon a SIGTERM is acted on (the wait for a request goes on after it)
REQUEST_TIMEOUT_S = 5.0  # a client sends its request as it connects


@dataclass
class Client:
    """A connection whose command runs in ``pid`` (0: none yet)."""

    conn: socket.socket
    pid: int = 0
    pidfd: int = -1


@dataclass
class Helper:
    path: Path
    listener: socket.socket
    code: dict[str, tuple[int, int]]  # a loaded module's file: (mtime_ns, size) as loaded
    inode: int  # the socket file's: removed at the end only if it is still this one
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)
    clients: dict[int, Client] = field(default_factory=dict)  # by the fd selected on
    stopping: bool = False


def warm() -> None:
    """Import what helped commands need, numpy loaded, no thread left running."""
    for name in WARM_MODULES:
        importlib.import_module(name)
    from vmckpt.lazy_numpy import np

    np.zeros(1)  # numpy itself, not only its lazy handle
    tasks = len(os.listdir("/proc/self/task"))
    if threading.active_count() != 1 or tasks != 1:
        raise UsageError(
            f"the helper runs {tasks} threads once vmckpt is imported: a process with "
            "threads cannot be forked safely, so it does not serve",
            step=STEP,
        )


def loaded_code() -> dict[str, tuple[int, int]]:
    """Every file of vmckpt's loaded modules, with what says it is unchanged."""
    package = os.path.dirname(os.path.abspath(launcher.__file__))
    found = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.abspath(path).startswith(package + os.sep):
            info = os.stat(path)
            found[path] = (info.st_mtime_ns, info.st_size)
    return found


def changed_code(code: dict[str, tuple[int, int]]) -> str | None:
    """A file of ``code`` that is not as it was loaded, if any."""
    for path, identity in code.items():
        try:
            info = os.stat(path)
        except OSError:
            return path
        if (info.st_mtime_ns, info.st_size) != identity:
            return path
    return None


def listen(path: Path) -> socket.socket:
    """The helper's socket at ``path`` (0600); LockError if a helper answers there."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    with probe:
        try:
            probe.connect(str(path))
        except OSError:
            pass  # none: a socket left behind by one that was killed is replaced
        else:
            raise LockError(f"a vmckpt helper already serves {path}", step=STEP)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old)
    listener.listen(16)
    return listener


def serve(verbose: bool = False) -> int:
    """``vmckpt helper``: warm, listen, serve until SIGTERM or SIGINT."""
    warm()
    root = hostdirs.private_dir(hostdirs.runtime_root())
    path = root / launcher.HELPER_SOCKET
    listener = listen(path)
    helper = Helper(path, listener, loaded_code(), os.stat(path).st_ino)

    def stop(_signum: int, _frame: object) -> None:
        helper.stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    print(f"vmckpt helper: serving {path} (pid {os.getpid()})", flush=True)
    gc.freeze()  # what the imports made is shared with every child, never collected
    selector = helper.selector
    selector.register(helper.listener, selectors.EVENT_READ)
    try:
        while not helper.stopping:
            for key, _events in selector.select(timeout=STOP_POLL_S):
                if key.fileobj is helper.listener:
                    _accept(helper, selector, verbose)
                else:
                    _settle(helper, selector, key.fd, verbose)
    finally:
        selector.unregister(helper.listener)
        _stop_listening(helper)
    # The commands it runs end as they would have: their clients get their exit statuses.
    while helper.clients:
        for key, _events in selector.select():
            _settle(helper, selector, key.fd, verbose)
    print("vmckpt helper: stopped", flush=True)
    return 0


def _stop_listening(helper: Helper) -> None:
    """Remove the socket if it is still this helper's (not a newer one's)."""
    with contextlib.suppress(OSError):
        if os.stat(helper.path).st_ino == helper.inode:
            helper.path.unlink()
    helper.listener.close()


def _accept(helper: Helper, selector: selectors.BaseSelector, verbose: bool) -> None:
    try:
        conn, _addr = helper.listener.accept()
    except OSError:
        return
    fds: list[int] = []
    try:
        conn.settimeout(REQUEST_TIMEOUT_S)  # a client stopped before it asked stops no other
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        message, fds, _flags, _addr = socket.recv_fds(conn, launcher.MESSAGE_MAX, 3)
        request = json.loads(message)
        refusal = _refusal(helper, uid, request, fds)
        if refusal is not None:
            conn.send(refusal.encode())
            conn.close()
            if verbose or refusal == "stale":
                print(f"vmckpt helper: not taken: {refusal}", flush=True)
            if refusal == "stale":
                helper.stopping = True
            return
        conn.settimeout(None)
        pid = os.fork()
        if pid == 0:
            _child(helper, conn, request, fds)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"vmckpt helper: a request failed: {exc}", flush=True)
        conn.close()
        return
    finally:
        for fd in fds:
            os.close(fd)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:  # no descriptor left: a child it cannot watch is not left running
        print(f"vmckpt helper: pid {pid}: cannot be watched ({exc}): killed", flush=True)
        os.kill(pid, signal.SIGKILL)  # its own child, not yet reaped: the PID is still its
        os.waitpid(pid, 0)
        conn.close()
        return
    client = Client(conn, pid, pidfd)
    helper.clients[pidfd] = client
    helper.clients[conn.fileno()] = client
    selector.register(pidfd, selectors.EVENT_READ)
    selector.register(conn, selectors.EVENT_READ)
    # A client gone meanwhile: its connection reads as ended, and its command is killed.
    with contextlib.suppress(OSError):
        socket.send_fds(conn, [f"pid {pid}".encode()], [pidfd])
    if verbose:
        print(f"vmckpt helper: pid {pid}: {' '.join(request['argv'])}", flush=True)


def _refusal(helper: Helper, uid: int, request: Any, fds: list[int]) -> str | None:
    """Why a request is not run here, if it is not."""
    if uid != os.geteuid():
        return "other-user"
    if len(fds) != 3 or not isinstance(request, dict):
        return "malformed"
    if request.get("installation") != launcher.installation():
        return "other-installation"
    changed = changed_code(helper.code)
    if changed is not None:
        print(f"vmckpt helper: {changed} changed since it was loaded: stopping", flush=True)
        return "stale"
    return None


def _settle(helper: Helper, selector: selectors.BaseSelector, fd: int, verbose: bool) -> None:
    """A child ended (its pidfd) or its client went away (its connection)."""
    client = helper.clients.pop(fd, None)
    if client is None:
        return
    other = client.conn.fileno() if fd == client.pidfd else client.pidfd
    helper.clients.pop(other, None)
    if fd != client.pidfd:  # the client is gone (nothing else is ever sent): so is its command
        with contextlib.suppress(OSError):
            signal.pidfd_send_signal(client.pidfd, signal.SIGKILL)
    _pid, status = os.waitpid(client.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    code = 128 - code if code < 0 else code
    with contextlib.suppress(OSError):
        client.conn.send(f"exit {code}".encode())
    for each in (client.conn, client.pidfd):
        selector.unregister(each)
    client.conn.close()
    os.close(client.pidfd)
    if verbose:
        print(f"vmckpt helper: pid {client.pid}: exit {code}", flush=True)


def _child(
    helper: Helper, conn: socket.socket, request: dict[str, Any], fds: list[int]
) -> NoReturn:
    """The forked command: the client's stdio, directory, umask and environment, then the
    CLI as the client would have run it."""
    code = 1
    try:
        conn.close()
        helper.listener.close()
        helper.selector.close()
        for client in helper.clients.values():
            with contextlib.suppress(OSError):
                os.close(client.pidfd)
            client.conn.close()
        os.setsid()
        # The helper's own log handler writes to the helper's stderr object: the command
        # configures its own (log.configure), on the client's.
        logging.getLogger(log.ROOT).handlers.clear()
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, signal.SIG_DFL if signum == signal.SIGTERM
                          else signal.default_int_handler)  # fmt: skip
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        fds.clear()
        sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = _text_out(1, "strict")
        sys.stderr = _text_out(2, "backslashreplace")
        os.environ.clear()
        os.environ.update(request["env"])
        os.umask(int(request["umask"]))
        try:
            os.chdir(request["cwd"])
        except OSError as exc:
            print(f"vmckpt: error: {request['cwd']}: {exc.strerror}", file=sys.stderr)
        else:
            from vmckpt.cli import finish, main

            try:
                code = main(request["argv"])
            except SystemExit as exc:  # argparse: a usage error, or --help
                code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
            finish()
    except BaseException as exc:  # never return into the helper's loop; say why, once
        code = 130 if isinstance(exc, KeyboardInterrupt) else 1
        with contextlib.suppress(Exception):  # stderr is the client's once it is set up
            print(f"vmckpt: error: the helper could not run the command ({exc!r})",
                  file=sys.stderr, flush=True)  # fmt: skip
    finally:
        os._exit(code)


def _text_out(fd: int, errors: str) -> io.TextIOWrapper:
    return io.TextIOWrapper(
        io.FileIO(fd, "w", closefd=False),
        encoding="utf-8",
        errors=errors,
        line_buffering=os.isatty(fd),
    )
