"""Guests that libvirt runs: checkpoint a libvirt domain, restore a layer as one.

Everything here goes through libvirt-python, imported lazily (vmckpt works
without it; a libvirt command then says what is missing).

**QMP.** libvirt owns its domains' QMP socket. vmckpt speaks QMP through
libvirt's monitor passthrough: commands with ``virDomainQemuMonitorCommand``,
the one ``getfd`` that hands QEMU vmckpt's end of the migration socket pair
with ``virDomainQemuMonitorCommandWithFiles`` (libvirt >= 8.2), and QMP
events, with QEMU's timestamps, from ``virConnectDomainQemuMonitorEventRegister``
(callbacks only queue). :class:`LibvirtMonitor` offers the methods of
:class:`vmckpt.qmp.Monitor`, so a checkpoint runs exactly as for a guest vmckpt
started. libvirt marks a domain that had passthrough commands as *tainted*
(``custom-monitor``, one line in the domain's log); libvirt keeps tracking the
domain (it sees the STOP/RESUME of the final iteration and shows it running).
vmckpt changes nothing libvirt configures: the migration settings it changes are
put back, the fd it passed is closed.

**Restore.** A layer records the domain's migratable XML (spec field
``libvirt_xml``). ``restore_domain`` defines a domain from it (new name, new
UUID, the layer's exact machine type), writes the composed chain as a libvirt
save image (libvirt's header ``LibvirtQemudSave``, version 2, the domain XML,
then QEMU's migration stream, as ``virsh save`` writes it) and has libvirt
restore it (``virDomainRestoreFlags``), so libvirt starts QEMU with
``-incoming`` itself and the domain is an ordinary, untainted libvirt domain.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import queue
import struct
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, BinaryIO

from vmckpt.backends import Guest, GuestStatus
from vmckpt.errors import LibvirtError, MachineError, QMPError, RestoreError, VmckptError
from vmckpt.guard import Guard
from vmckpt.images import Store, keys
from vmckpt.machine.spec import BootMedium, GuestSpec
from vmckpt.progress import NO_PROGRESS, Progress
from vmckpt.qmp import Monitor, PassthroughTransport
from vmckpt.ram import RamImage
from vmckpt.restore import load_layer_image
from vmckpt.stream import StreamEnvelope, write_stream

DEFAULT_URI = "qemu:///system"
KIND = "libvirt"  # the store's name space for domains' heads (store/libvirt/<domain>/)

# libvirt's save image (src/qemu/qemu_saveimage.h): magic, then native-endian u32s
# version, data_len, was_running, compressed, cookieOffset, unused[14]; then
# data_len bytes (the domain XML, NUL-terminated); then QEMU's migration stream.
SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_VERSION = 2
SAVE_HEADER = struct.Struct("=16s19I")


# -- libvirt-python, imported when first needed -------------------------------------------


def _modules() -> tuple[Any, Any]:
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


def _error(
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


def _open(lv: Any, uri: str, domain: str | None = None) -> Any:
    _ensure_event_loop(lv)  # before any connection, so every connection can deliver events
    try:
        return lv.open(uri)
    except lv.libvirtError as exc:
        raise _error(lv, exc, domain=domain, step="connect", uri=uri) from exc


def _lookup(lv: Any, conn: Any, name: str, uri: str) -> Any:
    try:
        return conn.lookupByName(name)
    except lv.libvirtError as exc:
        raise _error(lv, exc, domain=name, step="lookup", uri=uri) from exc


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
        self._lv, self._lvq = _modules()
        self._conn: Any = None
        self._dom: Any = None
        self._callback_id: int | None = None
        self._events: queue.SimpleQueue[tuple[str, int, int, str | None]] = queue.SimpleQueue()

    @property
    def events(self) -> queue.SimpleQueue[tuple[str, int, int, str | None]]:
        return self._events

    def open(self) -> None:
        lv = self._lv
        self._conn = _open(lv, self.uri, self.domain)
        try:
            self._dom = _lookup(lv, self._conn, self.domain, self.uri)
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
                raise _error(lv, exc, domain=self.domain, step="connect", uri=self.uri) from exc
        except BaseException:
            self.close()
            raise

    def command(self, text: str) -> str:
        if self._dom is None:
            raise QMPError("not connected", vm=self.domain, step="passthrough")
        try:
            return str(self._lvq.qemuMonitorCommand(self._dom, text, 0))
        except self._lv.libvirtError as exc:
            raise _error(
                self._lv, exc, domain=self.domain, step="passthrough", uri=self.uri, cls=QMPError
            ) from exc

    def command_with_fd(self, text: str, fd: int) -> str:
        """A command with ``fd`` attached (virDomainQemuMonitorCommandWithFiles, libvirt 8.2+)."""
        if self._dom is None:
            raise QMPError("not connected", vm=self.domain, step="passthrough")
        try:
            reply, _files = self._lvq.qemuMonitorCommandWithFiles(self._dom, text, [fd], 0)
        except self._lv.libvirtError as exc:
            raise _error(
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


# -- the spec, from the domain XML -------------------------------------------------------


@dataclass(frozen=True)
class LibvirtSpec(GuestSpec):
    """A GuestSpec derived from a domain, with the domain's migratable XML.

    Stored in every layer; a plain ``vmckpt restore`` reads it as a GuestSpec
    (the extra field is ignored) and runs the guest in vmckpt's own QEMU.
    """

    libvirt_xml: str = ""


def _memory_mib(element: ET.Element | None) -> int:
    if element is None or not (element.text or "").strip():
        raise MachineError("the domain XML has no <memory>", step="spec")
    value = int((element.text or "0").strip())
    factor = {
        "b": 1, "bytes": 1, "k": 1024, "kib": 1024, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
        "mb": 1000**2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000**3,
    }.get(element.get("unit", "KiB").lower(), 1024)  # fmt: skip
    return value * factor // (1 << 20)


def spec_from_xml(text: str, *, domain: str) -> LibvirtSpec:
    """memory, vCPUs, accelerator, machine type and boot media of a domain, from its XML."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise MachineError(f"cannot parse the domain XML: {exc}", vm=domain, step="spec") from exc
    os_type = root.find("os/type")
    media: list[BootMedium] = []
    for role in ("kernel", "initrd"):
        path = (root.findtext(f"os/{role}") or "").strip()
        if path:
            media.append(BootMedium.of(role, path))
    for disk in root.findall("devices/disk"):
        source = disk.find("source")
        image = source.get("file") if source is not None else None
        if disk.get("device") == "cdrom" and image:
            media.append(BootMedium.of("iso", image))
        elif disk.get("device", "disk") == "disk" and disk.find("readonly") is None:
            raise MachineError(
                "the domain has a writable disk; vmckpt does not checkpoint libvirt "
                "domains with writable disks yet",
                vm=domain,
                step="spec",
            )
    vcpus = int((root.findtext("vcpu") or "1").strip())
    return LibvirtSpec(
        memory_mib=_memory_mib(root.find("memory")),
        cpus=vcpus,
        accel="kvm" if root.get("type") == "kvm" else "tcg",
        machine=(os_type.get("machine") if os_type is not None else None) or "pc",
        media=tuple(media),
        append=(root.findtext("os/cmdline") or "").strip(),
        panic_device=False,  # the domain's devices are libvirt's, as its XML says
        libvirt_xml=text,
    )


