"""A guest's specification: what QEMU must emulate for it, as plain validated values.

The spec is stored in every layer (as JSON) so a restore rebuilds an
identical QEMU. A layer can come from another host or another user, so
:meth:`GuestSpec.from_dict` checks every field before anything uses it:
names, machine types and CPU models are short tokens without option syntax,
paths are absolute and free of the characters QEMU's option parser treats
specially, numbers are in range. Boot media and read-only disks are
referenced by path and SHA-256, never copied; :meth:`GuestSpec.check_media`
refuses a medium whose content changed.

Nothing here knows about stores, processes or QMP.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from vmckpt.errors import MachineError, UsageError
from vmckpt.hostdirs import file_sha256
from vmckpt.machine.binary import qemu_img

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
MACHINE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
CPU_MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
CPU_FEATURE_RE = re.compile(r"^[+-]?[A-Za-z0-9][A-Za-z0-9_.-]{0,63}(=[A-Za-z0-9_.-]{1,64})?\Z")
DISK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}\Z")
# A VM generation ID: a GUID in QEMU's text form, or "auto" (QEMU draws one).
GENERATION_ID_RE = re.compile(
    r"^([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|auto)\Z"
)
NODE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,62}\Z")  # QEMU's node names, without dots
ACCELERATORS = ("auto", "kvm", "tcg")
MEDIA_ROLES = ("kernel", "initrd", "iso", "module")
DISK_FORMATS = ("raw", "qcow2")
MAX_MEMORY_MIB = 1 << 22  # 4 TiB
MAX_CPUS = 288
_SHA256_RE = re.compile(r"^[0-9a-f]{64}\Z")
# Control characters have no place in a path (a comma does: QEMU's option strings get it
# doubled, vmckpt/machine/qemu.py).
_UNSAFE_IN_PATH = re.compile(r"[\x00-\x1f\x7f]")
_UNSAFE_IN_TEXT = re.compile(r"[\x00\n\r]")


def check_name(name: str, what: str = "guest name") -> str:
    """A guest (or domain) name: 1-64 of letters, digits, '_', '.', '-'; no leading dot."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise UsageError(
            f"{what} {name!r} is not allowed: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_machine(machine: str) -> str:
    if not isinstance(machine, str) or not MACHINE_RE.match(machine):
        raise UsageError(f"machine type {machine!r} is not a QEMU machine type name (e.g. q35)")
    return machine


def check_cpu(cpu: str) -> str:
    """A CPU model, optionally with features: ``max``, ``qemu64,+ssse3,+sse4.2``."""
    if cpu == "":
        return cpu
    model, *features = cpu.split(",") if isinstance(cpu, str) else [""]
    if not CPU_MODEL_RE.match(model) or not all(CPU_FEATURE_RE.match(f) for f in features):
        raise UsageError(
            f"CPU model {cpu!r} is not a QEMU CPU model with optional features "
            "(e.g. max, or qemu64,+ssse3)"
        )
    return cpu


def check_path(path: str, what: str) -> str:
    if not isinstance(path, str) or not path.startswith("/") or _UNSAFE_IN_PATH.search(path):
        raise UsageError(f"{what} path {path!r} must be absolute and free of control characters")
    return path


def check_text(text: str, what: str) -> str:
    if not isinstance(text, str) or _UNSAFE_IN_TEXT.search(text) or len(text) > 4096:
        raise UsageError(f"{what} {text[:40]!r}... must be one line of at most 4096 characters")
    return text


@dataclass(frozen=True)
class BootMedium:
    """A read-only boot file, referenced by path and content hash, never copied."""

    role: str  # kernel, initrd, iso, module (a multiboot boot module, in order)
    path: str
    sha256: str
    args: str = ""  # a multiboot module's string after its path

    @classmethod
    def of(cls, role: str, path: str | Path, args: str = "") -> BootMedium:
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_file():
            raise UsageError(f"{role} {path} does not exist")
        check_path(str(resolved), role)
        return cls(role, str(resolved), file_sha256(resolved), check_text(args, "module args"))

    @classmethod
    def from_dict(cls, data: Any) -> BootMedium:
        if not isinstance(data, dict):
            raise UsageError("a boot medium is not an object")
        role = data.get("role")
        if role not in MEDIA_ROLES:
            raise UsageError(f"boot medium role {role!r} is not one of {', '.join(MEDIA_ROLES)}")
        sha256 = data.get("sha256")
        if not isinstance(sha256, str) or not _SHA256_RE.match(sha256):
            raise UsageError(f"{role}: sha256 {sha256!r} is not 64 lowercase hex digits")
        return cls(
            role=role,
            path=check_path(str(data.get("path", "")), role),
            sha256=sha256,
            args=check_text(data.get("args", ""), "module args"),
        )

    def qemu_module(self) -> str:
        """This module as one entry of QEMU's multiboot -initrd list (commas doubled)."""
        text = f"{self.path} {self.args}" if self.args else self.path
        return text.replace(",", ",,")

    def check(self, vm: str | None = None) -> None:
        """Refuse a medium that is gone or whose content changed since the spec was made."""
        path = Path(self.path)
        if not path.is_file() or (path.is_symlink() and not path.resolve().is_file()):
            raise MachineError(f"{self.role} {self.path} is missing", vm=vm, step="check-media")
        if file_sha256(path.resolve()) != self.sha256:
            # Its digest is not shown: the path may come from a layer another host sent and
            # name any file of this one.
            raise MachineError(
                f"{self.role} {self.path} changed since the checkpoint (its content is not the "
                f"one recorded, sha256 {self.sha256[:12]}…)",
                vm=vm,
                step="check-media",
            )


