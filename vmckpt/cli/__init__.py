"""The ``vmckpt`` command: it parses arguments and dispatches; the work is elsewhere.

Every VmckptError becomes one line on stderr and the error's exit code
(listed by ``vmckpt --help``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import NoReturn

from vmckpt import __version__, log
from vmckpt.cli import commands, maintenance
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


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in its help (where it has one worth saying), epilogs as written."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            default not in (None, False, argparse.SUPPRESS)
            and "default" not in text
            and (action.option_strings or action.nargs in ("?", "*"))
        ):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad value refused in one line (and exit code 2) like every error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _store(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="DIR",
        help=f"the store (default: ${commands.STORE_ENV})",
    )


def _json(p: argparse.ArgumentParser, what: str = "print JSON instead of text") -> None:
    p.add_argument("--json", action="store_true", help=what)


def _libvirt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--libvirt", metavar="DOMAIN", help="a running libvirt domain instead of NAME")
    p.add_argument(
        "--connect", metavar="URI", help="libvirt URI (default qemu:///system) for --libvirt"
    )


def _mechanism(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mechanism",
        choices=["auto", "colo", "precopy-diff"],
        default="auto",
        help="auto: colo where QEMU runs it safely (vmckpt check says), else precopy-diff; "
        "colo is refused where it is not safe",
    )


def _ssh(p: argparse.ArgumentParser) -> None:
    from vmckpt.remote import DEFAULT_KNOWN_HOSTS, DEFAULT_REMOTE_STORE

    g = p.add_argument_group("other host (SSH)")
    g.add_argument("--identity", metavar="KEY", help="SSH private key (default: agent, ~/.ssh)")
    g.add_argument(
        "--known-hosts", metavar="FILE", default=DEFAULT_KNOWN_HOSTS, help="host keys to trust"
    )
    g.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust an unknown host key and add it to --known-hosts (a changed key is always "
        "refused)",
    )
    g.add_argument(
        "--remote-store",
        metavar="DIR",
        default=DEFAULT_REMOTE_STORE,
        help="the store on the other host (relative: to the remote home)",
    )
    g.add_argument(
        "--remote-python",
        metavar="CMD",
        default="python3",
        help="how to run Python with vmckpt there, e.g. 'env PYTHONPATH=/opt/vmckpt python3'",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="vmckpt",
        description="Incremental, short-pause checkpoints of whole QEMU guests, restored anywhere.",
        epilog=_epilog(),
        formatter_class=_Formatter,
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

    def command(name: str, func: object, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_Formatter)
        p.set_defaults(func=func)
        return p

    p = command("init", commands.cmd_init, "create a store (a directory of layers) and its key")
    p.add_argument("path", nargs="?", metavar="DIR", help="where (default: --store)")
    _store(p)
    p.add_argument(
        "--adopt",
        action="store_true",
        help="check an existing store's layers and seal those that do not authenticate with "
        "this user's key (a store made before format 1.3, or whose key is elsewhere): "
        "only for layers you trust",
    )
    p.add_argument(
        "--new-key",
        action="store_true",
        help="with --adopt: make a new key even though the layers authenticate with a key "
        "this user has (its copies elsewhere then no longer open the store; the layers are "
        "sealed anew as adopted, so their QEMU arguments are no longer used on restore)",
    )
    p.add_argument(
        "--accept-rollback",
        action="store_true",
        help="with --adopt: accept the store as it is although this user saw a later state of "
        "it (it was put back from a backup on purpose), or make its catalog anew if missing",
    )
    p.add_argument(
        "--encrypt",
        action="store_true",
        help="encrypt the store's layers at rest (ChaCha20-Poly1305, under a key derived from "
        "the store's key): chosen when the store is made, never later",
    )
    _json(p)

    p = command("check", commands.cmd_check, "what this host's QEMU supports, and the mechanisms")
    _json(p)

    p = command("run", commands.cmd_run, "start a guest under vmckpt")
    p.add_argument("name", help="the guest's name in the store")
    _store(p)
    p.add_argument("--create", action="store_true", help="create the store if it does not exist")
    p.add_argument("--kernel", metavar="FILE", help="a Linux or multiboot kernel to boot")
    p.add_argument(
        "--initrd",
        action="append",
        metavar="FILE",
        help="initrd of a Linux kernel; for a multiboot kernel its modules, 'FILE [ARGS],...' "
        "(QEMU's syntax, ',,' is a literal comma; repeatable)",
    )
    p.add_argument("--append", metavar="CMDLINE", help="the kernel command line")
    p.add_argument("--iso", metavar="FILE", help="a bootable ISO image (e.g. GRUB 2) instead")
    p.add_argument("--memory", default="512M", help="guest RAM, e.g. 512M or 1G")
    p.add_argument("--cpus", type=int, default=1, help="virtual CPUs")
    p.add_argument(
        "--accel",
        default="auto",
        choices=["auto", "kvm", "tcg"],
        help="auto: KVM where it really works, TCG otherwise",
    )
    p.add_argument("--machine", default="pc", help="QEMU machine type, e.g. pc or q35")
    p.add_argument("--cpu", help="QEMU CPU model (and features), e.g. max (default: QEMU's)")
    p.add_argument(
        "--disk",
        action="append",
        metavar="IMAGE[:ro]",
        help="a virtio disk (raw or qcow2; repeatable); writable ones are checkpointed, "
        ":ro ones referenced by content hash",
    )
    p.add_argument(
        "--qemu-arg",
        action="append",
        metavar="ARG",
        help="an extra QEMU argument (repeatable); reused on restore only from this store's "
        "own layers",
    )
    p.add_argument("--detach", action="store_true", help="return once the guest runs")
    p.add_argument(
        "--hint-after",
        metavar="TIME",
        help="if the guest prints nothing on its console for this long after it starts, or "
        "QEMU reports repeated resets, say so on stderr with the likely causes vmckpt can "
        "check (machine type, CPU model, memory for the image kind); 0: never. Default: "
        f"{commands.DEFAULT_HINT_AFTER_S:.0f}s in the foreground; with --detach only when given "
        "(run then waits that long before it returns)",
    )

    p = command("console", commands.cmd_console, "show a guest's serial console")
    p.add_argument("name", help="the guest")
    _store(p)
    p.add_argument("--follow", "-f", action="store_true", help="keep showing new output")

    p = command("checkpoint", commands.cmd_checkpoint, "checkpoint a running guest into a layer")
    p.add_argument("name", nargs="?", help="the guest")
    _store(p)
    _libvirt(p)
    p.add_argument(
        "--wait",
        type=float,
        default=commands.CHECKPOINT_WAIT_S,
        metavar="S",
        help="seconds to wait for a checkpoint of the guest already under way",
    )
    _mechanism(p)
    _json(p, "print the layer as JSON (README: Output)")

    p = command("watch", commands.cmd_watch, "checkpoint a running guest periodically")
    p.add_argument("name", nargs="?", help="the guest")
    _store(p)
    _libvirt(p)
    p.add_argument("--interval", default="1s", help="time between checkpoints (1s, 500ms, 2m)")
    p.add_argument("--count", type=int, help="stop after this many checkpoints (default: never)")
    p.add_argument(
        "--pause-budget",
        type=float,
        metavar="MS",
        help="set QEMU's downtime limit for the final stop to this; layers whose pause "
        "exceeded it are reported",
    )
    _mechanism(p)
    p.add_argument("--colo", action="store_true", help="the same as --mechanism colo")
    _json(p, "one JSON object per checkpoint (README: Output)")

    p = command("list", commands.cmd_list, "the layers (as a tree) and the guests of a store")
    _store(p)
    _json(p)

    p = command(
        "inspect", commands.cmd_inspect, "one layer in detail, and what restore passes QEMU"
    )
    _store(p)
    p.add_argument("layer", help="layer id or unique prefix (e.g. 0002)")
    _json(p)

    p = command(
        "verify",
        commands.cmd_verify,
        "check a layer's chain (or every layer); --boot: and whether it comes up alive",
    )
    _store(p)
    p.add_argument(
        "layer", nargs="?", help="layer id or prefix (default: every layer; --boot: the newest)"
    )
    p.add_argument(
        "--boot",
        action="store_true",
        help="also restore the layer in a throw-away QEMU, watch it and say whether it is "
        "alive (QEMU running, console output going on, no panic, reset or shutdown); exit code "
        "11 if not",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=5.0,
        metavar="S",
        help="how long --boot watches the restored guest",
    )
    p.add_argument(
        "--qemu-arg",
        action="append",
        metavar="ARG",
        help="with --boot: extra QEMU arguments to use instead of the layer's own (repeatable)",
    )
    _json(p)

    p = command("restore", commands.cmd_restore, "bring a guest back from a layer")
    _store(p)
    p.add_argument("--layer", metavar="ID", help="layer id or unique prefix (default: newest)")
    p.add_argument("--name", metavar="NAME", help="name of the restored guest (default: its own)")
    p.add_argument(
        "--qemu-arg",
        action="append",
        metavar="ARG",
        help="free-form QEMU arguments to use instead of the layer's own, which are used only "
        "if this store wrote the layer (origin local in inspect); repeatable, as "
        "--qemu-arg=-device --qemu-arg=virtio-rng-pci",
    )
    p.add_argument(
        "--libvirt-define",
        metavar="NAME",
        help="restore as a new libvirt domain NAME (layers taken with --libvirt)",
    )
    p.add_argument("--connect", metavar="URI", help="libvirt URI for --libvirt-define")
    p.add_argument("--host", metavar="[USER@]HOST[:PORT]", help="restore on another host, over SSH")
    _ssh(p)
    p.add_argument("--detach", action="store_true", help="return once the guest runs")
    _json(p)

    p = command("stop", commands.cmd_stop, "end a guest vmckpt started")
    p.add_argument("name", help="the guest")
    _store(p)

    p = command("pause", commands.cmd_pause, "pause a guest (QMP stop)")
    p.add_argument("name", help="the guest")
    _store(p)

    p = command(
        "resume", commands.cmd_resume, "run a paused guest (and clean up an interrupted checkpoint)"
    )
    p.add_argument("name", help="the guest")
    _store(p)

    p = command("migrate", commands.cmd_migrate, "live-migrate a guest to another host (or back)")
    p.add_argument("name", help="the guest")
    _store(p)
    p.add_argument(
        "--to", required=True, metavar="[USER@]HOST[:PORT]",
        help="the destination host, or 'local' to bring a guest back to this host",
    )  # fmt: skip
    p.add_argument(
        "--mechanism",
        choices=["qemu", "layers"],
        default="qemu",
        help="qemu: QEMU's own live migration, shortest pause; layers: send only the layers "
        "the destination lacks plus a final delta (a pause of seconds)",
    )
    p.add_argument("--listen", metavar="ADDR", help="destination address for QEMU's stream")
    p.add_argument("--bandwidth", metavar="RATE", help="cap QEMU's migration rate, e.g. 20M")
    p.add_argument(
        "--downtime-limit", type=int, default=50, metavar="MS", help="QEMU's downtime limit"
    )
    p.add_argument(
        "--heartbeat", type=float, default=10.0, metavar="S",
        help="a side silent this long counts as a cut connection",
    )  # fmt: skip
    _json(p)
    _ssh(p)

    maintenance.add_parsers(sub, command)  # prune, squash, delete, gc; watch --keep-*

    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log.configure(args.verbose)
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
