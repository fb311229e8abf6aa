"""``vmckpt verify --boot``: a layer restored in a throw-away QEMU, watched, and judged alive
or not, for guests without a checksum protocol; and a restore refusing a guest that resets.

The guests are real systems in real states: Fiasco.OC's hello-cfg (a line a
second, nothing to check but that it goes on), Genode on QEMU's default
i440fx machine (it resets over and over), the Fiasco.OC ticker with 256 MiB
(it never prints a thing), and the Linux test guest told to crash its kernel
with a pvpanic device present (QEMU hears of the panic). The throw-away QEMU must
leave no trace: no guest in the store, no head moved, its PID gone, its
scratch directory removed.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.framework.guest import Vmckpt, guest_append, one_line_error, qemu_pids_of
from tests.framework.microkernel import SYSTEMS, fiasco_hello_image, fiasco_image, require
from vmckpt.errors import NotAliveError, RestoreError
from vmckpt.machine.qemu import process_start_time


def scratch_dirs() -> set[Path]:
    return set(Path("/tmp").glob("vmckpt-boot-*"))


def run_and_checkpoint(runner: Vmckpt, name: str, wait_s: float, *args: str) -> str:
    """Run a guest, let it run ``wait_s``, checkpoint it; the layer id."""
    runner.started.add(name)
    runner(
        "run", name, "--store", str(runner.store), "--create", "--accel", "tcg", "--detach",
        *args,
    )  # fmt: skip
    subprocess.run(["sleep", str(wait_s)], check=True)
    return str(runner.checkpoint(name)["layer"])


def verify_boot(runner: Vmckpt, layer: str, *extra: str) -> tuple[int, dict[str, object], str]:
    """`vmckpt verify --boot --json`: exit code, the boot report, stderr."""
    before = scratch_dirs()
    result = runner(
        "verify", "--store", str(runner.store), "--boot", layer, "--json", *extra, check=False
    )
    assert result.stdout, f"verify --boot printed no report: {result.stderr}"
    report = json.loads(result.stdout)["boot"]
    assert isinstance(report, dict)
    pid = int(report["pid"])
    assert process_start_time(pid) is None, f"the throw-away QEMU (PID {pid}) is still there"
    assert scratch_dirs() <= before, "the throw-away QEMU's scratch directory was left"
    return result.returncode, report, result.stderr


def test_fiasco_hello_layer_boots_alive_in_a_throw_away_qemu(microkernel_runner: Vmckpt) -> None:
    runner = microkernel_runner
    hello = require(fiasco_hello_image)
    layer = run_and_checkpoint(runner, "hello", 3, "--kernel", str(hello))
    heads_before = runner.listing()["guests"]

    code, report, stderr = verify_boot(runner, layer)
    assert code == 0, stderr
    assert report["verdict"] == "alive", report
    assert report["status"] == "running" and report["exited"] is False
    assert report["events"] == [], report["events"]
    # Hello World! once a second: four or more in five seconds, nothing from a new boot.
    lines = report["last_lines"]
    assert isinstance(lines, list) and lines, report
    assert all(line == "hello   | Hello World!" for line in lines), lines
    assert int(str(report["console_lines"])) >= 4, report

    # The store did not gain a guest, and the running original was not touched.
    assert runner.listing()["guests"] == heads_before
    assert runner.guest("hello").process().alive()
    text = runner("verify", "--store", str(runner.store), "--boot", layer, "--seconds", "2")
    assert "alive" in text.stdout and "| hello   | Hello World!" in text.stdout, text.stdout


def test_genode_multiboot_on_i440fx_layer_resets_so_verify_says_reset_and_restore_refuses_it(
    microkernel_runner: Vmckpt,
) -> None:
    runner = microkernel_runner
    # QEMU's default machine: bootstrap's timer calibration fails and the system reboots.
    # (The multiboot pair, not the ISO: a checkpoint taken while GRUB reads the CD-ROM
    # restores into a GRUB error, with QEMU's own migration as much as with vmckpt.)
    media = require(SYSTEMS["genode-multiboot"].media_args)
    layer = run_and_checkpoint(runner, "loop", 2, *media, "--cpu", "max")
    runner("stop", "loop", "--store", str(runner.store))

    code, report, stderr = verify_boot(runner, layer)
    assert code == NotAliveError.exit_code, stderr
    assert report["verdict"] == "reset", report
    events = report["events"]
    assert isinstance(events, list)
    assert sum(1 for e in events if e["event"] == "RESET") >= 2, events
    line = one_line_error(
        subprocess.CompletedProcess([], code, "", stderr), "not alive: reset", "RESET"
    )
    assert f"layer {layer}" in line

    # The same layer with QEMU told to end on a guest reset: the guest is dead.
    code, report, stderr = verify_boot(
        runner, layer, "--qemu-arg=-action", "--qemu-arg=reboot=shutdown"
    )
    assert code == NotAliveError.exit_code, stderr
    assert report["verdict"] == "dead", report
    assert report["exited"] is True, report

    # A restore that watches it (--watch; a lazy restore returns once the guest runs, else)
    # fails at once, in one line, and leaves no QEMU running.
    result = runner(
        "restore", "--store", str(runner.store), "--layer", layer, "--detach", "--watch", "1",
        check=False,
    )  # fmt: skip
    one_line_error(result, "failed at once (RESET", code=RestoreError.exit_code)
    assert not qemu_pids_of(runner.store)


def test_fiasco_with_too_little_memory_is_silent(microkernel_runner: Vmckpt) -> None:
    runner = microkernel_runner
    ticker = require(fiasco_image)
    layer = run_and_checkpoint(runner, "mute", 2, "--kernel", str(ticker), "--memory", "256M")
    runner("stop", "mute", "--store", str(runner.store))
    code, report, stderr = verify_boot(runner, layer, "--seconds", "3")
    assert code == NotAliveError.exit_code, stderr
    assert report["verdict"] == "silent", report
    assert report["console_bytes"] == 0 and report["status"] == "running", report
    assert "not alive: silent" in stderr


def test_verify_boot_options_are_checked(microkernel_runner: Vmckpt) -> None:
    runner = microkernel_runner
    runner("init", str(runner.store))
    for args, needle in (
        (["--qemu-arg=-S"], "--qemu-arg goes with --boot"),
        (["--boot", "--seconds", "0"], "--seconds must be above 0"),
    ):
        result = runner("verify", "--store", str(runner.store), *args, check=False)
        assert result.returncode == 2, result.stderr
        assert needle in result.stderr


def test_linux_guest_that_panics_after_restore_is_panicked(vmckpt: Vmckpt) -> None:
    """The Linux test guest (vmckpt gives it a pvpanic device) crashes its kernel on request
    (vmckpt.panic_after, guest/panic.sh); a layer taken before that panics once restored,
    and QEMU hears of it (GUEST_PANICKED)."""
    vmckpt.started.add("doomed")
    vmckpt(
        "run",
        "doomed",
        "--store",
        str(vmckpt.store),
        "--create",
        "--kernel",
        str(vmckpt.media / "vmlinuz"),
        "--initrd",
        str(vmckpt.media / "initrd.img"),
        "--append",
        guest_append(pages=4, buf_mb=64) + " vmckpt.panic_after=15",
        "--memory",
        "256M",
        "--accel",
        "tcg",
        "--detach",
    )  # fmt: skip  (vmckpt gives every guest on a PC machine a pvpanic device)
    vmckpt.wait_states("doomed", 3)
    layer = str(vmckpt.checkpoint("doomed")["layer"])
    assert "panicking" not in vmckpt.serial("doomed"), "the guest panicked before its checkpoint"
    vmckpt("stop", "doomed", "--store", str(vmckpt.store))

    code, report, stderr = verify_boot(vmckpt, layer, "--seconds", "40")
    assert code == NotAliveError.exit_code, stderr
    assert report["verdict"] == "panicked", report
    events = report["events"]
    assert isinstance(events, list)
    assert events[0]["event"] == "GUEST_PANICKED", events
    assert "not alive: panicked" in stderr
