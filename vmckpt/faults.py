"""Fault injection, as CRIU does it: the tests make vmckpt fail at chosen points.

``VMCKPT_FAULT=kill-at:POINT`` makes vmckpt SIGKILL itself when it reaches
POINT (a name :func:`point` is called with), so a test can prove that a
crash at that exact step loses nothing and leaves no guest stopped.
``VMCKPT_FAULT=receiver-dies-after:BYTES`` makes the stream receiver fail
after reading that many bytes. Unset (always, outside tests), both are inert.
"""

from __future__ import annotations

import os
import signal

ENV = "VMCKPT_FAULT"

# The points a checkpoint passes, in order (docs/SECURITY.md lists what each test checks).
AFTER_SETTINGS = "after-settings"  # migration settings changed, nothing started
MID_MIGRATION = "mid-migration"  # QEMU is sending the guest's RAM
BEFORE_RESUME = "before-resume"  # the migration completed, the guest is stopped
MID_WRITE = "mid-write"  # the layer's files are being written
BEFORE_HEAD = "before-head"  # the layer is renamed into place, the head not yet moved
POINTS = (AFTER_SETTINGS, MID_MIGRATION, BEFORE_RESUME, MID_WRITE, BEFORE_HEAD)


def point(name: str) -> None:
    """Die here (SIGKILL, no clean-up at all) if the tests asked for it."""
    if os.environ.get(ENV) == f"kill-at:{name}":
        os.kill(os.getpid(), signal.SIGKILL)


def value(kind: str) -> int | None:
    """The number of ``VMCKPT_FAULT=kind:NUMBER``, or None."""
    spec = os.environ.get(ENV, "")
    if spec.startswith(kind + ":"):
        return int(spec.split(":", 1)[1])
    return None