def qemu_img_info(path: Path) -> dict[str, Any]:
    """``qemu-img info`` of an image, as JSON."""
    info = json.loads(qemu_img("info", "--output=json", "-U", str(path)))
    if not isinstance(info, dict):
        raise UsageError(f"qemu-img info {path} printed no object")
    return info


@dataclass(frozen=True)
class DiskSpec:
    """One virtio-blk disk of a guest: image path, format, size; read-only disks by hash."""

    id: str  # short name, unique per guest: disk0, disk1, ...
    path: str
    format: str  # raw or qcow2
    size: int  # virtual size in bytes
    readonly: bool = False
    sha256: str = ""  # read-only disks only: the content the layer expects
    backing: str = ""  # a restored disk: its composed base (raw), under a qcow2 overlay
    # The block node the guest's device uses where vmckpt did not name it (a libvirt domain's
    # "libvirt-N-format"); empty: vmckpt's own, vmckpt-<id>.
    node_name: str = ""

    @classmethod
    def of(cls, disk_id: str, path: str | Path, *, readonly: bool = False) -> DiskSpec:
        """Describe an existing image; its format and size come from ``qemu-img info``."""
        resolved = Path(path).expanduser().resolve()
        if not resolved.is_file():
            raise UsageError(f"disk {path} does not exist")
        if not DISK_ID_RE.match(disk_id):
            raise UsageError(f"{disk_id!r} is not a usable disk id")
        check_path(str(resolved), "disk")
        info = qemu_img_info(resolved)
        image_format = str(info.get("format"))
        if image_format not in DISK_FORMATS:
            raise UsageError(
                f"disk {path} is {image_format}; vmckpt handles {', '.join(DISK_FORMATS)}"
            )
        if info.get("backing-filename"):
            raise UsageError(f"disk {path} has a backing file; vmckpt handles standalone images")
        return cls(
            id=disk_id,
            path=str(resolved),
            format=image_format,
            size=int(info["virtual-size"]),
            readonly=readonly,
            sha256=file_sha256(resolved) if readonly else "",
        )

    @classmethod
    def parse(cls, index: int, text: str) -> DiskSpec:
        """``PATH`` or ``PATH:ro`` from the command line, as disk<index>."""
        readonly = text.endswith(":ro")
        return cls.of(f"disk{index}", text[:-3] if readonly else text, readonly=readonly)

    @classmethod
    def from_dict(cls, data: Any) -> DiskSpec:
        if not isinstance(data, dict):
            raise UsageError("a disk is not an object")
        disk_id, image_format = data.get("id"), data.get("format")
        if not isinstance(disk_id, str) or not DISK_ID_RE.match(disk_id):
            raise UsageError(f"disk id {disk_id!r} is not allowed")
        if image_format not in DISK_FORMATS:
            raise UsageError(f"disk {disk_id}: format {image_format!r} is not raw or qcow2")
        size = data.get("size")
        if type(size) is not int or size <= 0:
            raise UsageError(f"disk {disk_id}: size {size!r} is not a positive integer")
        sha256 = data.get("sha256", "")
        readonly = data.get("readonly", False)
        if not isinstance(readonly, bool) or not (sha256 == "" or _SHA256_RE.match(sha256)):
            raise UsageError(f"disk {disk_id}: readonly or sha256 has the wrong type")
        backing = data.get("backing", "")
        node_name = data.get("node_name", "")
        if not isinstance(node_name, str) or not (node_name == "" or NODE_RE.match(node_name)):
            raise UsageError(f"disk {disk_id}: node_name {node_name!r} is not a block node name")
        return cls(
            id=disk_id,
            path=check_path(str(data.get("path", "")), f"disk {disk_id}"),
            format=image_format,
            size=size,
            readonly=readonly,
            sha256=sha256,
            backing=check_path(backing, f"disk {disk_id} backing") if backing else "",
            node_name=node_name,
        )

    @property
    def node(self) -> str:
        """The QEMU block node the guest's device uses."""
        return self.node_name or f"vmckpt-{self.id}"

    def check(self, vm: str | None = None) -> None:
        """Refuse a missing image, or a read-only one whose content changed."""
        path = Path(self.path)
        if not path.is_file():
            raise MachineError(
                f"disk {self.id} ({self.path}) is missing", vm=vm, step="check-media"
            )
        if self.readonly and file_sha256(path) != self.sha256:
            raise MachineError(
                f"read-only disk {self.id} ({self.path}) changed since the checkpoint",
                vm=vm,
                step="check-media",
            )


