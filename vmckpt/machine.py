"""A guest's specification and the QEMU process that runs it.

The spec is stored in every layer, so a restore rebuilds an identical QEMU:
same binary family, machine type, memory, CPUs, boot media (checked by
content hash) and extra arguments. One :class:`QemuProcess` owns one QEMU:
it builds the command line, launches it detached with its QMP socket and
serial console in the guest's runtime directory, and shuts it down in order
(QMP ``quit``, then SIGTERM, then SIGKILL), always by the PID it started.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vmckpt.atomic import write_json_atomic
from vmckpt.disks import DiskSpec
from vmckpt.errors import MachineError, UsageError
from vmckpt.qmp import Monitor

DEFAULT_QEMU = "qemu-system-x86_64"
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; keep a margin


def qemu_binary() -> str:
    """The QEMU binary to use: $VMCKPT_QEMU, else qemu-system-x86_64 on PATH."""
    chosen = os.environ.get("VMCKPT_QEMU", DEFAULT_QEMU)
    found = shutil.which(chosen)
    if not found:
        raise MachineError(
            f"QEMU binary {chosen!r} not found (install qemu-system-x86, or set VMCKPT_QEMU)",
            step="find-qemu",
        )
    return found


def qemu_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False)
    match = re.search(r"version (\d+\.\d+\.\d+)", out.stdout)
    if not match:
        raise MachineError(f"{binary} --version printed no version: {out.stdout[:80]!r}")
    return match.group(1)


def kvm_usable() -> tuple[bool, str]:
    """Whether KVM can really run guests here, and why not.

    A /dev/kvm that opens is not enough: paravirtual hosts expose one whose
    guests never boot. The CPU must also advertise hardware virtualisation.
    """
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible to this user"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False, "cannot read /proc/cpuinfo"
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    if not flags & {"vmx", "svm"}:
        return False, "the CPU shows no vmx/svm flag (a paravirtual /dev/kvm cannot run guests)"
    return True, "ok"


def resolve_accel(requested: str) -> str:
    if requested == "auto":
        return "kvm" if kvm_usable()[0] else "tcg"
    if requested == "kvm":
        usable, why = kvm_usable()
        if not usable:
            raise UsageError(f"--accel kvm is not usable here: {why}")
    elif requested != "tcg":
        raise UsageError(f"unknown accelerator {requested!r} (auto, kvm or tcg)")
    return requested


def parse_memory(text: str) -> int:
    """'512M', '1G', '1024' (MiB) -> MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([MmGg]?)(i?[Bb])?\s*", text)
    if not match:
        raise UsageError(f"cannot read memory size {text!r} (use e.g. 512M or 1G)")
    value = int(match.group(1))
    mib = value * 1024 if match.group(2).lower() == "g" else value
    if mib < 16:
        raise UsageError(f"memory size {text!r} is too small")
    return mib


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
        return cls(role, str(resolved), file_sha256(resolved), args)

    def qemu_module(self) -> str:
        """This module as one entry of QEMU's multiboot -initrd list (commas doubled)."""
        text = f"{self.path} {self.args}" if self.args else self.path
        return text.replace(",", ",,")

    def check(self, vm: str | None = None) -> None:
        """Refuse a medium that is gone or whose content changed since the spec was made."""
        path = Path(self.path)
        if not path.is_file():
            raise MachineError(f"{self.role} {self.path} is missing", vm=vm, step="check-media")
        actual = file_sha256(path)
        if actual != self.sha256:
            raise MachineError(
                f"{self.role} {self.path} changed since the checkpoint "
                f"(sha256 {actual[:12]}…, recorded {self.sha256[:12]}…)",
                vm=vm,
                step="check-media",
            )


