"""A microkernel guest: GNU Mach (Debian's i386 image) with this project's bootstrap task.

The kernel is a multiboot kernel; the bootstrap task is its one boot module,
given as a GNU Mach boot-script line (``$(task-create) $(task-resume)``). The
task keeps the same kind of self-checking state as the Linux test guest and
prints STATE lines through Mach's device interface, so the zdtm-style checks
of the foundation apply unchanged: three checkpoints, restore from the
middle layer, the workload continues with the original run's checksums.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.framework.guest import GUEST_BUILD, REPO, Taken, Vmckpt, assert_continues, take


@pytest.fixture(scope="session")
def mach_images() -> tuple[Path, Path]:
    """GNU Mach and the bootstrap task, built by `make -C guest mach`."""
    subprocess.run(["make", "-s", "-C", str(REPO / "guest"), "mach"], check=True)
    kernel, bootstrap = GUEST_BUILD / "gnumach", GUEST_BUILD / "mach-bootstrap"
    assert kernel.is_file() and bootstrap.is_file(), "make -C guest mach built nothing"
    return kernel, bootstrap


def test_gnumach_chain_restore_from_middle(
    vmckpt: Vmckpt, mach_images: tuple[Path, Path], tmp_path: Path
) -> None:
    kernel = tmp_path / "gnumach"
    bootstrap = tmp_path / "bootstrap"
    shutil.copy(mach_images[0], kernel)
    shutil.copy(mach_images[1], bootstrap)
    module = f"{bootstrap} ${{device-port}} pages=4 hz=10 $(task-create) $(task-resume)"
    vmckpt.started.add("mach")
    vmckpt(
        "run", "mach", "--store", str(vmckpt.store), "--create",
        "--kernel", str(kernel), "--initrd", module, "--append", "console=com0",
        "--memory", "256M", "--accel", "tcg", "--detach",
    )  # fmt: skip
    vmckpt.wait_states("mach", 5)
    console = vmckpt.serial("mach")
    assert "GNU Mach" in console and "VMCKPT-MACH up" in console, console[-2000:]

    taken: list[Taken] = []
    for _ in range(3):
        taken.append(take(vmckpt, "mach"))
        vmckpt.wait_states("mach", len(vmckpt.states("mach")) + 5)
    original = vmckpt.states("mach")
    assert "BAD" not in vmckpt.serial("mach")
    vmckpt("stop", "mach", "--store", str(vmckpt.store))

    layer = json.loads(
        vmckpt("inspect", "--store", str(vmckpt.store), taken[1].layer, "--json").stdout
    )
    media = [(m["role"], m["path"], m["args"]) for m in layer["spec"]["media"]]
    assert media == [
        ("kernel", str(kernel), ""),
        ("module", str(bootstrap), "${device-port} pages=4 hz=10 $(task-create) $(task-resume)"),
    ]

    vmckpt.restore("--layer", taken[1].layer, "--name", "mach")
    restored = vmckpt.wait_states("mach", 10)
    assert_continues(restored, original, taken[1])
    assert "GNU Mach" not in vmckpt.serial("mach"), "the restored guest booted again"
    vmckpt("stop", "mach", "--store", str(vmckpt.store))

    # The boot module is checked on its own: a changed bootstrap task is refused.
    with bootstrap.open("ab") as handle:
        handle.write(b"\0")
    result = vmckpt("restore", "--store", str(vmckpt.store), "--layer", taken[1].layer, check=False)
    assert result.returncode != 0
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert f"module {bootstrap} changed since the checkpoint" in error, error
