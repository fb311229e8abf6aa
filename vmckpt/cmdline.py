"""A ``vmckpt`` command line read before anything of vmckpt is imported: which command it
names. The launcher (vmckpt/launcher.py) and the CLI (vmckpt/cli/) both ask."""

from __future__ import annotations

from collections.abc import Sequence

GLOBAL_FLAGS = ("-v", "--verbose", "--json-errors")


def command_of(argv: Sequence[str]) -> str | None:
    """The command a command line names (its first word after the global flags), if any."""
    for arg in argv:
        if arg in GLOBAL_FLAGS or (arg.startswith("-v") and set(arg[1:]) == {"v"}):
            continue
        return arg
    return None
