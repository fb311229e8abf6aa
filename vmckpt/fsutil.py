"""File primitives every part of vmckpt shares: hashing, durable and atomic writes.

A store is untrusted input (docs/SECURITY.md), so files in it are opened
without following symbolic links (``O_NOFOLLOW``); a link where a file should
be is reported, never read through.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import secrets
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


def write_atomic(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: a uniquely named temporary file beside it (0600),
    fsynced, renamed over it, the directory fsynced. Concurrent writers never collide
    on the temporary name, and a reader sees the old or the new file, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        with os.fdopen(open_nofollow(temporary, flags), "wb") as handle:
            os.fchmod(handle.fileno(), FILE_MODE)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """`write_atomic` of ``data`` as indented JSON."""
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """A JSON file read without following a symlink; OSError or ValueError if it cannot be."""
    with os.fdopen(open_nofollow(path), "rb") as handle:
        return json.loads(handle.read(_CHUNK * 16).decode("utf-8"))


_RENAME_EXCHANGE = 2  # linux/fs.h
_renameat2: Any = None


def exchange(directory: Path, first: str, second: str) -> None:
    """Swap two entries of ``directory`` atomically (Linux ``renameat2(RENAME_EXCHANGE)``):
    afterwards each name holds what the other held, and no moment exists at which either
    name is missing. Raises OSError (ENOSYS where the C library or the kernel lacks it,
    EINVAL where the file system does)."""
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
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _renameat2(fd, first.encode(), fd, second.encode(), _RENAME_EXCHANGE) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(directory / first))
    finally:
        os.close(fd)