@dataclass(frozen=True)
class GuestSpec:
    """Everything needed to build an identical QEMU for a guest."""

    memory_mib: int = 512
    cpus: int = 1
    accel: str = "auto"  # as requested; resolved when QEMU starts
    machine: str = "pc"  # alias at first start; a layer records the versioned type
    media: tuple[BootMedium, ...] = ()
    append: str = ""
    qemu_args: tuple[str, ...] = ()
    disks: tuple[DiskSpec, ...] = ()  # virtio-blk disks (vmckpt/disks.py)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GuestSpec:
        try:
            return cls(
                memory_mib=int(data["memory_mib"]),
                cpus=int(data["cpus"]),
                accel=str(data["accel"]),
                machine=str(data["machine"]),
                media=tuple(BootMedium(**m) for m in data["media"]),
                append=str(data.get("append", "")),
                qemu_args=tuple(str(a) for a in data.get("qemu_args", ())),
                disks=tuple(DiskSpec.from_dict(d) for d in data.get("disks", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MachineError(f"stored guest spec is incomplete: {exc}") from exc

    def medium(self, role: str) -> BootMedium | None:
        return next((m for m in self.media if m.role == role), None)

    def check_media(self, vm: str | None = None) -> None:
        for medium in self.media:
            medium.check(vm)

    def command_line(
        self,
        binary: str,
        *,
        name: str,
        accel: str,
        qmp_socket: Path,
        serial_log: Path,
        machine_type: str | None = None,
        incoming: bool = False,
    ) -> list[str]:
        args = [
            binary,
            "-name", name,
            "-machine", machine_type or self.machine,
            "-accel", accel,
            "-m", f"{self.memory_mib}M",
            "-smp", str(self.cpus),
            "-nodefaults", "-no-user-config", "-display", "none",
            "-chardev", f"file,id=vmckpt-serial,path={serial_log},append=on",
            "-serial", "chardev:vmckpt-serial",
            "-qmp", f"unix:{qmp_socket},server=on,wait=off",
        ]  # fmt: skip
        kernel, initrd, iso = self.medium("kernel"), self.medium("initrd"), self.medium("iso")
        if kernel:
            args += ["-kernel", kernel.path]
            modules = [m.qemu_module() for m in self.media if m.role == "module"]
            if modules:
                args += ["-initrd", ",".join(modules)]
            elif initrd:
                args += ["-initrd", initrd.path]
            if self.append:
                args += ["-append", self.append]
        if iso:
            args += ["-cdrom", iso.path, "-boot", "d"]
        for disk in self.disks:
            args += disk.qemu_args()
        args += list(self.qemu_args)
        if incoming:
            args += ["-S", "-incoming", "defer"]
        return args


def socket_listens(path: Path) -> bool:
    """Whether a Unix socket is listening: QEMU creates the file a moment before it listens."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a PID, to tell our QEMU from a later process with its PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])


@dataclass
class QemuProcess:
    """One QEMU process that vmckpt started, known by PID and start time."""

    name: str
    pid: int
    start_time: int
    qmp_socket: Path
    serial_log: Path
    log: Path
    command: list[str] = field(default_factory=list)
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def launch(
        cls,
        spec: GuestSpec,
        *,
        name: str,
        runtime_dir: Path,
        machine_type: str | None = None,
        incoming: bool = False,
        boot_timeout: float = 15.0,
    ) -> QemuProcess:
        """Start QEMU detached and wait until its QMP socket answers."""
        binary = qemu_binary()
        accel = resolve_accel(spec.accel)
        runtime_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        qmp_socket = runtime_dir / "qmp.sock"
        if len(str(qmp_socket)) > SOCKET_PATH_MAX:
            raise MachineError(
                f"the QMP socket path {qmp_socket} is longer than a Unix socket allows; "
                "use a store with a shorter path",
                vm=name,
                step="launch",
            )
        with contextlib.suppress(FileNotFoundError):
            qmp_socket.unlink()
        serial_log = runtime_dir / "serial.log"
        if serial_log.exists():
            serial_log.replace(runtime_dir / "serial.log.old")
        serial_log.touch(mode=0o600)
        log = runtime_dir / "qemu.log"
        command = spec.command_line(
            binary,
            name=name,
            accel=accel,
            qmp_socket=qmp_socket,
            serial_log=serial_log,
            machine_type=machine_type,
            incoming=incoming,
        )
        with log.open("ab") as log_handle:
            log_handle.write(("+ " + " ".join(command) + "\n").encode())
            log_handle.flush()
            popen = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C on vmckpt must not reach the guest
            )
        start_time = process_start_time(popen.pid) or 0
        process = cls(name, popen.pid, start_time, qmp_socket, serial_log, log, command, popen)
        process._wait_for_monitor(boot_timeout)
        return process

    def _wait_for_monitor(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                code = self._popen.poll() if self._popen else None
                raise MachineError(
                    f"QEMU exited (code {code}) while starting: {self.log_tail()}",
                    vm=self.name,
                    step="launch",
                )
            if self.qmp_socket.exists() and socket_listens(self.qmp_socket):
                return
            time.sleep(0.02)
        self.kill()
        raise MachineError(
            f"QEMU did not open its QMP socket within {timeout:.0f} s: {self.log_tail()}",
            vm=self.name,
            step="launch",
        )

    def log_tail(self, lines: int = 3) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        tail = [line for line in text if not line.startswith("+ ")][-lines:]
        return " | ".join(tail) or "(QEMU printed nothing)"

    def alive(self) -> bool:
        if self._popen is not None and self._popen.poll() is not None:
            return False
        return process_start_time(self.pid) == self.start_time

    def monitor(self, timeout: float = 10.0) -> Monitor:
        return Monitor(self.qmp_socket, vm=self.name, timeout=timeout).connect()

    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                if self._popen is not None:
                    self._popen.wait()
                return True
            time.sleep(0.02)
        return False

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop QEMU in order: QMP quit, then SIGTERM, then SIGKILL; only our own PID."""
        if not self.alive():
            return
        with contextlib.suppress(Exception), self.monitor(timeout=2.0) as mon:
            mon.quit()
        if self.wait_exit(timeout):
            return
        self.kill()

    def kill(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.alive():
                return
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            if self.wait_exit(3.0):
                return

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "start_time": self.start_time,
            "qmp_socket": str(self.qmp_socket),
            "serial_log": str(self.serial_log),
            "log": str(self.log),
            "command": self.command,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QemuProcess:
        return cls(
            name=str(data["name"]),
            pid=int(data["pid"]),
            start_time=int(data["start_time"]),
            qmp_socket=Path(data["qmp_socket"]),
            serial_log=Path(data["serial_log"]),
            log=Path(data["log"]),
            command=list(data.get("command", [])),
        )


@dataclass
class GuestRecord:
    """What the store remembers about a guest vmckpt runs: spec, process, newest layer."""

    name: str
    spec: GuestSpec
    process: QemuProcess | None
    head: str | None  # the layer the next checkpoint's delta is taken against
    machine_type: str | None = None

    FILE = "guest.json"

    def save(self, runtime_dir: Path) -> None:
        data = {
            "name": self.name,
            "spec": self.spec.to_dict(),
            "process": self.process.to_dict() if self.process else None,
            "head": self.head,
            "machine_type": self.machine_type,
        }
        write_json_atomic(runtime_dir / self.FILE, data)

    @classmethod
    def load(cls, runtime_dir: Path, name: str) -> GuestRecord:
        path = runtime_dir / cls.FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise MachineError(
                "no such guest in this store (start it with `vmckpt run`)", vm=name
            ) from None
        except (OSError, ValueError) as exc:
            raise MachineError(f"cannot read {path}: {exc}", vm=name) from exc
        process = QemuProcess.from_dict(data["process"]) if data.get("process") else None
        return cls(
            name=str(data["name"]),
            spec=GuestSpec.from_dict(data["spec"]),
            process=process,
            head=data.get("head"),
            machine_type=data.get("machine_type"),
        )

    def running_process(self) -> QemuProcess:
        if self.process is None or not self.process.alive():
            raise MachineError("is not running", vm=self.name)
        return self.process
