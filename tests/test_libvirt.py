"""libvirt domains: checkpoint a running domain, restore a layer as a new domain.

Runs a real libvirtd (Debian's packages) with a TCG domain of the test guest.
If no libvirtd listens on the system socket, the session fixture starts one
(and virtlogd, which its QEMU driver needs) and ends them by PID afterwards;
every domain a test defines is destroyed and undefined at teardown.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.framework.debian import CONSOLE_LAG_LINES, counters, debian_build, wait_counters
from tests.framework.guest import (
    GUEST_BUILD,
    State,
    Taken,
    Vmckpt,
    assert_continues,
    guest_append,
    parse_states,
    tail,
    wait_for,
)
from tests.test_disks import disk_states
from vmckpt.images import Store
from vmckpt.machine.qemu import socket_listens
from vmckpt.mechanisms.choice import LIBVIRT_REFUSAL

pytestmark = [pytest.mark.qemu, pytest.mark.libvirt]

URI = "qemu:///system"
LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")


def _end(process: subprocess.Popen[bytes]) -> None:
    """End a daemon this fixture started, by its PID: SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if process.poll() is not None:
            return
        os.kill(process.pid, sig)
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_listening(daemon: subprocess.Popen[bytes], name: str, sock: Path, log: Path) -> None:
    """Wait until a daemon we started listens on ``sock``; it must not exit meanwhile."""

    def listening() -> bool:
        assert daemon.poll() is None, f"{name} exited: {tail(log.read_text())}"
        return socket_listens(sock)

    wait_for(listening, f"{name} listening on {sock}", 30, evidence=lambda: tail(log.read_text()))


@pytest.fixture(scope="session")
def libvirtd(root: None) -> Iterator[str]:
    """A libvirtd answering on qemu:///system: the running one, else one started here."""
    started: list[subprocess.Popen[bytes]] = []
    logs = Path(tempfile.mkdtemp(prefix="vk-libvirtd-"))
    try:
        if not socket_listens(LIBVIRT_SOCK):
            for binary, sock in (("virtlogd", VIRTLOGD_SOCK), ("libvirtd", LIBVIRT_SOCK)):
                if socket_listens(sock):
                    continue
                path = shutil.which(binary) or f"/usr/sbin/{binary}"
                assert os.path.exists(path), f"{binary} is not installed (libvirt-daemon-system)"
                with (logs / f"{binary}.log").open("wb") as log:
                    started.append(
                        subprocess.Popen(
                            [path],
                            stdin=subprocess.DEVNULL,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            start_new_session=True,
                        )
                    )
                wait_listening(started[-1], binary, sock, logs / f"{binary}.log")
        yield URI
    finally:
        for process in reversed(started):
            _end(process)
        shutil.rmtree(logs, ignore_errors=True)


def virsh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["virsh", "-c", URI, *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)}: {result.stdout}{result.stderr}")
    return result


def domain_xml(name: str, serial: Path, media: Path, *, devices: str = "", append: str = "") -> str:
    """A TCG domain of the test guest (kernel and initrd in ``media``); serial console to a file;
    more ``devices`` (XML) and kernel arguments (``append``)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{media / "vmlinuz"}</kernel>
    <initrd>{media / "initrd.img"}</initrd>
    <cmdline>{guest_append(pages=4, buf_mb=64)}{append}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64")}</emulator>
    <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>
    <memballoon model='none'/>{devices}
  </devices>
</domain>
"""


@dataclass
class Domains:
    """Domains a test defines; all destroyed and undefined at teardown."""

    scratch: Path
    names: list[str] = field(default_factory=list)

    def new_name(self, stem: str) -> str:
        name = f"vk-{stem}-{secrets.token_hex(3)}"
        self.names.append(name)
        return name

    def define_and_start(self, name: str, *, devices: str = "", append: str = "") -> Path:
        serial = self.scratch / f"{name}.serial.log"
        xml = self.scratch / f"{name}.xml"
        xml.write_text(domain_xml(name, serial, self.scratch, devices=devices, append=append))
        virsh("define", str(xml))
        virsh("start", name)
        return serial

    def cleanup(self) -> None:
        for name in self.names:
            virsh("destroy", name, check=False)
            virsh("undefine", name, check=False)


