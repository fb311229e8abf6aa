"""How QMP messages reach a QEMU: a transport moves them, the Monitor gives them meaning.

Three transports exist: :class:`SocketTransport` speaks to QEMU's QMP socket
through qemu.qmp's ``QMPClient``; :class:`LineTransport` speaks to it directly,
one JSON document per line, without asyncio (for the monitor a COLO checkpoint
session drives inside the guest's pause: cheaper per command, and a command
can be sent now and its reply taken later); :class:`PassthroughTransport` sends
the same QMP JSON through a passthrough channel that someone else owns
(libvirt's monitor passthrough, see vmckpt/libvirt). All hand back replies and
events as plain JSON values; errors become :class:`~vmckpt.errors.QMPError`.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import json
import queue
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Protocol

from qemu.qmp import ConnectError, ExecuteError, QMPClient
from qemu.qmp import QMPError as LibQMPError
from qemu.qmp.qmp_client import NegotiationError

from vmckpt.errors import QMPError

NEGOTIATION_ATTEMPTS = 3
NEGOTIATION_RETRY_S = 0.05


@dataclass(frozen=True)
class RawEvent:
    """A QMP event as QEMU sent it: name, data, QEMU's timestamp (seconds since the epoch)."""

    name: str
    data: Mapping[str, Any]
    timestamp: float


class Transport(Protocol):
    """Moves QMP commands, replies and events; no knowledge of what they mean."""

    description: str  # for messages: a socket path, "libvirt domain X", ...

    def connect(self, timeout: float) -> str:
        """Connect and negotiate; return QEMU's version ``major.minor.micro``."""
        ...

    def execute(self, command: str, arguments: Mapping[str, object] | None, timeout: float) -> Any:
        """One command's return value; QMPError (``error_class`` set) if QEMU refused it."""
        ...

    def execute_with_fd(
        self, command: str, arguments: Mapping[str, object], fd: int, timeout: float
    ) -> Any:
        """One command with a file descriptor attached (``getfd``, ``add-fd``)."""
        ...

    def next_event(self, timeout: float) -> RawEvent | None:
        """The next event QEMU sent, waiting up to ``timeout``; None if none came."""
        ...

    def close(self) -> None: ...


class CommandRefused(QMPError):
    """QEMU answered a command with an error."""

    def __init__(self, message: str, error_class: str, **where: Any) -> None:
        self.error_class = error_class
        super().__init__(message, **where)


def _event(raw: Mapping[str, Any]) -> RawEvent:
    stamp = raw.get("timestamp", {})
    when = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
    data = raw.get("data", {})
    return RawEvent(str(raw["event"]), dict(data) if isinstance(data, dict) else {}, when)


def _version(qemu: Any) -> str:
    """``major.minor.micro`` of the ``qemu`` part of QMP's version object."""
    return f"{int(qemu['major'])}.{int(qemu['minor'])}.{int(qemu['micro'])}"


