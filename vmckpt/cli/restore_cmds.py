"""The commands that bring a guest back or move it: ``restore`` and ``migrate``."""

from __future__ import annotations

import argparse
import contextlib
import re
from pathlib import Path
from typing import Any

from vmckpt import faults
from vmckpt.cli._common import (
    Command,
    follow,
    json_option,
    open_bucket,
    open_store,
    ssh_options,
    store_option,
)
from vmckpt.cli.output import (
    human_bytes,
    human_ms,
    print_json,
    progress_for,
)
from vmckpt.errors import RestoreError, UsageError, VmckptError
from vmckpt.guests.local import LocalGuest
from vmckpt.machine.spec import (
    check_name,
)
from vmckpt.mechanisms import api
from vmckpt.mechanisms.pageserver import failure_of

MAX_CLONES = 64


def _target(args: argparse.Namespace, host: str) -> Any:
    from vmckpt.guests.remote import RemoteTarget
    from vmckpt.remote.ssh import HostAddress, SshOptions

    return RemoteTarget(
        address=HostAddress.parse(host),
        store=args.remote_store,
        python=args.remote_python,
        ssh=SshOptions(
            identity=args.identity,
            known_hosts=args.known_hosts,
            accept_new_host_key=args.accept_new_host_key,
        ),
    )


def _destination(args: argparse.Namespace) -> api.Destination:
    """Where ``restore`` brings the layer back, from its options."""
    if args.libvirt_define:
        from vmckpt.qmp.libvirt import DEFAULT_URI

        if args.host or args.name:
            raise UsageError("--libvirt-define names the domain; it goes without --host/--name")
        name = check_name(args.libvirt_define, "domain name")
        disk_dir = Path(args.disk_dir).absolute() if args.disk_dir else None
        return api.AsDomain(name, args.connect or DEFAULT_URI, disk_dir)
    if args.connect:
        raise UsageError("--connect goes with --libvirt-define")
    if args.disk_dir:
        raise UsageError("--disk-dir goes with --libvirt-define (vmckpt keeps its guests' disks)")
    if args.host:
        if args.clones is not None:
            raise UsageError("--clones starts clones on this host; it goes without --host")
        return api.OnHost(_target(args, args.host), args.name)
    return api.Here(args.name, args.clones)


def _options(args: argparse.Namespace) -> api.RestoreOptions:
    if args.watch is not None and args.watch < 0:
        raise UsageError("--watch must be 0 or more seconds")
    if args.clones is not None:
        if not 1 <= args.clones <= MAX_CLONES:
            raise UsageError(f"--clones must be between 1 and {MAX_CLONES}")
        if args.same_identity:
            raise UsageError(
                "clones each get their own identity: --same-identity restores one guest"
            )
    if args.libvirt_define and (args.lazy != "auto" or args.same_identity or args.clones):
        raise UsageError(
            "--lazy, --no-lazy, --same-identity and --clones restore into a QEMU of vmckpt's: "
            "they go without --libvirt-define"
        )
    return api.RestoreOptions(args.lazy, args.same_identity, args.watch)


def cmd_restore(args: argparse.Namespace) -> int:
    faults.point(faults.RESTORE_START)
    bucket = open_bucket(args)
    store = bucket.local if bucket is not None else open_store(args)
    destination = _destination(args)
    if bucket is not None:  # the chain's layers this host lacks, fetched and checked
        args.layer = bucket.fetch(args.layer)[0]
    results, guest = api.restore(
        store, args.layer, destination,
        qemu_args=tuple(args.qemu_arg) if args.qemu_arg else None,
        progress=progress_for(args.json), options=_options(args),
    )  # fmt: skip
    if args.json:
        if isinstance(destination, api.Here) and destination.clones is not None:
            print_json({"clones": [result.to_dict() for result in results]})
        else:
            print_json(results[0].to_dict())
    else:
        for result in results:
            print(result.summary())
    if bucket is not None:
        bucket.push()  # the restored guests' heads
    if args.detach or guest is None:
        return 0
    try:
        follow(guest.console(True))
    finally:
        with contextlib.suppress(VmckptError):
            if isinstance(guest, LocalGuest) and guest.process().alive():
                print(f"\nstopping guest {guest.name}")
                print(api.stop(guest))
    if isinstance(guest, LocalGuest):
        failed = failure_of(store, guest.name)  # a page found damaged while it was served
        if failed is not None:
            raise RestoreError(failed, vm=guest.name, layer=results[0].layer, step="serve pages")
    return 0


