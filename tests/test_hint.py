"""A silent or reboot-looping guest gets a hint from ``vmckpt run``, not a hang.

The first half builds the hint from written inputs (no guest boots): the
multiboot load end of kernels in each format, and which causes fit. The
second half runs the real systems in the real failure modes found by hand:
Fiasco.OC's ticker with 256 MiB (its bootstrap is linked at 256 MiB: it never
prints), Genode on QEMU's default machine and CPU (it reboots twice a second),
Genode on q35 with the default CPU; and a healthy system that gets no hint.
"""

from __future__ import annotations

import os
import re
import select
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.framework.guest import REPO, Vmckpt, qemu_pids_of, sigint_disposition, wait_for
from tests.framework.microkernel import SYSTEMS, fiasco_image, require
from vmckpt.machine.bootmedia import multiboot_load_end
from vmckpt.machine.diagnose import GuestFacts, hint_for
from vmckpt.machine.liveness import Observation
from vmckpt.machine.spec import BootMedium, GuestSpec

MULTIBOOT_FLAGS = 0x00000003
MIB = 1 << 20


def _multiboot_header(flags: int = MULTIBOOT_FLAGS) -> bytes:
    return struct.pack("<III", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF)


def elf32_kernel(path: Path, segments: list[tuple[int, int]]) -> Path:
    """An ELF32 multiboot kernel whose PT_LOAD segments are (physical address, memsz)."""
    phoff, phnum = 52, len(segments)
    header = bytearray(52)
    header[:7] = b"\x7fELF\x01\x01\x01"
    struct.pack_into("<HHIIIIIHHHHHH", header, 16, 2, 3, 1, 0, phoff, 0, 0, 52, 32, phnum, 0, 0, 0)
    table = b"".join(
        struct.pack("<8I", 1, 0x1000, paddr, paddr, 0, memsz, 7, 0x1000)
        for paddr, memsz in segments
    )
    body = bytes(header) + table
    path.write_bytes(body + bytes(0x100 - len(body) % 0x100) + _multiboot_header() + bytes(512))
    return path


