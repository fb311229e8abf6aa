"""The remote parts of the ``vmckpt`` command: options, ``restore --host``, ``migrate``, relays.

Kept here so that ``vmckpt/cli.py`` only calls in at a few places.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from vmckpt.errors import UsageError
from vmckpt.images import Store
from vmckpt.remote.migrate import MigrateSettings, migrate_by_layers, migrate_guest
from vmckpt.remote.ops import (
    DEFAULT_REMOTE_STORE,
    RemoteRecord,
    RemoteTarget,
    relay,
    remote_names,
    remote_status,
    restore_remote,
)
from vmckpt.remote.ssh import DEFAULT_KNOWN_HOSTS, HostAddress, SshOptions


def add_ssh_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("other host (SSH)")
    g.add_argument("--identity", metavar="KEY", help="SSH private key (default: agent, ~/.ssh)")
    g.add_argument(
        "--known-hosts",
        metavar="FILE",
        default=DEFAULT_KNOWN_HOSTS,
        help=f"host keys to trust (default {DEFAULT_KNOWN_HOSTS})",
    )
    g.add_argument(
        "--accept-new-host-key",
        action="store_true",
        help="trust an unknown host key and add it to --known-hosts (a changed key is "
        "always refused)",
    )
    g.add_argument(
        "--remote-store",
        metavar="DIR",
        default=DEFAULT_REMOTE_STORE,
        help=f"the store on the other host (default ~/{DEFAULT_REMOTE_STORE})",
    )
    g.add_argument(
        "--remote-python",
        metavar="CMD",
        default="python3",
        help="how to run Python with vmckpt there (default python3), e.g. "
        "'env PYTHONPATH=/opt/vmckpt python3'",
    )


def add_restore_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", metavar="[USER@]HOST[:PORT]", help="restore on another host, over SSH")
    add_ssh_options(p)


def add_migrate_parser(sub: Any) -> None:
    p = sub.add_parser("migrate", help="live-migrate a running guest to another host (or back)")
    p.add_argument("name")
    p.add_argument("--store", required=True, metavar="DIR", help="the image store directory")
    p.add_argument(
        "--to",
        required=True,
        metavar="[USER@]HOST[:PORT]",
        help="the destination host, or 'local' to bring a guest back to this host",
    )
    p.add_argument(
        "--mechanism",
        choices=["qemu", "layers"],
        default="qemu",
        help="qemu: QEMU's own live migration, shortest pause (default); layers: send only "
        "the layers the destination lacks plus a final delta (pause of seconds)",
    )
    p.add_argument("--listen", metavar="ADDR", help="destination address for QEMU's stream")
    p.add_argument(
        "--bandwidth", metavar="RATE", help="cap QEMU's migration rate, e.g. 20M (bytes/s)"
    )
    p.add_argument("--downtime-limit", type=int, default=50, metavar="MS")
    p.add_argument(
        "--heartbeat",
        type=float,
        default=10.0,
        metavar="S",
        help="a side silent this long counts as a cut connection",
    )
    p.add_argument("--json", action="store_true")
    add_ssh_options(p)
    p.set_defaults(func=cmd_migrate)


def parse_rate(text: str) -> int:
    """'20M', '512K', '1G', '1000000' -> bytes per second."""
    match = re.fullmatch(r"\s*(\d+)\s*([KkMmGg]?)(i?[Bb](/s)?)?\s*", text)
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"cannot read rate {text!r} (use e.g. 20M for 20 MiB/s)")
    shift = {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2).lower()]
    return int(match.group(1)) << shift


def target_of(args: argparse.Namespace, host: str) -> RemoteTarget:
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


def restore(args: argparse.Namespace, store: Store) -> int:
    result = restore_remote(store, args.layer, args.name, target_of(args, args.host))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
    else:
        print(
            f"guest {result.name} restored from layer {result.layer} on {result.host} "
            f"(store {result.remote_store}), PID {result.pid} there  "
            f"(copied {len(result.copied)} layer(s), {result.bytes_sent} bytes, reused "
            f"{len(result.reused)}; total {result.total_s:.2f} s)"
        )
    if args.detach:
        return 0
    record = RemoteRecord.load(store, result.name)
    assert record is not None
    return relay(store, record, "console", "--follow")


def cmd_migrate(args: argparse.Namespace) -> int:
    store = Store(args.store)
    to = None if args.to == "local" else target_of(args, args.to)
    if to is None:
        record = RemoteRecord.load(store, args.name)
        if record is None:
            raise UsageError(f"guest {args.name} runs on this host already")
    settings = MigrateSettings(
        bandwidth=parse_rate(args.bandwidth) if args.bandwidth else 0,
        downtime_limit_ms=args.downtime_limit,
        heartbeat_s=args.heartbeat,
        stall_s=args.heartbeat,
        listen=args.listen,
    )
    if args.mechanism == "layers":
        if to is None or RemoteRecord.load(store, args.name) is not None:
            raise UsageError("--mechanism layers moves a guest from this host to another only")
        result = migrate_by_layers(store, args.name, to, settings)
    else:
        result = migrate_guest(store, args.name, to, settings)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return 0
    downtime = f"{result.downtime_ms:.1f} ms" if result.downtime_ms is not None else "?"
    print(
        f"guest {result.name} migrated {result.source} -> {result.destination}, "
        f"PID {result.dest_pid} there: downtime {downtime} (QEMU: {result.qemu_downtime_ms} ms), "
        f"total {result.total_s:.2f} s (memory transfer {result.migrate_s:.2f} s, "
        f"{result.bytes_sent} bytes) [{result.mechanism}]"
    )
    return 0


def relayed(args: argparse.Namespace, command: str, *extra: str) -> int | None:
    """Run ``command`` on the host where guest ``args.name`` runs, if that is another host."""
    store = Store(args.store)
    record = RemoteRecord.load(store, args.name)
    if record is None:
        return None
    return relay(store, record, command, *extra)


def merge_guests(store: Store, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The local guest rows, with guests on other hosts as their hosts report them."""
    remote = {name: remote_status(record) for name in remote_names(store)
              if (record := RemoteRecord.load(store, name)) is not None}  # fmt: skip
    merged = [remote.pop(row["name"], row) for row in rows]
    merged += list(remote.values())
    return sorted(merged, key=lambda row: str(row["name"]))


def flush() -> None:
    sys.stdout.flush()
