"""The QEMU binary and the QEMU processes vmckpt starts.

One :class:`QemuProcess` owns one QEMU: it builds the command line from a
validated :class:`~vmckpt.machine.spec.GuestSpec`, launches QEMU detached (its own
session, so a Ctrl-C on vmckpt never reaches the guest), hands it its QMP
socket already listening, captures the serial console and QEMU's own output,
and shuts it down in order (QMP ``quit``, then SIGTERM, then SIGKILL), always
by the PID it started and that PID's start time, never by name.

QMP in server/accept mode: vmckpt binds and listens on the QMP socket itself
and passes the listening descriptor to QEMU (``-chardev socket,fd=N,
server=on``), so the socket accepts connections before QEMU has even started
(no polling for a file to appear), and each QEMU gets its own socket path
(an old QEMU that exits removes only its own).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vmckpt import log
from vmckpt.errors import MachineError, QMPError
from vmckpt.fsutil import FILE_MODE, open_nofollow
from vmckpt.machine.binary import cannot_run, qemu_binary, qemu_version, version_tuple
from vmckpt.machine.spec import DiskSpec, GuestSpec, check_machine, check_name
from vmckpt.qmp import Monitor, agent

DEFAULT_QEMU = "qemu-system-x86_64"
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes; keep a margin
SERIAL_LOG = "serial.log"
QEMU_LOG = "qemu.log"
KEEP_SERIAL_LOGS = 50  # console logs of earlier lives kept as serial.<n>.log
MONITOR_TIMEOUT_S = 30.0  # QEMU must greet on QMP within this after exec (TCG is slow)
MONITOR_RETRY_S = 0.05

_log = log.get(__name__)


# -- the binary --------------------------------------------------------------------------


def _escape(value: str) -> str:
    """A value inside a QEMU option string: commas doubled."""
    return value.replace(",", ",,")


def _has_isa_bus(machine: str) -> bool:
    """The PC machines (i440fx, q35, their versioned types) have the ISA bus pvpanic sits on."""
    return machine in ("pc", "q35") or machine.startswith(("pc-i440fx-", "pc-q35-"))


def disk_args(disk: DiskSpec) -> list[str]:
    ro = "on" if disk.readonly else "off"
    return [
        "-blockdev",
        f"driver=file,filename={_escape(disk.path)},node-name={disk.node}-file,read-only={ro}",
        "-blockdev",
        f"driver={disk.format},file={disk.node}-file,node-name={disk.node},read-only={ro}",
        "-device",
        f"virtio-blk-pci,drive={disk.node},id=vmckpt-dev-{disk.id}",
    ]


@dataclass(frozen=True)
class Launch:
    """How one QEMU is to be started, besides the spec."""

    name: str
    accel: str  # resolved: kvm or tcg
    serial_log: Path
    machine_type: str | None = None  # a layer's exact type (e.g. pc-i440fx-10.0) on restore
    incoming: bool = False  # -S -incoming defer: waits for migrate-incoming
    extra_args: tuple[str, ...] = ()  # free-form arguments the caller decided to trust


def command_line(
    spec: GuestSpec,
    launch: Launch,
    *,
    binary: str,
    qemu_major: int,
    qmp_fds: Sequence[int] = (),
    agent_fd: int | None = None,
) -> list[str]:
    """QEMU's argv for ``spec``: only validated fields, plus the caller's trusted extras.

    ``qmp_fds`` are the listening QMP sockets QEMU inherits, one monitor each; ``agent_fd``
    the listening host end of the guest agent's channel (a spec with ``guest_agent``). Every
    value that lands in an option string is checked here, whatever its source (a
    layer's machine type comes from a store, which may be hostile).
    """
    check_name(launch.name)
    machine = check_machine(launch.machine_type or spec.machine)
    monitor: list[str] = []
    for index, fd in enumerate(qmp_fds):
        chardev = f"vmckpt-qmp{index}"
        monitor += ["-chardev", f"socket,id={chardev},fd={fd},server=on,wait=off"]
        if qemu_major >= 11:  # -mon is deprecated from QEMU 11
            monitor += ["-object", f"monitor-qmp,id={chardev}-monitor,chardev={chardev}"]
        else:
            monitor += ["-mon", f"chardev={chardev},mode=control"]
    args = [
        binary,
        "-name", launch.name,
        "-machine", machine,
        "-accel", launch.accel,
        "-m", f"{spec.memory_mib}M",
        "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-display", "none",
        "-chardev", f"file,id=vmckpt-serial,path={_escape(str(launch.serial_log))},append=on",
        "-serial", "chardev:vmckpt-serial",
        *monitor,
    ]  # fmt: skip
    if spec.cpu:
        args += ["-cpu", spec.cpu]
    if spec.panic_device and _has_isa_bus(machine):
        args += ["-device", "pvpanic"]
    if spec.generation_id and _has_isa_bus(machine):  # the PC machines' ACPI and fw_cfg
        args += ["-device", f"vmgenid,id=vmckpt-genid,guid={spec.generation_id}"]
    if spec.guest_agent and _has_isa_bus(machine):  # the PC machines have PCI for it
        # Without a host end (a QEMU a benchmark starts on another host) the channel goes
        # nowhere, but is there: the device set, which a migration or restore must repeat,
        # is the spec's alone.
        host_end = (
            f"socket,id={agent.CHARDEV_ID},fd={agent_fd},server=on,wait=off"
            if agent_fd is not None
            else f"null,id={agent.CHARDEV_ID}"
        )
        args += [
            "-chardev", host_end,
            "-device", "virtio-serial-pci,id=vmckpt-vser",
            "-device", f"virtserialport,bus=vmckpt-vser.0,chardev={agent.CHARDEV_ID},"
                       f"name={agent.CHANNEL_NAME}",
        ]  # fmt: skip
    kernel, initrd, iso = spec.medium("kernel"), spec.medium("initrd"), spec.medium("iso")
    if kernel:
        args += ["-kernel", kernel.path]
        modules = [m.qemu_module() for m in spec.media if m.role == "module"]
        if modules:
            args += ["-initrd", ",".join(modules)]
        elif initrd:
            args += ["-initrd", initrd.path]
        if spec.append:
            args += ["-append", spec.append]
    if iso:
        args += ["-cdrom", iso.path, "-boot", "d"]
    for disk in spec.disks:
        args += disk_args(disk)
    args += list(launch.extra_args)
    if launch.incoming:
        args += ["-S", "-incoming", "defer"]
    return args


# -- the process ---------------------------------------------------------------------------


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


def socket_listens(path: Path) -> bool:
    """Whether something accepts connections on a Unix socket path."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def rotate_serial_log(runtime_dir: Path) -> Path:
    """Keep the console log of the guest's previous life as serial.<n>.log; a new, empty log."""
    current = runtime_dir / SERIAL_LOG
    if current.exists():
        numbers = [
            int(m.group(1))
            for p in runtime_dir.iterdir()
            if (m := re.fullmatch(r"serial\.(\d+)\.log", p.name))
        ]
        current.replace(runtime_dir / f"serial.{max(numbers, default=0) + 1}.log")
        for old in sorted(numbers)[: max(0, len(numbers) + 1 - KEEP_SERIAL_LOGS)]:
            (runtime_dir / f"serial.{old}.log").unlink(missing_ok=True)
    os.close(open_nofollow(current, os.O_WRONLY | os.O_CREAT | os.O_EXCL))
    os.chmod(current, FILE_MODE)
    return current


@dataclass
class QemuProcess:
    """One QEMU process that vmckpt started, known by PID and start time."""

    name: str
    pid: int
    start_time: int
    qmp_socket: Path
    serial_log: Path
    log: Path
    accel: str = "tcg"
    command: list[str] = field(default_factory=list)
    # A second QMP monitor, reserved for the guest's checkpoint session (vmckpt/mechanisms/colo.py),
    # so that the session's long-lived connection never blocks other commands.
    session_socket: Path | None = None
    # The host end of the guest agent's channel (a spec with guest_agent), bound by vmckpt.
    agent_socket: Path | None = None
    _popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @classmethod
    def launch(
        cls,
        spec: GuestSpec,
        launch: Launch,
        *,
        runtime_dir: Path,
        on_spawn: Callable[[QemuProcess], None] | None = None,
    ) -> QemuProcess:
        """Start QEMU detached with a listening QMP socket; return once QMP answers.

        ``on_spawn`` is called as soon as QEMU's PID is known (to record it before
        anything can go wrong). A QEMU that exits or does not greet in time is ended
        and reported with its own last lines of output.
        """
        binary = qemu_binary()
        token = secrets.token_hex(3)
        qmp_socket = runtime_dir / f"qmp-{token}.sock"
        session_socket = runtime_dir / f"session-{token}.sock"
        agent_socket = runtime_dir / f"qga-{token}.sock" if spec.guest_agent else None
        if len(str(session_socket)) > SOCKET_PATH_MAX:
            raise MachineError(
                f"the QMP socket path {session_socket} is longer than a Unix socket allows; "
                "use a shorter guest name, or a shorter runtime directory (VMCKPT_RUNTIME_DIR)",
                vm=launch.name,
                step="launch",
            )
        listeners: list[socket.socket] = []
        try:
            for path in (qmp_socket, session_socket, agent_socket):
                if path is None:
                    continue
                listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                listeners.append(listener)
                listener.bind(str(path))
                os.chmod(path, FILE_MODE)
                listener.listen(8)
            fds = [listener.fileno() for listener in listeners]
            major = version_tuple(qemu_version(binary))[0]
            command = command_line(
                spec, launch, binary=binary, qemu_major=major, qmp_fds=fds[:2],
                agent_fd=fds[2] if agent_socket is not None else None,
            )  # fmt: skip
            log_path = runtime_dir / QEMU_LOG
            fd = open_nofollow(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            with os.fdopen(fd, "ab") as log_handle:
                os.fchmod(log_handle.fileno(), FILE_MODE)
                log_handle.write(("+ " + " ".join(command) + "\n").encode())
                log_handle.flush()
                _log.info("launching QEMU for %s: %s", launch.name, " ".join(command))
                try:
                    popen = subprocess.Popen(
                        command,
                        stdin=subprocess.DEVNULL,
                        stdout=log_handle,
                        stderr=subprocess.STDOUT,
                        pass_fds=fds,
                        start_new_session=True,  # a Ctrl-C on vmckpt must not reach the guest
                    )
                except OSError as exc:
                    raise cannot_run(binary, exc, vm=launch.name, step="launch") from exc
        except BaseException:
            for path in (qmp_socket, session_socket, agent_socket):
                if path is not None:
                    path.unlink(missing_ok=True)
            raise
        finally:
            for listener in listeners:
                listener.close()  # QEMU holds its own copies
        process = cls(
            name=launch.name,
            pid=popen.pid,
            start_time=process_start_time(popen.pid) or 0,
            qmp_socket=qmp_socket,
            serial_log=launch.serial_log,
            log=log_path,
            accel=launch.accel,
            command=command,
            session_socket=session_socket,
            agent_socket=agent_socket,
            _popen=popen,
        )
        try:
            if on_spawn is not None:
                on_spawn(process)
            process._await_monitor()
        except BaseException as exc:
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(1.0)  # a QEMU that failed to start is exiting: let it finish
            exited = popen.returncode
            process.kill()
            for path in (qmp_socket, session_socket, agent_socket):
                if path is not None:
                    path.unlink(missing_ok=True)
            # A Ctrl-C stays a Ctrl-C, even when QEMU also exited meanwhile.
            if exited is not None and isinstance(exc, Exception):
                raise MachineError(
                    f"QEMU exited (code {exited}) while starting: {process.log_tail()}",
                    vm=launch.name,
                    step="launch",
                ) from exc
            raise
        _log.info("QEMU for %s runs as PID %d", launch.name, process.pid)
        return process

    def _await_monitor(self) -> None:
        """Wait until QMP answers. A connection made while QEMU is still setting up its
        monitor can be dropped before the greeting; it is made again until QEMU answers."""
        deadline = time.monotonic() + MONITOR_TIMEOUT_S
        while True:
            remaining = deadline - time.monotonic()
            try:  # spoken directly: asyncio's first loop alone costs ~40 ms
                with self.direct_monitor(timeout=max(1.0, remaining)):
                    return
            except QMPError:
                if remaining <= 0 or not self.alive():
                    raise
                _log.debug("%s: QMP not ready yet, connecting again", self.name)
                time.sleep(MONITOR_RETRY_S)

    def log_tail(self, lines: int = 3) -> str:
        """QEMU's last lines of output in this life (the log also holds earlier lives, each
        after the ``+ command`` line that started it)."""
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        starts = [i for i, line in enumerate(text) if line.startswith("+ ")]
        tail = text[starts[-1] + 1 if starts else 0 :][-lines:]
        return " | ".join(tail) or "(QEMU printed nothing)"

    def alive(self) -> bool:
        if self._popen is not None and self._popen.poll() is not None:
            return False
        return process_start_time(self.pid) == self.start_time

    def monitor(self, timeout: float = 10.0) -> Monitor:
        return Monitor.unix(self.qmp_socket, vm=self.name, timeout=timeout)

    def direct_monitor(self, timeout: float = 10.0) -> Monitor:
        """The general monitor spoken directly (:meth:`Monitor.lines`): no asyncio loop to
        start, for a command whose time counts (a lazy restore's); one thread drives it."""
        return Monitor.lines(self.qmp_socket, vm=self.name, timeout=timeout)

    def session_monitor(self, timeout: float = 10.0, *, oob: bool = False) -> Monitor:
        """The monitor reserved for the checkpoint session (the general one if there is none),
        spoken directly (:meth:`Monitor.lines`): the session sends a command inside the
        guest's pause. A lazy restore's page server holds it instead, with ``oob``."""
        return Monitor.lines(self.session_socket or self.qmp_socket, vm=self.name,
                             timeout=timeout, oob=oob)  # fmt: skip

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
            "accel": self.accel,
            "command": self.command,
            "session_socket": str(self.session_socket) if self.session_socket else None,
            "agent_socket": str(self.agent_socket) if self.agent_socket else None,
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
            accel=str(data.get("accel", "tcg")),
            command=[str(a) for a in data.get("command", [])],
            session_socket=Path(data["session_socket"]) if data.get("session_socket") else None,
            agent_socket=Path(data["agent_socket"]) if data.get("agent_socket") else None,
        )
