"""QMP over QEMU's socket through qemu.qmp's ``QMPClient`` (asyncio).

In a module of its own so that only the code that connects this way imports asyncio and
qemu.qmp (about 20 ms of a command's start): a lazy restore speaks
:class:`~vmckpt.qmp.transport.LineTransport` and never loads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from qemu.qmp import ConnectError, ExecuteError, QMPClient
from qemu.qmp import QMPError as LibQMPError
from qemu.qmp.qmp_client import NegotiationError

from vmckpt.errors import QMPError
from vmckpt.qmp.transport import CommandRefused, RawEvent, event_of, version_of

NEGOTIATION_ATTEMPTS = 3
NEGOTIATION_RETRY_S = 0.05


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
            return version_of(greeting.QMP.version["qemu"])
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
        return event_of(raw)

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