# -- the domain as a guest -----------------------------------------------------------------


class LibvirtGuest(Guest):
    """A running libvirt domain: checkpointed where it runs (precopy-diff layers)."""

    kind = KIND

    def __init__(self, store: Store, domain: str, uri: str | None = None) -> None:
        if not domain or "/" in domain or "\0" in domain or domain in (".", ".."):
            raise LibvirtError(f"{domain!r} is not a usable domain name", vm=domain, step="open")
        super().__init__(store, domain)
        self.uri = uri or DEFAULT_URI
        self._spec: LibvirtSpec | None = None

    def spec(self) -> LibvirtSpec:
        """The domain's spec, from its live XML (read once per command)."""
        if self._spec is None:
            lv, _ = _modules()
            conn = _open(lv, self.uri, self.name)
            try:
                dom = _lookup(lv, conn, self.name, self.uri)
                if not dom.isActive():
                    raise LibvirtError("the domain is not running", vm=self.name, step="spec")
                try:
                    text = dom.XMLDesc(lv.VIR_DOMAIN_XML_MIGRATABLE)
                except lv.libvirtError as exc:
                    raise _error(lv, exc, domain=self.name, step="spec", uri=self.uri) from exc
            finally:
                with contextlib.suppress(Exception):
                    conn.close()
            self._spec = spec_from_xml(str(text), domain=self.name)
        return self._spec

    @property
    def accel(self) -> str:
        return self.spec().accel

    def monitor(self) -> Monitor:
        return domain_monitor(self.name, self.uri)

    def guard(self) -> Guard:
        return Guard.for_libvirt(store=self.store.path, name=self.name, uri=self.uri)

    def status(self) -> GuestStatus:
        try:
            with self.monitor() as mon:
                state = mon.status()
        except VmckptError:
            state = "unreachable"
        return GuestStatus(self.name, self.kind, state, None, self.head(), host=self.uri)


# -- restore as a libvirt domain -------------------------------------------------------------


@dataclass(frozen=True)
class DomainRestoreResult:
    name: str
    uuid: str
    layer: str
    uri: str
    compose_s: float
    load_s: float
    total_s: float
    stream_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "uuid": self.uuid,
            "layer": self.layer,
            "uri": self.uri,
            "compose_s": round(self.compose_s, 3),
            "load_s": round(self.load_s, 3),
            "total_s": round(self.total_s, 3),
            "stream_bytes": self.stream_bytes,
        }


