"""File primitives every part of vmckpt shares: hashing, durable and atomic writes.

A store is untrusted input (docs/SECURITY.md), so files in it are opened
without following symbolic links (``O_NOFOLLOW``); a link where a file should
be is reported, never read through.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
import weakref
from collections.abc import Iterable
from pathlib import Path
from typing import Any

FILE_MODE = 0o600
DIR_MODE = 0o700
_CHUNK = 1 << 20


def open_nofollow(path: Path, flags: int = os.O_RDONLY) -> int:
    """``os.open`` that refuses a symbolic link as the last component (ELOOP)."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)


def sha256_file(path: Path) -> str:
    """The lowercase hex SHA-256 of a file's content, read without following a symlink."""
    with os.fdopen(open_nofollow(path), "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def sha256_chunks(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(path: Path, *, parents: bool = False) -> None:
    """Create a directory 0700 whatever the umask; an existing directory is made 0700 too."""
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        if path.is_symlink() or not path.is_dir():
            raise
    os.chmod(path, DIR_MODE, follow_symlinks=False)


def write_atomic(path: Path, data: bytes, *, durable: bool = True) -> None:
    """Replace ``path`` with ``data``: a uniquely named temporary file beside it (0600),
    fsynced, renamed over it, the directory fsynced. Concurrent writers never collide
    on the temporary name, and a reader sees the old or the new file, never half of one.
    ``durable=False``: no fsync, for what no crash of the host must keep (runtime records of
    processes that a crash ends too, caches): on a runtime directory that is not a tmpfs, a
    restore's three records took 20-30 ms of fsync."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        with os.fdopen(open_nofollow(temporary, flags), "wb") as handle:
            os.fchmod(handle.fileno(), FILE_MODE)
            handle.write(data)
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any, *, durable: bool = True) -> None:
    """`write_atomic` of ``data`` as indented JSON."""
    data_bytes = (json.dumps(data, indent=2, sort_keys=True) + "\n").encode()
    write_atomic(path, data_bytes, durable=durable)


MAX_JSON_BYTES = 16 << 20  # records, markers, manifests: kilobytes in practice


def read_regular(
    path: Path | str, limit: int, *, dir_fd: int | None = None, single_link: bool = True
) -> bytes:
    """The content of a regular file of at most ``limit`` bytes, read without following a
    symbolic link and without blocking on a FIFO (opened non-blocking, then checked to be a
    regular file before a byte is read). ``single_link``: a file with other hard links is
    refused too, since it may be a file outside the directory it was found in (one with no
    link left was replaced or removed after it was opened: it was the file at ``path``).
    OSError (with a readable strerror) for anything else than such a file."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        if single_link and info.st_nlink > 1:
            raise OSError(errno.EMLINK, "it has other hard links (refused)", str(path))
        if info.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        chunks = []
        left = limit + 1
        while left > 0 and (chunk := os.read(fd, min(left, _CHUNK * 16))):
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
        if len(data) > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return data
    finally:
        os.close(fd)


def parse_json(data: bytes) -> Any:
    """JSON from bytes; ValueError (never RecursionError) for anything that is not JSON a
    vmckpt file could hold, deeply nested input included."""
    try:
        return json.loads(data.decode("utf-8"))
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def read_json(path: Path, limit: int = MAX_JSON_BYTES, *, dir_fd: int | None = None) -> Any:
    """A JSON file read as :func:`read_regular` reads files; OSError or ValueError if it
    cannot be."""
    return parse_json(read_regular(path, limit, dir_fd=dir_fd))


_RENAME_EXCHANGE = 2  # linux/fs.h
_renameat2: Any = None


def exchange_at(dir_fd: int, first: str, second: str, where: Path) -> None:
    """Swap two entries of the directory ``dir_fd`` atomically (Linux ``renameat2`` with
    ``RENAME_EXCHANGE``): afterwards each name holds what the other held, and no moment exists
    at which either name is missing. Raises OSError (ENOSYS where the C library or the kernel
    lacks it, EINVAL where the file system does); ``where`` names the directory in it."""
    global _renameat2
    if _renameat2 is None:
        libc = ctypes.CDLL(None, use_errno=True)
        function = getattr(libc, "renameat2", None)
        if function is None:
            raise OSError(errno.ENOSYS, "the C library has no renameat2")
        function.argtypes = [
            ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint,
        ]  # fmt: skip
        function.restype = ctypes.c_int
        _renameat2 = function
    if _renameat2(dir_fd, first.encode(), dir_fd, second.encode(), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(where / first))


class Dir:
    """An open directory, for working inside it without following symbolic links: entries
    are opened, made, renamed and removed relative to its file descriptor, so no component
    above it is looked up again (a directory renamed or replaced by a link meanwhile changes
    nothing), and no entry that is a link is ever followed (a link is removed as a link).
    The way to handle a directory someone else can write, as a store may be."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path  # for messages
        # A Dir nobody closed (a Store dropped by a long-lived process: a test run, a
        # session) gives its descriptor back when it is collected, not at exit.
        self._closer = weakref.finalize(self, os.close, fd)
        self._closer.atexit = False

    @classmethod
    def open(cls, path: Path, *, follow: bool = False) -> Dir:
        """Open ``path`` (a link as its last component is refused unless ``follow``: a path
        the user gave may be one)."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        return cls(os.open(path, flags), path)

    def sub(self, name: str) -> Dir:
        """The entry ``name`` as a directory; OSError (ELOOP, ENOTDIR) if it is a link or
        anything but a directory."""
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
        return Dir(os.open(name, flags, dir_fd=self.fd), self.path / name)

    def close(self) -> None:
        if self.fd >= 0:
            self._closer()
            self.fd = -1

    def __enter__(self) -> Dir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def names(self) -> list[str]:
        return sorted(os.listdir(self.fd))

    def lstat(self, name: str) -> os.stat_result:
        return os.stat(name, dir_fd=self.fd, follow_symlinks=False)

    def is_dir(self, name: str) -> bool:
        try:
            return stat.S_ISDIR(self.lstat(name).st_mode)
        except OSError:
            return False

    def tree_bytes(self, name: str) -> int:
        """The size of an entry: a file's, or every file's under a directory (links not
        followed)."""
        try:
            info = self.lstat(name)
        except OSError:
            return 0
        if not stat.S_ISDIR(info.st_mode):
            return info.st_size
        total = 0
        for _root, _dirs, files, root_fd in os.fwalk(name, dir_fd=self.fd, follow_symlinks=False):
            for file in files:
                try:
                    total += os.stat(file, dir_fd=root_fd, follow_symlinks=False).st_size
                except OSError:
                    continue
        return total

    def remove(self, name: str) -> None:
        """Remove an entry: a directory with everything under it (shutil.rmtree relative to
        this directory, which never follows a link), anything else — a link included — as
        itself. Missing is fine."""
        try:
            info = self.lstat(name)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(info.st_mode):
            shutil.rmtree(name, dir_fd=self.fd)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=self.fd)
