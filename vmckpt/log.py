"""Logging: every module logs to ``vmckpt.<module>``; the CLI's ``-v`` shows it.

At the default level only warnings reach stderr (errors are reported by the
CLI as one line); ``-v`` adds what vmckpt does step by step, ``-vv`` every
QMP command and event (vmckpt.qmp at DEBUG).
"""

from __future__ import annotations

import logging
import sys

ROOT = "vmckpt"


def get(name: str) -> logging.Logger:
    """The logger of a vmckpt module: pass ``__name__``."""
    return logging.getLogger(name if name.startswith(ROOT) else f"{ROOT}.{name}")


def configure(verbosity: int) -> None:
    """0: warnings only; 1: vmckpt's steps (INFO); 2 or more: everything, QMP included."""
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else logging.DEBUG
    root = logging.getLogger(ROOT)
    root.setLevel(level)
    if not any(getattr(h, "_vmckpt", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            logging.Formatter("%(asctime)s.%(msecs)03d %(name)s: %(message)s", "%H:%M:%S")
        )
        handler._vmckpt = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.propagate = False
    # qemu.qmp logs connection failures itself; vmckpt reports them as one line.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL if verbosity < 3 else logging.DEBUG)
