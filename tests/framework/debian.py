"""The Debian test guest (guest/debian: Debian 12 with systemd on a qcow2 root disk, its
counter service checking its disk against its memory each second, qemu-guest-agent), built
with debootstrap from this machine's Debian mirror when it is not built or its recipe
changed, and what the tests read from its console."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.framework.guest import GUEST_BUILD, Vmckpt, tail, wait_for
from vmckpt.qmp.agent import channel_open

DEBIAN_BUILD = GUEST_BUILD / "debian"
# "COUNTER n=5 ok t=1765030000": the count, and the guest's clock (seconds since the epoch).
COUNTER_LINE = re.compile(r"COUNTER n=(\d+) ok")
CLOCK_LINE = re.compile(r"COUNTER n=(\d+) ok t=(\d+)")
# Lines the Debian guest's console may trail its counter service by (journald in between)
# on a loaded host, plus one torn at the instant.
CONSOLE_LAG_LINES = 4


def debian_build() -> Path:
    """The built guest (vmlinuz, initrd.img, root.qcow2): build.sh returns at once when it
    is up to date."""
    subprocess.run(
        ["sh", str(GUEST_BUILD.parent / "debian" / "build.sh"), str(DEBIAN_BUILD)],
        check=True, capture_output=True, timeout=1800,
    )  # fmt: skip
    return DEBIAN_BUILD


def counters(serial: Path, offset: int = 0) -> list[int]:
    text = serial.read_text(errors="replace")[offset:] if serial.exists() else ""
    assert "COUNTERBAD" not in text, tail(text)
    return [int(n) for n in COUNTER_LINE.findall(text)]


def clocks(serial: Path, offset: int = 0) -> list[tuple[int, int]]:
    """(count, the guest's clock) of each counter line."""
    text = serial.read_text(errors="replace")[offset:] if serial.exists() else ""
    return [(int(n), int(t)) for n, t in CLOCK_LINE.findall(text)]


def wait_counters(serial: Path, count: int, offset: int = 0, timeout: float = 300) -> list[int]:
    return wait_for(
        lambda: found if len(found := counters(serial, offset)) >= count else None,
        f"{serial.name}: {count} COUNTER lines", timeout,
        evidence=lambda: tail(serial.read_text(errors="replace")[offset:]),
    )  # fmt: skip


def agent_opened(vmckpt: Vmckpt, name: str) -> bool:
    """Whether the guest's qemu-ga has opened its channel (QEMU's ``frontend-open`` of the
    agent's chardev, what a restore reads from the layer's device state)."""
    with vmckpt.monitor(name) as mon:
        return channel_open(mon.execute("query-chardev"))


def wait_agent(vmckpt: Vmckpt, name: str, timeout: float = 300) -> None:
    """Wait until the guest's agent runs: udev starts qemu-ga when its port appears, which on
    a loaded host can be seconds after the counter service's first lines."""
    wait_for(lambda: agent_opened(vmckpt, name), f"guest {name}: qemu-ga opened its channel",
             timeout, evidence=lambda: tail(vmckpt.serial(name)))  # fmt: skip
