"""``vmckpt helper``: keep a vmckpt warm on this host for the commands that start guests."""

from __future__ import annotations

import argparse

from vmckpt.cli._common import Command


def cmd_helper(args: argparse.Namespace) -> int:
    from vmckpt import helper

    return helper.serve(verbose=args.verbose > 0)


def add_parsers(command: Command) -> None:
    command(
        "helper",
        cmd_helper,
        "serve this host's restore and run --detach commands from a vmckpt kept warm (every "
        "import done: a lazy restore's guest runs ~0.2 s sooner); runs until SIGTERM/SIGINT",
    )
