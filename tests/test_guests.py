"""vmckpt/guests/ and the mechanism choice of vmckpt/mechanisms/api.py without QEMU: records,
mechanism choice, status, and what a guest refuses.

A guest's QEMU is stood in for by a ``sleep`` process this test starts and ends by its PID
(it is alive, or it is not, which is all these paths ask), its QEMU binary by a script that
prints a version, and its monitor by the fake QEMU of tests/framework/fakeqmp.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.framework.fakeqmp import COMPLETED, FakeQemu
from tests.framework.guest import REPO
from tests.framework.journal import owner_dies
from vmckpt.errors import CheckpointError, MachineError, StoreError, UsageError
from vmckpt.guests import Guest, GuestStatus, LocalGuest, open_guest
from vmckpt.guests.libvirt import LibvirtGuest
from vmckpt.guests.local import RECORD, GuestRecord, local_guest_names
from vmckpt.images import LayerContent, Store
from vmckpt.machine.qemu import QemuProcess, process_start_time
from vmckpt.machine.spec import DiskSpec, GuestSpec
from vmckpt.mechanisms import api
from vmckpt.mechanisms.choice import COLO, LIBVIRT_REFUSAL, PRECOPY, Choice
from vmckpt.qmp import Monitor
from vmckpt.ram import PAGE_SIZE, RamBlock, RamImage
from vmckpt.session import JOURNAL, MigrationSession

VM = "g1"


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "store")


@pytest.fixture
def stand_in() -> Iterator[subprocess.Popen[bytes]]:
    """A live process for a record to name as its QEMU; ended by its PID afterwards."""
    proc = subprocess.Popen(["sleep", "600"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def fake_qemu_binary(tmp_path: Path, version: str) -> Path:
    binary = tmp_path / f"qemu-{version}"
    binary.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version} (fake)'\n")
    binary.chmod(0o755)
    return binary


def process(tmp_path: Path, pid: int, *, command: list[str] | None = None) -> QemuProcess:
    return QemuProcess(
        name=VM, pid=pid, start_time=process_start_time(pid) or 1, qmp_socket=tmp_path / "q.sock",
        serial_log=tmp_path / "serial.log", log=tmp_path / "qemu.log", accel="tcg",
        command=command or [], session_socket=tmp_path / "s.sock",
    )  # fmt: skip


def record(spec: GuestSpec, proc: QemuProcess | None) -> GuestRecord:
    return GuestRecord(VM, spec, proc, "tcg", ("-device", "pvpanic"))


# -- the record --------------------------------------------------------------------------------


def test_a_record_round_trips_through_json(tmp_path: Path) -> None:
    disk = DiskSpec("disk0", "/tmp/d.qcow2", "qcow2", 1 << 26)
    spec = GuestSpec(memory_mib=256, machine="q35", cpu="max", disks=(disk,))
    original = record(spec, process(tmp_path, 4242, command=["/usr/bin/qemu-system-x86_64"]))
    again = GuestRecord.from_dict(json.loads(json.dumps(original.to_dict())), VM)
    assert again == original
    assert again.process is not None and again.process.session_socket == tmp_path / "s.sock"
    stopped = record(GuestSpec(), None)
    assert GuestRecord.from_dict(json.loads(json.dumps(stopped.to_dict())), VM) == stopped


def test_a_record_survives_the_store(store: Store, tmp_path: Path) -> None:
    original = record(GuestSpec(memory_mib=128), process(tmp_path, 4242))
    LocalGuest(store, VM, original).save()
    assert local_guest_names(store) == [VM]
    assert LocalGuest(store, VM).record == original


def damaged(change: dict[str, Any], drop: str = "") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(
        json.dumps(record(GuestSpec(), process(Path("/tmp"), 4242)).to_dict())
    )
    data.update(change)
    data.pop(drop, None)
    return data


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (damaged({}, drop="spec"), "its record is damaged ('spec')"),
        (damaged({}, drop="name"), "its record is damaged ('name')"),
        (damaged({"process": {"name": VM}}), "its record is damaged ('pid')"),
        (damaged({"process": {**damaged({})["process"], "pid": "x1"}}), "invalid literal"),
        (damaged({"trusted_args": 5}), "its record is damaged"),
        (damaged({"spec": "512M"}), "stored guest spec is not an object"),
        (damaged({"spec": {"memory_mib": 1, "cpus": 1}}), "memory of 1 MiB is out of range"),
    ],
)
def test_a_damaged_record_is_one_machine_error(data: dict[str, Any], message: str) -> None:
    with pytest.raises(MachineError) as damage:
        GuestRecord.from_dict(data, VM)
    assert message in damage.value.message, damage.value.message
    assert "\n" not in str(damage.value)


def test_a_guest_without_a_record_or_with_a_broken_one(store: Store) -> None:
    with pytest.raises(MachineError, match="no such guest in this store"):
        _ = LocalGuest(store, VM).record
    store.host.runtime_dir(VM).joinpath(RECORD).write_text("{not json")
    with pytest.raises(StoreError, match="cannot read"):
        _ = LocalGuest(store, VM).record


# -- which mechanism -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "disks", "mechanism", "reason"),
    [
        ("11.1.3", (), COLO, "QEMU 11.1.3 under TCG: incremental transfer"),
        ("10.0.2", (), PRECOPY, "QEMU 10.0.2 under TCG: COLO deadlocks"),
        (
            "11.1.3",
            (DiskSpec("disk0", "/tmp/d.raw", "raw", 1 << 20),),
            COLO,
            "1 writable disk captured in each checkpoint's pause",
        ),
        (
            "11.1.3",
            (DiskSpec("disk0", "/tmp/d.raw", "raw", 1 << 20, readonly=True, sha256="0" * 64),),
            COLO,
            "incremental",
        ),
    ],
)
def test_a_local_guest_gets_the_mechanism_its_qemu_and_disks_allow(
    store: Store,
    tmp_path: Path,
    stand_in: subprocess.Popen[bytes],
    version: str,
    disks: tuple[DiskSpec, ...],
    mechanism: str,
    reason: str,
) -> None:
    binary = fake_qemu_binary(tmp_path, version)
    proc = process(tmp_path, stand_in.pid, command=[str(binary), "-name", VM])
    guest = LocalGuest(store, VM, record(GuestSpec(disks=disks), proc))
    choice = api.mechanism_of(guest)
    assert choice.mechanism == mechanism
    assert reason in choice.reason, choice.reason


def test_a_mechanism_asked_for_is_checked(
    store: Store, tmp_path: Path, stand_in: subprocess.Popen[bytes]
) -> None:
    binary = fake_qemu_binary(tmp_path, "10.0.2")
    guest = LocalGuest(store, VM, record(GuestSpec(), process(tmp_path, stand_in.pid,
                                                               command=[str(binary)])))  # fmt: skip
    assert api.choose(guest, "auto").mechanism == PRECOPY
    assert api.choose(guest, PRECOPY) == api.mechanism_of(guest)  # its own: with its reason
    with pytest.raises(UsageError, match=f"guest {VM}: COLO is refused here: QEMU 10.0.2"):
        api.choose(guest, COLO)
    with pytest.raises(UsageError, match="unknown mechanism 'fast'"):
        api.choose(guest, "fast")


class MonitoredGuest(Guest):
    """A guest reached only through a monitor (as a libvirt domain is): the fake's."""

    def __init__(self, store: Store, qemu: FakeQemu) -> None:
        super().__init__(store, VM)
        self.qemu = qemu

    def monitor(self) -> Monitor:
        return Monitor(self.qemu.transport(VM), vm=VM)  # connected by `with`

    def spec(self) -> GuestSpec:
        return GuestSpec()


