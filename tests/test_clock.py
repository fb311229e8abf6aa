"""A restore steps the guest's clock to now through QEMU's guest agent.

vmckpt gives the guests it starts a channel for the agent; the Debian test guest runs
qemu-guest-agent on it and prints its clock on each counter line. Restored, lazily and in
full, from a layer taken many seconds earlier, it reads the host's time, not the
checkpoint's. (The busybox test guest has the channel but no agent: tests/test_lazy.py
checks that restore says so.)
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tests.framework.debian import clocks, counters, debian_build, wait_agent, wait_counters
from tests.framework.guest import Vmckpt

pytestmark = [pytest.mark.qemu]

# How far the guest's clock may trail the host's when its line is read: the line is
# printed each second, and the console trails the service (journald) on a busy host.
TRAIL_S = 8
# Counter lines the original prints after the checkpoint before it is stopped: the
# checkpoint's instant is then at least this many seconds behind, more than TRAIL_S.
GAP_LINES = 14


@pytest.fixture(scope="module")
def debian_guest() -> Path:
    return debian_build()


def guest_clock_now(vmckpt: Vmckpt, name: str, offset: int) -> tuple[int, float]:
    """The guest's clock on the third counter line it prints after ``offset``, and the
    host's when that line was read."""
    serial = vmckpt.runtime(name) / "serial.log"
    wait_counters(serial, 3, offset, timeout=300)
    read = time.time()
    return clocks(serial, offset)[2][1], read


def test_a_restored_guest_with_an_agent_has_its_clock_stepped_to_now(
    vmckpt: Vmckpt, debian_guest: Path, tmp_path: Path
) -> None:
    root = tmp_path / "root.qcow2"
    shutil.copy(debian_guest / "root.qcow2", root)
    store = str(vmckpt.store)
    vmckpt.started.add("deb")
    vmckpt(
        "run", "deb", "--store", store, "--create",
        "--kernel", str(debian_guest / "vmlinuz"), "--initrd", str(debian_guest / "initrd.img"),
        "--append", "root=/dev/vda rw console=ttyS0 quiet", "--memory", "1G",
        "--accel", "tcg", "--disk", str(root), "--detach",
    )  # fmt: skip
    serial = vmckpt.runtime("deb") / "serial.log"
    wait_counters(serial, 3, timeout=600)
    # A layer taken before qemu-ga opened its channel restores with no agent, rightly.
    wait_agent(vmckpt, "deb")
    layer = vmckpt.checkpoint("deb")["layer"]
    taken = time.time()
    wait_counters(serial, len(counters(serial)) + GAP_LINES)
    vmckpt("stop", "deb", "--store", store)

    for how in ("--lazy", "--no-lazy"):
        restored = json.loads(vmckpt.restore("--layer", str(layer), "--name", "deb2", how).stdout)
        assert "clock stepped to now by the guest agent" in restored["notes"], restored
        clock, host = guest_clock_now(vmckpt, "deb2", 0)
        assert host - clock <= TRAIL_S and clock <= host + 1, (how, clock, host, taken)
        # Not stepped, it would read the checkpoint's instant plus the seconds it ran since.
        assert host - taken > GAP_LINES > TRAIL_S
        vmckpt("stop", "deb2", "--store", store)
