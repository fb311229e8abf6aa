"""Small runtime records (guest.json, remote.json) written so a crash never leaves half a file.

Layer files have their own, stricter protocol in vmckpt/images; these are
the guest bookkeeping files next to them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path`` (0600), fsync it, rename it into place."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", opener=lambda p, f: os.open(p, f, 0o600)) as handle:
        json.dump(data, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)
