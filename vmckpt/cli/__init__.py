"""The ``vmckpt`` command: it parses arguments and dispatches; the work is elsewhere.

Every VmckptError becomes one line on stderr and the error's exit code
(listed by ``vmckpt --help``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from vmckpt import __version__, log
from vmckpt.cmdline import command_of
from vmckpt.errors import VmckptError, exit_codes
from vmckpt.mechanisms import pageserver_fork

EXAMPLES = """\
examples:
  vmckpt init st && export VMCKPT_STORE=st      # a store, and the default for what follows
  vmckpt run web --kernel vmlinuz --initrd initrd.img --append console=ttyS0 --detach
  vmckpt checkpoint web                         # a layer: only the pages written since the last
  vmckpt watch web --interval 1s --count 60     # a layer a second
  vmckpt list                                   # the layers as a tree, and the guests
  vmckpt stop web && vmckpt restore --layer 0002 --name web --detach
  vmckpt restore --layer 0002 --host root@other --detach     # on another host, over SSH
"""


def _epilog() -> str:
    codes = "\n".join(f"  {code:>3}  {text}" for code, text in exit_codes())
    return f"{EXAMPLES}\nexit codes:\n{codes}\n"


# One module per command family (borg's archiver): each adds its commands. A command
# imports its own family only (a family's imports are most of a command's start: a lazy
# restore's is timed from the command's start); --help and a mistyped command import all.
# tests/test_cli.py checks this table against the commands each family adds.
FAMILIES = {
    "store_cmds": ("init", "check", "list", "inspect", "verify", "push"),
    "guest_cmds": ("run", "console", "stop", "pause", "resume"),
    "checkpoint_cmds": ("checkpoint", "watch"),
    "restore_cmds": ("restore", "migrate"),
    "maintenance": ("prune", "squash", "delete", "gc"),
    "helper_cmds": ("helper",),
}


def families_for(argv: Sequence[str]) -> list[str]:
    """The family modules a command line needs: the one of its command, or all of them."""
    command = command_of(argv)
    for family, commands in FAMILIES.items():
        if command in commands:
            return [family]
    return list(FAMILIES)


# A restore that is not lazy: no page server to fork (or help only).
_NOT_LAZY = frozenset({"--no-lazy", "--host", "--libvirt-define", "-h", "--help"})


def forks_a_page_server(argv: Sequence[str]) -> bool:
    """Whether the command line is a restore that is lazy where the host allows it: its
    page server is then forked before the command imports the rest of vmckpt (a guess made
    before parsing: a server no restore takes exits untouched)."""
    return command_of(argv) == "restore" and not any(
        arg.split("=", 1)[0] in _NOT_LAZY for arg in argv
    )


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``argv``'s command (of every command if ``argv`` is None or names none)."""
    from vmckpt.cli._common import Formatter, Parser

    parser = Parser(
        prog="vmckpt",
        description="Incremental, short-pause checkpoints of whole QEMU guests, restored anywhere.",
        epilog=_epilog(),
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"vmckpt {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="say what vmckpt does (-vv: every QMP command and event)",
    )  # fmt: skip
    parser.add_argument(
        "--json-errors", action="store_true",
        help="an error as one JSON object on stderr (for programs: another vmckpt relaying "
        "this one's), instead of one line of text",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help_text: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=Formatter)
        p.set_defaults(func=func)
        return p

    for family in families_for(argv) if argv is not None else FAMILIES:
        importlib.import_module(f"vmckpt.cli.{family}").add_parsers(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else list(argv)
    if forks_a_page_server(arguments):
        # Before anything else of vmckpt is imported: its imports (numpy) run beside this
        # process's (vmckpt/mechanisms/pageserver_fork.py).
        pageserver_fork.fork_early()
    try:
        return _main(arguments)
    finally:
        pageserver_fork.discard_early()  # a restore that did not take it: it exits


def _main(arguments: list[str]) -> int:
    parser = build_parser(arguments)
    args = parser.parse_args(arguments)
    log.configure(args.verbose)
    # What the imports made lives as long as the process: no collection needs to scan it,
    # the one at exit included (measured: 0.1 s of a lazy restore's 0.5 s command).
    gc.freeze()
    try:
        code: int = args.func(args)
        return code
    except VmckptError as exc:
        return _report(args, exc)
    except KeyboardInterrupt:
        print(f"vmckpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    # Every failure vmckpt foresees is a VmckptError; what escapes one is still said in one
    # line (-v adds the traceback): an OSError names its file, anything else is a bug.
    except OSError as exc:
        logging.getLogger(log.ROOT).info("where it failed", exc_info=True)
        return _report(args, VmckptError(str(exc)))
    except Exception as exc:
        logging.getLogger(log.ROOT).info("where it failed", exc_info=True)
        bug = f"internal error, a bug in vmckpt ({type(exc).__name__}: {exc}); -v shows where"
        return _report(args, VmckptError(bug))


def _report(args: argparse.Namespace, exc: VmckptError) -> int:
    if args.json_errors:
        print(json.dumps(exc.to_wire(), sort_keys=True), file=sys.stderr)
    else:
        print(f"vmckpt {args.command}: error: {exc.one_line()}", file=sys.stderr)
    return exc.exit_code


def finish() -> None:
    """What a command's process does before it exits without the interpreter's teardown of
    every module (~25 ms of a lazy restore's command, measured): by then each command has
    written, closed and waited for what it started (its threads are daemons, its files
    closed by ``with``); stdio and the log are flushed here."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say there
            stream.flush()


def run() -> NoReturn:
    """The command run in this process (vmckpt/launcher.py runs it where no helper does):
    :func:`main`, then :func:`finish` and exit."""
    code = main()
    finish()
    os._exit(code)


if __name__ == "__main__":
    run()
