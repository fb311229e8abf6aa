"""Locks on a store, for writers that must not interleave.

``flock`` locks on lock files inside the store: the kernel releases them
when their holder dies (kill -9 included), so a crash never leaves a stale
lock. A lock file records its holder (PID, command) for the message a
waiting command prints. Two locks exist:

- the **store lock** (``store.lock``): held for the short steps that allocate
  a layer id and publish a layer (rename into place, move a guest's head),
  and by chain maintenance (prune, squash, gc) while it changes the chain;
- a **guest lock** (``guests/<name>/checkpoint.lock``): held for a whole
  checkpoint (or a whole checkpoint session) of one guest, so checkpoints
  of a guest are serialised.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from vmckpt.errors import LockError
from vmckpt.fsutil import FILE_MODE, open_nofollow

POLL_S = 0.05


def _holder(fd: int) -> str:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return f"PID {data.get('pid')} ({data.get('what')})"
    except (OSError, ValueError):
        return "another process"


@contextlib.contextmanager
def hold(path: Path, *, what: str, wait_s: float, busy: str) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created 0600), waiting up to ``wait_s`` for it.

    ``busy`` is the message of the LockError raised when it stays taken; the
    holder is appended. The lock file itself is never removed (removing it
    would let two holders lock two different files).
    """
    fd = open_nofollow(path, os.O_RDWR | os.O_CREAT)
    try:
        os.fchmod(fd, FILE_MODE)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockError(f"{busy} (held by {_holder(fd)})", step="lock") from None
                time.sleep(POLL_S)
        note = json.dumps({"pid": os.getpid(), "what": what, "argv": sys.argv[1:4]}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, note, 0)
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def is_held(path: Path) -> bool:
    """Whether someone holds the lock on ``path`` now (a probe, for status displays)."""
    try:
        fd = open_nofollow(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
