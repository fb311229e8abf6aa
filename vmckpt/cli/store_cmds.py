"""The commands about a store and its layers: ``init``, ``check``, ``list``, ``inspect``,
``verify``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
from pathlib import Path
from typing import Any

from vmckpt.cli._common import (
    STORE_ENV,
    Command,
    json_option,
    open_bucket,
    open_store,
    store_option,
)
from vmckpt.cli.output import (
    human_bytes,
    human_ms,
    layer_row,
    layer_tree,
    print_json,
    progress_for,
    table,
)
from vmckpt.errors import NotAliveError, UsageError, VmckptError
from vmckpt.guests.base import GuestStatus
from vmckpt.guests.libvirt import KIND as LIBVIRT_KIND
from vmckpt.guests.libvirt import LibvirtGuest
from vmckpt.guests.local import LocalGuest, local_guest_names
from vmckpt.hostdirs import host_id
from vmckpt.images import Store, keys
from vmckpt.images.adopt import adopt
from vmckpt.images.bucket import BucketConfig, BucketUrl, is_bucket_url
from vmckpt.images.bucketstore import BucketStore
from vmckpt.mechanisms import api
from vmckpt.mechanisms.check import probe_capabilities
from vmckpt.mechanisms.choice import COLO

MAX_BOOT_CHECK_S = 600.0


def cmd_init(args: argparse.Namespace) -> int:
    target = args.path or args.store or os.environ.get(STORE_ENV)
    if not target:
        raise UsageError(f"name the store to create: vmckpt init DIR (or set {STORE_ENV})")
    if is_bucket_url(target):
        return _init_bucket(args, BucketUrl.parse(target))
    path = Path(target).expanduser().absolute()
    if args.adopt and args.encrypt:
        raise UsageError(
            "--adopt keeps a store as it is: a store is encrypted only when it is made "
            "(vmckpt init --encrypt NEW-DIR)"
        )
    if (args.new_key or args.accept_rollback) and not args.adopt:
        raise UsageError("--new-key and --accept-rollback go with --adopt")
    if args.adopt:
        result = adopt(Store(path), new_key=args.new_key, accept_rollback=args.accept_rollback)
        if args.json:
            print_json({"store": str(path), **dataclasses.asdict(result)})
        else:
            key = keys.key_path(result.store_id)
            print(f"store {path}: key {key} ({'new' if result.new_key else 'kept'})")
            print(
                f"sealed {len(result.sealed)} layer(s), {len(result.already)} authenticated "
                f"already, {len(result.refused)} refused"
            )
            for layer_id, why in result.refused:
                print(f"  refused {layer_id}: {why}")
        return 1 if result.refused else 0
    existed = (path / "vmckpt-store.json").exists()
    store = Store.create(path, encrypt=args.encrypt)
    if args.json:
        print_json(
            {
                "store": str(store.path),
                "created": not existed,
                "store_id": store.store_id,
                "encryption": store.encryption,
            }
        )
    else:
        print(f"store {store.path} {'exists already' if existed else 'created'}")
        if store.encryption is not None:
            print(f"encrypted with {store.encryption} (layer files; manifests are in the clear)")
        if store.key is not None and store.store_id is not None:
            usage = "sealed and encrypted" if store.encrypted else "sealed"
            print(f"key   {keys.key_path(store.store_id)} (keep it: layers are {usage} with it)")
        else:
            print(
                "key   none for this user: its layers cannot be restored or added to until "
                f"`vmckpt init --adopt {store.path}`"
            )
    return 0


def _init_bucket(args: argparse.Namespace, url: BucketUrl) -> int:
    if args.adopt:
        raise UsageError("--adopt is for a directory store")
    given = BucketConfig(args.endpoint, args.region)
    config = BucketConfig.resolve(given, profile=args.profile)
    bucket, created = BucketStore.open(url, config, create=True, encrypt=args.encrypt)
    store = bucket.local
    if args.json:
        print_json(
            {
                "store": str(url),
                "created": created,
                "store_id": store.store_id,
                "encryption": store.encryption,
                "working_copy": str(store.path),
            }
        )
        return 0
    print(f"store {url} {'created' if created else 'exists already'}")
    if store.encryption is not None:
        print(f"encrypted with {store.encryption} (layer files; manifests are in the clear)")
    assert store.store_id is not None
    print(f"key   {keys.key_path(store.store_id)} (keep it, and copy it to every host using it)")
    print(f"here  {store.path} (this host's working copy: new layers, fetched layers)")
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    bucket = open_bucket(args)
    if bucket is None:
        raise UsageError("push uploads into a store in a bucket: --store s3://BUCKET/PREFIX")
    result = bucket.push()
    if args.json:
        print_json(
            {"uploaded": result.uploaded, "heads": result.heads, "bytes": result.bytes_uploaded}
        )
    else:
        print(
            f"uploaded {len(result.uploaded)} layer(s) ({human_bytes(result.bytes_uploaded)}) "
            f"to {bucket.name}" + (f": {' '.join(result.uploaded)}" if result.uploaded else "")
        )
        if result.heads:
            print(f"heads {' '.join(result.heads)}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    caps = probe_capabilities()
    if args.json:
        print_json(caps.to_dict())
    else:
        print(f"QEMU        {caps.binary} {caps.version} ({caps.why})")
        for accel, state in caps.accelerators.items():
            print(f"accel {accel:<6}{state}")
        print(f"accel auto  picks {caps.default_accel}")
        for mechanism, state in caps.mechanisms.items():
            print(f"mechanism   {mechanism}: {state}")
    return 0 if caps.usable else 1


def _layers(store: Store) -> tuple[list[dict[str, Any]], list[str]]:
    """Every readable layer's row, and a line per damaged one (which does not hide the rest)."""
    rows, damaged = [], []
    for layer_id in store.layer_ids():
        try:
            rows.append(layer_row(store.manifest(layer_id)))
        except VmckptError as exc:
            damaged.append(exc.one_line())
    return rows, damaged