@pytest.fixture
def domains(libvirtd: str, guest_images: Path) -> Iterator[Domains]:
    scratch = Path(tempfile.mkdtemp(prefix="vk-lv-", dir="/tmp"))
    scratch.chmod(0o755)  # QEMU runs as libvirt-qemu; libvirtd opens the serial file
    # The checkout may sit below a directory libvirt-qemu cannot enter (mktemp's
    # 0700): the domain boots from copies that it can read.
    for name in ("vmlinuz", "initrd.img"):
        shutil.copy(GUEST_BUILD / name, scratch / name)
        (scratch / name).chmod(0o644)
    registry = Domains(scratch)
    try:
        yield registry
    finally:
        registry.cleanup()
        shutil.rmtree(scratch, ignore_errors=True)


def states(serial: Path, offset: int = 0) -> list[State]:
    with serial.open("rb") as handle:
        handle.seek(offset)
        return parse_states(handle.read().decode(errors="replace"))


def wait_states(serial: Path, count: int, offset: int = 0, timeout: float = 120) -> list[State]:
    """Wait until the domain's console (from byte ``offset``) holds ``count`` STATE lines."""

    def found() -> list[State] | None:
        lines = states(serial, offset) if serial.exists() else []
        return lines if len(lines) >= count else None

    def console() -> str:
        return tail(serial.read_text(errors="replace")[offset:]) if serial.exists() else "(none)"

    return wait_for(
        found,
        f"{serial.name}: {count} STATE lines",
        timeout,
        evidence=lambda: f"the console:\n{console()}",
    )


def last_seq(serial: Path) -> int:
    found = states(serial)
    return found[-1].seq if found else -1


def test_domain_checkpointed_three_times_destroyed_and_restored_as_a_domain(
    vmckpt: Vmckpt, domains: Domains
) -> None:
    name = domains.new_name("orig")
    serial = domains.define_and_start(name)
    wait_states(serial, 5)
    store = str(vmckpt.store)
    vmckpt("init", store)

    taken: list[Taken] = []
    for _ in range(3):
        before = last_seq(serial)
        out = json.loads(vmckpt("checkpoint", "--libvirt", name, "--store", store, "--json").stdout)
        taken.append(
            Taken(
                out["layer"],
                before,
                last_seq(serial),
                out["pages_stored"],
                out["bytes"],
                out["pause_ms"],
            )
        )
        assert virsh("domstate", name).stdout.strip() == "running"
        wait_states(serial, len(states(serial)) + 5)
    original = states(serial)
    assert "BAD" not in serial.read_text(errors="replace")
    assert [t.pages * 10 < taken[0].pages for t in taken[1:]] == [True, True], taken

    listing = json.loads(vmckpt("list", "--store", store, "--json").stdout)
    parents = {row["layer"]: row["parent"] for row in listing["layers"]}
    assert parents[taken[1].layer] == taken[0].layer
    assert parents[taken[2].layer] == taken[1].layer
    inspect = json.loads(vmckpt("inspect", "--store", store, taken[2].layer, "--json").stdout)
    assert f"<name>{name}</name>" in inspect["spec"]["libvirt_xml"]
    assert inspect["spec"]["accel"] == "tcg"
    assert inspect["spec"]["memory_mib"] == 256

    virsh("destroy", name)
    offset = serial.stat().st_size  # the restored domain appends to the same console file
    restored_name = domains.new_name("back")
    out = json.loads(
        vmckpt("restore", "--store", store, "--libvirt-define", restored_name, "--json").stdout
    )
    assert out["layer"] == taken[2].layer

    restored = wait_states(serial, 15, offset)
    assert_continues(restored, original, taken[2])
    assert "BAD" not in serial.read_text(errors="replace")[offset:]
    running = virsh("list", "--name").stdout.split()
    assert restored_name in running and name not in running
    info = virsh("dominfo", restored_name).stdout
    assert "Persistent:     yes" in info, info
    assert out["uuid"] in info

    # The restored domain continues the chain, here under `watch`.
    watched = vmckpt(
        "watch", "--libvirt", restored_name, "--store", store,
        "--interval", "0.5s", "--count", "2", "--json",
    )  # fmt: skip
    rows = [json.loads(line) for line in watched.stdout.splitlines()]
    assert [row["parent"] for row in rows] == [taken[2].layer, rows[0]["layer"]]
    assert virsh("domstate", restored_name).stdout.strip() == "running"


