"""A bare QEMU for tests that drive QEMU itself: no vmckpt guest, no store, just a process.

Some tests talk to QEMU directly (tests/test_stream.py: QEMU migrates into a file or a
socket, and loads what vmckpt wrote). :class:`BareQemu` is the one way tests start such a
QEMU, in the manner of QEMU's own ``QEMUMachine``: the test binds the QMP socket and hands
QEMU the listening descriptor (so there is nothing to wait for before connecting), QEMU's
output goes to a log, QMP goes through vmckpt's :class:`~vmckpt.qmp.Monitor`, and the
process is ended by the PID it was started with (QMP ``quit``, then SIGTERM, then
SIGKILL). A QEMU that does not come up is reported with its exit code, command line and
the end of its log.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self, cast

from tests.framework.guest import tail, wait_for
from vmckpt.errors import QMPError
from vmckpt.machine.binary import qemu_version, version_tuple
from vmckpt.qmp import Monitor

QEMU = "qemu-system-x86_64"
START_TIMEOUT_S = 30.0  # TCG on 2 busy cores
QUIT_TIMEOUT_S = 10.0


class BareQemu:
    """One QEMU process with a QMP monitor; a context manager that always ends it."""

    def __init__(self, workdir: Path, name: str, args: Sequence[str], *, binary: str = QEMU):
        self.name = name
        self.log = workdir / f"{name}.log"
        self.qmp_path = workdir / f"{name}.qmp"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.qmp_path))
            listener.listen(1)
            fd = listener.fileno()
            chardev = f"socket,id=qmp,fd={fd},server=on,wait=off"
            if version_tuple(qemu_version(_which(binary)))[0] >= 11:  # -mon is deprecated there
                monitor = ["-chardev", chardev, "-object", "monitor-qmp,id=qmp-mon,chardev=qmp"]
            else:
                monitor = ["-chardev", chardev, "-mon", "chardev=qmp,mode=control"]
            self.command = [binary, *args, *monitor]
            with self.log.open("wb") as log:
                self.process = subprocess.Popen(
                    self.command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(fd,),
                    start_new_session=True,  # a Ctrl-C on the tests does not reach it
                )
        finally:
            listener.close()  # QEMU holds its own copy
        try:
            self.monitor = Monitor.unix(self.qmp_path, vm=name, timeout=START_TIMEOUT_S)
        except QMPError as exc:
            self._end()
            raise AssertionError(
                f"QEMU {name} did not come up (exit code {self.process.returncode}): {exc}\n"
                f"command: {' '.join(self.command)}\n{tail(self.log.read_text(errors='replace'))}"
            ) from exc

    @property
    def pid(self) -> int:
        return self.process.pid

    def execute(self, command: str, **arguments: object) -> Any:
        """One QMP command; a name with a dash goes as ``**{"max-bandwidth": n}``."""
        return self.monitor.execute(command, arguments or None, timeout=60)

    def hmp(self, line: str) -> str:
        return cast(str, self.execute("human-monitor-command", **{"command-line": line}))

    def memory(self, addr: int, size: int, path: Path) -> bytes:
        """Guest-physical memory, as QEMU's ``pmemsave`` writes it."""
        self.execute("pmemsave", val=addr, size=size, filename=str(path))
        return path.read_bytes()

    def wait_migration(self, timeout: float = 60.0) -> dict[str, Any]:
        """Wait until ``query-migrate`` says completed; its answer. A failed migration fails
        at once, with QEMU's reason."""

        def completed() -> dict[str, Any] | None:
            info = cast(dict[str, Any], self.execute("query-migrate"))
            assert info.get("status") != "failed", f"QEMU {self.name}'s migration failed: {info}"
            return info if info.get("status") == "completed" else None

        return wait_for(
            completed,
            f"QEMU {self.name}'s migration completing",
            timeout,
            poll=0.02,
            evidence=lambda: f"{self.execute('query-migrate')}\n{self.log_tail()}",
        )

    def log_tail(self) -> str:
        return tail(self.log.read_text(errors="replace"))

    def close(self) -> None:
        """QMP quit, then SIGTERM, then SIGKILL, each to our PID only; the monitor closed."""
        with contextlib.suppress(QMPError):
            self.monitor.quit()
        self.monitor.close()
        self._end()

    def _end(self) -> None:
        try:
            self.process.wait(timeout=QUIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for kill in (self.process.terminate, self.process.kill):
                kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.process.wait(timeout=QUIT_TIMEOUT_S)
                    break
        self.qmp_path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _which(binary: str) -> str:
    found = shutil.which(binary)
    if found is None:
        raise AssertionError(f"QEMU binary {binary} not found (install qemu-system-x86)")
    return found