def _guest_rows(store: Store) -> list[dict[str, Any]]:
    from vmckpt.guests.remote import RemoteGuest, remote_names

    rows = []
    known = set(local_guest_names(store)) | set(remote_names(store))
    for name in sorted(known):
        try:
            guest = RemoteGuest.load(store, name) or LocalGuest(store, name)
            rows.append(api.status(guest).to_dict())
        except VmckptError as exc:
            rows.append({"name": name, "kind": "guest", "state": f"unreadable: {exc.message}"})
    # Guests known only by their head (no files on this host: another host's, or gone with
    # a reboot): their next checkpoint would build on it.
    for (kind, name), head in sorted(store.head_records().items()):
        if kind == "guest" and name not in known:
            row = GuestStatus(name, kind, "stopped", None, head.layer).to_dict()
            rows.append({**row, "host": "local" if head.host == host_id() else "another host"})
        elif kind == LIBVIRT_KIND:  # a domain checkpointed into this store (libvirt's default URI)
            try:
                rows.append(api.status(LibvirtGuest(store, name)).to_dict())
            except VmckptError as exc:
                rows.append({"name": name, "kind": kind, "state": f"unreadable: {exc.message}"})
    return rows


def _bucket_summary(bucket: BucketStore) -> dict[str, list[str]]:
    catalog, _ = bucket.catalog("list")
    here = set(bucket.local.layer_names())
    return {
        "layers": sorted(catalog.layers),
        "not_fetched": sorted(set(catalog.layers) - here),
        "not_uploaded": sorted(here - set(catalog.layers) - set(catalog.removed)),
        "removed": sorted(here & set(catalog.removed)),  # here still; `vmckpt gc` drops them
    }


