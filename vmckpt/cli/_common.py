"""What the command families share (borg's archiver/_common.py): the store a command works
on, the guest it names, the options several commands take, durations, and argparse's help
and error format."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from vmckpt.errors import UsageError
from vmckpt.images import Store
from vmckpt.images.bucket import BucketConfig, BucketUrl, is_bucket_url
from vmckpt.remote import DEFAULT_REMOTE_STORE
from vmckpt.remote.ssh import DEFAULT_KNOWN_HOSTS

# The kinds of guest and the store in a bucket are imported where a command reaches them:
# a command loads what it uses (vmckpt/cli/__init__.py).
if TYPE_CHECKING:
    from vmckpt.guests import Guest
    from vmckpt.images.bucketstore import BucketStore

STORE_ENV = "VMCKPT_STORE"

# How a family module adds a command: command(name, func, help) -> its parser.
Command = Callable[[str, Callable[[argparse.Namespace], int], str], argparse.ArgumentParser]


def _given_store(args: argparse.Namespace) -> str:
    given: str | None = args.store or os.environ.get(STORE_ENV)
    if not given:
        raise UsageError(f"no store given: pass --store DIR or set {STORE_ENV}")
    return given


def store_path(args: argparse.Namespace) -> Path:
    """The store a command works on: --store, else $VMCKPT_STORE; always absolute."""
    return Path(_given_store(args)).expanduser().absolute()


def open_bucket(args: argparse.Namespace) -> BucketStore | None:
    """The store in a bucket the command works on (--store s3://BUCKET/PREFIX), reached
    through this host's working copy; None for a directory store."""
    given = _given_store(args)
    if not is_bucket_url(given):
        return None
    from vmckpt.images.bucketstore import BucketStore

    config = BucketConfig.resolve(profile=getattr(args, "profile", None))
    return BucketStore.open(BucketUrl.parse(given), config)[0]


def open_store(args: argparse.Namespace) -> Store:
    """The store a command works on; for a store in a bucket, this host's working copy."""
    bucket = open_bucket(args)
    if bucket is not None:
        return bucket.local
    if getattr(args, "create", False):
        return Store.create(store_path(args))
    return Store(store_path(args))


def follow(chunks: Any) -> None:
    try:
        for chunk in chunks:
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


def parse_duration(text: str, *, zero: bool = False) -> float:
    """'1s', '500ms', '2m', '12h', '7d', '2w', '0.5' (seconds) -> seconds; finite, positive
    (or zero, if ``zero``)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(ms|s|m|h|d|w)?\s*", text)
    if not match:
        raise UsageError(f"cannot read duration {text!r} (use e.g. 1s, 500ms, 2m, 7d)")
    factor = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}[
        match.group(2) or "s"
    ]
    seconds = float(match.group(1)) * factor
    if seconds < 0 or (seconds == 0 and not zero):
        raise UsageError(f"duration {text!r} must be positive")
    return seconds


def guest_of(args: argparse.Namespace, store: Store) -> Guest:
    from vmckpt.guests import open_guest

    libvirt = getattr(args, "libvirt", None)
    if bool(args.name) == bool(libvirt):
        raise UsageError("give either a guest NAME or --libvirt DOMAIN")
    if getattr(args, "connect", None) and not libvirt:
        raise UsageError("--connect goes with --libvirt")
    return open_guest(store, args.name, libvirt=libvirt, uri=getattr(args, "connect", None))


class Formatter(argparse.RawDescriptionHelpFormatter):
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


class Parser(argparse.ArgumentParser):
    """argparse, with a bad value refused in one line (and exit code 2) like every error,
    and no abbreviated options: argparse would take ``--qemu X`` for ``--qemu-arg X`` and
    hand QEMU the path as its first disk."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        metavar="DIR",
        help=f"the store: a directory, or s3://BUCKET/PREFIX (default: ${STORE_ENV})",
    )
    p.add_argument(
        "--profile",
        metavar="NAME",
        help="for a store in a bucket: the ~/.aws/config profile (default: $AWS_PROFILE, else "
        "default) that gives what the AWS_* variables do not",
    )


def json_option(p: argparse.ArgumentParser, what: str = "print JSON instead of text") -> None:
    p.add_argument("--json", action="store_true", help=what)


def libvirt_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--libvirt", metavar="DOMAIN", help="a running libvirt domain instead of NAME")
    p.add_argument(
        "--connect", metavar="URI", help="libvirt URI (default qemu:///system) for --libvirt"
    )


def mechanism_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mechanism",
        choices=["auto", "colo", "precopy-diff"],
        default="auto",
        help="auto: colo where QEMU runs it safely (vmckpt check says), else precopy-diff; "
        "colo is refused where it is not safe",
    )


def ssh_options(p: argparse.ArgumentParser) -> None:
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
