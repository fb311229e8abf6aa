"""Checkpoints of a disk guest: as a libvirt domain (through libvirt's monitor passthrough, its
disks handed scratch images as fd sets) against the same VM as a vmckpt guest, same run.

The test guest (``--memory``, TCG) with its disk workload (guest/diskload.c: random 4 KiB
writes, checked against its memory) on a ``--disk`` qcow2 image, once started by vmckpt and
once defined in libvirt (a virtio disk; libvirtd started here, and ended by its PID, if none
listens), each checkpointed ``--count`` times after its base (precopy-diff; alternately, so
both see the same load on a shared machine). Per checkpoint: wall time, the guest's pause
(from QEMU's STOP/RESUME), bytes written to the store, of them the disk's.

    python -m benchmarks.libvirt_disk --json /tmp/libvirt-disk.json

Needs root (libvirtd's system instance). Benchmarks print numbers; nothing here asserts a
timing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vmckpt.guests.base import Guest
from vmckpt.guests.libvirt import LibvirtGuest
from vmckpt.guests.local import LocalGuest
from vmckpt.images import Store
from vmckpt.machine.binary import parse_memory
from vmckpt.machine.qemu import socket_listens
from vmckpt.machine.spec import BootMedium, DiskSpec, GuestSpec
from vmckpt.mechanisms.precopy import take_checkpoint

REPO_GUEST = Path(__file__).resolve().parent.parent / "guest" / "build"
APPEND = "console=ttyS0 quiet panic=-1 vmckpt.buf_mb=16 vmckpt.pages=4 vmckpt.disk=/dev/vda"
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")


@dataclass
class Run:
    how: str
    wall_s: list[float] = field(default_factory=list)
    pause_ms: list[float] = field(default_factory=list)
    bytes: list[int] = field(default_factory=list)
    disk_bytes: list[int] = field(default_factory=list)


@contextlib.contextmanager
def libvirtd(logs: Path) -> Iterator[None]:
    """A libvirtd on the system socket: the running one, else one started here (with
    virtlogd), ended by its PID afterwards."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        for binary, sock in (("virtlogd", VIRTLOGD_SOCK), ("libvirtd", LIBVIRT_SOCK)):
            if socket_listens(sock):
                continue
            with (logs / f"{binary}.log").open("wb") as log:
                started.append(
                    subprocess.Popen([shutil.which(binary) or f"/usr/sbin/{binary}"],
                                     stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
                )  # fmt: skip
            deadline = time.monotonic() + 30
            while not socket_listens(sock):
                if started[-1].poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"{binary} did not start: {(logs / f'{binary}.log').read_text()}"
                    )
                time.sleep(0.1)
        yield
    finally:
        for process in reversed(started):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.kill(process.pid, signal.SIGKILL)
                    process.wait()


def virsh(*args: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", *args], check=True,
                          capture_output=True, text=True).stdout  # fmt: skip


def wait_disk_lines(serial: Path, count: int) -> None:
    deadline = time.monotonic() + 300
    while True:
        text = serial.read_text(errors="replace") if serial.exists() else ""
        if "DISKBAD" in text:
            raise SystemExit(f"{serial}: DISKBAD\n{text[-2000:]}")
        if text.count("DISK seq=") >= count:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{serial}: fewer than {count} DISK lines")
        time.sleep(0.2)


def domain_xml(name: str, args: argparse.Namespace, media: Path, disk: Path, serial: Path) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{parse_memory(args.memory)}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{media / "vmlinuz"}</kernel>
    <initrd>{media / "initrd.img"}</initrd>
    <cmdline>{APPEND}</cmdline>
  </os>
  <features><acpi/></features>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64")}</emulator>
    <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>
    <memballoon model='none'/>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/><source file='{disk}'/><target dev='vda' bus='virtio'/>
    </disk>
  </devices>
