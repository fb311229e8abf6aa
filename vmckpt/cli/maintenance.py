"""The commands that shorten chains and free space: ``prune``, ``squash``, ``delete``, ``gc``,
and the retention options ``watch`` shares with ``prune``. They parse and print; the work is
in vmckpt/images/maintenance.py (and vmckpt/guests/local.py says which guests are gone)."""

from __future__ import annotations

import argparse

from vmckpt.cli._common import (
    Command,
    json_option,
    open_bucket,
    open_store,
    parse_duration,
    store_option,
)
from vmckpt.cli.output import human_bytes, print_json, progress_for
from vmckpt.errors import UsageError
from vmckpt.guests.local import gone_guests
from vmckpt.images import bucketmaint
from vmckpt.images.maintenance import Result, delete, gc, prune, squash
from vmckpt.images.retention import PERIODS, KeepRules

GONE_AFTER = "7d"
UNITS = ("minutes", "hours", "days", "ISO weeks", "months")  # of PERIODS, in local time


def add_keep_options(p: argparse.ArgumentParser) -> None:
    """The retention rules (borg's, for layers)."""
    g = p.add_argument_group("retention rules (a layer any rule selects is kept)")
    g.add_argument("--keep-last", type=int, default=0, metavar="N", help="the N newest layers")
    g.add_argument(
        "--keep-within", metavar="DURATION",
        help="every layer younger than DURATION (e.g. 2h, 7d)",
    )  # fmt: skip
    for period, unit in zip(PERIODS, UNITS, strict=True):
        g.add_argument(
            f"--keep-{period}", type=int, default=0, metavar="N",
            help=f"the newest layer of each of the N most recent {unit} that have layers",
        )  # fmt: skip


def keep_rules(args: argparse.Namespace) -> KeepRules:
    return KeepRules(
        last=args.keep_last,
        within_s=parse_duration(args.keep_within) if args.keep_within else 0.0,
        **{period: getattr(args, f"keep_{period}") for period in PERIODS},
    )


def add_parsers(command: Command) -> None:
    """Add the maintenance commands."""

    def store_and_json(p: argparse.ArgumentParser) -> None:
        store_option(p)
        json_option(p)

    p = command(
        "prune",
        cmd_prune,
        "remove the layers retention rules do not keep; a guest's head always stays, and a "
        "kept layer whose parent goes absorbs it (it restores exactly as before)",
    )
    store_and_json(p)
    add_keep_options(p)
    p.add_argument(
        "--guest", metavar="NAME",
        help="only this guest's layers (without it: every guest's, each ruled on its own)",
    )  # fmt: skip
    p.add_argument("-n", "--dry-run", action="store_true", help="say what would go; change nothing")
    p.add_argument("--list", action="store_true", help="list each layer kept (and why) too")

    p = command(
        "squash",
        cmd_squash,
        "LAYER: make LAYER a base layer (it absorbs its chain; the layers below stay); "
        "FROM..TO: merge that run of one chain into TO (the others go; branches off the run "
        "absorb them too)",
    )
    store_and_json(p)
    p.add_argument("layers", metavar="LAYER|FROM..TO", help="layer ids or unique prefixes")
    p.add_argument("-n", "--dry-run", action="store_true", help="say what would change")

    p = command(
        "delete",
        cmd_delete,
        "remove one layer that is no guest's head (its children, if any, absorb it)",
    )
    store_and_json(p)
    p.add_argument("layer", help="layer id or unique prefix")
    p.add_argument("-n", "--dry-run", action="store_true", help="say what would change")

    p = command(
        "gc",
        cmd_gc,
        "remove what no layer or live guest needs: leftovers of crashes and interrupted "
        "commands, and the records of guests long gone",
    )
    store_and_json(p)
    p.add_argument(
        "--gone-after", default=GONE_AFTER, metavar="DURATION",
        help="a guest whose QEMU is not running and whose files did not change for this "
        "long is gone (its records, head, logs and restored disks are removed)",
    )  # fmt: skip
    p.add_argument("-n", "--dry-run", action="store_true", help="say what would go")
    p.add_argument(
        "--upload-grace", default="1h", metavar="DURATION",
        help="a store in a bucket: the objects of a layer no catalog names are an interrupted "
        "upload once this old (younger, they may be one under way)",
    )  # fmt: skip


def _summary(result: Result) -> str:
    verb = "would free" if result.dry_run else "freed"
    what = "prune" if result.action == "prune" else result.action
    return (
        f"{what}: {len(result.removed)} layer(s) {'to remove' if result.dry_run else 'removed'}, "
        f"{len(result.rewritten)} {'to rewrite' if result.dry_run else 'rewritten'} (same ids, "
        f"same contents), {verb} {human_bytes(result.bytes_freed)}"
        + ("  [dry run: nothing changed]" if result.dry_run else "")
    )


