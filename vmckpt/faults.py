"""Fault injection, as CRIU does it: the tests make vmckpt fail at chosen points.

``VMCKPT_FAULT=kill-at:POINT`` makes vmckpt SIGKILL itself when it reaches
POINT (a name :func:`point` is called with), so a test can prove that a
crash at that exact step loses nothing and leaves no guest stopped.
``VMCKPT_FAULT=receiver-dies-after:BYTES`` makes the stream receiver fail
after reading that many bytes. ``VMCKPT_FAULT=hold-at:POINT`` holds vmckpt at
POINT (saying so on stderr) until a signal handler raises there, so a test can
interrupt that exact step. For lazy restores (vmckpt/mechanisms/lazy_restore.py,
vmckpt/mechanisms/pageserver/): ``push-pace-ms:N`` slows the page server's push (N ms per
read run, so a test can interrupt it), ``no-userfaultfd`` makes the host look as if it had
no userfaultfd, and ``qemu-refuses-postcopy`` as if QEMU refused to be a postcopy
destination. Unset (always, outside tests), all are inert.
"""

from __future__ import annotations

import os
import signal
import sys
import time

ENV = "VMCKPT_FAULT"

# The points a checkpoint passes, in order (docs/SECURITY.md lists what each test checks).
AFTER_SETTINGS = "after-settings"  # migration settings changed, nothing started
MID_MIGRATION = "mid-migration"  # QEMU is sending the guest's RAM
BEFORE_RESUME = "before-resume"  # the migration completed, the guest is stopped
MID_WRITE = "mid-write"  # the layer's files are being written
BEFORE_HEAD = "before-head"  # the layer renamed into place, the catalog not yet written
RESTORE_START = "restore-start"  # a restore command began: nothing read, nothing started
# The points a push into a bucket passes (vmckpt/images/bucketstore.py).
MID_UPLOAD = "mid-upload"  # after each file of a layer is uploaded
BEFORE_VISIBLE = "before-visible"  # every layer uploaded, the bucket's catalog not replaced
POINTS = (AFTER_SETTINGS, MID_MIGRATION, BEFORE_RESUME, MID_WRITE, BEFORE_HEAD)

# The points a chain maintenance (prune, squash, delete) passes (vmckpt/images/maintenance.py).
MAINT_MID_BUILD = "maint-mid-build"  # after each new version of a layer is built
MAINT_BEFORE_SWITCH = "maint-before-switch"  # every new version built, nothing switched
MAINT_MID_SWITCH = "maint-mid-switch"  # after each layer is switched to its new version
MAINT_BEFORE_REMOVE = "maint-before-remove"  # every layer switched, nothing removed
MAINT_MID_REMOVE = "maint-mid-remove"  # after each removed layer is renamed away
MAINT_BEFORE_CLEANUP = "maint-before-cleanup"  # switched and removed, old files still there
MAINTENANCE_POINTS = (
    MAINT_MID_BUILD,
    MAINT_BEFORE_SWITCH,
    MAINT_MID_SWITCH,
    MAINT_BEFORE_REMOVE,
    MAINT_MID_REMOVE,
    MAINT_BEFORE_CLEANUP,
)


HOLD_POLL_S = 1.0  # a signal interrupts the sleep; this bounds one sent to another thread


def point(name: str) -> None:
    """Die here (SIGKILL, no clean-up at all), or stay here until a signal handler raises
    (a KeyboardInterrupt, watch.Interrupted), if the tests asked for it."""
    spec = os.environ.get(ENV)
    if spec == f"kill-at:{name}":
        os.kill(os.getpid(), signal.SIGKILL)
    if spec == f"hold-at:{name}":
        print(f"vmckpt: fault: held at {name}", file=sys.stderr, flush=True)
        while True:
            time.sleep(HOLD_POLL_S)


def value(kind: str) -> int | None:
    """The number of ``VMCKPT_FAULT=kind:NUMBER``, or None."""
    spec = os.environ.get(ENV, "")
    if spec.startswith(kind + ":"):
        return int(spec.split(":", 1)[1])
    return None
