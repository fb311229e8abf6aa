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
import json
import os
import queue
import struct
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vmckpt.checkpoint import CheckpointResult, CheckpointSettings, take_checkpoint
from vmckpt.errors import LibvirtError, MachineError, QMPError, RestoreError, VmckptError
from vmckpt.images import Store
from vmckpt.machine import BootMedium, GuestRecord, GuestSpec
from vmckpt.qmp import Event, Monitor
from vmckpt.ram import RamImage
from vmckpt.stream import StreamEnvelope, write_stream
from vmckpt.watch import WatchSettings, watch

DEFAULT_URI = "qemu:///system"
LIBVIRT_DIR = "libvirt"  # store/libvirt/<domain>/: the head of each domain's chain

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


class LibvirtMonitor(Monitor):
    """QMP of one libvirt domain, through libvirt's monitor passthrough.

    Offers what :class:`vmckpt.qmp.Monitor` offers (execute, send_fd, events with
    QEMU's timestamps, the typed helpers built on execute). Not thread safe; one
    thread drives it, libvirt's event thread only queues events.
    """

    def __init__(self, domain: str, uri: str = DEFAULT_URI) -> None:
        super().__init__(f"libvirt:{domain}", vm=domain)
        self.uri = uri
        self._lv, self._lvq = _modules()
        self._conn: Any = None
        self._dom: Any = None
        self._callback_id: int | None = None
        self._queue: queue.SimpleQueue[tuple[str, int, int, str | None]] = queue.SimpleQueue()

    def connect(self) -> LibvirtMonitor:
        lv = self._lv
        self._conn = _open(lv, self.uri, self.vm)
        try:
            assert self.vm is not None
            self._dom = _lookup(lv, self._conn, self.vm, self.uri)
            if not self._dom.isActive():
                raise LibvirtError("the domain is not running", vm=self.vm, step="connect")

            def queue_event(
                _conn: Any,
                _dom: Any,
                event: str,
                seconds: int,
                micros: int,
                details: str | None,
                _opaque: object,
            ) -> None:
                self._queue.put((event, seconds, micros, details))

            try:
                self._callback_id = self._lvq.qemuMonitorEventRegister(
                    self._conn, self._dom, None, queue_event, None, 0
                )
            except lv.libvirtError as exc:
                raise _error(lv, exc, domain=self.vm, step="connect", uri=self.uri) from exc
            self.greeting_version = self.qemu_version()
        except BaseException:
            self.close()
            raise
        self._connected = True
        return self

    def close(self) -> None:
        if self._conn is not None:
            if self._callback_id is not None:
                with contextlib.suppress(Exception):
                    self._lvq.qemuMonitorEventDeregister(self._conn, self._callback_id)
                self._callback_id = None
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None
            self._dom = None
        if not self._loop.is_closed():
            self._loop.close()  # the unused asyncio loop of Monitor
        self._connected = False

    def _command(self, command: str, arguments: Mapping[str, object] | None) -> str:
        request: dict[str, object] = {"execute": command}
        if arguments:
            request["arguments"] = dict(arguments)
        return json.dumps(request)

    def _reply(self, command: str, text: str) -> Any:
        try:
            reply = json.loads(text)
        except ValueError as exc:
            raise QMPError(
                f"libvirt returned no JSON for {command}: {text[:80]!r}", vm=self.vm, step=command
            ) from exc
        if "error" in reply:
            error = reply["error"]
            raise QMPError(
                f"QEMU refused {command}: {error.get('desc')} ({error.get('class')})",
                vm=self.vm,
                step=command,
            )
        return reply.get("return")

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """Run one QMP command through libvirt (whose own job timeout applies)."""
        if self._dom is None:
            raise QMPError("not connected", vm=self.vm, step=command)
        try:
            text = self._lvq.qemuMonitorCommand(self._dom, self._command(command, arguments), 0)
        except self._lv.libvirtError as exc:
            raise _error(
                self._lv, exc, domain=self.vm, step=command, uri=self.uri, cls=QMPError
            ) from exc
        return self._reply(command, str(text))

    def send_fd(self, name: str, fd: int) -> None:
        """``getfd`` with ``fd`` attached, through virDomainQemuMonitorCommandWithFiles."""
        if self._dom is None:
            raise QMPError("not connected", vm=self.vm, step="getfd")
        try:
            text, _files = self._lvq.qemuMonitorCommandWithFiles(
                self._dom, self._command("getfd", {"fdname": name}), [fd], 0
            )
        except self._lv.libvirtError as exc:
            raise _error(
                self._lv, exc, domain=self.vm, step="getfd", uri=self.uri, cls=QMPError
            ) from exc
        self._reply("getfd", str(text))

    def _pull_one(self, timeout: float) -> None:
        try:
            name, seconds, micros, details = self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return
        try:
            data = json.loads(details) if details else {}
        except ValueError:
            data = {}
        self._events.append(
            Event(name, data if isinstance(data, dict) else {}, seconds + micros / 1e6)
        )

    def events_since(self, since: int) -> list[Event]:
        time.sleep(0.01)  # let libvirt's event thread deliver what QEMU already sent
        while not self._queue.empty():
            self._pull_one(0.0)
        return self._events[since:]


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
        libvirt_xml=text,
    )