def _print(result: Result, args: argparse.Namespace, *, list_kept: bool = False) -> None:
    if args.json:
        print_json(result.to_dict())
        return
    if list_kept:
        for layer_id, why in sorted(result.kept.items()):
            print(f"keep     {layer_id}  {why}")
    for layer_id in result.removed:
        print(f"{'would remove' if result.dry_run else 'removed':<8} {layer_id}")
    for layer_id in result.rewritten:
        print(f"{'would rewrite' if result.dry_run else 'rewrote':<8} {layer_id}")
    print(_summary(result))


def cmd_prune(args: argparse.Namespace) -> int:
    rules = keep_rules(args)
    bucket = open_bucket(args)
    if bucket is not None:
        result = bucketmaint.prune(bucket, rules, guest=args.guest, dry_run=args.dry_run)
        _print(result, args, list_kept=args.list)
        return 0
    result = prune(
        open_store(args), rules, guest=args.guest, dry_run=args.dry_run,
        progress=progress_for(args.json),
    )  # fmt: skip
    _print(result, args, list_kept=args.list)
    return 0


def cmd_squash(args: argparse.Namespace) -> int:
    first, sep, last = args.layers.partition("..")
    if sep and not (first and last):
        raise UsageError(f"{args.layers!r}: give FROM..TO with both ends")
    bucket = open_bucket(args)
    if bucket is not None:
        return _squash_bucket(bucketmaint.squash(
            bucket, first if sep else None, last if sep else first, dry_run=args.dry_run
        ), args)  # fmt: skip
    store = open_store(args)
    result = squash(store, first if sep else None, last if sep else first, dry_run=args.dry_run)
    if not result.rewritten and not args.json:
        print(f"nothing to do: {args.layers} is a base layer already")
        return 0
    _print(result, args)
    return 0


def _squash_bucket(done: bucketmaint.Squashed, args: argparse.Namespace) -> int:
    """A squash on a store in a bucket: a new layer replaces the run."""
    result = done.result
    if args.json:
        print_json({**result.to_dict(), "top": done.top, "new_layer": done.layer})
        return 0
    if not result.removed and done.layer is None and not result.dry_run:
        print(f"nothing to do: {done.top} is a base layer already")
        return 0
    on = f"on {done.parent}" if done.parent else "a base layer"
    if done.layer is None:
        print(f"would write a new layer ({on}) that restores as {done.top} does")
    else:
        print(f"wrote    {done.layer} ({on}): it restores as {done.top} did")
    _print(result, args)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    bucket = open_bucket(args)
    if bucket is not None:
        _print(bucketmaint.delete(bucket, args.layer, dry_run=args.dry_run), args)
        return 0
    _print(delete(open_store(args), args.layer, dry_run=args.dry_run), args)
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    bucket = open_bucket(args)
    store = bucket.local if bucket is not None else open_store(args)
    if bucket is not None and not args.dry_run:
        grace = parse_duration(args.upload_grace, zero=True)
        for layer_id in bucket.gc(grace):
            print(f"removed from {bucket.name}: the objects of {layer_id} (removed, or an "
                  "upload no catalog names)")  # fmt: skip
        for layer_id in bucket.trim():
            print(f"removed {layer_id} from this host's working copy (in {bucket.name}; "
                  "no guest here builds on it)")  # fmt: skip
    gone = gone_guests(store, parse_duration(args.gone_after))
    found = gc(store, gone, dry_run=args.dry_run)
    removed = [item for item in found if item.removed]
    left = [item for item in found if not item.removed]
    total = sum(item.bytes for item in removed)
    if args.json:
        print_json(
            {
                "removed": [{"path": i.path, "bytes": i.bytes, "why": i.why} for i in removed],
                "left": [{"path": i.path, "bytes": i.bytes, "why": i.why} for i in left],
                "bytes_freed": total,
                "dry_run": args.dry_run,
            }
        )
        return 0
    for item in removed:
        verb = "would remove" if args.dry_run else "removed"
        print(f"{verb} {item.path} ({human_bytes(item.bytes)}): {item.why}")
    for item in left:
        print(f"left {item.path} ({human_bytes(item.bytes)}): {item.why}")
    verb = "would free" if args.dry_run else "freed"
    print(f"gc: {len(removed)} item(s), {verb} {human_bytes(total)}")
    return 0
