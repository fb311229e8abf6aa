"""Machine type and CPU model as part of the guest spec: recorded, validated, used on restore.

A layer's spec is an input from a store (vmckpt/machine/spec.py): the machine and CPU
fields reach QEMU's command line, so anything that is not a plain name (with
CPU features) is refused before it is used. The QEMU tests show the fields in
real layers (tests/test_microkernels.py: Genode's ``--machine q35 --cpu max``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.framework.guest import LEAKS_SHOWN, REPO, Vmckpt, one_line_error, qemu_pids_of
from tests.framework.mechanisms import Mechanism, qemu11
from vmckpt.cli import main
from vmckpt.errors import MachineError, RestoreError, UsageError
from vmckpt.machine.qemu import Launch, QemuProcess, command_line
from vmckpt.machine.spec import GuestSpec


def _line(spec: GuestSpec, tmp_path: Path, machine_type: str | None = None) -> list[str]:
    launch = Launch(name="g", accel="tcg", serial_log=tmp_path / "s", machine_type=machine_type)
    return command_line(spec, launch, binary="qemu", qemu_major=10, qmp_fds=(3,))


def test_machine_and_cpu_round_trip_through_a_layer_spec(tmp_path: Path) -> None:
    spec = GuestSpec(machine="q35", cpu="qemu64,+ssse3,+sse4.2,-x2apic,level=13")
    again = GuestSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    assert (again.machine, again.cpu) == ("q35", "qemu64,+ssse3,+sse4.2,-x2apic,level=13")


def test_command_line_uses_the_layers_exact_machine_type_and_the_cpu(tmp_path: Path) -> None:
    spec = GuestSpec(machine="q35", cpu="max")
    line = _line(spec, tmp_path)
    assert line[line.index("-machine") + 1] == "q35"
    assert line[line.index("-cpu") + 1] == "max"
    # On restore the layer's versioned type replaces the alias the guest was run with.
    line = _line(spec, tmp_path, machine_type="pc-q35-10.0")
    assert line[line.index("-machine") + 1] == "pc-q35-10.0"
    assert line.count("-machine") == 1
    assert "-cpu" not in _line(GuestSpec(), tmp_path), "QEMU's default CPU: no -cpu at all"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("machine", "q35,accel=kvm"),
        ("machine", "q35 -bios x"),
        ("machine", "-q35"),
        ("machine", ""),
        ("cpu", "max -device x"),
        ("cpu", "max,,x"),
        ("cpu", "max,+sse4.2;x"),
        ("cpu", "-max"),
        ("cpu", "max,file=/etc/passwd,x"),
    ],
)
def test_stored_machine_or_cpu_with_option_syntax_is_refused(field: str, value: str) -> None:
    data = json.loads(json.dumps(GuestSpec().to_dict()))  # as stored: lists, not tuples
    data[field] = value
    what = {"machine": "machine type", "cpu": "CPU model"}[field]
    with pytest.raises(MachineError, match=f"stored guest spec is not valid: {what} "):
        GuestSpec.from_dict(data)


GUID = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


def test_a_generation_id_round_trips_and_reaches_the_command_line(tmp_path: Path) -> None:
    spec = GuestSpec(generation_id=GUID)
    assert GuestSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    line = _line(spec, tmp_path)
    assert line[line.index(f"vmgenid,id=vmckpt-genid,guid={GUID}") - 1] == "-device"
    # A spec of an older vmckpt has none: no device, and a new identity keeps it so.
    assert not any("vmgenid" in arg for arg in _line(GuestSpec(), tmp_path))
    assert GuestSpec().with_new_identity().generation_id == ""
    fresh = spec.with_new_identity().generation_id
    assert fresh != GUID and re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", fresh)


def test_the_guest_agent_channel_round_trips_and_reaches_the_command_line(tmp_path: Path) -> None:
    spec = GuestSpec(guest_agent=True)
    assert GuestSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    launch = Launch(name="g", accel="tcg", serial_log=tmp_path / "s")
    line = command_line(spec, launch, binary="qemu", qemu_major=10, qmp_fds=(3,), agent_fd=9)
    assert "socket,id=vmckpt-qga,fd=9,server=on,wait=off" in line
    port = "virtserialport,bus=vmckpt-vser.0,chardev=vmckpt-qga,name=org.qemu.guest_agent.0"
    assert line[line.index(port) - 1] == "-device"
    assert "null,id=vmckpt-qga" in _line(spec, tmp_path)  # no host end: the device is there
    # A spec of an older vmckpt has none (and a stored value that is not true gives none).
    assert not any("vmckpt-qga" in arg for arg in _line(GuestSpec(), tmp_path))
    for stored in ("yes", 1, None):
        data = {**json.loads(json.dumps(spec.to_dict())), "guest_agent": stored}
        assert GuestSpec.from_dict(data).guest_agent is False


@pytest.mark.parametrize(
    "value", [GUID.upper(), GUID + "\n", GUID[:-1], "auto,x=1", f"{GUID},file=/x", 7]
)
def test_a_stored_generation_id_that_is_no_guid_is_refused(value: object) -> None:
    data = json.loads(json.dumps(GuestSpec().to_dict()))  # as stored: lists, not tuples
    data["generation_id"] = value
    with pytest.raises(MachineError, match=r"VM generation ID .* is not a GUID"):
        GuestSpec.from_dict(data)


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [
        ("--machine", "q35,accel=kvm", "machine type 'q35,accel=kvm'"),
        ("--cpu", "max -bios x", "CPU model 'max -bios x'"),
    ],
)
def test_run_refuses_machine_or_cpu_with_option_syntax(
    option: str, value: str, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    kernel = REPO / "guest" / "build" / "vmlinuz"
    if not kernel.is_file():
        pytest.fail("guest/build/vmlinuz missing: run `make -C guest`", pytrace=False)
    code = main(["run", "g", "--store", "/nonexistent/st", "--kernel", str(kernel), option, value])
    assert code == UsageError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_qemu_log_tail_shows_only_the_last_life(tmp_path: Path) -> None:
    log = tmp_path / "qemu.log"
    log.write_text(
        '+ qemu -machine nosuch\nqemu: unsupported machine type: "nosuch"\n'
        "Use -machine help to list supported machines\n"
        "+ qemu -cpu nosuch\nqemu: unable to find CPU model 'nosuch'\n"
    )
    process = QemuProcess("g", 1, 0, tmp_path / "q.sock", tmp_path / "s", log)
    assert process.log_tail() == "qemu: unable to find CPU model 'nosuch'"
    log.write_text(log.read_text() + "+ qemu\n")
    assert process.log_tail() == "(QEMU printed nothing)"


# -- with QEMU ----------------------------------------------------------------------------


def test_machine_type_qemu_lacks_is_refused_in_one_line(vmckpt: Vmckpt) -> None:
    """A QEMU that refuses to start is one line on stderr, and nothing else: the QMP
    connections tried meanwhile leave no event loop for the garbage collector (LEAKS_SHOWN
    makes one say so every time; left alone, its finalizer printed a 25-line traceback
    whenever the collector reached the loop after its socket)."""
    result = vmckpt(
        "run", "g", "--store", str(vmckpt.store), "--create",
        "--kernel", str(vmckpt.media / "vmlinuz"), "--machine", "nosuch-1.0", "--detach",
        check=False, env=LEAKS_SHOWN,
    )  # fmt: skip
    one_line_error(result, 'unsupported machine type: "nosuch-1.0"', code=MachineError.exit_code)
    result = vmckpt(
        "run", "g", "--store", str(vmckpt.store),
        "--kernel", str(vmckpt.media / "vmlinuz"), "--cpu", "nosuch", "--detach",
        check=False, env=LEAKS_SHOWN,
    )  # fmt: skip
    line = one_line_error(result, "unable to find CPU model 'nosuch'", code=MachineError.exit_code)
    assert "nosuch-1.0" not in line, "the previous start's complaint leaked into this one"


@pytest.mark.qemu11
def test_layer_of_a_newer_qemu_is_refused_before_anything_starts(vmckpt: Vmckpt) -> None:
    newer = Mechanism("precopy-diff", qemu=qemu11(), qemu_major=11).env()
    vmckpt.run_guest("g", env=newer)
    out = vmckpt("checkpoint", "g", "--store", str(vmckpt.store), "--json", env=newer).stdout
    layer = str(json.loads(out)["layer"])
    vmckpt("stop", "g", "--store", str(vmckpt.store))
    machine_type = json.loads(
        vmckpt("inspect", "--store", str(vmckpt.store), layer, "--json").stdout
    )["machine_type"]
    assert machine_type.startswith("pc-i440fx-11.")
    result = vmckpt(
        "restore", "--store", str(vmckpt.store), "--layer", layer, "--detach", check=False
    )
    one_line_error(
        result, f"machine type {machine_type}", "QEMU 10.", "restore it with QEMU 11.",
        code=RestoreError.exit_code,
    )  # fmt: skip
    assert not qemu_pids_of(vmckpt.store), "a QEMU was started for a layer it cannot load"
    # The QEMU that took it restores it.
    vmckpt.restore("--layer", layer, "--name", "g", env=newer)
    assert vmckpt.guest("g").process().alive()
