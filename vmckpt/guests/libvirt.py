"""Guests that libvirt runs: a running libvirt domain, reached through libvirt's monitor
passthrough (vmckpt/qmp/libvirt.py), its spec read from its live domain XML. vmckpt changes
nothing libvirt configures: the migration settings a checkpoint changes are put back, the
file descriptor it passed is closed; libvirt keeps tracking the domain (it marks it tainted,
``custom-monitor``). A layer of a domain records its migratable XML (``libvirt_xml``), which
``restore --libvirt-define`` defines again (vmckpt/mechanisms/restore_libvirt.py).
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ET
from dataclasses import dataclass, replace
from pathlib import Path

from vmckpt.errors import LibvirtError, MachineError, VmckptError
from vmckpt.guard import Guard
from vmckpt.guests.base import LIBVIRT_KIND, Guest, GuestStatus
from vmckpt.images import Store
from vmckpt.machine.spec import (
    DISK_FORMATS,
    DISK_ID_RE,
    BootMedium,
    DiskSpec,
    GuestSpec,
    qemu_img_info,
)
from vmckpt.qmp import Monitor
from vmckpt.qmp.libvirt import (
    DEFAULT_URI,
    connect,
    domain_monitor,
    libvirt_error,
    load_libvirt,
    lookup,
)
from vmckpt.qmp.monitor import BlockNode

KIND = LIBVIRT_KIND


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


def spec_from_xml(text: str, *, domain: str, live: str | None = None) -> LibvirtSpec:
    """memory, vCPUs, accelerator, machine type, boot media and writable disks of a domain,
    from its migratable XML (``text``, stored in layers) and its live XML (``live``: the
    block node each disk's device uses; without it no writable disk is accepted). A device
    vmckpt cannot capture consistently is refused (:func:`refuse_uncapturable`)."""
    root = _parse(text, domain)
    live_root = _parse(live, domain) if live is not None else None
    os_type = root.find("os/type")
    media: list[BootMedium] = []
    for role in ("kernel", "initrd"):
        path = (root.findtext(f"os/{role}") or "").strip()
        if path:
            media.append(BootMedium.of(role, path))
    refuse_uncapturable(root, domain)
    disks: list[DiskSpec] = []
    for disk in root.findall("devices/disk"):
        source = disk.find("source")
        image = source.get("file") if source is not None else None
        if disk.get("device") == "cdrom" and image:
            media.append(BootMedium.of("iso", image))
        elif _writable(disk):
            disks.append(_disk_spec(disk, live_root, domain))
    vcpus = int((root.findtext("vcpu") or "1").strip())
    return LibvirtSpec(
        memory_mib=_memory_mib(root.find("memory")),
        cpus=vcpus,
        accel="kvm" if root.get("type") == "kvm" else "tcg",
        machine=(os_type.get("machine") if os_type is not None else None) or "pc",
        media=tuple(media),
        disks=tuple(disks),
        append=(root.findtext("os/cmdline") or "").strip(),
        panic_device=False,  # the domain's devices are libvirt's, as its XML says
        libvirt_xml=text,
    )


def _parse(text: str, domain: str) -> ET.Element:
    try:
        return ET.fromstring(text)
    except ET.ParseError as exc:
        raise MachineError(f"cannot parse the domain XML: {exc}", vm=domain, step="spec") from exc


def _writable(disk: ET.Element) -> bool:
    return disk.get("device", "disk") in ("disk", "lun") and disk.find("readonly") is None


def _refused(device: str, why: str, domain: str) -> MachineError:
    return MachineError(f"cannot checkpoint {device}: {why}", vm=domain, step="spec")


def refuse_uncapturable(root: ET.Element, domain: str) -> None:
    """Refuse, in one line naming the device and why, a domain with a device whose state
    vmckpt cannot capture at the checkpoint's instant: a writable disk that is no image file
    of raw or qcow2 format (a host block device, a network disk, a SCSI passthrough LUN), one
    another domain may write (shareable) or libvirt discards (transient), a host directory
    shared in (filesystem), a host device passed through (hostdev)."""
    for disk in root.findall("devices/disk"):
        if not _writable(disk):
            continue
        target = disk.find("target")
        dev = target.get("dev", "?") if target is not None else "?"
        name = f"disk {dev}"
        kind = disk.get("type", "file")
        driver = disk.find("driver")
        image_format = driver.get("type", "raw") if driver is not None else "raw"
        if disk.get("device") == "lun":
            why = "a SCSI passthrough LUN (device='lun'): the guest drives the host's device"
            raise _refused(name, f"{why}, whose state is not QEMU's to capture", domain)
        if kind != "file":
            why = f"type '{kind}': vmckpt captures writable disks that are image files"
            raise _refused(name, f"{why} (type='file'), whose restored copies it can make", domain)
        if image_format not in DISK_FORMATS:
            raise _refused(name, f"format {image_format!r}: vmckpt captures raw and qcow2 images",
                           domain)  # fmt: skip
        if disk.find("shareable") is not None:
            raise _refused(name, "shareable: another domain may write it at any instant", domain)
        if disk.find("transient") is not None:
            raise _refused(name, "transient: libvirt discards its writes when the domain stops",
                           domain)  # fmt: skip
    for element, why in (
        ("filesystem", "a host directory shared into the guest; its files change outside QEMU"),
        ("hostdev", "a host device passed through; its state is not QEMU's to capture"),
    ):
        found = root.find(f"devices/{element}")
        if found is not None:
            target = found.find("target")
            label = target.get("dir", "") if target is not None else ""
            raise _refused(f"{element} {label}".strip(), why, domain)


def _disk_spec(disk: ET.Element, live: ET.Element | None, domain: str) -> DiskSpec:
    """A writable image-file disk (checked by :func:`refuse_uncapturable`) as a DiskSpec with
    the block node libvirt gave it (``libvirt-<index>-format``, from the live XML)."""
    target = disk.find("target")
    source = disk.find("source")
    dev = target.get("dev", "") if target is not None else ""
    path = source.get("file", "") if source is not None else ""
    if not DISK_ID_RE.match(dev) or not path:
        raise _refused(f"disk {dev or '?'}", "it has no usable target dev or source file", domain)
    if live is None:
        raise _refused(f"disk {dev}", "the domain's live XML was not read", domain)
    index = None
    for candidate in live.findall("devices/disk"):
        live_target = candidate.find("target")
        live_source = candidate.find("source")
        if live_target is not None and live_target.get("dev") == dev and live_source is not None:
            index = live_source.get("index")
    if index is None or not index.isdigit():
        raise _refused(f"disk {dev}", "libvirt names no block node for it (a libvirt that does "
                       "not use -blockdev?)", domain)  # fmt: skip
    driver = disk.find("driver")
    image_format = driver.get("type", "raw") if driver is not None else "raw"
    try:
        info = qemu_img_info(Path(path))
    except VmckptError as exc:
        raise _refused(f"disk {dev}", f"{path}: {exc.message}", domain) from exc
    return DiskSpec(
        id=dev,
        path=path,
        format=image_format,
        size=int(info["virtual-size"]),
        node_name=f"libvirt-{index}-format",
    )


def device_nodes(
    disks: tuple[DiskSpec, ...], nodes: list[BlockNode], domain: str
) -> tuple[DiskSpec, ...]:
    """Each disk with the block node its device uses in the running QEMU: libvirt's format
    node ``libvirt-N-format``, or, where libvirt left out a raw image's format layer, its
    storage node ``libvirt-N-storage`` (N from the live XML's source index)."""
    by_name = {node.node_name: node for node in nodes}
    result = []
    for disk in disks:
        stem = disk.node.removesuffix("-format")
        for candidate in (f"{stem}-format", f"{stem}-storage"):
            node = by_name.get(candidate)
            if node is not None and node.driver in (disk.format, "file"):
                result.append(replace(disk, node_name=candidate))
                break
        else:
            raise _refused(f"disk {disk.id}", f"QEMU has no block node {stem}-format or "
                           f"{stem}-storage for {disk.path}", domain)  # fmt: skip
    return tuple(result)


# -- the domain as a guest -----------------------------------------------------------------


class LibvirtGuest(Guest):
    """A running libvirt domain: checkpointed where it runs (precopy-diff layers)."""

    kind = KIND
    files_by_fd = True  # QEMU runs as libvirt's user (libvirt-qemu), not as vmckpt's

    def __init__(self, store: Store, domain: str, uri: str | None = None) -> None:
        if not domain or "/" in domain or "\0" in domain or domain in (".", ".."):
            raise LibvirtError(f"{domain!r} is not a usable domain name", vm=domain, step="open")
        super().__init__(store, domain)
        self.uri = uri or DEFAULT_URI
        self._spec: LibvirtSpec | None = None

    def spec(self) -> LibvirtSpec:
        """The domain's spec, from its live XML (read once per command)."""
        if self._spec is None:
            lv, _ = load_libvirt()
            conn = connect(lv, self.uri, self.name)
            try:
                dom = lookup(lv, conn, self.name, self.uri)
                if not dom.isActive():
                    raise LibvirtError("the domain is not running", vm=self.name, step="spec")
                try:
                    text = dom.XMLDesc(lv.VIR_DOMAIN_XML_MIGRATABLE)
                    live = dom.XMLDesc(0)
                except lv.libvirtError as exc:
                    raise libvirt_error(
                        lv, exc, domain=self.name, step="spec", uri=self.uri
                    ) from exc
            finally:
                with contextlib.suppress(Exception):
                    conn.close()
            spec = spec_from_xml(str(text), domain=self.name, live=str(live))
            if spec.disks:
                with self.monitor() as mon:
                    spec = replace(
                        spec, disks=device_nodes(spec.disks, mon.block_nodes(), self.name)
                    )
            self._spec = spec
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