def test_libvirt_errors_are_one_line_with_their_exit_code(
    vmckpt: Vmckpt, domains: Domains, tmp_path: Path
) -> None:
    store = str(vmckpt.store)
    vmckpt("init", store)
    missing = vmckpt("checkpoint", "--libvirt", "vk-no-such-domain", "--store", store, check=False)
    assert missing.returncode == 13, missing.stderr
    assert "no domain vk-no-such-domain" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr

    # Without libvirt-python: a clear error naming what to install, nothing else breaks.
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "libvirt.py").write_text("raise ImportError('libvirt hidden by the test')\n")
    env = {"PYTHONPATH": str(shim)}
    hidden = vmckpt("checkpoint", "--libvirt", "x", "--store", store, check=False, env=env)
    assert hidden.returncode == 13, hidden.stderr
    assert "libvirt-python is not installed" in hidden.stderr
    assert vmckpt("list", "--store", store, env=env).returncode == 0

    # A layer that did not come from a libvirt domain cannot be defined as one.
    vmckpt.run_guest("plain")
    vmckpt.wait_states("plain", 3)
    vmckpt("checkpoint", "plain", "--store", store)
    vmckpt("stop", "plain", "--store", store)
    name = domains.new_name("never")
    refused = vmckpt("restore", "--store", store, "--libvirt-define", name, check=False)
    assert refused.returncode == 10, refused.stderr
    assert "no libvirt_xml" in refused.stderr
    assert virsh("dominfo", name, check=False).returncode != 0


def test_colo_is_refused_for_a_domain_in_one_line_that_says_why(
    vmckpt: Vmckpt, domains: Domains
) -> None:
    """A libvirt domain gets precopy-diff: asked for colo, vmckpt refuses in one line (exit 2)
    naming libvirt's reason and what would make colo possible, and leaves the domain as it
    was; `vmckpt list` shows the domain with that reason."""
    name = domains.new_name("nocolo")
    serial = domains.define_and_start(name)
    wait_states(serial, 3)
    store = str(vmckpt.store)
    vmckpt("init", store)
    refused = vmckpt(
        "checkpoint", "--libvirt", name, "--mechanism", "colo", "--store", store, check=False
    )
    assert refused.returncode == 2, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert LIBVIRT_REFUSAL in refused.stderr
    assert virsh("domstate", name).stdout.strip() == "running"
    assert json.loads(vmckpt("list", "--store", store, "--json").stdout)["layers"] == []
    before = last_seq(serial)
    wait_for(lambda: last_seq(serial) > before + 2 or None, f"{name} going on", 60)

    row = json.loads(vmckpt("checkpoint", "--libvirt", name, "--store", store, "--json").stdout)
    assert row["mechanism"] == "precopy-diff"
    listing = json.loads(vmckpt("list", "--store", store, "--json").stdout)
    domain = next(g for g in listing["guests"] if g["name"] == name)
    assert (domain["kind"], domain["state"]) == ("libvirt", "running")
    assert (domain["head"], domain["mechanism"]) == (row["layer"], "precopy-diff")
    assert domain["mechanism_reason"] == LIBVIRT_REFUSAL
    text = vmckpt("list", "--store", store).stdout
    assert f"{name}: not colo: {LIBVIRT_REFUSAL}" in text


# -- domains with writable disks -------------------------------------------------------------

DISK_XML = """
    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{path}'/>
      <target dev='{dev}' bus='{bus}'/>
    </disk>"""
SCSI_CONTROLLER = "\n    <controller type='scsi' index='0' model='virtio-scsi'/>"


def image(path: Path, fmt: str, size: int, pattern: int | None = None) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)], check=True)
    if pattern is not None:
        subprocess.run(
            ["qemu-io", "-f", fmt, "-c", f"write -q -P {pattern} 1M 3M", str(path)], check=True
        )
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wait_disk_lines(serial: Path, count: int, offset: int = 0) -> dict[int, str]:
    def found() -> dict[int, str] | None:
        text = serial.read_text(errors="replace")[offset:] if serial.exists() else ""
        assert "DISKBAD" not in text, tail(text)
        got = disk_states(text)
        return got if len(got) >= count else None

    return wait_for(
        found, f"{serial.name}: {count} DISK lines", 180,
        evidence=lambda: tail(serial.read_text(errors="replace")[offset:]),
    )  # fmt: skip


def domain_disks(name: str) -> dict[str, str]:
    """target dev -> source of each disk of a domain (virsh domblklist)."""
    rows = virsh("domblklist", name).stdout.splitlines()[2:]
    return {row.split()[0]: row.split()[1] for row in rows if len(row.split()) == 2}


def qemu_uid(name: str) -> int:
    """The uid the domain's QEMU runs as (libvirt's pid file of it)."""
    pid = int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
    return os.stat(f"/proc/{pid}").st_uid


