"""A guard that puts a guest back if the vmckpt process working on it dies.

A checkpoint changes a running guest (migration settings, a stopped guest
during the final iteration, a COLO session); :class:`vmckpt.session.MigrationSession`
undoes all of it on every exit the process lives to see. For the exits it
does not live to see (kill -9, an OOM kill, a crash), the command first starts
a guard: ``python -m vmckpt.guard`` as a separate process that only waits on a
pipe from its parent. When the parent releases it, it exits. When the pipe
ends without a release (the parent died), it takes the guest's checkpoint
lock, connects to the guest's monitor and recovers from the migration journal
the session wrote before changing anything (:func:`vmckpt.session.recover`):
COLO or migration ended, settings back, guest running if it ran before. Then
it removes what the checkpoint had added for the guest's writable disks
(backup jobs, their targets, dirty bitmaps other than the head layer's:
:func:`vmckpt.disk_capture.clear_leftovers`); it acts when a journal or such
scratch files are there.

The guard is spawned, not forked: it inherits no locks, sockets or threads of
its parent, and its start-up runs beside the parent's work (a parent that
dies before the guard has even started still leaves it an ended pipe).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

RELEASE = b"release\n"
CONNECT_RETRY_S = 30.0  # the dead parent's QMP connection must be gone first


class Guard:
    """The parent's side: start the guard, release it when done. A context manager."""

    def __init__(
        self, argv: list[str], module: str = "vmckpt.guard", pass_fds: Sequence[int] = ()
    ) -> None:
        self._argv = argv
        self._module = module  # the guard's program: ``python -m MODULE --pipe FD ARGV``
        self.pass_fds = tuple(pass_fds)  # descriptors the guard holds (and ARGV names)
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_fd: int | None = None

    @classmethod
    def for_qmp(cls, *, store: Path, name: str, kind: str, qmp_socket: Path) -> Guard:
        return cls(["--store", str(store), "--name", name, "--kind", kind,
                    "--qmp", str(qmp_socket)])  # fmt: skip

    @classmethod
    def for_libvirt(cls, *, store: Path, name: str, uri: str) -> Guard:
        return cls(["--store", str(store), "--name", name, "--kind", "libvirt",
                    "--libvirt-uri", uri])  # fmt: skip

    def start(self) -> Self:
        read_fd, write_fd = os.pipe()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", self._module, "--pipe", str(read_fd), *self._argv],
                pass_fds=(read_fd, *self.pass_fds),
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C or a kill of the process group spares it
            )
        except BaseException:
            os.close(write_fd)
            raise
        finally:
            os.close(read_fd)
        self._write_fd = write_fd
        return self

    @property
    def pid(self) -> int | None:
        """The guard process's PID, once started."""
        return self._proc.pid if self._proc is not None else None

    def release(self) -> None:
        """The work is done and the guest as found: the guard exits without acting."""
        if self._write_fd is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._write_fd, RELEASE)
        os.close(self._write_fd)
        self._write_fd = None
        # Not waited for: it reads the release and exits on its own (subprocess reaps it).
        if self._proc is not None:
            self._proc.poll()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


# -- the guard process -------------------------------------------------------------------


def wait_for_parent(fd: int) -> bool:
    """Block until the parent releases us (True) or dies (False)."""
    data = b""
    while True:
        try:
            chunk = os.read(fd, 64)
        except InterruptedError:
            continue
        if not chunk:
            return data.startswith(RELEASE)
        data += chunk
        if data.startswith(RELEASE):
            return True


def _recover(args: argparse.Namespace) -> int:
    from vmckpt import log
    from vmckpt.errors import QMPError, VmckptError
    from vmckpt.images import Store
    from vmckpt.mechanisms.disk_capture import clear_leftovers, has_scratch_leftovers, head_bitmaps
    from vmckpt.qmp import Monitor
    from vmckpt.session import JOURNAL, read_journal, recover

    logger = log.get("vmckpt.guard")
    store = Store(args.store)
    # Looked at without making directories: a guard whose guest and store are gone (a
    # test's, torn down) must not leave its runtime directory behind.
    journal = store.host.journal_path(args.name, JOURNAL, args.kind, create=False)
    disks = args.kind == "guest"  # only vmckpt's own guests have their disks captured
    scratch = store.host.scratch_path(args.name, args.kind) if disks else None
    if read_journal(journal) is None and not (scratch and has_scratch_leftovers(scratch)):
        return 0
    with store.host.guest_lock(args.name, what="recover after a crash", wait_s=600, kind=args.kind):
        deadline = time.monotonic() + CONNECT_RETRY_S
        while True:
            try:
                if args.libvirt_uri:
                    from vmckpt.qmp.libvirt import domain_monitor

                    mon = domain_monitor(args.name, args.libvirt_uri)
                else:
                    mon = Monitor.unix(Path(args.qmp), vm=args.name, timeout=5)
                break
            except VmckptError as exc:
                if time.monotonic() > deadline:
                    logger.error("%s: cannot recover: %s", args.name, exc.one_line())
                    return 1
                time.sleep(0.2)
        with mon:
            try:
                recover(mon, journal, vm=args.name)
            except VmckptError as exc:
                logger.error("%s: recovery failed: %s", args.name, exc.one_line())
                return 1
            if scratch is not None:
                try:
                    keep = head_bitmaps(store, args.name, args.kind)
                    clear_leftovers(mon, vm=args.name, keep=keep, scratch=scratch)
                except QMPError as exc:
                    logger.error("%s: removing the disks' leftovers failed: %s", args.name,
                                 exc.one_line())  # fmt: skip
                    return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmckpt.guard", description=__doc__)
    parser.add_argument("--pipe", type=int, required=True)
    parser.add_argument("--store", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--kind", default="guest")
    parser.add_argument("--qmp")
    parser.add_argument("--libvirt-uri")
    args = parser.parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)  # it ends when its parent says so, or dies
    if wait_for_parent(args.pipe):
        return 0
    from vmckpt import log

    log.configure(1)
    return _recover(args)


if __name__ == "__main__":
    sys.exit(main())