class SocketTransport:
    """QMP over a Unix socket (a path or a connected socket), with qemu.qmp.

    qemu.qmp is asyncio; this transport owns a private event loop and runs
    each call to completion on it, so callers stay synchronous. One thread
    drives it. The loop and the QMP client exist from :meth:`connect` to
    :meth:`close`; a connect that fails closes them itself, so no caller can
    leave a loop for the garbage collector (whose ``BaseEventLoop.__del__``
    prints a traceback when the loop's own socket was collected first).
    """

    def __init__(self, address: str | Path | socket.socket, *, vm: str | None) -> None:
        self.address = address
        self.vm = vm
        self.description = (
            "a connected socket" if isinstance(address, socket.socket) else str(address)
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: QMPClient | None = None

    def connect(self, timeout: float) -> str:
        if self._loop is not None:
            raise QMPError(f"already connected to {self.description}", vm=self.vm, step="connect")
        self._loop = asyncio.new_event_loop()
        try:
            return self._connect(timeout)
        except BaseException:
            self.close()
            raise

    def _connect(self, timeout: float) -> str:
        where = self.description
        if isinstance(self.address, str | Path) and not Path(self.address).exists():
            raise QMPError(f"no QMP socket at {where}", vm=self.vm, step="connect")
        target = self.address if isinstance(self.address, socket.socket) else str(self.address)
        deadline = time.monotonic() + timeout
        self._client = QMPClient(self.vm)
        try:
            for attempt in range(NEGOTIATION_ATTEMPTS):
                try:
                    self._run(self._client.connect(target), max(0.1, deadline - time.monotonic()))
                    break
                except ConnectError as exc:
                    # QEMU greeted as QMP but dropped the connection while negotiating (seen
                    # when a client connects while QEMU is still setting its monitor up):
                    # a new connection is answered.
                    last = attempt == NEGOTIATION_ATTEMPTS - 1
                    if (
                        not isinstance(exc.exc, NegotiationError)
                        or last
                        or isinstance(target, socket.socket)
                    ):
                        raise
                    self._run(self._client.disconnect(), 5.0)
                    self._client = QMPClient(self.vm)
                    time.sleep(NEGOTIATION_RETRY_S)
        except TimeoutError as exc:
            raise QMPError(
                f"{where} did not answer as a QMP monitor within {timeout:.0f} s "
                "(is it QEMU's QMP socket, and is no other client connected to it?)",
                vm=self.vm,
                step="connect",
            ) from exc
        except ConnectError as exc:
            cause = exc.exc if isinstance(exc.exc, Exception) else exc
            if isinstance(cause, ConnectionRefusedError | FileNotFoundError):
                detail = "nobody listens there (is the guest running?)"
            elif isinstance(cause, LibQMPError | ValueError | KeyError):
                detail = f"it is not QEMU's QMP ({exc})"
            else:
                detail = str(exc)
            raise QMPError(
                f"cannot connect to {where}: {detail}", vm=self.vm, step="connect"
            ) from exc
        except (OSError, LibQMPError, EOFError) as exc:
            raise QMPError(f"cannot connect to {where}: {exc}", vm=self.vm, step="connect") from exc
        try:
            greeting: Any = self._client.greeting
            return _version(greeting.QMP.version["qemu"])
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise QMPError(
                f"{where} greeted without a QEMU version: not a QEMU monitor",
                vm=self.vm,
                step="connect",
            ) from exc

    def execute(self, command: str, arguments: Mapping[str, object] | None, timeout: float) -> Any:
        client = self._connected(command)
        try:
            return self._run(
                client.execute(command, dict(arguments) if arguments else None), timeout
            )
        except ExecuteError as exc:
            raise CommandRefused(
                f"QEMU refused {command}: {exc} ({exc.error_class})",
                exc.error_class,
                vm=self.vm,
                step=command,
            ) from exc
        except TimeoutError as exc:
            raise QMPError(
                f"QEMU did not answer {command} within {timeout:.0f} s", vm=self.vm, step=command
            ) from exc
        except (LibQMPError, OSError, EOFError) as exc:
            raise QMPError(
                f"lost the monitor connection during {command}: {exc}", vm=self.vm, step=command
            ) from exc

    def execute_with_fd(
        self, command: str, arguments: Mapping[str, object], fd: int, timeout: float
    ) -> Any:
        try:
            self._connected(command).send_fd_scm(fd)
        except (LibQMPError, OSError) as exc:
            raise QMPError(
                f"cannot pass a file descriptor: {exc}", vm=self.vm, step=command
            ) from exc
        return self.execute(command, arguments, timeout)

    def next_event(self, timeout: float) -> RawEvent | None:
        events = self._connected("wait-event").events
        if timeout <= 0:
            # Let the reader task take in what the socket already holds, then look.
            with contextlib.suppress(TimeoutError):
                self._run(asyncio.sleep(0), 1.0)
            if events.empty():
                return None
        try:
            raw = self._run(events.get(), max(timeout, 1.0 if timeout <= 0 else timeout))
        except TimeoutError:
            return None
        return _event(raw)

    def close(self) -> None:
        """Disconnect and close the loop, whatever state a failure (or a Ctrl-C) left them
        in; safe to call twice."""
        loop, client = self._loop, self._client
        if loop is None or loop.is_closed():
            return
        try:
            if client is not None:
                with contextlib.suppress(Exception):
                    self._run(client.disconnect(), 5.0)
        finally:
            self._client = None
            self._loop = None
            _close_loop(loop)

    def _connected(self, step: str) -> QMPClient:
        if self._loop is None or self._client is None:
            raise QMPError(f"not connected to {self.description}", vm=self.vm, step=step)
        return self._client

    def _run(self, awaitable: Any, timeout: float | None) -> Any:
        assert self._loop is not None, "connect() makes the loop"
        return _run_interruptibly(self._loop, asyncio.wait_for(awaitable, timeout))


# The signals whose Python handlers may raise (Ctrl-C's KeyboardInterrupt, watch's second
# signal, restore's SIGTERM): held back from the coroutines while QMP waits (see below).
_DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _run_interruptibly(loop: asyncio.AbstractEventLoop, awaitable: Any) -> Any:
    """Run ``awaitable`` to completion on ``loop``. A signal whose handler raises meanwhile
    (a Ctrl-C's KeyboardInterrupt) cancels it, lets it unwind, then raises here.

    Left alone, a handler's exception is raised in whatever code runs at that instant. In
    one of the loop's tasks (qemu.qmp's connect, its reader), it ends the task's step and
    leaves the loop at once: tasks are left half-run, one holds an exception nobody
    retrieves (asyncio prints it with a traceback when the task is collected), and
    qemu.qmp turns a handler's Exception into a connection error (a BaseException such as
    KeyboardInterrupt it passes on). asyncio.Runner handles SIGINT in the same way. Each
    handler still runs when its signal arrives (one that only sets a flag, such as watch's
    first signal, changes nothing here); a second raising signal during the unwinding is
    raised at once. Only in the main thread, where handlers run.
    """
    task = loop.create_task(awaitable)
    raised: list[BaseException] = []

    def deferring(handler: Callable[[int, FrameType | None], Any]) -> Any:
        def run(signum: int, frame: FrameType | None) -> None:
            if raised:  # the user insists: the unwinding is not waited for
                handler(signum, frame)
                return
            try:
                handler(signum, frame)
            except BaseException as exc:
                raised.append(exc)
                loop.call_soon_threadsafe(task.cancel)

        return run

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in _DEFERRED_SIGNALS:
            current = signal.getsignal(sig)
            if callable(current):  # not SIG_DFL or SIG_IGN: those raise nothing in Python
                previous[sig] = signal.signal(sig, deferring(current))
    try:
        result = loop.run_until_complete(task)
    except asyncio.CancelledError:
        if raised:
            raise raised[0] from None
        raise
    finally:
        for sig, kept in previous.items():
            signal.signal(sig, kept)
    if raised:
        raise raised[0]
    return result


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close a transport's loop; tasks a failure or a Ctrl-C left on it are cancelled and
    run to their end first (closing a loop over pending tasks warns about each one)."""
    try:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending:
            with contextlib.suppress(Exception):
                _run_interruptibly(
                    loop, asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5.0)
                )
        with contextlib.suppress(Exception):
            _run_interruptibly(loop, loop.shutdown_asyncgens())
    finally:
        loop.close()


class _NotQmp(QMPError):
    """What came from the socket is not QMP (no JSON object a line)."""


class LineTransport:
    """QMP over a Unix socket, spoken directly: synchronous, one JSON document a line.

    What a checkpoint session's monitor needs inside the guest's pause: a command
    costs less than through asyncio (query-status 0.21 ms against 0.50 ms median, a
    one-action transaction 0.81 against 1.14 ms, on a loaded 2-core host), and
    :meth:`submit` sends a command whose reply :meth:`collect` takes later, so the
    thread can read the checkpoint while QEMU runs it. Replies are matched by ``id``;
    events that arrive meanwhile are queued. One thread drives it.
    """

    def __init__(self, path: str | Path, *, vm: str | None) -> None:
        self.path = Path(path)
        self.vm = vm
        self.description = str(path)
        self._sock: socket.socket | None = None
        self._buffer = bytearray()
        self._events: collections.deque[RawEvent] = collections.deque()
        self._replies: dict[int, dict[str, Any]] = {}
        self._commands: dict[int, str] = {}
        self._next_id = 0

    def connect(self, timeout: float) -> str:
        where = self.description
        deadline = time.monotonic() + timeout
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            detail = (
                "nobody listens there (is the guest running?)"
                if isinstance(exc, ConnectionRefusedError | FileNotFoundError)
                else str(exc)
            )
            raise QMPError(f"cannot connect to {where}: {detail}", vm=self.vm,
                           step="connect") from exc  # fmt: skip
        self._sock = sock
        try:
            try:
                greeting = self._message(deadline, "the greeting")
            except _NotQmp as exc:
                raise QMPError(f"cannot connect to {where}: it is not QEMU's QMP ({exc.message})",
                               vm=self.vm, step="connect") from exc  # fmt: skip
            version = _version(greeting["QMP"]["version"]["qemu"])
        except (KeyError, TypeError, ValueError) as exc:
            self.close()
            raise QMPError(f"{where} greeted without a QEMU version: not a QEMU monitor",
                           vm=self.vm, step="connect") from exc  # fmt: skip
        except QMPError:
            self.close()
            raise
        self.execute("qmp_capabilities", None, max(0.1, deadline - time.monotonic()))
        return version

    # -- commands ---------------------------------------------------------------

    def submit(
        self, command: str, arguments: Mapping[str, object] | None, fd: int | None = None
    ) -> int:
        """Send a command (with ``fd`` attached, if given); its token for :meth:`collect`."""
        sock = self._connected(command)
        self._next_id += 1
        token = self._next_id
        request: dict[str, object] = {"execute": command, "id": token}
        if arguments:
            request["arguments"] = dict(arguments)
        data = json.dumps(request).encode() + b"\n"
        try:
            sock.settimeout(None)
            if fd is None:
                sock.sendall(data)
            else:
                fds = array.array("i", [fd])
                sent = sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
                if sent < len(data):
                    sock.sendall(data[sent:])
        except OSError as exc:
            raise QMPError(f"lost the monitor connection during {command}: {exc}", vm=self.vm,
                           step=command) from exc  # fmt: skip
        self._commands[token] = command
        return token

    def collect(self, token: int, timeout: float) -> Any:
        """The reply to the command :meth:`submit` returned ``token`` for."""
        command = self._commands.get(token, "a command")
        deadline = time.monotonic() + timeout
        self._pump(deadline, command, lambda: token in self._replies)
        self._commands.pop(token, None)
        reply = self._replies.pop(token)
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise CommandRefused(
                f"QEMU refused {command}: {error.get('desc')} ({error.get('class')})",
                str(error.get("class")),
                vm=self.vm,
                step=command,
            )
        return reply.get("return")

    def execute(self, command: str, arguments: Mapping[str, object] | None, timeout: float) -> Any:
        return self.collect(self.submit(command, arguments), timeout)

    def execute_with_fd(
        self, command: str, arguments: Mapping[str, object], fd: int, timeout: float
    ) -> Any:
        return self.collect(self.submit(command, arguments, fd), timeout)

    def next_event(self, timeout: float) -> RawEvent | None:
        if not self._events:
            deadline = time.monotonic() + max(0.0, timeout)
            with contextlib.suppress(TimeoutError):
                self._pump(deadline, "events", lambda: bool(self._events))
        return self._events.popleft() if self._events else None

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    # -- reading ----------------------------------------------------------------

    def _connected(self, what: str) -> socket.socket:
        if self._sock is None:
            raise QMPError(f"the monitor is not connected ({what})", vm=self.vm, step=what)
        return self._sock

    def _pump(self, deadline: float, what: str, done: Callable[[], bool]) -> None:
        """Read messages until ``done()``; events are queued, replies kept by id. Raises
        TimeoutError (events) or QMPError (a command) at ``deadline``."""
        while not done():
            message = self._message(deadline, what)
            if "event" in message:
                self._events.append(_event(message))
            elif isinstance(message.get("id"), int):
                self._replies[message["id"]] = message

    def _message(self, deadline: float, what: str) -> dict[str, Any]:
        sock = self._connected(what)
        while (end := self._buffer.find(b"\n")) < 0:
            remaining = deadline - time.monotonic()
            ready, _, _ = select.select([sock], [], [], max(0.0, remaining))
            if not ready:
                if what == "events":
                    raise TimeoutError
                raise QMPError(f"QEMU did not answer {what} in time", vm=self.vm, step=what)
            try:
                chunk = sock.recv(65536)
            except OSError as exc:
                raise QMPError(f"lost the monitor connection during {what}: {exc}",
                               vm=self.vm, step=what) from exc  # fmt: skip
            if not chunk:
                raise QMPError(f"QEMU closed the monitor connection during {what}",
                               vm=self.vm, step=what)  # fmt: skip
            self._buffer += chunk
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        try:
            message = json.loads(line)
        except ValueError as exc:
            raise _NotQmp(f"QEMU sent no JSON during {what}: {line[:80]!r}", vm=self.vm,
                          step=what) from exc  # fmt: skip
        if not isinstance(message, dict):
            raise _NotQmp(f"QEMU sent a non-object during {what}", vm=self.vm, step=what)
        return message


class Passthrough(Protocol):
    """A channel to a QEMU's monitor that another program owns (e.g. libvirt).

    It takes a QMP command as JSON text and returns QEMU's reply as JSON text,
    and queues QEMU's events as (name, seconds, microseconds, data JSON text).
    """

    description: str

    def open(self) -> None: ...

    def command(self, text: str) -> str: ...

    def command_with_fd(self, text: str, fd: int) -> str: ...

    @property
    def events(self) -> queue.SimpleQueue[tuple[str, int, int, str | None]]: ...

    def close(self) -> None: ...


class PassthroughTransport:
    """QMP JSON through a :class:`Passthrough`: vmckpt builds and parses every message."""

    def __init__(self, channel: Passthrough, *, vm: str | None) -> None:
        self.channel = channel
        self.vm = vm
        self.description = channel.description

    def connect(self, timeout: float) -> str:
        self.channel.open()
        info = self.execute("query-version", None, timeout)
        try:
            return _version(info["qemu"])
        except (KeyError, TypeError, ValueError) as exc:
            raise QMPError(
                f"{self.description} answered query-version without a QEMU version",
                vm=self.vm,
                step="connect",
            ) from exc

    @staticmethod
    def _request(command: str, arguments: Mapping[str, object] | None) -> str:
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        return json.dumps(request)

    def _reply(self, command: str, text: str) -> Any:
        try:
            reply = json.loads(text)
        except ValueError as exc:
            raise QMPError(
                f"{self.description} returned no JSON for {command}: {text[:80]!r}",
                vm=self.vm,
                step=command,
            ) from exc
        if not isinstance(reply, dict):
            raise QMPError(f"reply to {command} is not an object", vm=self.vm, step=command)
        if "error" in reply:
            error = reply["error"] if isinstance(reply["error"], dict) else {}
            raise CommandRefused(
                f"QEMU refused {command}: {error.get('desc')} ({error.get('class')})",
                str(error.get("class")),
                vm=self.vm,
                step=command,
            )
        return reply.get("return")

    def execute(self, command: str, arguments: Mapping[str, object] | None, timeout: float) -> Any:
        del timeout  # the channel's owner applies its own
        return self._reply(command, self.channel.command(self._request(command, arguments)))

    def execute_with_fd(
        self, command: str, arguments: Mapping[str, object], fd: int, timeout: float
    ) -> Any:
        del timeout
        text = self.channel.command_with_fd(self._request(command, arguments), fd)
        return self._reply(command, text)

    def next_event(self, timeout: float) -> RawEvent | None:
        try:
            name, seconds, micros, details = self.channel.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        try:
            data = json.loads(details) if details else {}
        except ValueError:
            data = {}
        return RawEvent(name, data if isinstance(data, dict) else {}, seconds + micros / 1e6)

    def close(self) -> None:
        self.channel.close()
