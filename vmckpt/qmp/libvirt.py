"""libvirt, reached through libvirt-python (imported when first needed: vmckpt works without
it, and a libvirt command then says what to install): connections, errors classified by
libvirt's error codes (never by message text), and QMP to a running domain through
libvirt's monitor passthrough — commands with ``virDomainQemuMonitorCommand``, a file
descriptor with ``virDomainQemuMonitorCommandWithFiles`` (libvirt >= 8.2), events with
QEMU's timestamps from ``virConnectDomainQemuMonitorEventRegister`` (callbacks only queue).
A :class:`vmckpt.qmp.Monitor` over :func:`domain_monitor` offers the same methods as one on
a QEMU vmckpt started. libvirt marks such a domain *tainted* (``custom-monitor``).
"""

from __future__ import annotations

import contextlib
import importlib
import queue
import threading
from typing import Any

from vmckpt.errors import LibvirtError, QMPError, VmckptError
from vmckpt.qmp.monitor import Monitor
from vmckpt.qmp.transport import PassthroughTransport

DEFAULT_URI = "qemu:///system"


# -- libvirt-python, imported when first needed -------------------------------------------


def load_libvirt() -> tuple[Any, Any]:
    """libvirt and libvirt_qemu, or a LibvirtError naming what to install."""
    try:
        lv = importlib.import_module("libvirt")
        lvq = importlib.import_module("libvirt_qemu")
    except ImportError as exc:
        raise LibvirtError(
            f"libvirt-python is not installed ({exc}); install it with "
            "`pip install 'vmckpt[libvirt]'` (it builds against Debian's libvirt-dev and "
            "pkg-config)",
            step="import-libvirt",
        ) from exc
    # libvirt-python prints every error on stderr unless a handler takes it; vmckpt
    # reports the exceptions itself, as one line.
    lv.registerErrorHandler(_ignore_error, None)
    return lv, lvq


def _ignore_error(_context: object, _error: object) -> None:
    return None


_event_loop_lock = threading.Lock()
_event_loop_started = False


def _ensure_event_loop(lv: Any) -> None:
    """libvirt's default event loop, run by one daemon thread; needed for QMP events."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        lv.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                lv.virEventRunDefaultImpl()

        threading.Thread(target=run, name="vmckpt-libvirt-events", daemon=True).start()
        _event_loop_started = True


def libvirt_error(
    lv: Any,
    exc: Exception,
    *,
    domain: str | None,
    step: str,
    uri: str,
    cls: type[VmckptError] = LibvirtError,
) -> VmckptError:
    """A libvirt error as a vmckpt error, classified by libvirt's error code."""
    code = exc.get_error_code() if isinstance(exc, lv.libvirtError) else None
    text = " ".join(str(exc).split())
    if code == lv.VIR_ERR_NO_DOMAIN:
        message = f"libvirt at {uri} has no domain {domain}"
    elif code == lv.VIR_ERR_OPERATION_INVALID:
        message = f"libvirt refused: the domain is not in a state for this ({text})"
    elif code in (lv.VIR_ERR_NO_CONNECT, lv.VIR_ERR_SYSTEM_ERROR) and step == "connect":
        message = f"cannot connect to libvirt at {uri} (is libvirtd running?): {text}"
    elif code in (lv.VIR_ERR_AUTH_FAILED, lv.VIR_ERR_AUTH_UNAVAILABLE, lv.VIR_ERR_OPERATION_DENIED):
        message = f"libvirt at {uri} denied access: {text}"
    elif code == lv.VIR_ERR_DOM_EXIST:
        message = f"libvirt at {uri} already has a domain of this name or UUID: {text}"
    elif code == lv.VIR_ERR_NO_SUPPORT:
        message = f"this libvirt does not support it: {text}"
    else:
        message = f"libvirt failed (error code {code}): {text}"
    return cls(message, vm=domain, step=step)