# -- checkpoint and watch -------------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    """A libvirt domain as vmckpt checkpoints it."""

    name: str
    uri: str = DEFAULT_URI

    def monitor(self) -> LibvirtMonitor:
        return LibvirtMonitor(self.name, self.uri).connect()

    def spec(self) -> LibvirtSpec:
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
        return spec_from_xml(str(text), domain=self.name)

    def record(self, store: Store) -> tuple[GuestRecord, Path]:
        """The domain's record in the store (its chain's head), with a fresh spec."""
        spec = self.spec()  # first: nothing is created in the store for a missing domain
        runtime_dir = _runtime_dir(store, self.name)
        head = None
        with contextlib.suppress(MachineError):
            head = GuestRecord.load(runtime_dir, self.name).head
        if head is not None and not (store.path / "layers" / head).is_dir():
            head = None  # its head layer was removed (gc): start a new chain
        return GuestRecord(self.name, spec, None, head=head), runtime_dir


def _runtime_dir(store: Store, name: str) -> Path:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise LibvirtError(f"{name!r} is not a usable domain name", vm=name, step="open")
    directory = store.path / LIBVIRT_DIR / name
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    return directory


def checkpoint_domain(
    store: Store,
    domain: Domain,
    settings: CheckpointSettings | None = None,
    *,
    base: RamImage | None = None,
) -> CheckpointResult:
    """One precopy-diff checkpoint of a running libvirt domain into a new layer."""
    record, runtime_dir = domain.record(store)
    return take_checkpoint(store, record, runtime_dir, settings, base=base, monitor=domain.monitor)


def watch_domain(
    store: Store,
    domain: Domain,
    settings: WatchSettings,
    report: Callable[[CheckpointResult, str], None],
) -> int:
    """``vmckpt watch`` for a libvirt domain (precopy-diff layers)."""
    record, runtime_dir = domain.record(store)
    return watch(store, record, runtime_dir, settings, report, monitor=domain.monitor)


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
    store: Store, layer_ref: str | None, name: str, *, uri: str = DEFAULT_URI
) -> DomainRestoreResult:
    """Define domain ``name`` from a layer's stored domain XML and start it from the layer.

    Fails before defining anything if the chain is broken, the layer holds no domain
    XML, or a domain of that name exists; a failure after the define undefines it.
    """
    started = time.monotonic()
    layer_ids = store.layer_ids()
    if not layer_ids:
        raise RestoreError(f"store {store.path} holds no layers", vm=name, step="resolve")
    layer_id = store.resolve(layer_ref) if layer_ref else layer_ids[-1]
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
        ram, prelude, epilogue = store.compose(layer_id)
        envelope = StreamEnvelope(
            prelude=prelude,
            machine_type=manifest.machine_type,
            ram_section_id=manifest.ram_section[0],
            ram_instance_id=manifest.ram_section[1],
            ram_version_id=manifest.ram_section[2],
            epilogue=epilogue,
        )
        new_uuid = str(uuid.uuid4())
        xml = restored_xml(
            str(text), name=name, new_uuid=new_uuid, machine_type=manifest.machine_type
        )
        composed = time.monotonic()
        runtime_dir = _runtime_dir(store, name)
        image = runtime_dir / "restore.save"
        defined: Any = None
        try:
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb", buffering=1 << 20) as sink:
                written = write_save_image(sink, xml, envelope, ram)
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
                exc.layer = exc.layer or layer_id
                exc.args = (exc.one_line(),)
            raise
        finally:
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
        GuestRecord(name, GuestSpec.from_dict(manifest.spec), None, head=layer_id).save(runtime_dir)
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