def test_a_guest_vmckpt_did_not_start_never_gets_colo(store: Store) -> None:
    guest = MonitoredGuest(store, FakeQemu(version=(11, 1, 3)))
    choice = api.mechanism_of(guest)
    assert choice.mechanism == PRECOPY
    assert "COLO needs a guest whose QEMU vmckpt started" in choice.reason, choice.reason
    assert api.choose(guest, PRECOPY).mechanism == PRECOPY
    with pytest.raises(UsageError, match="COLO needs a guest whose QEMU vmckpt started"):
        api.choose(guest, COLO)


def test_a_libvirt_domain_gets_precopy_diff_with_the_one_line_reason_why_not_colo(
    store: Store,
) -> None:
    """Even on a QEMU that runs COLO: the reason is libvirt's, in one line, and names what
    would make COLO possible. Neither libvirt nor the domain is asked (none runs here), and
    `vmckpt list` shows the reason for a domain with a head in the store."""
    domain = LibvirtGuest(store, "vk-dom")
    choice = api.mechanism_of(domain)
    assert choice == Choice(PRECOPY, LIBVIRT_REFUSAL)
    assert "\n" not in choice.reason
    for why in ("libvirt", "resumes the guest after every checkpoint", "no API to hold a job"):
        assert why in choice.reason
    assert "`vmckpt restore` of its layer, or `vmckpt run`) on QEMU 11 gets colo" in choice.reason
    with pytest.raises(UsageError, match="COLO is refused here: libvirt domain: "):
        api.choose(domain, COLO)
    # A head of the domain in the store: `list` names it, with the reason (JSON and text).
    layer = store.write_layer(tiny_layer("vk-dom"))
    store.set_head("vk-dom", layer.id, kind="libvirt")
    listing = subprocess.run(
        [sys.executable, "-m", "vmckpt", "list", "--store", str(store.path), "--json"],
        capture_output=True, text=True, cwd=REPO, check=True, timeout=120,
    )  # fmt: skip
    rows = {row["name"]: row for row in json.loads(listing.stdout)["guests"]}
    assert rows["vk-dom"]["kind"] == "libvirt"
    assert rows["vk-dom"]["mechanism"] == PRECOPY
    assert rows["vk-dom"]["mechanism_reason"] == LIBVIRT_REFUSAL
    text = subprocess.run(
        [sys.executable, "-m", "vmckpt", "list", "--store", str(store.path)],
        capture_output=True, text=True, cwd=REPO, check=True, timeout=120,
    ).stdout  # fmt: skip
    assert f"vk-dom: not colo: {LIBVIRT_REFUSAL}\n" in text


