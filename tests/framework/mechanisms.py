"""The checkpoint mechanisms a test can run a guest through, each with the QEMU it needs.

vmckpt has two mechanisms (vmckpt/mechanisms.py): ``precopy-diff``, which every
QEMU >= 7.2 runs, and ``colo`` (incremental transfer through QEMU's COLO, with
vmckpt as the receiver), which is safe only on QEMU >= 11 under TCG. A
:class:`Mechanism` names one of them together with the QEMU binary it runs
on and the ``vmckpt`` command that takes one checkpoint with it; tests take
:data:`MECHANISMS` as a pytest parameter list, so a new variant (COLO on QEMU
11) is one more entry here and every such test runs it.

QEMU 11 is the one ``make test`` installs (scripts/install-deps.sh); another
can be named with ``VMCKPT_QEMU11``. A variant whose QEMU is missing fails,
saying where it was looked for.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import pytest

from tests.framework.guest import Vmckpt

SYSTEM_QEMU = "qemu-system-x86_64"  # on PATH: Debian's QEMU 10 (bookworm-backports)
QEMU11_DEFAULT = "/var/cache/vmckpt/qemu-11/bin/qemu-system-x86_64"


def qemu11() -> str:
    return os.environ.get("VMCKPT_QEMU11", QEMU11_DEFAULT)


@dataclass(frozen=True)
class Mechanism:
    """One way of checkpointing a guest in a test."""

    name: str  # what every layer it writes must record as its mechanism
    qemu: str = SYSTEM_QEMU  # VMCKPT_QEMU for every vmckpt command
    qemu_major: int = 10  # the major version the layers must record
    # The vmckpt command (and options) that takes one checkpoint of a guest; it gets the
    # guest's name, --store and --json, and prints the layer's row (the README's vocabulary),
    # e.g. ("watch", "--colo", "--count", "1") for a mechanism that watch drives.
    command: tuple[str, ...] = ("checkpoint",)

    def checkpoint(self, runner: Vmckpt, name: str) -> dict[str, object]:
        """One checkpoint of ``name`` with this mechanism: the row of the layer it wrote."""
        out = runner(
            self.command[0], name, *self.command[1:], "--store", str(runner.store), "--json"
        ).stdout
        try:
            row = json.loads(out)  # one object (checkpoint --json)
        except json.JSONDecodeError:
            row = json.loads(out.strip().splitlines()[-1])  # one line per layer (watch --json)
        assert isinstance(row, dict), out
        assert row.get("mechanism") == self.name, f"expected a {self.name} layer: {row}"
        return row

    def env(self) -> dict[str, str]:
        """The environment for every vmckpt command of the test (fails if the QEMU is missing)."""
        if shutil.which(self.qemu) is None:
            pytest.fail(
                f"no QEMU {self.qemu_major} at {self.qemu} (make deps-test installs it; "
                "or set VMCKPT_QEMU11=PATH)",
                pytrace=False,
            )
        return {"VMCKPT_QEMU": self.qemu}


MECHANISMS = [
    pytest.param(Mechanism("precopy-diff"), id="precopy-diff-qemu10"),
    pytest.param(
        Mechanism(
            "precopy-diff",
            qemu=qemu11(),
            qemu_major=11,
            command=("checkpoint", "--mechanism", "precopy-diff"),
        ),
        id="precopy-diff-qemu11",
        marks=pytest.mark.qemu11,
    ),
    pytest.param(
        Mechanism("colo", qemu=qemu11(), qemu_major=11),  # QEMU 11's default
        id="colo-qemu11",
        marks=pytest.mark.qemu11,
    ),
]