def elf64_kernel(path: Path, paddr: int, memsz: int) -> Path:
    header = bytearray(64)
    header[:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<HHIQQQIHHHHHH", header, 16, 2, 62, 1, 0, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    entry = struct.pack("<IIQQQQQQ", 1, 7, 0x1000, paddr, paddr, 0, memsz, 0x1000)
    path.write_bytes(bytes(header) + entry + _multiboot_header() + bytes(512))
    return path


def aout_kludge_kernel(path: Path, load_end: int, bss_end: int) -> Path:
    flags = MULTIBOOT_FLAGS | 0x00010000
    fields = struct.pack("<5I", 0x100000, 0x100000, load_end, bss_end, 0x100000)
    path.write_bytes(bytes(32) + _multiboot_header(flags) + fields + bytes(512))
    return path


def test_multiboot_load_end_of_elf32_elf64_and_aout_kludge(tmp_path: Path) -> None:
    fiasco_like = elf32_kernel(
        tmp_path / "k32", [(0x2D0000, 0xFD30000), (0x10000000, 0x4000), (0x1000F000, 0x207AA7)]
    )
    assert multiboot_load_end(fiasco_like) == 0x1000F000 + 0x207AA7
    assert multiboot_load_end(elf64_kernel(tmp_path / "k64", 0x200000, 0x300000)) == 0x500000
    kludge = aout_kludge_kernel(tmp_path / "aout", 0x180000, 0x1C0000)
    assert multiboot_load_end(kludge) == 0x1C0000
    linux = REPO / "guest" / "build" / "vmlinuz"
    if linux.is_file():
        assert multiboot_load_end(linux) is None, "a Linux kernel has no multiboot load end"
    not_elf = tmp_path / "raw"
    not_elf.write_bytes(bytes(64) + _multiboot_header() + bytes(64))
    assert multiboot_load_end(not_elf) is None


SILENT = Observation(seconds=5.0, status="running")
LOOPING = Observation(
    seconds=1.3,
    events=(("RESET", "guest-reset", 0.63), ("RESET", "guest-reset", 0.65), ("RESET", "", 1.3)),
    status="running",
    console_bytes=800,
    console_lines=12,
    last_output_s=1.2,
)
DEFAULTS = GuestFacts("pc-i440fx-10.0", "qemu64", ("popcnt", "ssse3", "sse4.1", "sse4.2"))
GENODE_OK = GuestFacts("pc-q35-10.0", "max", ())


def _kernel_spec(kernel: Path, memory_mib: int, append: str = "") -> GuestSpec:
    return GuestSpec(memory_mib=memory_mib, media=(BootMedium.of("kernel", kernel),), append=append)


def test_fiasco_like_kernel_above_the_ram_is_the_likely_cause(tmp_path: Path) -> None:
    kernel = elf32_kernel(tmp_path / "bootstrap", [(0x10000000, 0x216AA7)])
    hint = hint_for(_kernel_spec(kernel, 256), SILENT, DEFAULTS)
    assert hint is not None
    assert "printed nothing on its console in 5.0 s" in hint.problem
    assert len(hint.likely) == 1
    assert "loads up to 258.1 MiB, above the guest's 256 MiB" in hint.likely[0]
    assert "--memory 512M" in hint.likely[0]
    # With enough RAM the same kernel is ruled out as a cause.
    roomy = hint_for(_kernel_spec(kernel, 512), SILENT, GENODE_OK)
    assert roomy is not None and not roomy.likely and not roomy.possible
    assert any("512 MiB holds the kernel" in line for line in roomy.ruled_out)
    assert "none of the causes vmckpt can check fits" in "\n".join(roomy.lines())


def test_genode_like_reboot_loop_names_machine_and_cpu(tmp_path: Path) -> None:
    kernel = elf32_kernel(tmp_path / "bender", [(0x180000, 0x80000)])
    hint = hint_for(_kernel_spec(kernel, 512), LOOPING, DEFAULTS)
    assert hint is not None
    assert "3 guest resets (RESET events) in 1.3 s" in hint.problem
    text = "\n".join(hint.lines())
    assert "possible cause: machine type pc-i440fx-10.0" in text and "--machine q35" in text
    assert "possible cause: CPU model qemu64 (QEMU's default) lacks x86-64-v2" in text
    assert "--cpu max" in text
    q35 = hint_for(
        _kernel_spec(kernel, 512), LOOPING, GuestFacts("pc-q35-10.0", "qemu64", ("popcnt",))
    )
    assert q35 is not None and len(q35.possible) == 1 and "CPU model" in q35.possible[0]
    assert "machine type pc-q35-10.0" in q35.ruled_out


def test_linux_without_serial_console_and_guests_that_need_no_hint(tmp_path: Path) -> None:
    linux = REPO / "guest" / "build" / "vmlinuz"
    if not linux.is_file():
        pytest.fail("guest/build/vmlinuz missing: run `make -C guest`", pytrace=False)
    hint = hint_for(_kernel_spec(linux, 256, "quiet"), SILENT, GENODE_OK)
    assert hint is not None and "console=ttyS0" in hint.likely[0]
    assert hint_for(_kernel_spec(linux, 256, "console=ttyS0"), SILENT, GENODE_OK) is not None
    talking = Observation(5.0, status="running", console_bytes=400, last_output_s=4.9)
    assert hint_for(_kernel_spec(linux, 256, "console=ttyS0"), talking, DEFAULTS) is None
    # One reboot that SeaBIOS turns into two RESET events is no loop.
    one_reset = Observation(
        5.0, (("RESET", "", 1.0), ("RESET", "", 1.02)), status="running", console_bytes=9
    )
    assert hint_for(_kernel_spec(linux, 256), one_reset, DEFAULTS) is None
    gone = Observation(0.5, exited=True)
    assert hint_for(_kernel_spec(linux, 256), gone, None) is None


# -- with QEMU ----------------------------------------------------------------------------


def _run(runner: Vmckpt, name: str, *args: str) -> str:
    """What `run --detach` says on stderr (the guest is stopped afterwards)."""
    runner.started.add(name)
    result = runner(
        "run", name, "--store", str(runner.store), "--create", "--accel", "tcg", "--detach", *args
    )
    runner("stop", name, "--store", str(runner.store))
    return result.stderr


def _media(system: str) -> list[str]:
    return require(SYSTEMS[system].media_args)


SILENT_FOR = re.compile(
    r"vmckpt run: hint: the guest printed nothing on its console in ([0-9.]+) s "
    r"\(QEMU's run state: running\)"
)


def _silent_for(text: str) -> float:
    """How long the hint says the guest was silent: --hint-after, or a little more (the
    watch ends at its first poll past it, later on a busy host)."""
    found = SILENT_FOR.search(text)
    assert found is not None, text
    return float(found.group(1))


def test_fiasco_with_256m_gets_the_memory_hint(microkernel_runner: Vmckpt) -> None:
    stderr = _run(
        microkernel_runner, "mute", *_media("fiasco"), "--memory", "256M", "--hint-after", "3s"
    )
    first = stderr.strip().splitlines()[0]
    assert SILENT_FOR.fullmatch(first) and _silent_for(first) >= 3.0, stderr
    assert (
        f"likely cause: memory: the multiboot kernel {fiasco_image()} loads up to 258.1 MiB"
        in stderr
    )
    assert "try --memory 512M" in stderr


def test_genode_on_default_machine_and_cpu_gets_both_hints_early(
    microkernel_runner: Vmckpt,
) -> None:
    stderr = _run(microkernel_runner, "loop", *_media("genode-multiboot"), "--hint-after", "20s")
    assert "guest resets (RESET events) in" in stderr, stderr
    assert "reboot over and over" in stderr
    assert "possible cause: machine type pc-i440fx-" in stderr
    assert "possible cause: CPU model qemu64 (QEMU's default) lacks x86-64-v2" in stderr
    # The watch ended at the resets, not at its 20 s: the hint says how long it watched
    # (the command's own run time would also count Python's and QEMU's start on a busy host).
    watched = re.search(r"guest resets \(RESET events\) in ([0-9.]+) s", stderr)
    assert watched is not None and float(watched.group(1)) < 20, stderr

    stderr = _run(
        microkernel_runner, "loopq35", *_media("genode-multiboot"), "--machine", "q35",
        "--hint-after", "5s",
    )  # fmt: skip
    assert "possible cause: CPU model qemu64" in stderr, stderr
    assert "possible cause: machine type" not in stderr
    ruled_out = [line for line in stderr.splitlines() if "ruled out:" in line]
    assert ruled_out and "machine type pc-q35-" in ruled_out[0], stderr


def test_genode_as_it_needs_to_run_gets_no_hint(microkernel_runner: Vmckpt) -> None:
    args = require(SYSTEMS["genode-multiboot"].run_args)
    stderr = _run(microkernel_runner, "genode", *args, "--hint-after", "3s")
    assert stderr == "", stderr
    # --detach without --hint-after returns without watching: this guest stays silent, so a
    # watch would have ended in the memory hint (its run time is no measure on a busy host).
    stderr = _run(microkernel_runner, "quick", *_media("fiasco"), "--memory", "256M")
    assert stderr == "", stderr


def test_fiasco_in_the_foreground_gets_the_hint_by_default(microkernel_runner: Vmckpt) -> None:
    """`vmckpt run` without --detach follows the console and hints after 5 s; a Ctrl-C (SIGINT
    to the vmckpt we started) stops the guest. The run starts with SIGINT ignored, as it
    does whenever the tests run in a script's background job (every process such a job
    starts inherits that): the foreground run's own handlers take the signal anyway. Before
    they did, this test timed out there, whatever the load."""
    runner = microkernel_runner
    runner("init", str(runner.store))
    runner.started.add("fg")
    command = [
        sys.executable, "-m", "vmckpt", "run", "fg", "--store", str(runner.store),
        *_media("fiasco"), "--memory", "256M", "--accel", "tcg",
    ]  # fmt: skip
    # Started as a background job of a script would start it: SIGINT inherited ignored
    # (vmckpt run must still stop on it).
    with sigint_disposition(ignored=True):
        vmckpt = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ)
        )
    try:
        assert vmckpt.stderr is not None
        pipe = vmckpt.stderr.fileno()
        # poll, not select: the test process may hold more than select's 1024 descriptors.
        readable = select.poll()
        readable.register(pipe, select.POLLIN | select.POLLHUP)
        said = bytearray()

        def hinted() -> bool:
            if readable.poll(0):
                chunk = os.read(pipe, 4096)
                assert chunk, f"vmckpt run ended before its hint: {bytes(said)!r}"
                said.extend(chunk)
            return b"likely cause: memory" in said

        wait_for(hinted, "the memory hint on vmckpt run's stderr", 30, evidence=lambda: said)
        stderr = bytes(said)
        assert _silent_for(stderr.decode()) >= 5.0, stderr
        assert b"likely cause: memory" in stderr, stderr
        vmckpt.send_signal(signal.SIGINT)
        out, _ = vmckpt.communicate(timeout=30)
    finally:
        if vmckpt.poll() is None:
            vmckpt.kill()
            vmckpt.wait()
    assert b"guest fg running" in out and b"guest fg stopped" in out, out
    assert not qemu_pids_of(runner.store), "the foreground run left its QEMU running"