def cmd_list(args: argparse.Namespace) -> int:
    from vmckpt.images.maintenance import exclusive_bytes

    bucket = open_bucket(args)
    store = bucket.local if bucket is not None else open_store(args)
    rows, damaged = _layers(store)
    guests = _guest_rows(store)
    only: dict[str, int] = {}
    if not damaged:  # what deleting each would free (needs every chain whole)
        with contextlib.suppress(VmckptError):
            only = exclusive_bytes(store)
    for row in rows:
        row["exclusive_bytes"] = only.get(row["layer"])
    total = store.bytes_on_disk()
    strays = store.uncatalogued()
    in_bucket = _bucket_summary(bucket) if bucket is not None else None
    if args.json:
        print_json(
            {
                "layers": rows, "guests": guests, "damaged": damaged, "store_bytes": total,
                "uncatalogued": strays, "bucket": in_bucket,
            }
        )  # fmt: skip
        return 0
    if bucket is not None and in_bucket is not None:
        print(
            f"bucket {bucket.name}: {len(in_bucket['layers'])} layer(s); this host holds "
            f"{len(rows)} of them or its own, {len(in_bucket['not_fetched'])} not fetched here, "
            f"{len(in_bucket['not_uploaded'])} not uploaded (`vmckpt push`)"
            + (
                f", {len(in_bucket['removed'])} removed from the bucket (`vmckpt gc` drops them)"
                if in_bucket["removed"]
                else ""
            )
        )
    lines = []
    for prefix, row in layer_tree(rows):
        lines.append(
            [
                prefix + row["layer"], row["guest"], row["mechanism"], human_ms(row["pause_ms"]),
                str(row["pages_stored"]), human_bytes(row["bytes"]),
                human_bytes(row["exclusive_bytes"]), row["created"][:19],
            ]
        )  # fmt: skip
    headers = ["LAYER", "GUEST", "MECHANISM", "PAUSE", "PAGES", "SIZE", "ONLY HERE", "CREATED"]
    print("\n".join(table(headers, lines, right={3, 4, 5, 6})))
    print(
        f"{len(rows)} layer(s), {human_bytes(sum(r['bytes'] for r in rows))} in all; the store "
        f"holds {human_bytes(total)} (ONLY HERE: what deleting that layer alone would free)"
    )
    foreign = [r for r in rows if r.get("origin") != "local"]
    if foreign:
        origins = sorted({str(r.get("origin")) for r in foreign})
        print(
            f"{len(foreign)} layer(s) not written by this store (origin {', '.join(origins)}): "
            "`vmckpt inspect LAYER` says what that means for a restore"
        )
    for line in damaged:
        print(f"damaged: {line}")
    if strays:
        print(
            f"{len(strays)} layer director{'y' if len(strays) == 1 else 'ies'} the store's "
            f"catalog does not name ({', '.join(strays[:3])}{', ...' if len(strays) > 3 else ''}"
            "): not layers of the store (`vmckpt gc` removes those this store sealed, "
            "`vmckpt init --adopt` checks and adopts the others)"
        )
    if guests:
        print()
        glines = [
            [
                g["name"], g.get("kind", ""), g.get("state", ""), str(g.get("pid") or "-"),
                g.get("head") or "-", g.get("mechanism") or "-", g.get("host") or "local",
            ]
            for g in guests
        ]  # fmt: skip
        headers = ["GUEST", "KIND", "STATE", "PID", "HEAD", "MECHANISM", "HOST"]
        print("\n".join(table(headers, glines, right={3})))
        for g in guests:  # why a domain gets no colo, in one line
            if g.get("kind") == LIBVIRT_KIND and g.get("mechanism") != COLO:
                print(f"{g['name']}: not colo: {g.get('mechanism_reason')}")
    return 1 if damaged else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from vmckpt.mechanisms.restore import restore_command

    bucket = open_bucket(args)
    store = bucket.local if bucket is not None else open_store(args)
    layer = bucket.fetch(args.layer)[0] if bucket is not None else store.resolve(args.layer)
    manifest = store.manifest(layer)
    spec = manifest.spec
    try:
        restore: list[str] | None = restore_command(store, manifest)
        refused = None
    except VmckptError as exc:
        restore, refused = None, exc.one_line()
    data = {
        **layer_row(manifest),
        "format_version": ".".join(map(str, manifest.format_version)),
        "qemu_version": manifest.qemu_version,
        "machine_type": manifest.machine_type,
        "accel": manifest.stats.get("accel") or spec.get("accel"),
        "stats": manifest.stats,
        "spec": spec,
        "ram_blocks": [b.__dict__ for b in manifest.blocks],
        "files": {name: entry.__dict__ for name, entry in manifest.files.items()},
        "disks": [d.__dict__ for d in manifest.disks],
        "restore_command": restore,
        "restore_refused": refused,
    }
    if args.json:
        print_json(data)
        return 0
    print(f"layer          {manifest.id} (format {data['format_version']})")
    meaning = ORIGIN_MEANING.get(manifest.origin, "sent by that host; QEMU arguments not used")
    print(f"origin         {manifest.origin} ({meaning})")
    print(f"parent         {manifest.parent or '- (base layer)'}")
    print(f"guest          {manifest.guest}, created {manifest.created}")
    print(f"QEMU           {manifest.qemu_version}, machine {manifest.machine_type}")
    print(f"mechanism      {manifest.mechanism}, pause {human_ms(data['pause_ms'])}")
    print(
        f"spec           {spec.get('memory_mib')} MiB, {spec.get('cpus')} CPU(s), "
        f"accel {data['accel']}, cpu {spec.get('cpu') or 'default'}"
    )
    for medium in spec.get("media", []):
        print(f"  {medium['role']:<12} {medium['path']} (sha256 {medium['sha256'][:16]}…)")
    if spec.get("append"):
        print(f"  append       {spec['append']}")
    for arg in spec.get("qemu_args", []):
        print(f"  qemu-arg     {arg}")
    print("RAM blocks")
    for block in manifest.blocks:
        print(
            f"  {block.idstr:<28} {human_bytes(block.length):>10}  "
            f"stored {block.pages_stored:>7} pages, zeroed {block.pages_zeroed}"
        )
    for disk in manifest.disks:
        print(
            f"disk {disk.id:<9} {human_bytes(disk.size):>10}  {disk.format}, "
            f"{'full' if disk.full else 'delta'}: {disk.extents_stored} extents "
            f"{human_bytes(disk.bytes_stored)} stored, {disk.extents_zeroed} extents "
            f"{human_bytes(disk.bytes_zeroed)} zeroed"
        )
    print("files")
    for name, entry in sorted(manifest.files.items()):
        print(f"  {name:<14} {human_bytes(entry.size):>10}  sha256 {entry.sha256[:16]}…")
    print(f"total          {human_bytes(manifest.bytes_total)}")
    if restore is not None:
        print("restore runs   " + shlex.join(restore))
    else:
        print(f"restore        refused: {refused}")
    return 0


