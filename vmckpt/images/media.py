"""Boot media copied into a store from another host (``media/<sha256>/<file>``), found by
content: a restore on that host boots from them when the original path does not hold the
content the (authenticated) spec names."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path

from vmckpt.errors import StoreError
from vmckpt.fsutil import DIR_MODE, FILE_MODE
from vmckpt.hostdirs import NAME_RE, file_sha256
from vmckpt.images import crypt
from vmckpt.images.layerio import TMP_PREFIX, write_chunks
from vmckpt.images.store import MEDIA_DIR, Store, is_real_dir


def media_path(store: Store, sha256: str, file_name: str) -> Path:
    """Where the store keeps its own copy of a boot medium: media/<sha256>/<file name>."""
    if not re.fullmatch(r"[0-9a-f]{64}", sha256) or not NAME_RE.match(file_name):
        raise StoreError(f"{file_name!r} ({sha256[:12]}) is not a medium name", step="media")
    return store.path / MEDIA_DIR / sha256 / file_name


def find_medium(store: Store, sha256: str, original: str) -> Path | None:
    """A file with this content: the original path if it still holds it, else the store's
    copy (a regular file of its own in real directories of the store, never a link). The
    content hash decides, never the path."""
    with contextlib.suppress(OSError):
        path = Path(original)
        if path.is_file() and file_sha256(path.resolve()) == sha256:
            return path.resolve()
    try:
        copy = media_path(store, sha256, Path(original).name)
    except StoreError:
        return None
    for directory in (copy.parent.parent, copy.parent):
        if not is_real_dir(directory):
            return None
    with contextlib.suppress(OSError):
        info = os.lstat(copy)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 1 and file_sha256(copy) == sha256:
            return copy
    return None


def import_medium(store: Store, sha256: str, file_name: str, chunks: Iterable[bytes]) -> Path:
    """Store a copy of a boot medium received from another host, checked by its hash:
    written as a new file in media/<sha256>/ (reached without following a link) and
    renamed into place only once its content matched."""
    target = media_path(store, sha256, file_name)
    try:
        root = store.files.root
        with contextlib.suppress(FileExistsError):
            os.mkdir(MEDIA_DIR, DIR_MODE, dir_fd=root.fd)
        with root.sub(MEDIA_DIR) as media:
            with contextlib.suppress(FileExistsError):
                os.mkdir(sha256, DIR_MODE, dir_fd=media.fd)
            copies = media.sub(sha256)
        with copies:
            partial = f"{TMP_PREFIX}{file_name}-{secrets.token_hex(4)}"
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            fd = os.open(partial, flags, FILE_MODE, dir_fd=copies.fd)
            try:
                entry = write_chunks(fd, chunks, crypt.PLAIN, "", file_name)
                if entry.sha256 != sha256:
                    raise StoreError(
                        f"{file_name}: the copy's sha256 is not the one announced",
                        step="media",
                    )
                os.rename(partial, file_name, src_dir_fd=copies.fd, dst_dir_fd=copies.fd)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(partial, dir_fd=copies.fd)
            os.fsync(copies.fd)
    except OSError as exc:
        raise StoreError(f"cannot store medium {file_name}: {exc}", step="media") from exc
    return target
