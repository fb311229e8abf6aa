"""The ``vmckpt`` command: thin glue, human output or ``--json``.

Every VmckptError becomes one line on stderr and the error's exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmckpt import __version__, bench
from vmckpt.bootmedia import kernel_media
from vmckpt.checkpoint import CheckpointResult, take_checkpoint
from vmckpt.disks import DiskSpec
from vmckpt.errors import MachineError, UsageError, VmckptError
from vmckpt.guests import (
    follow_console,
    guest_names,
    guest_status,
    load_guest,
    probe_capabilities,
    start_guest,
    stop_guest,
)
from vmckpt.images import LayerManifest, Store
from vmckpt.libvirt import DEFAULT_URI, Domain, checkpoint_domain, restore_domain, watch_domain
from vmckpt.machine import BootMedium, GuestSpec, parse_memory
from vmckpt.remote import cli as remote_cli
from vmckpt.restore import restore_guest
from vmckpt.watch import WatchSettings, stop_on_signals, watch


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _human_bytes(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} B"


def _open_store(args: argparse.Namespace) -> Store:
    return Store(Path(args.store))


# -- commands -----------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    caps = probe_capabilities()
    if args.json:
        _print_json(caps.__dict__)
    else:
        print(f"QEMU        {caps.binary} {caps.version}")
        for accel, state in caps.accelerators.items():
            print(f"accel {accel:<6}{state}")
        for mechanism, state in caps.mechanisms.items():
            print(f"mechanism   {mechanism}: {state}")
    return 0 if caps.mechanisms["precopy-diff"] == "yes" else 1


def cmd_run(args: argparse.Namespace) -> int:
    if bool(args.kernel) == bool(args.iso):
        raise UsageError("give either --kernel (with --initrd/--append) or --iso")
    if args.initrd and not args.kernel:
        raise UsageError("--initrd needs --kernel")
    media: list[BootMedium] = []
    if args.kernel:
        media += kernel_media(args.kernel, args.initrd or [])
    if args.iso:
        media.append(BootMedium.of("iso", args.iso))
    if args.cpus < 1:
        raise UsageError("--cpus must be at least 1")
    spec = GuestSpec(
        memory_mib=parse_memory(args.memory),
        cpus=args.cpus,
        accel=args.accel,
        media=tuple(media),
        append=args.append or "",
        qemu_args=tuple(args.qemu_arg or ()),
        disks=tuple(DiskSpec.parse(i, text) for i, text in enumerate(args.disk or ())),
    )
    store = Store.create(Path(args.store))
    record = start_guest(store, args.name, spec)
    assert record.process is not None
    print(
        f"guest {args.name} running, PID {record.process.pid}, console {record.process.serial_log}"
    )
    if args.detach:
        return 0
    try:
        for chunk in follow_console(record.process.serial_log, True, record.process):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        print(f"\nstopping guest {args.name}")
        stop_guest(store, args.name)
    return 0


def cmd_console(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if (code := remote_cli.relayed(args, "console", *(["--follow"] * args.follow))) is not None:
        return code
    record, runtime_dir = load_guest(store, args.name)
    log = runtime_dir / "serial.log"
    if not log.exists():
        raise MachineError("has no console output yet", vm=args.name)
    process = record.process if record.process and record.process.alive() else None
    try:
        for chunk in follow_console(log, args.follow, process):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def _libvirt_domain(args: argparse.Namespace) -> Domain | None:
    """The libvirt domain of --libvirt, or None; exactly one of NAME and --libvirt."""
    if bool(args.name) == bool(args.libvirt):
        raise UsageError("give either a guest NAME or --libvirt DOMAIN")
    if args.connect and not args.libvirt:
        raise UsageError("--connect goes with --libvirt")
    return Domain(args.libvirt, args.connect or DEFAULT_URI) if args.libvirt else None


def cmd_checkpoint(args: argparse.Namespace) -> int:
    domain = _libvirt_domain(args)
    if domain is not None:
        result = checkpoint_domain(Store.create(Path(args.store)), domain)
    else:
        store = _open_store(args)
        extra = ["--json"] * args.json
        if (code := remote_cli.relayed(args, "checkpoint", *extra)) is not None:
            return code
        record, runtime_dir = load_guest(store, args.name)
        # A Ctrl-C lets the checkpoint finish (a second one aborts it, still cleanly).
        with stop_on_signals():
            result = take_checkpoint(store, record, runtime_dir)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(
            f"layer {result.layer.id}  parent {result.layer.parent or '-'}  "
            f"pause {result.pause_ms:.1f} ms  pages {result.pages_stored}"
            f"{f' (+{result.pages_zeroed} zeroed)' if result.pages_zeroed else ''}  "
            f"written {_human_bytes(result.bytes_written)}  total {result.total_s:.2f} s  "
            f"[{result.mechanism}]"
        )
    return 0


def parse_duration(text: str) -> float:
    """'1s', '500ms', '2m', '0.5' (seconds) -> seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in ("ms", "s", "m", "h"):
        if text.endswith(unit):
            number, factor = text[: -len(unit)], units[unit]
            break
    else:
        number, factor = text, 1.0
    try:
        seconds = float(number) * factor
    except ValueError:
        raise UsageError(f"cannot read duration {text!r} (use e.g. 1s, 500ms, 2m)") from None
    if seconds <= 0:
        raise UsageError(f"duration {text!r} must be positive")
    return seconds