</domain>
"""


def checkpoint(guest: Guest, run: Run) -> None:
    result = take_checkpoint(guest)
    run.wall_s.append(result.total_s)
    run.pause_ms.append(result.pause_ms)
    run.bytes.append(result.bytes_written)
    run.disk_bytes.append(sum(d.bytes_stored for d in result.layer.disks))


def bench(args: argparse.Namespace, scratch: Path) -> list[Run]:
    scratch.chmod(0o755)  # libvirt's QEMU (libvirt-qemu) reads the guest and the disk here
    for name in ("vmlinuz", "initrd.img"):
        shutil.copy(args.media / name, scratch / name)
        (scratch / name).chmod(0o644)
    disks = {}
    for how in ("vmckpt", "libvirt"):
        disks[how] = scratch / f"disk-{how}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disks[how]), args.disk],
                       check=True)  # fmt: skip
    store = Store.create(scratch / "store")
    spec = GuestSpec(
        memory_mib=parse_memory(args.memory), accel="tcg",
        media=(BootMedium.of("kernel", scratch / "vmlinuz"),
               BootMedium.of("initrd", scratch / "initrd.img")),
        append=APPEND, disks=(DiskSpec.of("vda", disks["vmckpt"]),),
    )  # fmt: skip
    domain = f"vk-bench-{os.getpid()}"
    serial = scratch / "domain.serial.log"
    (scratch / "domain.xml").write_text(domain_xml(domain, args, scratch, disks["libvirt"], serial))
    runs = {how: Run(how) for how in ("vmckpt guest", "libvirt domain")}
    local = LocalGuest.start(store, "bench", spec)
    try:
        virsh("create", str(scratch / "domain.xml"))
        try:
            wait_disk_lines(store.host.runtime_path("bench") / "serial.log", 3)
            wait_disk_lines(serial, 3)
            lv = LibvirtGuest(store, domain)
            take_checkpoint(local)  # the bases: the whole disk and RAM
            take_checkpoint(lv)
            for _ in range(args.count):
                time.sleep(args.interval)  # the workload writes between checkpoints
                checkpoint(local, runs["vmckpt guest"])
                checkpoint(lv, runs["libvirt domain"])
            wait_disk_lines(serial, serial.read_text().count("DISK seq=") + 1)
        finally:
            virsh("destroy", domain)
    finally:
        local.stop()
    return list(runs.values())


def format_table(runs: Sequence[Run], title: str) -> str:
    lines = [title, "", "| guest | wall | pause | bytes per layer | of them disk |",
             "|---|---|---|---|---|"]  # fmt: skip
    for run in runs:
        lines.append(
            f"| {run.how} | {statistics.median(run.wall_s):.3f} s | "
            f"{statistics.median(run.pause_ms):.1f} ms | "
            f"{statistics.median(run.bytes) / 1e6:.2f} MB | "
            f"{statistics.median(run.disk_bytes) / 1e6:.2f} MB |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="libvirt_disk", description=__doc__.split("\n")[0])
    p.add_argument("--memory", default="512M")
    p.add_argument("--disk", default="2G", help="virtual size of the qcow2 disk")
    p.add_argument("--count", type=int, default=10, help="checkpoints after the base")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between checkpoints")
    p.add_argument("--media", type=Path, default=REPO_GUEST)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="vk-lvbench-", dir="/tmp"))
    for variable, sub in (("VMCKPT_DATA_DIR", "data"), ("VMCKPT_RUNTIME_DIR", "run"),
                          ("VMCKPT_KEYS_DIR", "keys")):  # fmt: skip
        os.environ.setdefault(variable, str(scratch / sub))
    try:
        with libvirtd(scratch):
            runs = bench(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    title = (
        f"checkpoints of the test guest ({args.memory}, TCG) with its disk workload on a "
        f"{args.disk} qcow2 disk: as a vmckpt guest and as a libvirt domain, alternately, "
        f"{args.count} after the base, {args.interval} s apart (medians; precopy-diff)"
    )
    print(format_table(runs, title))
    if args.json:
        args.json.write_text(json.dumps([asdict(run) for run in runs], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