def connect(lv: Any, uri: str, domain: str | None = None) -> Any:
    _ensure_event_loop(lv)  # before any connection, so every connection can deliver events
    try:
        return lv.open(uri)
    except lv.libvirtError as exc:
        raise libvirt_error(lv, exc, domain=domain, step="connect", uri=uri) from exc


def lookup(lv: Any, conn: Any, name: str, uri: str) -> Any:
    try:
        return conn.lookupByName(name)
    except lv.libvirtError as exc:
        raise libvirt_error(lv, exc, domain=name, step="lookup", uri=uri) from exc


# -- QMP through libvirt ---------------------------------------------------------------


class LibvirtChannel:
    """libvirt's monitor passthrough to one running domain, as a QMP passthrough channel
    (vmckpt.qmp.Passthrough): QMP JSON text in, QMP JSON text out, events queued.

    libvirt's event thread only queues events (nova's rule: callbacks do nothing else).
    """

    def __init__(self, domain: str, uri: str = DEFAULT_URI) -> None:
        self.domain = domain
        self.uri = uri
        self.description = f"libvirt domain {domain} at {uri}"
        self._lv, self._lvq = load_libvirt()
        self._conn: Any = None
        self._dom: Any = None
        self._callback_id: int | None = None
        self._events: queue.SimpleQueue[tuple[str, int, int, str | None]] = queue.SimpleQueue()

    @property
    def events(self) -> queue.SimpleQueue[tuple[str, int, int, str | None]]:
        return self._events

    def open(self) -> None:
        lv = self._lv
        self._conn = connect(lv, self.uri, self.domain)
        try:
            self._dom = lookup(lv, self._conn, self.domain, self.uri)
            if not self._dom.isActive():
                raise LibvirtError("the domain is not running", vm=self.domain, step="connect")

            def queue_event(
                _conn: Any,
                _dom: Any,
                event: str,
                seconds: int,
                micros: int,
                details: str | None,
                _opaque: object,
            ) -> None:
                self._events.put((event, seconds, micros, details))

            try:
                self._callback_id = self._lvq.qemuMonitorEventRegister(
                    self._conn, self._dom, None, queue_event, None, 0
                )
            except lv.libvirtError as exc:
                raise libvirt_error(
                    lv, exc, domain=self.domain, step="connect", uri=self.uri
                ) from exc
        except BaseException:
            self.close()
            raise

    def command(self, text: str) -> str:
        if self._dom is None:
            raise QMPError("not connected", vm=self.domain, step="passthrough")
        try:
            return str(self._lvq.qemuMonitorCommand(self._dom, text, 0))
        except self._lv.libvirtError as exc:
            raise libvirt_error(
                self._lv, exc, domain=self.domain, step="passthrough", uri=self.uri, cls=QMPError
            ) from exc

    def command_with_fd(self, text: str, fd: int) -> str:
        """A command with ``fd`` attached (virDomainQemuMonitorCommandWithFiles, libvirt 8.2+)."""
        if self._dom is None:
            raise QMPError("not connected", vm=self.domain, step="passthrough")
        try:
            reply, _files = self._lvq.qemuMonitorCommandWithFiles(self._dom, text, [fd], 0)
        except self._lv.libvirtError as exc:
            raise libvirt_error(
                self._lv, exc, domain=self.domain, step="passthrough", uri=self.uri, cls=QMPError
            ) from exc
        return str(reply)

    def close(self) -> None:
        if self._conn is None:
            return
        if self._callback_id is not None:
            with contextlib.suppress(Exception):
                self._lvq.qemuMonitorEventDeregister(self._conn, self._callback_id)
            self._callback_id = None
        with contextlib.suppress(Exception):
            self._conn.close()
        self._conn = None
        self._dom = None


def domain_monitor(domain: str, uri: str = DEFAULT_URI) -> Monitor:
    """A connected Monitor on a running libvirt domain, through libvirt."""
    channel = LibvirtChannel(domain, uri)
    return Monitor(PassthroughTransport(channel, vm=domain), vm=domain).connect()
