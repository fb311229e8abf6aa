"""Boot media on a host that is not the one the guest was started on.

A layer's spec names each boot medium by path and sha256. On another host the
medium may live elsewhere: vmckpt copies it into the store's ``media/<sha256>/``
folder, and :func:`relocate_media` points the spec there when the original path
is missing or holds other content. The content hash decides, never the path.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vmckpt.machine import BootMedium, GuestSpec, file_sha256

MEDIA_DIR = "media"


def media_path(store_path: Path, medium: BootMedium) -> Path:
    """Where a store keeps its own copy of a medium: media/<sha256>/<file name>."""
    return store_path / MEDIA_DIR / medium.sha256 / Path(medium.path).name


def has_content(path: Path, sha256: str) -> bool:
    try:
        return path.is_file() and file_sha256(path) == sha256
    except OSError:
        return False


def find_medium(store_path: Path, medium: BootMedium) -> Path | None:
    """A file on this host with the medium's content: its own path, else the store's copy."""
    for candidate in (Path(medium.path), media_path(store_path, medium)):
        if has_content(candidate, medium.sha256):
            return candidate
    return None


def relocate_media(spec: GuestSpec, store_path: Path) -> GuestSpec:
    """The spec with each medium whose path lacks its content pointed at the store's copy."""
    media = []
    for medium in spec.media:
        found = find_medium(store_path, medium)
        if found is not None and str(found) != medium.path:
            medium = dataclasses.replace(medium, path=str(found))
        media.append(medium)
    return dataclasses.replace(spec, media=tuple(media))