def cmd_watch(args: argparse.Namespace) -> int:
    domain = _libvirt_domain(args)
    if domain is None:
        store = _open_store(args)
        record, runtime_dir = load_guest(store, args.name)
        record.running_process()

    def report(result: CheckpointResult, note: str) -> None:
        if args.json:
            print(json.dumps({**result.to_dict(), "note": note}), flush=True)
        else:
            print(
                f"layer {result.layer.id}  pause {result.pause_ms:7.1f} ms  "
                f"pages {result.pages_stored:>7}  bytes {result.bytes_written:>10}  "
                f"total {result.total_s:5.2f} s  [{result.mechanism}]"
                + (f"  ({note})" if note else ""),
                flush=True,
            )

    settings = WatchSettings(
        interval_s=parse_duration(args.interval),
        count=args.count,
        pause_budget_ms=args.pause_budget,
        use_colo=args.colo,
    )
    if domain is not None:
        taken = watch_domain(Store.create(Path(args.store)), domain, settings, report)
    else:
        taken = watch(store, record, runtime_dir, settings, report)
    if not args.json:
        print(f"watch ended after {taken} checkpoint(s); guest {args.name or args.libvirt} runs on")
    return 0


def _layer_row(manifest: LayerManifest) -> dict[str, Any]:
    return {
        "id": manifest.id,
        "parent": manifest.parent,
        "guest": manifest.guest,
        "created": manifest.created,
        "mechanism": manifest.mechanism,
        "pause_ms": manifest.stats.get("pause_ms"),
        "pages_stored": sum(b.pages_stored for b in manifest.blocks),
        "bytes": manifest.bytes_total,
    }


