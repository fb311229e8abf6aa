"""Locks for writers that must not interleave: a store's, and a guest's on this host.

``flock`` locks on lock files (in the store, or in a guest's runtime directory on this
host, vmckpt/hostdirs.py): the kernel releases them
when their holder dies (kill -9 included), so a crash never leaves a stale
lock. A lock file records its holder (PID, command) for the message a
waiting command prints. The locks:

- the **store lock** (``store.lock``): held for the short steps that allocate
  a layer id and publish a layer (rename into place, move a guest's head),
  and by chain maintenance (prune, squash, delete) while it switches the chain;
- the **maintenance lock** (``maintenance.lock``): one prune, squash, delete or
  gc at a time, for the whole of it (building the new versions of layers
  takes a while; the store lock is held only for the switch);
- the **chain lock** (``chain.lock``): shared by every reader of a chain
  (compose, verify, sending a layer to another host) and exclusive for the
  switch of a chain maintenance, so a reader never sees a layer half
  rewritten or a parent removed under it;
- a **guest lock** (``checkpoint.lock`` in the guest's runtime directory): held for a whole
  checkpoint (or a whole checkpoint session) of one guest, so checkpoints
  of a guest are serialised;
- a **directory lock** on each temporary layer directory (``layers/.tmp-*``)
  for as long as its writer works in it, so ``gc`` tells a crash's leftovers
  (unlocked) from a layer being written (locked).

Order, where one holder takes several: maintenance, chain, store.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from vmckpt.errors import LockError
from vmckpt.fsutil import FILE_MODE, open_nofollow, parse_json

POLL_S = 0.05


def _holder(fd: int) -> str:
    try:
        data = parse_json(os.pread(fd, 4096, 0) or b"{}")
        return f"PID {data.get('pid')} ({data.get('what')})"
    except (OSError, ValueError):
        return "another process"


def _open_lock_file(path: Path, shared: bool, dir_fd: int | None) -> int | None:
    """The lock file, created 0600 if needed, and checked to be a regular file with no other
    hard link (a lock file is written to: a link planted in a store must not make vmckpt
    write a file elsewhere). A shared holder (a reader) may find it missing in a store it
    cannot write (read-only media, another user's store): None, and it reads unlocked, as
    nothing can change such a store under it. LockError (one line) for anything else."""
    where = path.name if dir_fd is not None else path
    try:
        fd = _open(where, os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, dir_fd)
    except OSError as exc:
        if not shared:
            raise LockError(f"cannot lock {path}: {_why(exc)}", step="lock") from exc
        try:
            fd = _open(where, os.O_RDONLY | os.O_NONBLOCK, dir_fd)
        except FileNotFoundError:
            return None
        except OSError as again:
            raise LockError(f"cannot lock {path}: {_why(again)}", step="lock") from again
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise LockError(
                f"cannot lock {path}: it is not a plain file of its own (a link?): refused",
                step="lock",
            )
    except BaseException:
        os.close(fd)
        raise
    with contextlib.suppress(OSError):
        os.fchmod(fd, FILE_MODE)
    return fd


def _open(path: Path | str, flags: int, dir_fd: int | None) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE, dir_fd=dir_fd)


def _why(exc: OSError) -> str:
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    return exc.strerror or str(exc)


@contextlib.contextmanager
def hold(
    path: Path,
    *,
    what: str,
    wait_s: float,
    busy: str,
    shared: bool = False,
    dir_fd: int | None = None,
) -> Iterator[None]:
    """Hold a lock on ``path`` (created 0600), waiting up to ``wait_s`` for it: exclusive,
    or ``shared`` with other shared holders (readers). With ``dir_fd``, the lock file is
    ``path``'s name in that open directory (a store's root: nothing above it is looked up).

    ``busy`` is the message of the LockError raised when it stays taken; the
    holder is appended. The lock file itself is never removed (removing it
    would let two holders lock two different files).
    """
    fd = _open_lock_file(path, shared, dir_fd)
    if fd is None:
        yield
        return
    try:
        deadline = time.monotonic() + wait_s
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockError(f"{busy} (held by {_holder(fd)})", step="lock") from None
                time.sleep(POLL_S)
        if not shared:
            note = json.dumps({"pid": os.getpid(), "what": what, "argv": sys.argv[1:4]}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, note, 0)
        try:
            yield
        finally:
            if not shared:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def lock_fd(fd: int) -> None:
    """Lock an open directory its creator works in (exclusive, at once), for as long as the
    descriptor is open (or its holder lives)."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def fd_locked(fd: int) -> bool:
    """Whether a live process holds the lock of :func:`lock_fd` on the open directory."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False


def lock_directory(path: Path) -> int:
    """Lock a directory its creator works in (exclusive, at once); returns the fd that holds
    the lock until it is closed (or its holder dies)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def directory_in_use(path: Path) -> bool:
    """Whether a live process holds the lock of :func:`lock_directory` on ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def is_held(path: Path) -> bool:
    """Whether someone holds the lock on ``path`` now (a probe, for status displays)."""
    try:
        fd = open_nofollow(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


STORE_LOCK = "store.lock"
CHAIN_LOCK = "chain.lock"
MAINTENANCE_LOCK = "maintenance.lock"


class StoreLocks:
    """A store's three locks (see the module doc), their files opened relative to the
    store's root directory (``root_fd``: nothing above it is looked up again)."""

    def __init__(self, path: Path, root_fd: Callable[[], int]) -> None:
        self.path = path
        self._root_fd = root_fd
        self._owner: int | None = None  # the thread that holds the store lock, if any

    def _hold(self, name: str, what: str, wait_s: float, busy: str, shared: bool = False) -> Any:
        return hold(
            self.path / name, what=what, wait_s=wait_s, busy=busy, shared=shared,
            dir_fd=self._root_fd(),
        )  # fmt: skip

    @contextlib.contextmanager
    def store(self, what: str, wait_s: float) -> Iterator[None]:
        """The store lock; a thread that holds it already takes it again at once (the
        catalog's write within a gc, which holds it around more)."""
        me = threading.get_ident()
        if self._owner == me:
            yield
            return
        with self._hold(STORE_LOCK, what, wait_s, f"store {self.path} is busy"):
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def chain(self, what: str, wait_s: float, *, shared: bool) -> AbstractContextManager[None]:
        """The chain lock: shared by readers of a chain, exclusive for a maintenance's switch."""
        busy = (
            f"store {self.path}: a chain maintenance is switching layers"
            if shared
            else f"store {self.path}: layers are being read (restore, verify)"
        )
        lock: AbstractContextManager[None] = self._hold(CHAIN_LOCK, what, wait_s, busy, shared)
        return lock

    def maintenance(self, what: str, wait_s: float) -> AbstractContextManager[None]:
        busy = f"store {self.path}: another prune, squash, delete or gc is under way"
        lock: AbstractContextManager[None] = self._hold(MAINTENANCE_LOCK, what, wait_s, busy)
        return lock
