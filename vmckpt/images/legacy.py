"""What a store of format 1.4 or older kept outside its layers: its guests' heads, in its
guests' directories. They are taken into the catalog once, when such a store is first opened
by this vmckpt (store.py) or adopted (adopt.py), and read as untrusted input: a head names a
layer whose seal authenticates, or it is ignored."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection
from pathlib import Path

from vmckpt.fsutil import read_json
from vmckpt.hostdirs import NAME_RE, host_id
from vmckpt.images.catalog import Head, head_key

# Where such a store kept guests' runtime files and heads, by kind of guest.
HEAD_DIRS = {"guest": "guests", "libvirt": "libvirt"}
HEAD_FILE = "head.json"


def heads(store_path: Path, layers: Collection[str]) -> dict[str, Head | None]:
    """The heads the store kept in its guests' directories (those on the ``layers`` given),
    owned by this host."""
    found: dict[str, Head | None] = {}
    me = host_id()
    for kind, sub in HEAD_DIRS.items():
        for name in _real_subdirs(store_path / sub):
            with contextlib.suppress(OSError, ValueError):
                data = read_json(store_path / sub / name / HEAD_FILE)
                head = data.get("pending") or data.get("head")
                if isinstance(head, str) and head in layers:
                    found[head_key(kind, name)] = Head(head, me)
    return found


def _real_subdirs(path: Path) -> list[str]:
    """The names (usable as guest names) of the real directories in ``path``."""
    try:
        entries = list(os.scandir(path))
    except OSError:
        return []
    return sorted(
        e.name for e in entries if NAME_RE.match(e.name) and e.is_dir(follow_symlinks=False)
    )