def restored_xml(text: str, *, name: str, new_uuid: str, machine_type: str | None) -> str:
    """The stored domain XML renamed, with a new UUID and the layer's exact machine type."""
    root = ET.fromstring(text)
    root.attrib.pop("id", None)
    for tag, value in (("name", name), ("uuid", new_uuid)):
        element = root.find(tag)
        if element is None:
            element = ET.SubElement(root, tag)
        element.text = value
    os_type = root.find("os/type")
    if machine_type and os_type is not None:
        os_type.set("machine", machine_type)
    return ET.tostring(root, encoding="unicode")


def write_save_image(sink: BinaryIO, xml: str, envelope: StreamEnvelope, ram: RamImage) -> int:
    """libvirt's save image: header, the domain XML, the composed migration stream."""
    data = xml.encode() + b"\0"
    sink.write(SAVE_HEADER.pack(SAVE_MAGIC, SAVE_VERSION, len(data), 1, 0, 0, *([0] * 14)))
    sink.write(data)
    return SAVE_HEADER.size + len(data) + write_stream(sink, envelope, ram)


def restore_domain(
    store: Store,
    layer_ref: str | None,
    name: str,
    *,
    uri: str = DEFAULT_URI,
    progress: Progress = NO_PROGRESS,
) -> DomainRestoreResult:
    """Define domain ``name`` from a layer's stored domain XML and start it from the layer.

    Fails before defining anything if the chain is broken, the layer holds no domain
    XML, or a domain of that name exists; a failure after the define undefines it.
    """
    started = time.monotonic()
    layer_id = store.resolve(layer_ref) if layer_ref else store.newest()
    manifest = store.manifest(layer_id)
    text = manifest.spec.get("libvirt_xml")
    if not text:
        raise RestoreError(
            "the layer was not taken from a libvirt domain (its spec has no libvirt_xml); "
            "restore it without --libvirt-define",
            vm=name,
            layer=layer_id,
            step="libvirt-define",
        )
    if manifest.origin != keys.LOCAL:
        # Domain XML can name hooks, files and QEMU command lines: only this store's own.
        raise RestoreError(
            f"the layer's origin is {manifest.origin}: --libvirt-define uses domain XML only "
            "from layers this store wrote (docs/SECURITY.md)",
            vm=name,
            layer=layer_id,
            step="libvirt-define",
        )
    if manifest.disks:
        raise RestoreError(
            "the layer holds writable disks, which --libvirt-define does not restore yet",
            vm=name,
            layer=layer_id,
            step="libvirt-define",
        )
    GuestSpec.from_dict(manifest.spec).check_media(vm=name)
    lv, _ = _modules()
    conn = _open(lv, uri, name)
    try:
        with contextlib.suppress(lv.libvirtError):
            conn.lookupByName(name)
            raise RestoreError(
                f"libvirt at {uri} already has a domain {name}; choose another name",
                vm=name,
                layer=layer_id,
                step="libvirt-define",
            )
        image_of_layer = load_layer_image(store, layer_id, progress=progress)
        new_uuid = str(uuid.uuid4())
        xml = restored_xml(
            str(text), name=name, new_uuid=new_uuid, machine_type=manifest.machine_type
        )
        composed = time.monotonic()
        image = store.host.data_dir(name, KIND) / "restore.save"
        defined: Any = None
        try:
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb", buffering=1 << 20) as sink:
                written = write_save_image(sink, xml, image_of_layer.envelope, image_of_layer.ram)
            try:
                defined = conn.defineXML(xml)
                conn.restoreFlags(str(image), None, lv.VIR_DOMAIN_SAVE_RUNNING)
                dom = conn.lookupByName(name)
                state, _reason = dom.state()
            except lv.libvirtError as exc:
                raise _error(
                    lv, exc, domain=name, step="libvirt-restore", uri=uri, cls=RestoreError
                ) from exc
            if state != lv.VIR_DOMAIN_RUNNING:
                raise RestoreError(
                    f"libvirt restored the domain but it is not running (state {state})",
                    vm=name,
                    step="libvirt-restore",
                )
        except BaseException as exc:
            if defined is not None:
                _remove_domain(lv, defined)
            if isinstance(exc, VmckptError):
                raise exc.in_context(layer=layer_id) from exc
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
        store.set_head(name, layer_id, KIND)
    finally:
        with contextlib.suppress(Exception):
            conn.close()
    loaded = time.monotonic()
    return DomainRestoreResult(
        name=name,
        uuid=new_uuid,
        layer=layer_id,
        uri=uri,
        compose_s=composed - started,
        load_s=loaded - composed,
        total_s=loaded - started,
        stream_bytes=written,
    )


def _remove_domain(lv: Any, dom: Any) -> None:
    """Destroy (if running) and undefine a domain this restore defined."""
    with contextlib.suppress(lv.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(lv.libvirtError):
        dom.undefine()
