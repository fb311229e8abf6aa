"""What the ``vmckpt`` command prints: one vocabulary for humans and for ``--json``.

Every command that describes a layer uses the same fields (README, "Output"):
``layer``, ``parent``, ``guest``, ``created``, ``mechanism``, ``pause_ms``,
``pages_stored``, ``pages_zeroed``, ``bytes`` (whole bytes), ``total_s``
(seconds); guests: ``name``, ``kind``, ``state``, ``pid``, ``head``, ``host``,
``mechanism``, ``mechanism_reason``. Human output shows sizes in binary
units and durations in ms or s, always the same way.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from vmckpt.images import LayerManifest
from vmckpt.progress import NO_PROGRESS, Progress, TerminalProgress


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def print_json_line(data: Any) -> None:
    print(json.dumps(data, sort_keys=True), flush=True)


def human_bytes(count: int | None) -> str:
    if count is None:
        return "-"
    if count < 0:
        return "-" + human_bytes(-count)
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def human_ms(value: Any) -> str:
    return f"{float(value):.1f} ms" if isinstance(value, int | float) else "-"


def progress_for(json_output: bool) -> Progress:
    """Progress lines on a terminal; nothing when output is JSON or not a terminal."""
    if json_output or not sys.stderr.isatty():
        return NO_PROGRESS
    return TerminalProgress()


def layer_row(manifest: LayerManifest) -> dict[str, Any]:
    """A layer in the shared vocabulary."""
    return {
        "layer": manifest.id,
        "parent": manifest.parent,
        "guest": manifest.guest,
        "created": manifest.created,
        "mechanism": manifest.mechanism,
        "pause_ms": manifest.stats.get("pause_ms"),
        "pages_stored": sum(b.pages_stored for b in manifest.blocks),
        "pages_zeroed": sum(b.pages_zeroed for b in manifest.blocks),
        "bytes": manifest.bytes_total,
        "total_s": manifest.stats.get("total_s"),
        "origin": manifest.origin,  # local, host:NAME, adopted, unsealed, no-key (keys.py)
    }


def checkpoint_line(row: dict[str, Any]) -> str:
    """One checkpoint, as ``checkpoint`` and ``watch`` print it."""
    zeroed = f" (+{row['pages_zeroed']} zeroed)" if row.get("pages_zeroed") else ""
    total = row.get("total_s")
    where = f"  on {row['host']}" if row.get("host") not in (None, "local") else ""
    note = f"  ({row['note']})" if row.get("note") else ""
    return (
        f"layer {row['layer']}  parent {row.get('parent') or '-'}  "
        f"pause {human_ms(row.get('pause_ms'))}  pages {row.get('pages_stored')}{zeroed}  "
        f"size {human_bytes(row.get('bytes'))}  "
        f"total {f'{total:.2f} s' if isinstance(total, int | float) else '-'}  "
        f"[{row.get('mechanism')}]{where}{note}"
    )


def layer_tree(rows: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The layers as a tree: (prefix, row) in display order.

    A chain continues on one level; where a layer has several children, each
    child's branch is drawn with ``├─``/``└─``, so forks are visible and a long
    chain does not drift to the right. Layers whose parent is not in the store
    (a damaged chain, a layer copied alone) are shown as roots.
    """
    by_id = {row["layer"]: row for row in rows}
    children: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        parent = row.get("parent")
        children.setdefault(parent if parent in by_id else None, []).append(row)
    out: list[tuple[str, dict[str, Any]]] = []
    # (row, prefix of its first line, prefix of the lines of its chain after it)
    stack: list[tuple[dict[str, Any], str, str]] = [
        (root, "", "") for root in reversed(children.get(None, []))
    ]
    while stack:
        row, first, rest = stack.pop()
        out.append((first, row))
        kids = children.get(row["layer"], [])
        if len(kids) == 1:
            stack.append((kids[0], rest, rest))
        else:
            for index in reversed(range(len(kids))):
                last = index == len(kids) - 1
                stack.append(
                    (
                        kids[index],
                        rest + ("└─ " if last else "├─ "),
                        rest + ("   " if last else "│  "),
                    )
                )
    return out


def table(headers: Sequence[str], lines: Iterable[Sequence[str]], right: set[int]) -> list[str]:
    """Fixed-width columns; ``right`` are the indexes of right-aligned ones."""
    rows = [list(headers), *[list(line) for line in lines]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    text = []
    for r in rows:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        text.append("  ".join(cells).rstrip())
    return text
