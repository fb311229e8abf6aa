"""The ``vmckpt`` program's first step: hand the command to this host's helper, if one runs.

A ``vmckpt`` process spends most of its start importing vmckpt (~0.15-0.2 s of CPU here,
and a lazy restore's page server as much again beside it): more than a lazy restore takes
to have the guest running. A **helper** (``vmckpt helper``, vmckpt/helper.py) is a vmckpt
kept warm on this host, everything imported, that forks a process per command, as
``libvirtd`` serves ``virsh`` or a build server its client. This module is what runs first:
for a command that returns once its guest runs (``restore`` or ``run`` with ``--detach``)
it looks for the helper's socket in this host's runtime root and, if a helper answers, sends
it the command line, the environment, the working directory, the umask and its own standard
input, output and error; the helper's child runs :func:`vmckpt.cli.main` on them as this
process would, and this process forwards the signals it gets to that child and exits with
its exit status. With no helper, or one that cannot take the command (its code is not this
vmckpt's any more, another user's), the command runs in this process as always: nothing
about a command's result depends on the helper.

Imports only what Python has loaded anyway, ``socket``, ``json`` and two small modules of
vmckpt (``hostroot``, ``cmdline``): this is the whole of a helped command's own start.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import NoReturn

from vmckpt import hostroot
from vmckpt.cmdline import command_of

HELPER_SOCKET = "helper.sock"  # in the runtime root (vmckpt/hostroot.py), 0600
HELPED = frozenset({"restore", "run"})  # with --detach: commands that return a running guest
MESSAGE_MAX = 1 << 20  # a request: argv and environment (SOCK_SEQPACKET: one message)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
NO_STATUS = 1  # the helper ended before the command: its exit status is unknown


def helped(argv: Sequence[str]) -> bool:
    """Whether a helper may run this command line: a command that returns once its guest
    runs, holding no terminal (the helper's child has none)."""
    return command_of(argv) in HELPED and "--detach" in argv


def helper_socket() -> str:
    return os.path.join(hostroot.runtime_root(), HELPER_SOCKET)


def installation() -> dict[str, str]:
    """What says which vmckpt this is: a helper runs only its own code for a client. The
    environment's prefix, not the interpreter's path: a venv's ``python`` and ``python3``
    (``python -m vmckpt`` and the ``vmckpt`` script) are one installation."""
    return {"prefix": sys.prefix, "package": os.path.dirname(os.path.abspath(__file__))}


def through_helper(argv: Sequence[str]) -> int | None:
    """Run ``argv`` in this host's helper: its exit status; None if no helper took it (then
    nothing of the command has run)."""
    try:
        request = {
            "argv": list(argv),
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "umask": _umask(),
            "installation": installation(),
        }
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    except OSError:  # a working directory removed: the command says so itself
        return None
    with sock:
        try:
            sock.connect(helper_socket())
            socket.send_fds(sock, [json.dumps(request).encode()], [0, 1, 2])
            reply, fds, _flags, _addr = socket.recv_fds(sock, 256, 1)
        except OSError:  # none runs (a socket left behind), or it ended: run here
            return None
        if not reply.startswith(b"pid ") or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            return None  # "stale", "other": the helper does not run this vmckpt's code
        return _wait_for_child(sock, fds[0])


def _wait_for_child(sock: socket.socket, pidfd: int) -> int:
    """The child's exit status, each signal this process gets sent on to it meanwhile."""

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(OSError):  # it has just ended: its status is on its way
            signal.pidfd_send_signal(pidfd, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    try:
        reply = sock.recv(256)
    except OSError:
        reply = b""
    finally:
        os.close(pidfd)
    if reply.startswith(b"exit "):
        return int(reply.split()[1])
    print("vmckpt: error: the vmckpt helper ended before the command did; its outcome is "
          "unknown (vmckpt list shows the guest)", file=sys.stderr)  # fmt: skip
    return NO_STATUS


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def run() -> NoReturn:
    """The ``vmckpt`` program (and ``python -m vmckpt``)."""
    argv = sys.argv[1:]
    if helped(argv):
        code = through_helper(argv)
        if code is not None:
            os._exit(code)
    from vmckpt.cli import run as run_here

    run_here()
