"""Why a guest that was just started says nothing, or keeps resetting: the causes vmckpt can
check, said as a hint (``vmckpt run``).

A guest that boots into silence looks like a hang; one in a reboot loop
looks busy. Both are usually a mismatch between what the system needs and
what QEMU emulates, and some of those can be checked from outside without
touching the guest:

- the machine type: QEMU's default ``pc`` is the i440FX; some systems need
  ``q35`` (Genode on base-hw: its timer calibration fails on i440FX and it
  reboots);
- the CPU model: QEMU's default ``qemu64`` lacks x86-64-v2 (SSSE3, SSE4.1/4.2,
  POPCNT); systems built for it (Genode 26.02) stop or reboot right after their
  boot loader; the vCPU's features are asked from QEMU itself;
- the memory size for the image kind: a multiboot kernel linked above the
  guest's RAM (Fiasco.OC's bootstrap is linked at 256 MiB) loads into nothing;
- a Linux kernel without ``console=ttyS0`` logs on the screen, which vmckpt
  does not show.

:func:`probe_facts` asks the running QEMU (through the typed Monitor);
:func:`hint_for` is plain logic over the spec, the facts and an
:class:`~vmckpt.machine.liveness.Observation`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vmckpt.machine.bootmedia import is_multiboot, multiboot_load_end
from vmckpt.machine.liveness import Observation
from vmckpt.machine.spec import GuestSpec
from vmckpt.qmp import Monitor

# x86-64-v2, as QEMU names the features (QOM properties of an x86 vCPU).
X86_64_V2 = ("cx16", "lahf-lm", "popcnt", "pni", "ssse3", "sse4.1", "sse4.2")
# This many RESET events in the watch make a reboot loop. One reboot can show as two: SeaBIOS
# answers a warm reset with a hard one of its own (seen as pairs 20-30 ms apart).
REPEATED_RESETS = 3


@dataclass(frozen=True)
class GuestFacts:
    """What the running QEMU emulates for the guest."""

    machine_type: str  # e.g. pc-i440fx-10.0
    cpu_model: str  # e.g. qemu64
    cpu_missing: tuple[str, ...]  # the x86-64-v2 features the vCPU lacks


def probe_facts(mon: Monitor) -> GuestFacts:
    """Ask QEMU for the machine type and the first vCPU's model and x86-64-v2 features."""
    path, model = mon.cpu_model()
    flags = mon.cpu_flags(path, X86_64_V2)
    return GuestFacts(
        machine_type=mon.machine_type(),
        cpu_model=model,
        cpu_missing=tuple(name for name in X86_64_V2 if flags.get(name) is False),
    )


@dataclass(frozen=True)
class Hint:
    """A guest that looks stuck, the causes that fit, what was ruled out.

    ``likely``: a check that failed outright (a kernel above the RAM); ``possible``: a
    setting some systems cannot run with (QEMU's default machine and CPU)."""

    problem: str
    likely: tuple[str, ...]
    possible: tuple[str, ...]
    ruled_out: tuple[str, ...]

    def lines(self) -> list[str]:
        out = [self.problem]
        out += [f"likely cause: {cause}" for cause in self.likely]
        out += [f"possible cause: {cause}" for cause in self.possible]
        if not self.likely and not self.possible:
            out.append(
                "none of the causes vmckpt can check fits: the guest may log elsewhere than "
                "the first serial port, or only later"
            )
        if self.ruled_out:
            out.append(f"ruled out: {'; '.join(self.ruled_out)}")
        return out


def _mib(value: int) -> str:
    return f"{value / (1 << 20):.1f} MiB"


def _memory_advice(end: int) -> int:
    """The smallest power of two of MiB that holds ``end`` with some room (at least 64 MiB)."""
    mib = 64
    while mib << 20 < end + (16 << 20):
        mib *= 2
    return mib


def hint_for(spec: GuestSpec, observation: Observation, facts: GuestFacts | None) -> Hint | None:
    """A hint if the guest printed nothing on its console, or QEMU reported repeated resets;
    None if it looks fine (or is gone: QEMU's own words say more then)."""
    resets = observation.count("RESET")
    if observation.exited:
        return None
    if resets >= REPEATED_RESETS:
        problem = (
            f"QEMU reported {resets} guest resets (RESET events) in {observation.seconds:.1f} s: "
            "the guest seems to reboot over and over"
        )
    elif observation.console_bytes == 0:
        problem = (
            f"the guest printed nothing on its console in {observation.seconds:.1f} s "
            f"(QEMU's run state: {observation.status or 'unknown'})"
        )
    else:
        return None
    certain: list[str] = []
    possible: list[str] = []
    fine: list[str] = []

    kernel = spec.medium("kernel")
    if kernel is not None and Path(kernel.path).is_file():
        if is_multiboot(kernel.path):
            end = multiboot_load_end(kernel.path)
            memory = spec.memory_mib << 20
            if end is not None and end > memory:
                certain.append(
                    f"memory: the multiboot kernel {kernel.path} loads up to {_mib(end)}, above "
                    f"the guest's {spec.memory_mib} MiB of RAM, so it never starts: try "
                    f"--memory {_memory_advice(end)}M"
                )
            elif end is not None:
                fine.append(f"memory ({spec.memory_mib} MiB holds the kernel, up to {_mib(end)})")
        elif "console=ttyS" not in spec.append:
            certain.append(
                "console: a Linux kernel without console=ttyS0 in --append logs on the screen, "
                "which vmckpt does not show"
            )
    if facts is not None:
        if facts.machine_type.startswith("pc-i440fx") or facts.machine_type == "pc":
            possible.append(
                f"machine type {facts.machine_type} (i440FX, QEMU's default): systems that need "
                "q35 do not boot on it (Genode on base-hw reboots: its timer calibration "
                "fails): try --machine q35"
            )
        else:
            fine.append(f"machine type {facts.machine_type}")
        if facts.cpu_missing:
            default = "" if spec.cpu else " (QEMU's default)"
            possible.append(
                f"CPU model {facts.cpu_model}{default} lacks x86-64-v2 "
                f"({', '.join(facts.cpu_missing)}): systems built for it (Genode 26.02) stop or "
                "reboot right after their boot loader: try --cpu max"
            )
        else:
            fine.append(f"CPU model {facts.cpu_model} (x86-64-v2)")
    return Hint(problem, tuple(certain), tuple(possible), tuple(fine))