@dataclass(frozen=True)
class GuestSpec:
    """Everything needed to build an identical QEMU for a guest."""

    memory_mib: int = 512
    cpus: int = 1
    accel: str = "auto"  # as requested; the accelerator used is recorded beside the spec
    machine: str = "pc"  # alias at first start; a layer records the versioned type
    cpu: str = ""  # QEMU's -cpu (model and features); "" is QEMU's default
    media: tuple[BootMedium, ...] = ()
    append: str = ""
    qemu_args: tuple[str, ...] = ()  # free-form; used on restore only from trusted layers
    disks: tuple[DiskSpec, ...] = ()  # virtio-blk disks
    # A pvpanic device, so a guest panic is a QMP event (GUEST_PANICKED); False in specs
    # written before vmckpt added it (a restore must give QEMU the same devices).
    panic_device: bool = True
    # The GUID of the guest's VM generation ID device (QEMU's vmgenid, present from boot: its
    # ACPI tables are built then). A restore gives the guest a new one, so a clone knows it
    # is one (the guest reseeds its random numbers), unless told to keep it; "" in specs
    # written before vmckpt added the device (such a guest is restored without it).
    generation_id: str = ""
    # A channel for QEMU's guest agent (virtio-serial, org.qemu.guest_agent.0), through which
    # a restore steps the guest's clock to now where an agent answers in the guest; False in
    # specs written before vmckpt added it (such a guest is restored without it).
    guest_agent: bool = False

    def __post_init__(self) -> None:
        if not 16 <= self.memory_mib <= MAX_MEMORY_MIB:
            raise UsageError(f"memory of {self.memory_mib} MiB is out of range (16 MiB-4 TiB)")
        if not 1 <= self.cpus <= MAX_CPUS:
            raise UsageError(f"{self.cpus} CPUs is out of range (1-{MAX_CPUS})")
        if self.accel not in ACCELERATORS:
            raise UsageError(f"accelerator {self.accel!r} is not one of {', '.join(ACCELERATORS)}")
        check_machine(self.machine)
        check_cpu(self.cpu)
        check_text(self.append, "kernel command line")
        if self.generation_id and not GENERATION_ID_RE.match(str(self.generation_id)):
            raise UsageError(f"VM generation ID {str(self.generation_id)[:40]!r} is not a GUID")
        ids = [disk.id for disk in self.disks]
        if len(set(ids)) != len(ids):
            raise UsageError(f"disk ids repeat: {ids}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> GuestSpec:
        """A spec from a layer or record, every field checked (errors name the first bad one)."""
        if not isinstance(data, dict):
            raise MachineError("stored guest spec is not an object")
        try:
            memory, cpus = data["memory_mib"], data["cpus"]
            if type(memory) is not int or type(cpus) is not int:
                raise UsageError("memory_mib and cpus must be integers")
            qemu_args = data.get("qemu_args", [])
            if not isinstance(qemu_args, list) or not all(isinstance(a, str) for a in qemu_args):
                raise UsageError("qemu_args must be a list of strings")
            known = {f.name for f in fields(cls)}
            extra = {k: v for k, v in data.items() if k in known and k not in _BASE_FIELDS}
            return cls(
                memory_mib=memory,
                cpus=cpus,
                accel=str(data.get("accel", "auto")),
                machine=str(data.get("machine", "pc")),
                cpu=str(data.get("cpu", "")),
                media=tuple(BootMedium.from_dict(m) for m in data.get("media", [])),
                append=check_text(data.get("append", ""), "kernel command line"),
                qemu_args=tuple(check_text(a, "QEMU argument") for a in qemu_args),
                disks=tuple(DiskSpec.from_dict(d) for d in data.get("disks", [])),
                panic_device=data.get("panic_device", False) is True,
                guest_agent=data.get("guest_agent", False) is True,
                **extra,
            )
        except KeyError as exc:
            raise MachineError(f"stored guest spec lacks {exc}") from exc
        except (TypeError, UsageError) as exc:
            message = exc.message if isinstance(exc, UsageError) else str(exc)
            raise MachineError(f"stored guest spec is not valid: {message}") from exc

    def medium(self, role: str) -> BootMedium | None:
        return next((m for m in self.media if m.role == role), None)

    def check_media(self, vm: str | None = None) -> None:
        for medium in self.media:
            medium.check(vm)
        for disk in self.disks:
            if disk.readonly:
                disk.check(vm)

    @property
    def writable_disks(self) -> tuple[DiskSpec, ...]:
        return tuple(disk for disk in self.disks if not disk.readonly)

    def without_qemu_args(self) -> GuestSpec:
        return replace(self, qemu_args=())

    def with_new_identity(self) -> GuestSpec:
        """The same guest as a new machine: a new VM generation ID (if it has the device)."""
        if not self.generation_id:
            return self
        return replace(self, generation_id=new_generation_id())


def new_generation_id() -> str:
    """A random GUID for a VM generation ID device."""
    return str(uuid.uuid4())


_BASE_FIELDS = frozenset(
    {
        "memory_mib", "cpus", "accel", "machine", "cpu", "media", "append", "qemu_args",
        "disks", "panic_device", "guest_agent",
    }
)  # fmt: skip
