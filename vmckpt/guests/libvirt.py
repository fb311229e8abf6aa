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
from dataclasses import dataclass

from vmckpt.errors import LibvirtError, MachineError, VmckptError
from vmckpt.guard import Guard
from vmckpt.guests.base import Guest, GuestStatus
from vmckpt.images import Store
from vmckpt.machine.spec import BootMedium, GuestSpec
from vmckpt.qmp import Monitor
from vmckpt.qmp.libvirt import (
    DEFAULT_URI,
    connect,
    domain_monitor,
    libvirt_error,
    load_libvirt,
    lookup,
)

KIND = "libvirt"  # the store's name space for domains' heads and this host's files of them


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
            lv, _ = load_libvirt()
            conn = connect(lv, self.uri, self.name)
            try:
                dom = lookup(lv, conn, self.name, self.uri)
                if not dom.isActive():
                    raise LibvirtError("the domain is not running", vm=self.name, step="spec")
                try:
                    text = dom.XMLDesc(lv.VIR_DOMAIN_XML_MIGRATABLE)
                except lv.libvirtError as exc:
                    raise libvirt_error(
                        lv, exc, domain=self.name, step="spec", uri=self.uri
                    ) from exc
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
