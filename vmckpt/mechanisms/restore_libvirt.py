"""A layer restored as a libvirt domain (``restore --libvirt-define``).

A layer of a domain records the domain's migratable XML (spec field ``libvirt_xml``).
:func:`restore_domain` defines a domain from it (new name, new UUID, the layer's exact machine
type), writes the composed chain as a libvirt save image (libvirt's header
``LibvirtQemudSave``, version 2, the domain XML, then QEMU's migration stream, as ``virsh
save`` writes it) and has libvirt restore it (``virDomainRestoreFlags``), so libvirt starts
QEMU with ``-incoming`` itself and the domain is an ordinary libvirt domain. The domain XML
is used only from layers this store wrote (docs/SECURITY.md).

Writable disks come back as new images, each beside its original (or in ``disk_dir``): a qcow2
overlay named ``<original's stem>-<domain>-<layer>.qcow2`` on the disk's base, written out
once per directory as ``vmckpt-base-<digest>.raw`` (read-only, shared by the restores into
that directory), with the later deltas written into the overlay
(vmckpt/mechanisms/disk_restore.py). The domain XML names the overlays; libvirt labels them
(and the base, read-only) for its QEMU as it does its own images. The originals are never
opened. The domain is restored paused, the layer's dirty bitmaps are added (so its next
checkpoint is incremental), then it runs.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from vmckpt.errors import RestoreError, VmckptError
from vmckpt.guests.libvirt import KIND, device_nodes, spec_from_xml
from vmckpt.images import LayerManifest, Store, keys
from vmckpt.machine.spec import DiskSpec, GuestSpec
from vmckpt.mechanisms.disk_restore import build_overlay, track_restored
from vmckpt.mechanisms.restore import load_layer_image
from vmckpt.progress import NO_PROGRESS, Progress
from vmckpt.qmp.libvirt import DEFAULT_URI, connect, domain_monitor, libvirt_error, load_libvirt
from vmckpt.ram import RamImage
from vmckpt.stream import StreamEnvelope, write_stream

# libvirt's save image (src/qemu/qemu_saveimage.h): magic, then native-endian u32s
# version, data_len, was_running, compressed, cookieOffset, unused[14]; then
# data_len bytes (the domain XML, NUL-terminated); then QEMU's migration stream.
SAVE_MAGIC = b"LibvirtQemudSave"
SAVE_VERSION = 2
SAVE_HEADER = struct.Struct("=16s19I")


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

    def summary(self) -> str:
        return (
            f"libvirt domain {self.name} (UUID {self.uuid}) defined and running from layer "
            f"{self.layer} on {self.uri}  (total {self.total_s:.2f} s)"
        )

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


def restored_xml(
    text: str,
    *,
    name: str,
    new_uuid: str,
    machine_type: str | None,
    disks: Mapping[str, Path] | None = None,
) -> str:
    """The stored domain XML renamed, with a new UUID, the layer's exact machine type, and
    each writable disk in ``disks`` (target dev → restored qcow2 image) pointing to its
    restored image (its backing chain is the image's own, which libvirt reads)."""
    root = ET.fromstring(text)
    for disk in root.findall("devices/disk"):
        target = disk.find("target")
        image = (disks or {}).get(target.get("dev", "") if target is not None else "")
        if image is None:
            continue
        source = disk.find("source")
        if source is None:
            source = ET.SubElement(disk, "source")
        source.attrib.clear()
        source.set("file", str(image))
        driver = disk.find("driver")
        if driver is None:
            driver = ET.SubElement(disk, "driver", {"name": "qemu"})
        driver.set("type", "qcow2")
        for backing in disk.findall("backingStore"):
            disk.remove(backing)
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


def _domain_layer(
    store: Store, layer_ref: str | None, name: str
) -> tuple[LayerManifest, str, list[DiskSpec]]:
    """The layer to define domain ``name`` from, its domain XML and its writable disks;
    refused unless this store wrote it, from a libvirt domain, with every disk's contents."""
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
    spec = GuestSpec.from_dict(manifest.spec)
    spec.check_media(vm=name)
    writable = [d for d in spec.disks if not d.readonly]
    for disk in writable:
        if manifest.disk(disk.id) is None:
            raise RestoreError(f"holds no contents for writable disk {disk.id}", vm=name,
                               layer=layer_id, step="libvirt-define")  # fmt: skip
    return manifest, str(text), writable


def restore_domain(
    store: Store,
    layer_ref: str | None,
    name: str,
    *,
    uri: str = DEFAULT_URI,
    disk_dir: Path | None = None,
    progress: Progress = NO_PROGRESS,
) -> DomainRestoreResult:
    """Define domain ``name`` from a layer's stored domain XML and start it from the layer.

    Fails before defining anything if the chain is broken, the layer holds no domain
    XML, or a domain of that name exists; a failure after the define undefines it.
    """
    started = time.monotonic()
    manifest, text, writable = _domain_layer(store, layer_ref, name)
    layer_id = manifest.id
    lv, _ = load_libvirt()
    conn = connect(lv, uri, name)
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
        image = store.host.data_dir(name, KIND) / "restore.save"
        defined: Any = None
        made: list[Path] = []
        try:
            restored: dict[str, Path] = {}
            with progress.task("rebuilding the disks", None):
                for disk in writable:
                    overlay = _disk_path(disk.path, disk_dir, name, layer_id)
                    build_overlay(store, layer_id, disk.id, overlay, vm=name,
                                  base_dir=overlay.parent)  # fmt: skip
                    made.append(overlay)
                    restored[disk.id] = overlay
            xml = restored_xml(
                str(text), name=name, new_uuid=new_uuid, machine_type=manifest.machine_type,
                disks=restored,
            )  # fmt: skip
            composed = time.monotonic()
            with contextlib.suppress(FileNotFoundError):
                image.unlink()
            fd = os.open(image, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb", buffering=1 << 20) as sink:
                written = write_save_image(sink, xml, image_of_layer.envelope, image_of_layer.ram)
            try:
                defined = conn.defineXML(xml)
                paused = lv.VIR_DOMAIN_SAVE_PAUSED if writable else lv.VIR_DOMAIN_SAVE_RUNNING
                conn.restoreFlags(str(image), None, paused)
                dom = conn.lookupByName(name)
                if writable:
                    _track_disks(lv, dom, name, uri, manifest)
                    dom.resume()
                state, _reason = dom.state()
            except lv.libvirtError as exc:
                raise libvirt_error(
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
            for path in made:
                path.unlink(missing_ok=True)
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


def _disk_path(original: str, disk_dir: Path | None, name: str, layer_id: str) -> Path:
    """Where a restored disk goes: beside its original (or in ``disk_dir``), named after it,
    the domain and the layer."""
    source = Path(original)
    directory = disk_dir or source.parent
    if not directory.is_dir():
        raise RestoreError(f"{directory} is not a directory for the restored disks",
                           vm=name, layer=layer_id, step="libvirt-disks")  # fmt: skip
    return directory / f"{source.stem}-{name}-{layer_id}.qcow2"


def _track_disks(lv: Any, dom: Any, name: str, uri: str, manifest: LayerManifest) -> None:
    """In the restored domain, before it runs: the layer's dirty bitmaps on the block nodes
    libvirt gave the restored disks (their next checkpoint is then incremental)."""
    try:
        live = str(dom.XMLDesc(0))
        text = str(dom.XMLDesc(lv.VIR_DOMAIN_XML_MIGRATABLE))
    except lv.libvirtError as exc:
        raise libvirt_error(lv, exc, domain=name, step="libvirt-restore", uri=uri) from exc
    disks = spec_from_xml(text, domain=name, live=live).disks
    with domain_monitor(name, uri) as mon:
        track_restored(mon, device_nodes(disks, mon.block_nodes(), name), manifest)


def _remove_domain(lv: Any, dom: Any) -> None:
    """Destroy (if running) and undefine a domain this restore defined."""
    with contextlib.suppress(lv.libvirtError):
        if dom.isActive():
            dom.destroy()
    with contextlib.suppress(lv.libvirtError):
        dom.undefine()