def cmd_list(args: argparse.Namespace) -> int:
    store = _open_store(args)
    rows = [_layer_row(store.manifest(layer_id)) for layer_id in store.layer_ids()]
    guests = [guest_status(store, name).__dict__ for name in guest_names(store)]
    guests = remote_cli.merge_guests(store, guests)
    if args.json:
        _print_json({"layers": rows, "guests": guests})
        return 0
    print(
        f"{'LAYER':<12} {'PARENT':<12} {'GUEST':<12} {'PAUSE ms':>9} {'PAGES':>8} "
        f"{'SIZE':>10}  CREATED"
    )
    for row in rows:
        pause = f"{row['pause_ms']:.1f}" if row["pause_ms"] is not None else "-"
        print(
            f"{row['id']:<12} {row['parent'] or '-':<12} {row['guest']:<12} {pause:>9} "
            f"{row['pages_stored']:>8} {_human_bytes(row['bytes']):>10}  {row['created']}"
        )
    if guests:
        print()
        print(f"{'GUEST':<12} {'STATE':<12} {'PID':>8}  HEAD")
        for guest in guests:
            print(
                f"{guest['name']:<12} {guest['state']:<12} {guest['pid'] or '-':>8}  "
                f"{guest['head'] or '-'}{'  on ' + guest['host'] if guest.get('host') else ''}"
            )
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    store = _open_store(args)
    manifest = store.manifest(store.resolve(args.layer))
    data = {
        "id": manifest.id,
        "parent": manifest.parent,
        "guest": manifest.guest,
        "created": manifest.created,
        "format_version": ".".join(map(str, manifest.format_version)),
        "qemu_version": manifest.qemu_version,
        "machine_type": manifest.machine_type,
        "mechanism": manifest.mechanism,
        "stats": manifest.stats,
        "spec": manifest.spec,
        "ram_blocks": [b.__dict__ for b in manifest.blocks],
        "files": {name: entry.__dict__ for name, entry in manifest.files.items()},
        "bytes_total": manifest.bytes_total,
        "disks": [d.__dict__ for d in manifest.disks],
    }
    if args.json:
        _print_json(data)
        return 0
    print(f"layer          {manifest.id} (format {data['format_version']})")
    print(f"parent         {manifest.parent or '- (base layer)'}")
    print(f"guest          {manifest.guest}, created {manifest.created}")
    print(f"QEMU           {manifest.qemu_version}, machine {manifest.machine_type}")
    print(f"mechanism      {manifest.mechanism}, pause {manifest.stats.get('pause_ms')} ms")
    spec = manifest.spec
    print(
        f"spec           {spec.get('memory_mib')} MiB, {spec.get('cpus')} CPU(s), "
        f"accel {spec.get('accel')}"
    )
    for medium in spec.get("media", []):
        print(f"  {medium['role']:<12} {medium['path']} (sha256 {medium['sha256'][:16]}…)")
    if spec.get("append"):
        print(f"  append       {spec['append']}")
    print("RAM blocks")
    for block in manifest.blocks:
        print(
            f"  {block.idstr:<28} {_human_bytes(block.length):>10}  "
            f"stored {block.pages_stored:>7} pages, zeroed {block.pages_zeroed}"
        )
    for disk in manifest.disks:
        print(
            f"disk {disk.id:<9} {_human_bytes(disk.size):>10}  {disk.format}, "
            f"{'full' if disk.full else 'delta'}: {disk.extents_stored} extents "
            f"{_human_bytes(disk.bytes_stored)} stored, {disk.extents_zeroed} extents "
            f"{_human_bytes(disk.bytes_zeroed)} zeroed"
        )
    print("files")
    for name, entry in sorted(manifest.files.items()):
        print(f"  {name:<14} {_human_bytes(entry.size):>10}  sha256 {entry.sha256[:16]}…")
    print(f"total          {_human_bytes(manifest.bytes_total)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    store = _open_store(args)
    layer = store.resolve(args.layer) if args.layer else None
    verified = store.verify(layer)
    shown = " ".join(verified) if len(verified) <= 8 else f"{verified[0]} … {verified[-1]}"
    print(f"ok: {len(verified)} layer(s) verified: {shown}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if args.libvirt_define:
        if args.host or args.name:
            raise UsageError("--libvirt-define names the domain; it goes without --host/--name")
        restored = restore_domain(
            store, args.layer, args.libvirt_define, uri=args.connect or DEFAULT_URI
        )
        if args.json:
            _print_json(restored.to_dict())
        else:
            print(
                f"libvirt domain {restored.name} (UUID {restored.uuid}) defined and running "
                f"from layer {restored.layer} on {restored.uri}  (total {restored.total_s:.2f} s)"
            )
        return 0
    if args.connect:
        raise UsageError("--connect goes with --libvirt-define")
    if args.host:
        return remote_cli.restore(args, store)
    result = restore_guest(store, args.layer, args.name)
    if args.json:
        _print_json(result.to_dict())
    else:
        print(
            f"guest {result.name} restored from layer {result.layer}, PID {result.pid}  "
            f"(compose {result.compose_s:.2f} s, load {result.load_s:.2f} s, "
            f"total {result.total_s:.2f} s)"
        )
    if args.detach:
        return 0
    record, runtime_dir = load_guest(store, result.name)
    try:
        for chunk in follow_console(runtime_dir / "serial.log", True, record.process):
            sys.stdout.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        print(f"\nstopping guest {result.name}")
        stop_guest(store, result.name)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    store = _open_store(args)
    if (code := remote_cli.relayed(args, "stop")) is not None:
        return code
    started = time.monotonic()
    pid = stop_guest(store, args.name)
    print(f"guest {args.name} stopped (PID {pid}, {time.monotonic() - started:.1f} s)")
    return 0


# -- argument parsing --------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmckpt",
        description="Incremental, short-pause checkpoints of whole QEMU guests.",
    )
    parser.add_argument("--version", action="version", version=f"vmckpt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def store_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--store", required=True, metavar="DIR", help="the image store directory")

    p = sub.add_parser("check", help="what QEMU and this host support")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("run", help="start a guest under vmckpt")
    p.add_argument("name")
    store_arg(p)
    p.add_argument("--kernel", metavar="FILE")
    p.add_argument(
        "--initrd",
        action="append",
        metavar="FILE",
        help="initrd of a Linux kernel; for a multiboot kernel its modules, 'FILE [ARGS],...' "
        "(QEMU's syntax, ',,' is a literal comma; repeatable)",
    )
    p.add_argument("--append", metavar="CMDLINE")
    p.add_argument("--iso", metavar="FILE")
    p.add_argument("--memory", default="512M")
    p.add_argument("--cpus", type=int, default=1)
    p.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    p.add_argument("--qemu-arg", action="append", metavar="ARG", help="extra QEMU argument")
    p.add_argument(
        "--disk",
        action="append",
        metavar="IMAGE[:ro]",
        help="a virtio disk (raw or qcow2; repeatable); writable ones are checkpointed, "
        ":ro ones referenced by content hash",
    )
    p.add_argument("--detach", action="store_true", help="return once the guest runs")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("console", help="the guest's serial output")
    p.add_argument("name")
    store_arg(p)
    p.add_argument("--follow", "-f", action="store_true")
    p.set_defaults(func=cmd_console)

    def libvirt_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--libvirt", metavar="DOMAIN", help="a running libvirt domain instead")
        p.add_argument("--connect", metavar="URI", help=f"libvirt URI (default {DEFAULT_URI})")

    p = sub.add_parser("checkpoint", help="checkpoint a running guest into a new layer")
    p.add_argument("name", nargs="?")
    store_arg(p)
    libvirt_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_checkpoint)

    p = sub.add_parser("watch", help="checkpoint a running guest periodically")
    p.add_argument("name", nargs="?")
    store_arg(p)
    libvirt_args(p)
    p.add_argument("--interval", default="1s", help="time between checkpoints (1s, 500ms)")
    p.add_argument("--count", type=int, help="stop after this many checkpoints")
    p.add_argument("--pause-budget", type=float, metavar="MS", help="keep pauses under this")
    p.add_argument(
        "--colo",
        action="store_true",
        help="experimental: incremental transfer through QEMU's COLO (see README)",
    )
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint")
    p.set_defaults(func=cmd_watch)

    p = sub.add_parser("list", help="layers and guests of a store")
    store_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("inspect", help="one layer in detail")
    store_arg(p)
    p.add_argument("layer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("verify", help="check a layer's chain (or every layer)")
    store_arg(p)
    p.add_argument("layer", nargs="?")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("restore", help="bring a guest back from a layer")
    store_arg(p)
    p.add_argument("--layer", metavar="ID", help="layer id or unique prefix (default: newest)")
    p.add_argument("--name", metavar="NAME", help="name of the restored guest")
    p.add_argument(
        "--libvirt-define",
        metavar="NAME",
        help="restore as a new libvirt domain NAME (layers taken with --libvirt)",
    )
    p.add_argument("--connect", metavar="URI", help=f"libvirt URI (default {DEFAULT_URI})")
    remote_cli.add_restore_options(p)
    p.add_argument("--detach", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("stop", help="end a guest that vmckpt started")
    p.add_argument("name")
    store_arg(p)
    p.set_defaults(func=cmd_stop)

    remote_cli.add_migrate_parser(sub)
    bench.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # qemu.qmp logs connection failures itself; vmckpt reports them as one line.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except VmckptError as exc:
        print(f"vmckpt {args.command}: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
