"""Where this host's runtime directories are, and nothing else: the one answer, light enough
for the ``vmckpt`` launcher to ask before it imports anything (vmckpt/launcher.py looks for a
helper there); vmckpt/hostdirs.py builds on it."""

from __future__ import annotations

import os

RUNTIME_ENV = "VMCKPT_RUNTIME_DIR"


def runtime_root() -> str:
    """``$VMCKPT_RUNTIME_DIR`` (made absolute), else ``/run/vmckpt`` as root, else
    ``$XDG_RUNTIME_DIR/vmckpt``, else ``vmckpt-UID`` in the temporary directory."""
    given = os.environ.get(RUNTIME_ENV)
    if given:
        return os.path.join(os.getcwd(), given)
    if os.geteuid() == 0:
        return "/run/vmckpt"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(xdg, "vmckpt")
    import tempfile  # rarely needed, and its import is not free

    return os.path.join(tempfile.gettempdir(), f"vmckpt-{os.geteuid()}")
