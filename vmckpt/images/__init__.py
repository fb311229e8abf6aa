"""The layered image set on disk: layers, parents, page index, checksums, atomic writes.

Nothing outside this package touches image files. docs/FORMAT.md specifies
the format; `format` implements its encodings, `store` the files.
"""

from vmckpt.images.format import (
    FORMAT_MAJOR,
    FORMAT_MINOR,
    BlockSummary,
    DiskDelta,
    DiskRecord,
    FileEntry,
    LayerContent,
    LayerManifest,
)
from vmckpt.images.store import Store

__all__ = [
    "FORMAT_MAJOR",
    "FORMAT_MINOR",
    "BlockSummary",
    "DiskDelta",
    "DiskRecord",
    "FileEntry",
    "LayerContent",
    "LayerManifest",
    "Store",
]
