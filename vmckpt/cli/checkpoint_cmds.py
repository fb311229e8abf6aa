"""The commands that checkpoint: ``checkpoint`` and ``watch``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vmckpt.cli._common import (
    Command,
    guest_of,
    json_option,
    libvirt_options,
    mechanism_option,
    open_bucket,
    open_store,
    parse_duration,
    store_option,
)
from vmckpt.cli.maintenance import add_keep_options, keep_rules
from vmckpt.cli.output import (
    checkpoint_line,
    print_json,
    print_json_line,
    progress_for,
)
from vmckpt.errors import BucketError, UsageError
from vmckpt.images.bucketstore import BucketStore
from vmckpt.log import get as get_log
from vmckpt.mechanisms import api
from vmckpt.mechanisms.layers import CheckpointSettings
from vmckpt.mechanisms.watch import WatchSettings, stop_on_signals

CHECKPOINT_WAIT_S = 60.0  # another checkpoint of the guest under way: wait this long
_log = get_log(__name__)


def push_after(bucket: BucketStore, row: dict[str, Any]) -> None:
    """A store in a bucket: the layer just committed here (the guest runs again) uploaded,
    then made visible; a failure keeps it here for `vmckpt push`."""
    try:
        bucket.push()
    except BucketError as exc:
        raise BucketError(
            f"{exc.message}; layer {row.get('layer')} is kept on this host: `vmckpt push "
            f"--store {bucket.name}` uploads it",
            layer=exc.layer,
            step=exc.step,
        ) from exc


def cmd_checkpoint(args: argparse.Namespace) -> int:
    bucket = open_bucket(args)
    store = bucket.local if bucket is not None else open_store(args)
    guest = guest_of(args, store)
    settings = CheckpointSettings(lock_wait_s=args.wait)
    # A Ctrl-C lets the checkpoint finish (a second one aborts it, still cleanly).
    with stop_on_signals():
        row = api.checkpoint(
            guest, settings, progress=progress_for(args.json), mechanism=args.mechanism
        )
    print_json(row) if args.json else print(checkpoint_line(row))
    if bucket is not None:
        sys.stdout.flush()  # the layer is said before the upload, however that ends
        push_after(bucket, row)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    bucket = open_bucket(args)
    store = bucket.local if bucket is not None else open_store(args)
    keep = keep_rules(args)
    if bucket is not None and keep.any():
        raise UsageError(
            "watch --keep-… prunes the watch's own chain, which a store in a bucket keeps whole "
            "(a layer another builds on stays there): not supported on a store in a bucket"
        )
    guest = guest_of(args, store)
    settings = WatchSettings(
        interval_s=parse_duration(args.interval),
        count=args.count,
        pause_budget_ms=args.pause_budget,
        keep=keep if keep.any() else None,
        prune_every_s=parse_duration(args.prune_every, zero=True),
    )
    mechanism = "colo" if args.colo else args.mechanism

    def report(row: dict[str, Any]) -> None:
        print_json_line(row) if args.json else print(checkpoint_line(row), flush=True)
        if bucket is not None:
            try:
                push_after(bucket, row)
            except BucketError as exc:  # the watch goes on; the next push takes it too
                _log.warning("%s", exc.one_line())

    taken = api.watch(
        guest, settings, report, progress=progress_for(args.json), mechanism=mechanism
    )
    if not args.json:
        print(f"watch ended after {taken} checkpoint(s); guest {guest.name} runs on")
    return 0


def add_parsers(command: Command) -> None:
    p = command("checkpoint", cmd_checkpoint, "checkpoint a running guest into a layer")
    p.add_argument("name", nargs="?", help="the guest")
    store_option(p)
    libvirt_options(p)
    p.add_argument(
        "--wait",
        type=float,
        default=CHECKPOINT_WAIT_S,
        metavar="S",
        help="seconds to wait for a checkpoint of the guest already under way",
    )
    mechanism_option(p)
    json_option(p, "print the layer as JSON (README: Output)")

    p = command("watch", cmd_watch, "checkpoint a running guest periodically")
    p.add_argument("name", nargs="?", help="the guest")
    store_option(p)
    libvirt_options(p)
    p.add_argument("--interval", default="1s", help="time between checkpoints (1s, 500ms, 2m)")
    p.add_argument("--count", type=int, help="stop after this many checkpoints (default: never)")
    p.add_argument(
        "--pause-budget",
        type=float,
        metavar="MS",
        help="set QEMU's downtime limit for the final stop to this; layers whose pause "
        "exceeded it are reported",
    )
    mechanism_option(p)
    p.add_argument("--colo", action="store_true", help="the same as --mechanism colo")
    json_option(p, "one JSON object per checkpoint (README: Output)")
    add_keep_options(p)
    p.add_argument(
        "--prune-every", default="1m", metavar="DURATION",
        help="with --keep-*: prune the guest's layers at most this often, between checkpoints "
        "(0: after every checkpoint)",
    )  # fmt: skip