def tiny_layer(guest: str) -> LayerContent:
    image = RamImage.zeroed([RamBlock("pc.ram", 4 * PAGE_SIZE)])
    image.pages_of("pc.ram")[1] = 7
    return LayerContent(
        parent=None, guest=guest, spec={"memory_mib": 1}, qemu_version="10.0.2",
        machine_type="pc-i440fx-10.0", mechanism=PRECOPY, ram_section=(2, 0, 4), stats={},
        ram=image, pages={"pc.ram": np.array([1], dtype=np.uint32)}, zeroed={},
        prelude=b"QEVM", epilogue=b"\x00",
    )  # fmt: skip


# -- status and refusals -------------------------------------------------------------------------


def test_a_stopped_guest_is_stopped_without_asking_qemu(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_monitor(*_args: Any, **_kwargs: Any) -> Monitor:
        raise AssertionError("a stopped guest's status asked a monitor")

    monkeypatch.setattr(Monitor, "unix", no_monitor)
    LocalGuest(store, VM, record(GuestSpec(), None)).save()
    status = LocalGuest(store, VM).status()
    assert status == GuestStatus(VM, "guest", "stopped", None, None)
    assert status.to_dict()["state"] == "stopped" and status.to_dict()["host"] == "local"
    # A record whose QEMU has gone (its PID ended) is stopped too.
    ended = subprocess.Popen(["true"])
    ended.wait()
    LocalGuest(store, "g2", GuestRecord("g2", GuestSpec(), process(tmp_path, ended.pid))).save()
    assert LocalGuest(store, "g2").status().state == "stopped"
    with pytest.raises(MachineError, match="is not running"):
        LocalGuest(store, "g2").process()


def test_a_running_guest_is_not_started_twice(
    store: Store, tmp_path: Path, stand_in: subprocess.Popen[bytes]
) -> None:
    LocalGuest(store, VM, record(GuestSpec(), process(tmp_path, stand_in.pid))).save()
    with pytest.raises(UsageError) as running:
        LocalGuest(store, VM).refuse_if_running()
    assert f"guest {VM} is running (PID {stand_in.pid}); stop it first" in str(running.value)
    # Stopped, gone, never recorded, or unreadable: nothing to refuse.
    LocalGuest(store, "stopped", record(GuestSpec(), None)).save()
    LocalGuest(store, "stopped").refuse_if_running()
    LocalGuest(store, "never").refuse_if_running()
    store.host.runtime_dir("broken").joinpath(RECORD).write_text('{"name": "broken"}')
    LocalGuest(store, "broken").refuse_if_running()
    stand_in.kill()
    stand_in.wait()
    LocalGuest(store, VM).refuse_if_running()


def test_the_console_of_a_stopped_guest_is_what_it_printed(store: Store) -> None:
    guest = LocalGuest(store, VM, record(GuestSpec(), None))
    with pytest.raises(MachineError, match="has no console output yet"):
        list(guest.console(follow=False))
    (store.host.runtime_dir(VM) / "serial.log").write_text("STATE seq=1\nSTATE seq=2\n")
    # Following a guest that does not run ends at the end of its log.
    assert "".join(guest.console(follow=True)) == "STATE seq=1\nSTATE seq=2\n"


def test_what_a_kind_of_guest_cannot_do_is_a_usage_error(store: Store) -> None:
    guest = Guest(store, VM)
    for call in (guest.spec, guest.monitor, guest.guard, guest.status, guest.stop):
        with pytest.raises(UsageError, match=f"guest {VM} \\(guest\\) "):
            call()
    with pytest.raises(UsageError, match="name a guest"):
        open_guest(store)
    with pytest.raises(UsageError):
        open_guest(store, "../etc")
    assert type(open_guest(store, VM)) is LocalGuest


# -- resume: a guest paused, or left half checkpointed by a vmckpt that died --------------------


def test_resume_runs_a_paused_guest(store: Store) -> None:
    qemu = FakeQemu(run_state="paused")
    assert MonitoredGuest(store, qemu).resume() is False
    assert qemu.running and qemu.commands().count("cont") == 1
    again = len(qemu.log)
    assert MonitoredGuest(store, qemu).resume() is False
    assert "cont" not in qemu.commands()[again:], "a running guest was sent cont"


def test_resume_recovers_a_checkpoint_a_dead_vmckpt_left(store: Store) -> None:
    qemu = FakeQemu(outcome=COMPLETED)
    found = (dict(qemu.capabilities), dict(qemu.parameters))
    journal = store.host.journal_path(VM, JOURNAL)
    mon = Monitor(qemu.transport(VM), vm=VM).connect()
    session = MigrationSession(mon, vm=VM, error=CheckpointError, capabilities={"events": True},
                               parameters={"downtime-limit": 50}, journal=journal)  # fmt: skip
    session.open()
    session.start("unix:/nowhere")
    session.wait()  # the guest is stopped: then its vmckpt is killed
    owner_dies(journal)
    assert qemu.run_state == "postmigrate"

    assert MonitoredGuest(store, qemu).resume() is True
    assert qemu.running
    assert (dict(qemu.capabilities), dict(qemu.parameters)) == found
    assert not journal.exists()
