"""The ``vmckpt`` command: it parses arguments and dispatches; the work is elsewhere.

Every VmckptError becomes one line on stderr and the error's exit code
(listed by ``vmckpt --help``).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from collections.abc import Callable, Sequence

from vmckpt import __version__, log
from vmckpt.cli import checkpoint_cmds, guest_cmds, maintenance, restore_cmds, store_cmds
from vmckpt.cli._common import Formatter, Parser
from vmckpt.errors import VmckptError, exit_codes

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


def build_parser() -> argparse.ArgumentParser:
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

    # One module per command family (borg's archiver): each adds its commands.
    store_cmds.add_parsers(command)  # init, check, list, inspect, verify
    guest_cmds.add_parsers(command)  # run, console, stop, pause, resume
    checkpoint_cmds.add_parsers(command)  # checkpoint, watch
    restore_cmds.add_parsers(command)  # restore, migrate
    maintenance.add_parsers(command)  # prune, squash, delete, gc
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.configure(args.verbose)
    # What the imports made lives as long as the process: no collection needs to scan it,
    # the one at exit included (measured: 0.1 s of a lazy restore's 0.5 s command).
    gc.freeze()
    try:
        code: int = args.func(args)
        return code
    except VmckptError as exc:
        if args.json_errors:
            print(json.dumps(exc.to_wire(), sort_keys=True), file=sys.stderr)
        else:
            print(f"vmckpt {args.command}: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"vmckpt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
