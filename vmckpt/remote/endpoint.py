"""A host that holds a store: this one (agent as a child process) or another (over SSH).

Both run the same agent (:mod:`vmckpt.remote.agent`) and the same ``vmckpt``
command; an :class:`Endpoint` only knows how to start them and read their lines.
"""

from __future__ import annotations

import contextlib
import json
import queue
import shlex
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from vmckpt.errors import RemoteError, from_wire
from vmckpt.remote.ssh import SshHost

DEFAULT_REMOTE_PYTHON = "python3"
READER_JOIN_S = 5.0  # a child that ended: its pipes reach their end at once


class Session(Protocol):
    """A running agent command: lines to its stdin, lines from its stdout."""

    def send_line(self, line: str) -> bool: ...

    def send_bytes(self, data: bytes) -> bool: ...

    def end_input(self) -> None: ...

    def read_line(self, timeout: float) -> str | None: ...

    def stderr(self) -> str: ...

    def close(self) -> None: ...


class _LocalSession:
    def __init__(self, argv: list[str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # a Ctrl-C reaches the orchestrator only
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._err = b""
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_err, daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(raw.decode(errors="replace").rstrip("\n"))
        self.lines.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self._err = self.proc.stderr.read()

    def send_bytes(self, data: bytes) -> bool:
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(data)
            self.proc.stdin.flush()
            return True
        except (OSError, ValueError):
            return False

    def send_line(self, line: str) -> bool:
        return self.send_bytes((line + "\n").encode())

    def end_input(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()

    def read_line(self, timeout: float) -> str | None:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None

    def stderr(self) -> str:
        return self._err.decode(errors="replace")

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its Popen handle
            self.proc.wait(5)
        # Its pipes are ours to close (left to the collector, each one warns), each once its
        # reader has met its end: the child is gone, so at once, unless something it started
        # holds the pipe open; a reader still blocked in read() would block close() too.
        for reader, pipe in zip(self._readers, (self.proc.stdout, self.proc.stderr), strict=True):
            reader.join(READER_JOIN_S)
            if pipe is not None and not reader.is_alive():
                with contextlib.suppress(OSError):
                    pipe.close()


@dataclass
class Endpoint:
    """A store on a host: ``ssh`` None means this host."""

    store: str
    ssh: SshHost | None = None
    python: str = DEFAULT_REMOTE_PYTHON

    @property
    def host(self) -> str:
        return self.ssh.name if self.ssh else "local"

    def argv(self, module: str, args: list[str]) -> list[str]:
        """How to run ``python -m module args`` there."""
        if self.ssh is None:
            return [sys.executable, "-m", module, *args]
        return [*shlex.split(self.python), "-m", module, *args]

    def open(self, command: str, *args: str) -> Session:
        """Start an agent command that the caller talks to line by line."""
        argv = self.argv("vmckpt.agent", [command, "--store", self.store, *args])
        if self.ssh is None:
            return _LocalSession(argv)
        return self.ssh.open(argv, step=command)

    def call(self, command: str, *args: str, timeout: float = 300.0) -> dict[str, Any]:
        """Run an agent command to its end; its last JSON line, or RemoteError."""
        session = self.open(command, *args)
        try:
            lines = read_until_end(session, timeout, self.host, command)
        finally:
            session.close()
        last = lines[-1] if lines else {}
        if "error" in last or not lines:
            raise agent_error(last, session, self.host, command)
        return last

    def vmckpt(self, *args: str, timeout: float = 300.0) -> tuple[int, str, str]:
        """Run the ``vmckpt`` command itself there; exit status, stdout, stderr (its error, if
        any, as errors.to_wire's JSON: :func:`failure_of` reads it)."""
        argv = self.argv("vmckpt", ["--json-errors", *args])
        if self.ssh is None:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
            return done.returncode, done.stdout, done.stderr
        return self.ssh.run(argv, timeout=timeout, step=args[0] if args else "vmckpt")


def read_until_end(session: Session, timeout: float, host: str, step: str) -> list[dict[str, Any]]:
    lines: list[dict[str, Any]] = []
    while True:
        try:
            line = session.read_line(timeout)
        except TimeoutError:
            raise RemoteError(
                f"the agent did not answer within {timeout:.0f} s", host=host, step=step
            ) from None
        if line is None:
            return lines
        parsed = parse_line(line)
        if parsed is not None:
            lines.append(parsed)


def parse_line(line: str) -> dict[str, Any] | None:
    with contextlib.suppress(ValueError):
        data = json.loads(line)
        if isinstance(data, dict):
            return data
    return None


def remote_failure(data: dict[str, Any], host: str, step: str) -> RemoteError:
    """A RemoteError naming the host, with what failed there (errors.to_wire's shape)."""
    return RemoteError(from_wire(data, default=RemoteError).one_line(), host=host, step=step)


def failure_of(stderr: str, host: str, step: str) -> RemoteError:
    """The RemoteError for a vmckpt run there with --json-errors that failed: its error as it
    sent it, or its last line of output if it could not say (it did not start, say)."""
    lines = stderr.strip().splitlines()
    last = lines[-1] if lines else "(no output)"
    return remote_failure(parse_line(last) or {"error": {"message": last}}, host, step)


def agent_error(last: dict[str, Any], session: Session, host: str, step: str) -> RemoteError:
    if "error" in last:
        return remote_failure(last, host, step)
    tail = " | ".join(session.stderr().strip().splitlines()[-2:]) or "no output"
    return RemoteError(f"the vmckpt agent failed: {tail}", host=host, step=step)