def test_domain_with_disks_checkpointed_destroyed_and_restored_with_its_disks(
    vmckpt: Vmckpt, domains: Domains
) -> None:
    """A domain with a qcow2 disk on virtio (the guest writes it and checks it against its
    memory) and a raw disk on virtio-scsi: three checkpoints, destroyed, restored with
    --libvirt-define; it carries on with its disk as its memory expects, from new images
    beside the originals that libvirt owns; the originals are untouched."""
    scratch = domains.scratch
    vda = image(scratch / "root.qcow2", "qcow2", 64 << 20)
    sda = image(scratch / "data.raw", "raw", 16 << 20, pattern=0x5A)
    devices = (
        SCSI_CONTROLLER
        + DISK_XML.format(fmt="qcow2", path=vda, dev="vda", bus="virtio")
        + DISK_XML.format(fmt="raw", path=sda, dev="sda", bus="scsi")
    )
    name = domains.new_name("disks")
    serial = domains.define_and_start(name, devices=devices, append=" vmckpt.disk=/dev/vda")
    wait_disk_lines(serial, 3)
    store = str(vmckpt.store)
    vmckpt("init", store)

    taken: list[Taken] = []
    for _ in range(3):
        before = last_seq(serial)
        out = json.loads(vmckpt("checkpoint", "--libvirt", name, "--store", store, "--json").stdout)
        taken.append(Taken(out["layer"], before, last_seq(serial), out["pages_stored"],
                           out["bytes"], out["pause_ms"]))  # fmt: skip
        assert virsh("domstate", name).stdout.strip() == "running"
        wait_disk_lines(serial, len(disk_states(serial.read_text(errors="replace"))) + 3)
    original_text = serial.read_text(errors="replace")
    original_disk = disk_states(original_text)
    original = states(serial)
    assert "BAD" not in original_text

    inspect = json.loads(vmckpt("inspect", "--store", store, taken[2].layer, "--json").stdout)
    specs = {d["id"]: d for d in inspect["spec"]["disks"]}
    assert specs["vda"]["path"] == str(vda) and specs["vda"]["format"] == "qcow2"
    assert specs["sda"]["path"] == str(sda) and specs["sda"]["format"] == "raw"
    for layer in taken[1:]:  # the later layers hold the clusters written since, not the disk
        manifest = Store(vmckpt.store).manifest(layer.layer)
        record = manifest.disk("vda")
        assert record is not None and not record.full and record.bytes_stored < 4 << 20, record

    virsh("destroy", name)
    originals = {path: sha256(path) for path in (vda, sda)}
    offset = serial.stat().st_size
    restored_name = domains.new_name("dback")
    out = json.loads(
        vmckpt("restore", "--store", store, "--libvirt-define", restored_name, "--json").stdout
    )
    assert out["layer"] == taken[2].layer
    restored_disk = wait_disk_lines(serial, 6, offset)
    restored = wait_states(serial, 10, offset)
    assert_continues(restored, original, taken[2])
    # The disk is the one of the checkpoint's instant: the guest checks every block it wrote
    # against its memory (a DISKBAD line otherwise), and prints the sums the original printed.
    assert "DISKBAD" not in serial.read_text(errors="replace")[offset:]
    common = set(restored_disk) & set(original_disk)
    assert common, (restored_disk, original_disk)
    assert all(restored_disk[seq] == original_disk[seq] for seq in common)

    running = virsh("list", "--name").stdout.split()
    assert restored_name in running and name not in running
    disks = domain_disks(restored_name)
    for dev, original_path in (("vda", vda), ("sda", sda)):
        new = Path(disks[dev])
        assert new.parent == scratch and new != original_path, disks
        assert new.name == f"{original_path.stem}-{restored_name}-{taken[2].layer}.qcow2"
        assert os.stat(new).st_uid == qemu_uid(restored_name)  # libvirt labelled it its own
    assert {path: sha256(path) for path in (vda, sda)} == originals
    # The raw SCSI disk (not written by the guest) holds what the original held.
    compare = subprocess.run(
        ["qemu-img", "compare", "-U", str(sda), disks["sda"]], capture_output=True, text=True
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr

    # The restored domain's next checkpoint is incremental: its disk bitmap was recreated.
    out = json.loads(
        vmckpt("checkpoint", "--libvirt", restored_name, "--store", store, "--json").stdout
    )
    manifest = Store(vmckpt.store).manifest(out["layer"])
    assert manifest.parent == taken[2].layer
    record = manifest.disk("vda")
    assert record is not None and not record.full, record
    assert virsh("domstate", restored_name).stdout.strip() == "running"


def test_a_domain_with_a_disk_vmckpt_cannot_capture_is_refused_in_one_line(
    vmckpt: Vmckpt, domains: Domains
) -> None:
    shared = image(domains.scratch / "shared.raw", "raw", 8 << 20)
    devices = DISK_XML.format(fmt="raw", path=shared, dev="vdb", bus="virtio").replace(
        "</disk>", "  <shareable/>\n    </disk>"
    )
    name = domains.new_name("shared")
    serial = domains.define_and_start(name, devices=devices)
    wait_states(serial, 2)
    store = str(vmckpt.store)
    vmckpt("init", store)
    refused = vmckpt("checkpoint", "--libvirt", name, "--store", store, check=False)
    assert refused.returncode != 0
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1, refused.stderr
    assert "disk vdb" in lines[0] and "shareable" in lines[0], lines[0]
    assert virsh("domstate", name).stdout.strip() == "running"
    assert Store(vmckpt.store).layer_ids() == []


# -- a Debian 12 system with systemd on a qcow2 root disk ------------------------------------


@pytest.fixture(scope="session")
def debian_guest() -> Path:
    return debian_build()


def test_debian_systemd_domain_with_a_qcow2_root_disk_continues_after_restore(
    vmckpt: Vmckpt, domains: Domains, debian_guest: Path
) -> None:
    """The issue's user's VM: Debian 12 with systemd on a qcow2 root disk, defined with virsh,
    a service keeping a counter in memory and on its root disk (checked against each other
    each second), checkpointed three times, destroyed, restored with --libvirt-define: it
    counts on from the checkpoint with memory and disk agreeing, and virsh lists it."""
    scratch = domains.scratch
    for name in ("vmlinuz", "initrd.img"):
        shutil.copy(debian_guest / name, scratch / f"debian-{name}")
        (scratch / f"debian-{name}").chmod(0o644)
    root = scratch / "debian-root.qcow2"
    shutil.copy(debian_guest / "root.qcow2", root)
    name = domains.new_name("debian")
    serial = scratch / f"{name}.serial.log"
    xml = (
        domain_xml(name, serial, scratch)
        .replace(f"{scratch / 'vmlinuz'}", str(scratch / "debian-vmlinuz"))
        .replace(f"{scratch / 'initrd.img'}", str(scratch / "debian-initrd.img"))
    )
    xml = re.sub(r"<cmdline>.*</cmdline>", "<cmdline>root=/dev/vda rw console=ttyS0 quiet"
                 "</cmdline>", xml).replace("<memory unit='MiB'>256</memory>",
                 "<memory unit='MiB'>1024</memory>")  # fmt: skip
    xml = xml.replace("<memballoon model='none'/>", "<memballoon model='none'/>" + DISK_XML.format(
        fmt="qcow2", path=root, dev="vda", bus="virtio"))  # fmt: skip
    (scratch / f"{name}.xml").write_text(xml)
    virsh("define", str(scratch / f"{name}.xml"))
    virsh("start", name)
    wait_counters(serial, 3, timeout=600)
    store = str(vmckpt.store)
    vmckpt("init", store)

    layers = []
    for _ in range(3):
        before = counters(serial)[-1]
        out = json.loads(vmckpt("checkpoint", "--libvirt", name, "--store", store, "--json").stdout)
        after = counters(serial)[-1]
        layers.append((out["layer"], before, after))
        assert virsh("domstate", name).stdout.strip() == "running"
        wait_counters(serial, len(counters(serial)) + 3)
    virsh("destroy", name)
    last_original = counters(serial)[-1]
    layer, before, _after = layers[-1]
    previous_after = layers[-2][2]

    offset = serial.stat().st_size
    restored_name = domains.new_name("debback")
    out = json.loads(
        vmckpt("restore", "--store", store, "--libvirt-define", restored_name, "--json").stdout
    )
    assert out["layer"] == layer
    restored = wait_counters(serial, 5, offset)
    # It counts on from the checkpoint's instant, one by one, memory and disk agreeing (the
    # service reads the disk back before each step: COUNTERBAD otherwise). The console trails
    # the service (journald forwards its lines), by more lines the busier the host, so the
    # instant is bounded by what the guest is known to have counted: at least `before` when
    # the checkpoint began (past the previous layer's instant), and no more than the original
    # had counted when it was destroyed, plus the lines it had not yet printed then and a
    # line torn at the instant.
    text = serial.read_text(errors="replace")
    evidence = (restored, before, last_original, text[offset - 400 : offset + 400])
    assert restored[0] >= before and restored[0] > previous_after, evidence
    assert restored[0] <= last_original + CONSOLE_LAG_LINES, evidence
    assert restored == list(range(restored[0], restored[0] + len(restored))), restored
    assert restored_name in virsh("list", "--name").stdout.split()
    assert Path(domain_disks(restored_name)["vda"]).parent == scratch
