"""What belongs to this host, kept apart from the store: a store may sit on a shared disk or
come from another host, so it is untrusted input (docs/SECURITY.md), while what only makes
sense here is this host's own and lives in directories only this user can write, as libvirt
keeps ``/run/libvirt`` apart from ``/var/lib/libvirt``:

- the **runtime directory** of a store (``/run/vmckpt/<store>/`` as root, else
  ``$XDG_RUNTIME_DIR/vmckpt/<store>/``; ``$VMCKPT_RUNTIME_DIR`` moves it): what a running
  guest is made of on this host — its record (PID and start time, QEMU's command line,
  its spec), QMP and control sockets, console and QEMU logs, migration journals, session
  records, checkpoint locks;
- the **data directory** of a store (``/var/lib/vmckpt/<store>/`` as root, else
  ``$XDG_DATA_HOME/vmckpt/<store>/``; ``$VMCKPT_DATA_DIR`` moves it): what this host keeps
  for a store beyond a reboot and what is too large for a runtime directory — how to reach
  guests that run on other hosts, restored disk images, scratch space of disk backups.

``<store>`` is the store's id and a digest of its path, so two stores — or two copies of one
store — never share a directory. Every directory here is made 0700 and checked to be this
user's own, never a link: what is read from it is trusted as the user's own input is.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmckpt import hostroot, locks
from vmckpt.errors import StoreError
from vmckpt.fsutil import DIR_MODE, open_nofollow, read_json, write_json_atomic

RUNTIME_ENV = hostroot.RUNTIME_ENV
DATA_ENV = "VMCKPT_DATA_DIR"
HOST_FILE = "host.json"
HOST_ID_RE = re.compile(r"^[0-9a-f]{16}\Z")
KIND_DIRS = {"guest": "guests", "libvirt": "libvirt"}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
RECORD_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}\.json\Z")
GUEST_LOCK = "checkpoint.lock"
DIGEST_DIR = "file-digests"  # in the runtime root: files' sha256 by identity (file_sha256)
# A file changed less than this long ago may change again within its times' granularity
# (a few ms) without changing them: its digest is not remembered (git's "racy" entries).
DIGEST_SETTLE_NS = 2_000_000_000
SCRATCH_DIR = "disk-scratch"  # a checkpoint's scratch files (vmckpt/mechanisms/disk_capture.py)


def runtime_root() -> Path:
    """Where this host's runtime directories of stores are (vmckpt/hostroot.py)."""
    return Path(hostroot.runtime_root()).absolute()


def data_root() -> Path:
    """Where this host's data directories of stores are."""
    given = os.environ.get(DATA_ENV)
    if given:
        return Path(given).absolute()
    if os.geteuid() == 0:
        return Path("/var/lib/vmckpt")
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "vmckpt"


def private_dir(path: Path, *, create: bool = True) -> Path:
    """``path`` as a directory of this user's only (0700, owned by the effective user, not a
    link), made with its missing parents if ``create``; StoreError (one line) otherwise."""
    try:
        if create:
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.mkdir(path, DIR_MODE)
            except FileExistsError:
                pass
            else:
                os.chmod(path, DIR_MODE)  # whatever the umask
        info = os.lstat(path)
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}", step="host-dirs") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise StoreError(f"{path} is not a directory (a link?): refused", step="host-dirs")
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise StoreError(
            f"{path} must be a directory of this user's only (owner uid {os.geteuid()}, "
            f"mode 0700); it is uid {info.st_uid}, mode {stat.S_IMODE(info.st_mode):04o}",
            step="host-dirs",
        )
    return path


def file_sha256(path: Path) -> str:
    """The sha256 of a file's content (opened without following a link, as
    ``fsutil.sha256_file``), remembered on this host under the file's identity: its device,
    inode, size and modification and change times. A write to the file changes its change
    time, so a changed file is read again. Boot media and read-only disks are checked on
    every restore: ~10 ms for the test guest's kernel and initrd (twice: found, then
    checked), of a restore that is to run in milliseconds. The records are in the runtime
    root (this user's only, on tmpfs as root), never in a store."""
    with os.fdopen(open_nofollow(path), "rb") as handle:
        info = os.fstat(handle.fileno())
        identity = {
            "dev": info.st_dev, "ino": info.st_ino, "size": info.st_size,
            "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns,
        }  # fmt: skip
        key = hashlib.sha256(repr(sorted(identity.items())).encode()).hexdigest()[:32]
        record_dir = runtime_root() / DIGEST_DIR
        with contextlib.suppress(OSError, ValueError, StoreError):
            private_dir(record_dir, create=False)
            record = read_json(record_dir / f"{key}.json")
            known = record.get("sha256") if isinstance(record, dict) else None
            if (
                isinstance(record, dict) and record.get("identity") == identity
                and isinstance(known, str) and re.fullmatch(r"[0-9a-f]{64}", known)
            ):  # fmt: skip
                return known
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
        after = os.fstat(handle.fileno())
    settled = time.time_ns() - max(info.st_mtime_ns, info.st_ctime_ns) > DIGEST_SETTLE_NS
    unchanged = (after.st_mtime_ns, after.st_ctime_ns) == (info.st_mtime_ns, info.st_ctime_ns)
    if stat.S_ISREG(info.st_mode) and settled and unchanged:
        with contextlib.suppress(OSError, StoreError):  # not remembered: read next time
            private_dir(runtime_root())
            private_dir(record_dir)
            write_json_atomic(record_dir / f"{key}.json", {"identity": identity, "sha256": digest},
                              durable=False)  # fmt: skip
    return digest


