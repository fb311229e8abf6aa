"""Which checkpoint mechanism a guest gets, and why (DESIGN.md, "Checkpoint mechanisms").

- ``colo``: QEMU's COLO checkpointing with vmckpt as the receiver; each
  checkpoint moves only the pages written since the previous one. Only where
  it is known to be safe: QEMU >= 11 under TCG; QEMU >= 10.0.7 under KVM
  (untested here). Under TCG, QEMU 10.x deadlocks (10.0.7-10.0.13) or aborts
  (10.2) after the first incremental checkpoint, and 7.2 deadlocks: COLO
  saves RAM without the big QEMU lock, while TCG's dirty-log sync waits on a
  condition variable that needs it. QEMU 10.0.0-10.0.6 complete the migration
  instead of entering COLO. A guest's writable disks are captured inside each
  checkpoint's pause (vmckpt/colo.py, vmckpt/disk_capture.py). Never for a
  guest vmckpt did not start (the session needs a QEMU it owns).

Never for a libvirt domain (`LIBVIRT_REFUSAL`): libvirt's monitor passthrough could carry
the session (file descriptors pass with virDomainQemuMonitorCommandWithFiles, as
precopy-diff's do), but a session keeps QEMU in migration state ``colo`` behind libvirt's
back for as long as it lasts: QEMU resumes the guest at the end of every checkpoint
(migration/colo.c, ``colo_do_checkpoint_transaction``), undoing a pause libvirt made, and
refuses libvirt's own migration jobs (save, managedsave, snapshots with memory, migrate),
while libvirt has no API to hold a job on behalf of an outside process.

Every reason for refusing COLO names what would make it possible.
- ``precopy-diff``: a live migration into vmckpt and a diff; works on every
  QEMU >= 7.2 and everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmckpt.machine.spec import GuestSpec

COLO = "colo"
PRECOPY = "precopy-diff"
COLO_TCG_MIN = (11, 0, 0)
COLO_KVM_MIN = (10, 0, 7)


@dataclass(frozen=True)
class Choice:
    mechanism: str
    reason: str


def _version(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(".")[:3] if p.isdigit()]
    parts += [0] * (3 - len(parts))
    return (parts[0], parts[1], parts[2])


def colo_refusal(qemu_version: str, accel: str) -> str | None:
    """Why COLO must not run with this QEMU and accelerator, or None if it may."""
    version = _version(qemu_version)
    shown = qemu_version or "of unknown version"
    if accel == "kvm":
        if version < COLO_KVM_MIN:
            return (
                f"QEMU {shown} under KVM: COLO needs 10.0.7 or later (earlier ones complete "
                "the migration instead of entering COLO); QEMU 10.0.7+ (VMCKPT_QEMU) makes "
                "it possible"
            )
        return None
    if version < COLO_TCG_MIN:
        return (
            f"QEMU {shown} under TCG: COLO deadlocks or aborts the guest before QEMU 11 "
            "(its RAM save and TCG's dirty-log sync wait on each other); QEMU 11 or later "
            "makes it possible (scripts/install-deps.sh installs it; vmckpt takes the newest "
            "installed unless VMCKPT_QEMU names one)"
        )
    return None


LIBVIRT_REFUSAL = (
    "libvirt domain: a COLO session would hold QEMU in migration state colo behind libvirt's "
    "back (QEMU resumes the guest after every checkpoint, undoing a pause libvirt made, and "
    "refuses libvirt's save, snapshot and migrate jobs while it lasts) and libvirt has no API "
    "to hold a job for an outside process; the guest run by vmckpt (`vmckpt restore` of its "
    "layer, or `vmckpt run`) on QEMU 11 gets colo"
)


def choose_mechanism(
    qemu_version: str, accel: str, spec: GuestSpec, *, local: bool, libvirt: bool = False
) -> Choice:
    """The mechanism a guest's checkpoints use, with the reason in words."""
    if libvirt:
        return Choice(PRECOPY, LIBVIRT_REFUSAL)
    if not local:
        return Choice(
            PRECOPY,
            "COLO needs a guest whose QEMU vmckpt started on this host; "
            "one started with `vmckpt run` (or restored by vmckpt) gets it",
        )
    refusal = colo_refusal(qemu_version, accel)
    if refusal:
        return Choice(PRECOPY, refusal)
    disks = len(spec.writable_disks)
    also = (
        f"; {disks} writable disk{'s' if disks > 1 else ''} captured in each checkpoint's pause"
        if disks
        else ""
    )
    return Choice(COLO, f"QEMU {qemu_version} under {accel.upper()}: incremental transfer{also}")
