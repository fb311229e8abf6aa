"""The ``vmckpt`` commands: each parses nothing and decides nothing, it calls the module
that owns the work (vmckpt/backends.py and friends) and prints the result."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import re
import shlex
import sys
import threading
from pathlib import Path
from typing import Any

from vmckpt.backends import GuestStatus, LocalGuest, local_guest_names, open_guest
from vmckpt.check import probe_capabilities
from vmckpt.checkpoint import CheckpointSettings
from vmckpt.cli.output import (
    checkpoint_line,
    human_bytes,
    human_ms,
    layer_row,
    layer_tree,
    print_json,
    print_json_line,
    progress_for,
    table,
)
from vmckpt.errors import NotAliveError, UsageError, VmckptError
from vmckpt.hostdirs import host_id
from vmckpt.images import Store, keys
from vmckpt.images.adopt import adopt
from vmckpt.machine.binary import parse_memory
from vmckpt.machine.bootmedia import kernel_media
from vmckpt.machine.diagnose import REPEATED_RESETS, hint_for
from vmckpt.machine.liveness import Observation
from vmckpt.machine.spec import (
    BootMedium,
    DiskSpec,
    GuestSpec,
    check_cpu,
    check_machine,
    check_name,
)
from vmckpt.watch import WatchSettings, stop_on_signals

STORE_ENV = "VMCKPT_STORE"
CHECKPOINT_WAIT_S = 60.0  # another checkpoint of the guest under way: wait this long
MAX_BOOT_CHECK_S = 600.0
DEFAULT_HINT_AFTER_S = 5.0  # a guest run in the foreground silent this long gets a hint
HINT_JOIN_S = 3.0


def store_path(args: argparse.Namespace) -> Path:
    """The store a command works on: --store, else $VMCKPT_STORE; always absolute."""
    given = args.store or os.environ.get(STORE_ENV)
    if not given:
        raise UsageError(f"no store given: pass --store DIR or set {STORE_ENV}")
    return Path(given).expanduser().absolute()


def open_store(args: argparse.Namespace) -> Store:
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


# -- the store ---------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    target = args.path or args.store or os.environ.get(STORE_ENV)
    if not target:
        raise UsageError(f"name the store to create: vmckpt init DIR (or set {STORE_ENV})")
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


def cmd_check(args: argparse.Namespace) -> int:
    caps = probe_capabilities()
    if args.json:
        print_json(caps.to_dict())
    else:
        print(f"QEMU        {caps.binary} {caps.version}")
        for accel, state in caps.accelerators.items():
            print(f"accel {accel:<6}{state}")
        print(f"accel auto  picks {caps.default_accel}")
        for mechanism, state in caps.mechanisms.items():
            print(f"mechanism   {mechanism}: {state}")
    return 0 if caps.usable else 1


# -- guests vmckpt runs --------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    name = check_name(args.name)
    if bool(args.kernel) == bool(args.iso):
        raise UsageError("give either --kernel (with --initrd/--append) or --iso")
    if args.initrd and not args.kernel:
        raise UsageError("--initrd needs --kernel")
    media: list[BootMedium] = []
    if args.kernel:
        media += kernel_media(args.kernel, args.initrd or [])
    if args.iso:
        media.append(BootMedium.of("iso", args.iso))
    qemu_args = tuple(args.qemu_arg or ())
    spec = GuestSpec(
        memory_mib=parse_memory(args.memory),
        cpus=args.cpus,
        accel=args.accel,
        machine=check_machine(args.machine),
        cpu=check_cpu(args.cpu or ""),
        media=tuple(media),
        append=args.append or "",
        qemu_args=qemu_args,
        disks=tuple(DiskSpec.parse(i, text) for i, text in enumerate(args.disk or ())),
    )
    hint_s = hint_seconds(args.hint_after, detach=args.detach)
    store = open_store(args)
    guest = LocalGuest.start(store, name, spec, extra_args=qemu_args)
    if not args.detach:
        return run_in_foreground(guest, hint_s)
    _say_running(guest)
    if hint_s:
        report_hint(guest, hint_s)
    return 0


def _say_running(guest: LocalGuest) -> None:
    process = guest.process()
    print(
        f"guest {guest.name} running, PID {process.pid}, accel {process.accel}, "
        f"console {process.serial_log}",
        flush=True,
    )


def run_in_foreground(guest: LocalGuest, hint_s: float) -> int:
    """Follow the console of the guest ``run`` just started until the guest ends or SIGINT
    or SIGTERM arrives, then stop the guest (with a hint after ``hint_s``, if not 0).

    The signals only set a flag (watch.stop_on_signals) that the console loop checks: a
    KeyboardInterrupt raised wherever the main thread is could cut the orderly stop short
    and leave the guest running. The handlers also replace an inherited SIG_IGN (a script's
    background job), which would otherwise make the run impossible to end but by SIGKILL,
    with its guest left running. A second signal during the stop (QMP quit, then SIGTERM,
    then SIGKILL: seconds at worst) ends QEMU by its PID at once.
    """
    process = guest.process()
    done = threading.Event()  # the following ended: the hint's watch ends with it
    hinter = threading.Thread(
        target=report_hint, args=(guest, hint_s, done), name="vmckpt-hint", daemon=True
    )
    try:
        with stop_on_signals(notice=None) as stop:
            try:
                _say_running(guest)
                if hint_s:
                    hinter.start()
                follow(guest.console(True, stop=stop))
            finally:
                done.set()
                if hinter.is_alive():
                    # Once done is set it lets go of the guest's monitor within one poll
                    # (liveness.POLL_S) or one QMP command; the stop below needs it.
                    hinter.join(HINT_JOIN_S)
                if process.alive():
                    print(f"\nstopping guest {guest.name}", flush=True)
                    print(guest.stop(), flush=True)
    except KeyboardInterrupt:
        # A second signal cut the stop short (watch.Interrupted), or the first came before
        # the handlers were in place: no more waiting for QEMU to quit.
        process.kill()
        raise
    return 0


def hint_seconds(text: str | None, *, detach: bool) -> float:
    """--hint-after: given, '0' turns it off; not given, on for a guest run in the foreground
    (whose console the user watches), off with --detach (which returns at once)."""
    if text is None:
        return 0.0 if detach else DEFAULT_HINT_AFTER_S
    if text.strip() in {"0", "0s", "0ms"}:
        return 0.0
    return parse_duration(text)


def report_hint(guest: LocalGuest, seconds: float, done: threading.Event | None = None) -> None:
    """Watch the new guest for ``seconds`` and, if it stays silent or keeps resetting, say on
    stderr what vmckpt can check about why (vmckpt/diagnose.py). Never touches the guest.
    ``done`` (the foreground run ended) ends the watch without a hint."""

    def enough(observation: Observation) -> bool:
        return observation.count("RESET") >= REPEATED_RESETS

    try:
        observation, facts = guest.observe(seconds, until=enough, stop=done)
    except VmckptError:
        return  # the guest went away meanwhile: its own messages say why
    if done is not None and done.is_set():
        return
    hint = hint_for(guest.spec(), observation, facts)
    if hint is not None:
        text = "\n".join(f"vmckpt run: hint: {line}" for line in hint.lines())
        print(f"\n{text}", file=sys.stderr, flush=True)


def _guest(args: argparse.Namespace, store: Store) -> Any:
    libvirt = getattr(args, "libvirt", None)
    if bool(args.name) == bool(libvirt):
        raise UsageError("give either a guest NAME or --libvirt DOMAIN")
    if getattr(args, "connect", None) and not libvirt:
        raise UsageError("--connect goes with --libvirt")
    return open_guest(store, args.name, libvirt=libvirt, uri=getattr(args, "connect", None))


def cmd_console(args: argparse.Namespace) -> int:
    follow(_guest(args, open_store(args)).console(args.follow))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    print(_guest(args, open_store(args)).stop())
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    _guest(args, open_store(args)).pause()
    print(f"guest {args.name} paused (vmckpt resume {args.name} runs it again)")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    recovered = _guest(args, open_store(args)).resume()
    extra = " (a checkpoint interrupted earlier was cleaned up)" if recovered else ""
    print(f"guest {args.name} running{extra}")
    return 0


# -- checkpoints ---------------------------------------------------------------------------


def cmd_checkpoint(args: argparse.Namespace) -> int:
    store = open_store(args)
    guest = _guest(args, store)
    settings = CheckpointSettings(lock_wait_s=args.wait)
    # A Ctrl-C lets the checkpoint finish (a second one aborts it, still cleanly).
    with stop_on_signals():
        row = guest.checkpoint_row(
            settings, progress=progress_for(args.json), mechanism=args.mechanism
        )
    print_json(row) if args.json else print(checkpoint_line(row))
    return 0


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


def cmd_watch(args: argparse.Namespace) -> int:
    from vmckpt.cli.maintenance import keep_rules

    store = open_store(args)
    guest = _guest(args, store)
    keep = keep_rules(args)
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

    taken = guest.watch_rows(
        settings, report, progress=progress_for(args.json), mechanism=mechanism
    )
    if not args.json:
        print(f"watch ended after {taken} checkpoint(s); guest {guest.name} runs on")
    return 0


# -- layers --------------------------------------------------------------------------------


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
    from vmckpt.remote import RemoteGuest, remote_names

    rows = []
    known = set(local_guest_names(store)) | set(remote_names(store))
    for name in sorted(known):
        try:
            guest = RemoteGuest.load(store, name) or LocalGuest(store, name)
            rows.append(guest.status().to_dict())
        except VmckptError as exc:
            rows.append({"name": name, "kind": "guest", "state": f"unreadable: {exc.message}"})
    # Guests known only by their head (no files on this host: another host's, or gone with
    # a reboot): their next checkpoint would build on it.
    for (kind, name), head in sorted(store.head_records().items()):
        if kind == "guest" and name not in known:
            row = GuestStatus(name, kind, "stopped", None, head.layer).to_dict()
            rows.append({**row, "host": "local" if head.host == host_id() else "another host"})
    return rows


def cmd_list(args: argparse.Namespace) -> int:
    from vmckpt.images.maintenance import exclusive_bytes

    store = open_store(args)
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
    if args.json:
        print_json(
            {
                "layers": rows, "guests": guests, "damaged": damaged, "store_bytes": total,
                "uncatalogued": strays,
            }
        )  # fmt: skip
        return 0
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
    return 1 if damaged else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from vmckpt.restore import restore_command

    store = open_store(args)
    manifest = store.manifest(store.resolve(args.layer))
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
    layer = store.resolve(args.layer) if args.layer else None
    if args.qemu_arg and not args.boot:
        raise UsageError("--qemu-arg goes with --boot")
    if args.boot and not (0 < args.seconds <= MAX_BOOT_CHECK_S):
        raise UsageError(f"--seconds must be above 0 and at most {MAX_BOOT_CHECK_S:.0f}")
    verified = store.verify(layer)
    shown = " ".join(verified) if len(verified) <= 8 else f"{verified[0]} … {verified[-1]}"
    if not args.boot:
        print_json({"verified": verified}) if args.json else print(
            f"ok: {len(verified)} layer(s) verified: {shown}"
        )
        return 0
    from vmckpt.restore import boot_check

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


# -- restore and migration -------------------------------------------------------------------


def _target(args: argparse.Namespace, host: str) -> Any:
    from vmckpt.remote import HostAddress, RemoteTarget, SshOptions

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


def cmd_restore(args: argparse.Namespace) -> int:
    from vmckpt.restore import restore_guest

    store = open_store(args)
    progress = progress_for(args.json)
    if args.libvirt_define:
        from vmckpt.libvirt import DEFAULT_URI, restore_domain

        if args.host or args.name:
            raise UsageError("--libvirt-define names the domain; it goes without --host/--name")
        restored = restore_domain(
            store, args.layer, check_name(args.libvirt_define, "domain name"),
            uri=args.connect or DEFAULT_URI, progress=progress,
        )  # fmt: skip
        if args.json:
            print_json(restored.to_dict())
        else:
            print(
                f"libvirt domain {restored.name} (UUID {restored.uuid}) defined and running "
                f"from layer {restored.layer} on {restored.uri}  (total {restored.total_s:.2f} s)"
            )
        return 0
    if args.connect:
        raise UsageError("--connect goes with --libvirt-define")
    if args.host:
        from vmckpt.remote import RemoteGuest, restore_remote

        remote = restore_remote(
            store,
            args.layer,
            args.name,
            _target(args, args.host),
            qemu_args=tuple(args.qemu_arg) if args.qemu_arg else None,
            progress=progress,
        )
        if args.json:
            print_json(remote.to_dict())
        else:
            print(
                f"guest {remote.name} restored from layer {remote.layer} on {remote.host} "
                f"(store {remote.remote_store}), PID {remote.pid} there  (copied "
                f"{len(remote.copied)} layer(s), {human_bytes(remote.bytes_sent)}, reused "
                f"{len(remote.reused)}; total {remote.total_s:.2f} s)"
            )
        there = RemoteGuest.load(store, remote.name)
        if not args.detach and there is not None:
            follow(there.console(True))
        return 0
    extra = tuple(args.qemu_arg) if args.qemu_arg else None
    result = restore_guest(store, args.layer, args.name, extra_args=extra, progress=progress)
    if args.json:
        print_json(result.to_dict())
    else:
        print(
            f"guest {result.name} restored from layer {result.layer}, PID {result.pid}  "
            f"(compose {result.compose_s:.2f} s, load {result.load_s:.2f} s, "
            f"total {result.total_s:.2f} s)"
        )
    if args.detach:
        return 0
    guest = LocalGuest(store, result.name)
    try:
        follow(guest.console(True))
    finally:
        if guest.process().alive():
            print(f"\nstopping guest {result.name}")
            print(guest.stop())
    return 0


def parse_rate(text: str) -> int:
    """'20M', '512K', '1G', '1000000' -> bytes per second."""
    match = re.fullmatch(r"\s*(\d+)\s*([KkMmGg]?)(i?[Bb](/s)?)?\s*", text)
    if not match or int(match.group(1)) == 0:
        raise UsageError(f"cannot read rate {text!r} (use e.g. 20M for 20 MiB/s)")
    shift = {"": 0, "k": 10, "m": 20, "g": 30}[match.group(2).lower()]
    return int(match.group(1)) << shift


def cmd_migrate(args: argparse.Namespace) -> int:
    from vmckpt.remote import MigrateSettings, RemoteGuest, migrate_by_layers, migrate_guest

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