def store_dir_name(store_id: str | None, store_path: Path) -> str:
    """The name of a store's directories on this host: its id (or ``legacy`` for a store
    made before stores had one) and a digest of its path."""
    digest = hashlib.sha256(os.fsencode(store_path)).hexdigest()[:8]
    return f"{(store_id or 'legacy')[:12]}-{digest}"


def host_id() -> str:
    """This host's id (16 hex digits, made once, kept in the data root): the owner of the
    heads of the guests it runs, in a store that several hosts share."""
    root = private_dir(data_root())
    path = root / HOST_FILE
    try:
        data = read_json(path)
        value = data.get("host_id") if isinstance(data, dict) else None
        if isinstance(value, str) and HOST_ID_RE.fullmatch(value):
            return value
    except FileNotFoundError:
        pass
    except (OSError, ValueError) as exc:
        raise StoreError(f"{path}: cannot be read ({exc})", step="host-dirs") from exc
    value = secrets.token_hex(8)
    write_json_atomic(path, {"host_id": value, "hostname": os.uname().nodename})
    return value


@dataclass(frozen=True)
class HostDirs:
    """A store's directories on this host, and the files of its guests there (nothing is
    created until asked for). Guests are named by (name, kind): ``guest`` for those vmckpt
    runs, ``libvirt`` for libvirt domains (a name space of their own)."""

    runtime: Path
    data: Path
    store: Path

    @classmethod
    def for_store(
        cls,
        store_id: str | None,
        store_path: Path,
        *,
        runtime: Path | None = None,
        data: Path | None = None,
    ) -> HostDirs:
        """A store's directories under this host's roots (or the ``runtime`` and ``data``
        roots given: another host's, as tests see it)."""
        name = store_dir_name(store_id, store_path)
        return cls((runtime or runtime_root()) / name, (data or data_root()) / name, store_path)

    # -- where ------------------------------------------------------------------------

    def _kind_dir(self, name: str, kind: str) -> str:
        if kind not in KIND_DIRS:
            raise StoreError(f"unknown kind of guest {kind!r}", vm=name, step="open")
        if not NAME_RE.match(name):
            raise StoreError(f"{name!r} is not a usable guest name", vm=name, step="open")
        return KIND_DIRS[kind]

    def runtime_path(self, name: str, kind: str = "guest") -> Path:
        """Where a guest's runtime directory is (not created)."""
        return self.runtime / self._kind_dir(name, kind) / name

    def data_path(self, name: str, kind: str = "guest") -> Path:
        """Where a guest's data directory is (not created)."""
        return self.data / self._kind_dir(name, kind) / name

    def _make(self, top: Path, name: str, kind: str) -> Path:
        sub = self._kind_dir(name, kind)
        fresh = not top.exists()
        private_dir(top.parent)
        private_dir(top)
        if fresh:
            # For people looking around: which store these files belong to.
            write_json_atomic(top / "store.json", {"store": str(self.store)})
        private_dir(top / sub)
        return private_dir(top / sub / name)

    def runtime_dir(self, name: str, kind: str = "guest") -> Path:
        """A guest's runtime directory (made 0700 if needed): its record, QEMU's sockets and
        logs, journals, session records, its checkpoint lock."""
        return self._make(self.runtime, name, kind)

    def data_dir(self, name: str, kind: str = "guest") -> Path:
        """A guest's data directory (made 0700 if needed): its restored disks, how to reach
        it on another host, its checkpoints' scratch space."""
        return self._make(self.data, name, kind)

    def scratch_dir(self, name: str, kind: str = "guest") -> Path:
        """Where a checkpoint of the guest keeps its scratch files (``gc`` removes what an
        interrupted checkpoint left there)."""
        return self.data_dir(name, kind) / SCRATCH_DIR

    def scratch_path(self, name: str, kind: str = "guest") -> Path:
        """Where :meth:`scratch_dir` is (nothing created: for a look that must leave no
        directory behind, e.g. a guard's after its guest is gone)."""
        return self.data_path(name, kind) / SCRATCH_DIR

    def fresh(self, parent: Path, prefix: str) -> Path:
        """A new directory of this user's only in ``parent`` (a directory made by one of the
        methods here): made by one mkdir under a random name, so nothing can be in it but
        what this process puts there (files made in it cannot be links planted in advance)."""
        return Path(tempfile.mkdtemp(prefix=prefix, dir=private_dir(parent, create=False)))

    def scratch(self, prefix: str, *, data: bool) -> Path:
        """A fresh private directory for work that belongs to no guest (a boot check): in
        the runtime directory (sockets, logs) or the data directory (disk images)."""
        top = self.data if data else self.runtime
        private_dir(top.parent)
        private_dir(top)
        return self.fresh(private_dir(top / "scratch"), prefix)

    def journal_path(
        self, name: str, file: str, kind: str = "guest", *, create: bool = True
    ) -> Path:
        """Where a guest's journal ``file`` lives (vmckpt.session's migration journal); its
        runtime directory is made unless ``create`` is false."""
        if not RECORD_NAME_RE.match(file):
            raise StoreError(f"{file!r} is not a journal name", vm=name, step="journal")
        top = self.runtime_dir(name, kind) if create else self.runtime_path(name, kind)
        return top / file

    # -- which guests -----------------------------------------------------------------

    def names(self, kind: str = "guest", *, data: bool = False) -> list[str]:
        """The guests of ``kind`` that have a runtime (or ``data``) directory here."""
        root = (self.data if data else self.runtime) / KIND_DIRS[kind]
        try:
            entries = list(os.scandir(root))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(
            e.name for e in entries if NAME_RE.match(e.name) and e.is_dir(follow_symlinks=False)
        )

    def names_with(self, record: str, kind: str = "guest", *, durable: bool = False) -> list[str]:
        """The guests of ``kind`` that have a ``record`` file here."""
        return [
            name
            for name in self.names(kind, data=durable)
            if self._record_path(name, record, kind, durable, "list").is_file()
        ]

    def has_runtime(self, name: str, kind: str = "guest") -> bool:
        path = self.runtime_path(name, kind)
        return path.is_dir() and not path.is_symlink()

    def runtime_idle_s(self, name: str, kind: str = "guest") -> float:
        """Seconds since anything in the guest's runtime directory last changed."""
        directory = self.runtime_path(name, kind)
        newest = 0.0
        with contextlib.suppress(OSError):
            newest = os.lstat(directory).st_mtime
            for entry in os.scandir(directory):
                with contextlib.suppress(OSError):
                    newest = max(newest, entry.stat(follow_symlinks=False).st_mtime)
        return max(0.0, time.time() - newest)

    # -- records ----------------------------------------------------------------------

    def _record_path(self, name: str, record: str, kind: str, durable: bool, step: str) -> Path:
        if not RECORD_NAME_RE.match(record):
            raise StoreError(f"{record!r} is not a record name", vm=name, step=step)
        base = self.data_path(name, kind) if durable else self.runtime_path(name, kind)
        return base / record

    def read_record(
        self, name: str, record: str, kind: str = "guest", *, durable: bool = False
    ) -> dict[str, Any] | None:
        """A guest's record (``guest.json``; ``durable``: one kept in its data directory,
        such as ``remote.json``), or None if absent."""
        path = self._record_path(name, record, kind, durable, "read-record")
        try:
            data = read_json(path)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}", vm=name, step="read-record") from exc
        if not isinstance(data, dict):
            raise StoreError(f"{path} is not a JSON object", vm=name, step="read-record")
        return data

    def write_record(
        self,
        name: str,
        record: str,
        data: dict[str, Any],
        kind: str = "guest",
        *,
        durable: bool = False,
        create: bool = True,
    ) -> None:
        """Replace a guest's record atomically (unique temporary name, rename). ``durable``:
        in its data directory, fsynced; else in its runtime directory, not (its processes
        do not outlive the host either). Not ``create``: only into the guest's runtime
        directory as it is (StoreError if it is gone), never made again."""
        self._record_path(name, record, kind, durable, "write-record")
        if durable:
            directory = self.data_dir(name, kind)
        elif create:
            directory = self.runtime_dir(name, kind)
        else:
            directory = private_dir(self.runtime_path(name, kind), create=False)
        path = directory / record
        try:
            write_json_atomic(path, data, durable=durable)
        except OSError as exc:
            raise StoreError(f"cannot write {path}: {exc}", vm=name, step="write-record") from exc

    def remove_record(
        self, name: str, record: str, kind: str = "guest", *, durable: bool = False
    ) -> None:
        path = self._record_path(name, record, kind, durable, "remove-record")
        if path.parent.is_dir() and not path.parent.is_symlink():
            path.unlink(missing_ok=True)

    # -- a guest's checkpoint lock ----------------------------------------------------

    def guest_lock(
        self, name: str, *, what: str, wait_s: float, kind: str = "guest"
    ) -> contextlib.AbstractContextManager[None]:
        """A guest's checkpoint lock: one checkpoint (or checkpoint session) at a time."""
        return locks.hold(
            self.runtime_dir(name, kind) / GUEST_LOCK,
            what=what,
            wait_s=wait_s,
            busy=f"guest {name}: a checkpoint is under way",
        )

    def guest_locked(self, name: str, kind: str = "guest") -> bool:
        return locks.is_held(self.runtime_path(name, kind) / GUEST_LOCK)