ORIGIN_MEANING = {
    keys.LOCAL: "written by this store; its QEMU arguments are used on restore",
    keys.ADOPTED: "sealed by `init --adopt`; its QEMU arguments are not used on restore",
    keys.UNSEALED: "no seal: not restored until `vmckpt init --adopt`",
    keys.NO_KEY: "this user has no key for the store: not restored",
}


def cmd_verify(args: argparse.Namespace) -> int:
    store = open_store(args)
    layer = args.layer if is_bucket_url(args.store or os.environ.get(STORE_ENV, "")) else None
    if layer is None and args.layer:
        layer = store.resolve(args.layer)
    if args.qemu_arg and not args.boot:
        raise UsageError("--qemu-arg goes with --boot")
    if args.boot and not (0 < args.seconds <= MAX_BOOT_CHECK_S):
        raise UsageError(f"--seconds must be above 0 and at most {MAX_BOOT_CHECK_S:.0f}")
    bucket = open_bucket(args)
    if bucket is not None:
        if layer is None:
            verified = bucket.verify()
        else:
            layer = bucket.fetch(args.layer)[0]
            verified = store.verify(layer)
    else:
        verified = store.verify(layer)
    shown = " ".join(verified) if len(verified) <= 8 else f"{verified[0]} … {verified[-1]}"
    if not args.boot:
        print_json({"verified": verified}) if args.json else print(
            f"ok: {len(verified)} layer(s) verified: {shown}"
        )
        return 0
    from vmckpt.mechanisms.restore import boot_check

    extra = tuple(args.qemu_arg) if args.qemu_arg else None
    check = boot_check(
        store, layer, seconds=args.seconds, extra_args=extra, progress=progress_for(args.json)
    )
    observation = check.observation
    if args.json:
        print_json({"verified": verified, "boot": check.to_dict()})
    else:
        print(f"ok: {len(verified)} layer(s) verified: {shown}")
        print(
            f"boot: layer {check.layer} in a throw-away QEMU {check.qemu_version} "
            f"(PID {check.pid}, ended): {observation.verdict}"
        )
        print(f"  {observation.evidence()}")
        for line in observation.last_lines:
            print(f"  | {line}")
    if not check.alive:
        raise NotAliveError(
            f"the restored guest is not alive: {observation.verdict}, {observation.evidence()}",
            layer=check.layer,
            step="boot-check",
        )
    return 0


def add_parsers(command: Command) -> None:
    p = command("init", cmd_init, "create a store (a directory of layers) and its key")
    p.add_argument("path", nargs="?", metavar="DIR", help="where (default: --store)")
    store_option(p)
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
    json_option(p)

    p.add_argument(
        "--endpoint",
        metavar="URL",
        help="s3://: the object store's endpoint "
        "(default: $AWS_ENDPOINT_URL, else the profile's, else AWS)",
    )
    p.add_argument("--region", help="s3://: the region (default: $AWS_REGION, else the profile's)")

    p = command(
        "push",
        cmd_push,
        "upload this host's layers that a store in a bucket lacks (a checkpoint does it; "
        "this retries one that failed), and this host's guests' heads",
    )
    store_option(p)
    json_option(p)

    p = command("check", cmd_check, "what this host's QEMU supports, and the mechanisms")
    json_option(p)

    p = command("list", cmd_list, "the layers (as a tree) and the guests of a store")
    store_option(p)
    json_option(p)

    p = command("inspect", cmd_inspect, "one layer in detail, and what restore passes QEMU")
    store_option(p)
    p.add_argument("layer", help="layer id or unique prefix (e.g. 0002)")
    json_option(p)

    p = command(
        "verify",
        cmd_verify,
        "check a layer's chain (or every layer); --boot: and whether it comes up alive",
    )
    store_option(p)
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
    json_option(p)