def parse_rate(text: str) -> int:
    """'20M', '512K', '1G', '1000000' -> bytes per second."""
    match = re.fullmatch(r"\s*(\d+)\s*([KkMmGg]?)(i?[Bb](/s)?)?\s*", text)
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"cannot read rate {text!r} (use e.g. 20M for 20 MiB/s)")
    shift = {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2).lower()]
    return int(match.group(1)) << shift


def cmd_migrate(args: argparse.Namespace) -> int:
    from vmckpt.guests.remote import RemoteGuest
    from vmckpt.mechanisms.migrate import MigrateSettings, migrate_by_layers, migrate_guest

    store = open_store(args)
    check_name(args.name)
    to = None if args.to == "local" else _target(args, args.to)
    settings = MigrateSettings(
        bandwidth=parse_rate(args.bandwidth) if args.bandwidth else 0,
        downtime_limit_ms=args.downtime_limit,
        heartbeat_s=args.heartbeat,
        stall_s=args.heartbeat,
        listen=args.listen,
    )
    if args.mechanism == "layers":
        if to is None or RemoteGuest.load(store, args.name) is not None:
            raise UsageError("--mechanism layers moves a guest from this host to another only")
        result = migrate_by_layers(store, args.name, to, settings)
    else:
        result = migrate_guest(store, args.name, to, settings)
    if args.json:
        print_json(result.to_dict())
        return 0
    downtime = human_ms(result.downtime_ms)
    print(
        f"guest {result.name} migrated {result.source} -> {result.destination}, "
        f"PID {result.dest_pid} there: downtime {downtime} (QEMU: {result.qemu_downtime_ms} ms), "
        f"total {result.total_s:.2f} s (memory transfer {result.migrate_s:.2f} s, "
        f"{human_bytes(result.bytes_sent)}) [{result.mechanism}]"
    )
    return 0


def add_parsers(command: Command) -> None:
    p = command("restore", cmd_restore, "bring a guest back from a layer")
    store_option(p)
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
    p.add_argument(
        "--disk-dir",
        metavar="DIR",
        help="with --libvirt-define: where the domain's restored disk images go (default: "
        "each beside its original)",
    )
    p.add_argument("--host", metavar="[USER@]HOST[:PORT]", help="restore on another host, over SSH")
    lazy = p.add_mutually_exclusive_group()
    lazy.add_argument(
        "--lazy",
        dest="lazy",
        action="store_const",
        const="always",
        default="auto",
        help="the guest runs at once and its pages come from the store as it needs them "
        "(a page server pushes the rest); the default where the host allows it: refused in "
        "one line where it does not",
    )
    lazy.add_argument(
        "--no-lazy",
        dest="lazy",
        action="store_const",
        const="never",
        help="load every page before the guest runs",
    )
    p.add_argument(
        "--clones",
        type=int,
        metavar="N",
        help="start N clones of the layer, named NAME-1..NAME-N, each with its own identity "
        "(a new VM generation ID), sharing one read of the store",
    )
    p.add_argument(
        "--same-identity",
        action="store_true",
        help="keep the layer's VM generation ID (the guest does not learn it was restored)",
    )
    p.add_argument(
        "--watch",
        type=float,
        metavar="S",
        help="watch the restored guest this long before the restore counts (one that dies, "
        "panics or resets fails it; default: 1 s for a full restore, none for a lazy one)",
    )
    ssh_options(p)
    p.add_argument("--detach", action="store_true", help="return once the guest runs")
    json_option(p)

    p = command("migrate", cmd_migrate, "live-migrate a guest to another host (or back)")
    p.add_argument("name", help="the guest")
    store_option(p)
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
    json_option(p)
    ssh_options(p)
