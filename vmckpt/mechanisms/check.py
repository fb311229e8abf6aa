"""``vmckpt check``: what this host's QEMU and accelerators support, and which checkpoint
mechanism a guest gets here (vmckpt/mechanisms.py says why)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmckpt.machine.binary import choose_qemu, kvm_usable, resolve_accel
from vmckpt.machine.qemu import Launch, QemuProcess, rotate_serial_log
from vmckpt.machine.spec import GuestSpec
from vmckpt.mechanisms.choice import COLO, LIBVIRT_REFUSAL, PRECOPY, colo_refusal


@dataclass(frozen=True)
class Capabilities:
    binary: str
    version: str
    why: str  # why this QEMU (VMCKPT_QEMU, or the newest installed)
    accelerators: dict[str, str]  # name -> "yes" or why not
    default_accel: str  # what --accel auto picks here
    mechanisms: dict[str, str]  # name -> "yes ..." or "no: why"

    def to_dict(self) -> dict[str, Any]:
        return {
            "binary": self.binary,
            "version": self.version,
            "why": self.why,
            "accelerators": self.accelerators,
            "default_accel": self.default_accel,
            "mechanisms": self.mechanisms,
        }

    @property
    def usable(self) -> bool:
        return self.mechanisms[PRECOPY].startswith("yes")


def probe_capabilities() -> Capabilities:
    """Start a throw-away QEMU with no guest and ask it what it supports."""
    qemu = choose_qemu()
    binary, version = qemu.binary, qemu.version
    kvm_ok, why = kvm_usable()
    accelerators = {"kvm": "yes" if kvm_ok else f"no: {why}", "tcg": "yes"}
    accel = resolve_accel("auto")
    spec = GuestSpec(memory_mib=16, accel="tcg", machine="none")
    with tempfile.TemporaryDirectory(prefix="vmckpt-check-") as scratch:
        runtime = Path(scratch)
        launch = Launch(name="vmckpt-check", accel="tcg", serial_log=rotate_serial_log(runtime))
        process = QemuProcess.launch(spec, launch, runtime_dir=runtime)
        try:
            with process.monitor() as mon:
                caps = mon.migrate_capabilities()
                commands = mon.commands()
        finally:
            process.shutdown()
    refusal = colo_refusal(version, accel)
    if "x-colo" not in caps:
        colo = (
            "no: this QEMU has no x-colo capability; a QEMU 11 built with COLO (Debian's: "
            "scripts/install-deps.sh installs it, or name one with VMCKPT_QEMU) makes it "
            "possible"
        )
    elif refusal:
        colo = f"no: {refusal}"
    else:
        colo = f"yes (QEMU {version}, {accel}; the default for guests vmckpt runs here)"
    precopy_ok = {"migrate", "getfd"} <= commands and "events" in caps
    mechanisms = {
        COLO: colo,
        f"{COLO} (libvirt domains)": f"no: {LIBVIRT_REFUSAL}",
        PRECOPY: (
            "yes" + (" (the default here)" if colo.startswith("no") else " (fallback)")
            if precopy_ok
            else "no: QEMU lacks migrate/getfd/events"
        ),
        "background-snapshot (baseline)": "yes" if "background-snapshot" in caps else "no",
        "mapped-ram (baseline)": "yes" if "mapped-ram" in caps else "no",
        "savevm (baseline)": "yes" if "snapshot-save" in commands else "no",
    }
    return Capabilities(binary, version, qemu.why, accelerators, accel, mechanisms)
