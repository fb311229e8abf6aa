"""A libvirt domain's XML as vmckpt reads it (no libvirtd): its writable disks with the block
nodes libvirt gave them, the XML a restore defines, and every device vmckpt refuses in one
line naming it and why."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from vmckpt.errors import MachineError, RestoreError
from vmckpt.guests.libvirt import device_nodes, spec_from_xml
from vmckpt.machine.spec import DiskSpec, GuestSpec
from vmckpt.mechanisms.restore_libvirt import _disk_path, restored_xml
from vmckpt.qmp.monitor import BlockNode


def domain(devices: str) -> str:
    return f"""<domain type='qemu'>
  <name>d</name><memory unit='MiB'>256</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc-i440fx-10.0'>hvm</type></os>
  <devices>{devices}</devices>
</domain>"""


def disk(path: Path, dev: str, *, fmt: str = "qcow2", bus: str = "virtio", extra: str = "",
         kind: str = "file", device: str = "disk", index: int | None = None) -> str:  # fmt: skip
    source = f"<source file='{path}'{f' index={chr(39)}{index}{chr(39)}' if index else ''}/>"
    if kind != "file":
        source = f"<source dev='{path}'/>"
    return (
        f"<disk type='{kind}' device='{device}'><driver name='qemu' type='{fmt}'/>{source}"
        f"<target dev='{dev}' bus='{bus}'/>{extra}</disk>"
    )


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    qcow2, raw = tmp_path / "root.qcow2", tmp_path / "data.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(raw), "16M"], check=True)
    return qcow2, raw


def test_writable_disks_with_their_nodes(images: tuple[Path, Path]) -> None:
    qcow2, raw = images
    stored = domain(disk(qcow2, "vda") + disk(raw, "sda", fmt="raw", bus="scsi"))
    live = domain(disk(qcow2, "vda", index=2) + disk(raw, "sda", fmt="raw", bus="scsi", index=1))
    spec = spec_from_xml(stored, domain="d", live=live)
    assert [(d.id, d.path, d.format, d.size, d.node) for d in spec.disks] == [
        ("vda", str(qcow2), "qcow2", 64 << 20, "libvirt-2-format"),
        ("sda", str(raw), "raw", 16 << 20, "libvirt-1-format"),
    ]
    # Stored in the layer and read back as any spec is.
    assert GuestSpec.from_dict(json.loads(json.dumps(spec.to_dict()))).disks == spec.disks
    # In the running QEMU: the format node, or a raw image's storage node where libvirt left
    # out its format layer.
    nodes = [
        BlockNode("libvirt-2-format", "qcow2", str(qcow2), False, 64 << 20, ()),
        BlockNode("libvirt-2-storage", "file", str(qcow2), False, 0, ()),
        BlockNode("libvirt-1-storage", "file", str(raw), False, 16 << 20, ()),
    ]
    found = device_nodes(spec.disks, nodes, "d")
    assert [d.node for d in found] == ["libvirt-2-format", "libvirt-1-storage"]
    with pytest.raises(MachineError, match="disk vda: QEMU has no block node libvirt-2"):
        device_nodes(spec.disks, nodes[2:], "d")


def test_a_node_name_in_a_stored_spec_is_checked() -> None:
    data = DiskSpec("vda", "/images/a.qcow2", "qcow2", 1 << 20, node_name="x,file=/etc").__dict__
    with pytest.raises(Exception, match="node_name"):
        DiskSpec.from_dict(dict(data))


@pytest.mark.parametrize(
    ("devices", "named", "why"),
    [
        ("{disk_shareable}", "disk vdb", "shareable"),
        ("{disk_transient}", "disk vdb", "transient"),
        ("{disk_block}", "disk vdb", "type 'block'"),
        ("{disk_lun}", "disk sdb", "SCSI passthrough LUN"),
        ("{disk_vmdk}", "disk vdb", "format 'vmdk'"),
        (
            "<filesystem type='mount'><source dir='/srv'/><target dir='share'/></filesystem>",
            "filesystem share",
            "host directory",
        ),
        (
            "<hostdev mode='subsystem' type='usb'><source><vendor id='0x1'/>"
            "<product id='0x2'/></source></hostdev>",
            "hostdev",
            "passed through",
        ),
    ],
)
def test_uncapturable_devices_are_refused_naming_them(
    images: tuple[Path, Path], devices: str, named: str, why: str
) -> None:
    qcow2, raw = images
    devices = devices.format(
        disk_shareable=disk(raw, "vdb", fmt="raw", extra="<shareable/>"),
        disk_transient=disk(qcow2, "vdb", extra="<transient/>"),
        disk_block=disk(Path("/dev/sdz"), "vdb", fmt="raw", kind="block"),
        disk_lun=disk(Path("/dev/sdz"), "sdb", fmt="raw", bus="scsi", kind="block", device="lun"),
        disk_vmdk=disk(qcow2, "vdb", fmt="vmdk"),
    )
    text = domain(disk(qcow2, "vda", index=1) + devices)
    with pytest.raises(MachineError) as info:
        spec_from_xml(text, domain="d", live=text)
    line = info.value.one_line()
    assert "\n" not in line
    assert f"cannot checkpoint {named}:" in line and why in line, line
    assert "d" in line


def test_read_only_disks_and_cdroms_are_not_captured(images: tuple[Path, Path]) -> None:
    qcow2, _raw = images
    text = domain(
        disk(qcow2, "vdb", extra="<readonly/>")
        + disk(qcow2, "hdc", device="cdrom", fmt="raw", bus="ide", extra="<readonly/>")
    )
    spec = spec_from_xml(text, domain="d", live=text)
    assert spec.disks == ()
    assert [m.role for m in spec.media] == ["iso"]


def test_the_restored_xml_names_the_restored_images(images: tuple[Path, Path]) -> None:
    qcow2, raw = images
    text = domain(
        disk(qcow2, "vda", extra="<backingStore type='file'><format type='raw'/>"
             "<source file='/images/template.raw'/></backingStore>")
        + disk(raw, "sda", fmt="raw", bus="scsi")
    )  # fmt: skip
    new = {"vda": Path("/images/root-new.qcow2"), "sda": Path("/images/data-new.qcow2")}
    root = ET.fromstring(
        restored_xml(text, name="new", new_uuid="u", machine_type="pc-i440fx-10.0", disks=new)
    )
    assert root.findtext("name") == "new" and root.findtext("uuid") == "u"
    for element in root.findall("devices/disk"):
        dev = str(element.find("target").get("dev"))  # type: ignore[union-attr]
        assert element.find("source").get("file") == str(new[dev])  # type: ignore[union-attr]
        assert element.find("driver").get("type") == "qcow2"  # type: ignore[union-attr]
        assert element.find("backingStore") is None


def test_restored_disks_go_beside_their_originals_or_into_disk_dir(tmp_path: Path) -> None:
    original = tmp_path / "images" / "root.qcow2"
    original.parent.mkdir()
    elsewhere = tmp_path / "restored"
    elsewhere.mkdir()
    beside = _disk_path(str(original), None, "dom2", "0003-abcdef")
    assert beside == original.parent / "root-dom2-0003-abcdef.qcow2"
    assert _disk_path(str(original), elsewhere, "dom2", "0003-abcdef").parent == elsewhere
    with pytest.raises(RestoreError, match="is not a directory"):
        _disk_path(str(original), tmp_path / "missing", "dom2", "0003-abcdef")
