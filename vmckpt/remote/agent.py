"""The host side of remote work: ``python3 -m vmckpt.remote.agent COMMAND --store DIR ...``.

vmckpt runs this on whichever host holds the store and the QEMU concerned,
over SSH on another host and as a child process on this one, so both ends
run the same code. Every command prints JSON lines on stdout; a failure is a
last line ``{"error": ..., "exit": ...}`` and that exit code.

Commands:

- ``prepare``: create the store if needed; list its layers (id -> sha256 of manifest.json).
- ``commit-layer``: check a layer copied into ``layers/.tmp-*`` against its manifest
  (every file's size and sha256), then rename it into place; or remove it.
- ``media``: which boot media (role, sha256, path) this host has, by content.
- ``describe``: a guest's spec, versioned machine type and head layer.
- ``receive``: the destination of a live migration (see :func:`receive`).
- ``send``: the source of a live migration (see :func:`send`).

``receive`` and ``send`` read commands from stdin, one per line: ``ping``
(the orchestrator is alive), ``commit``, ``abort``. No ``ping`` for
``--heartbeat`` seconds, or end of input, counts as ``abort``: a migration
that loses its orchestrator leaves the guest running at the source and no
QEMU at the destination.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import queue
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vmckpt.checkpoint import ACTIVE_MIGRATION, leave_guest_as_found
from vmckpt.errors import MachineError, QMPError, RemoteError, StoreError, VmckptError
from vmckpt.images import Store
from vmckpt.images.format import LAYER_ID_RE, MANIFEST, parse_manifest
from vmckpt.machine import BootMedium, GuestRecord, GuestSpec, QemuProcess
from vmckpt.qmp import Monitor
from vmckpt.remote.media import find_medium, relocate_media

TMP_PREFIX = ".tmp-"


def emit(**data: Any) -> None:
    print(json.dumps(data, sort_keys=True), flush=True)


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


# -- store commands ---------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    store = Store.create(Path(args.store))
    layers: dict[str, str] = {}
    for layer_id in store.layer_ids():
        with contextlib.suppress(OSError):
            layers[layer_id] = _sha256(store.layers_path / layer_id / MANIFEST)
    usage = shutil.disk_usage(store.path)
    emit(store=str(store.path.resolve()), layers=layers, free_bytes=usage.free)
    return 0


def cmd_commit_layer(args: argparse.Namespace) -> int:
    store = Store(Path(args.store))
    layer_id = args.id
    tmp = store.layers_path / args.tmp
    if not LAYER_ID_RE.match(layer_id) or not args.tmp.startswith(f"{TMP_PREFIX}{layer_id}-"):
        raise StoreError(f"{args.tmp!r} is not a temporary copy of a layer", step="commit-layer")
    try:
        if args.discard:
            shutil.rmtree(tmp, ignore_errors=True)
            emit(discarded=args.tmp)
            return 0
        _check_copy(tmp, layer_id, args.manifest_sha256)
        final = store.layers_path / layer_id
        if final.exists():
            raise StoreError("exists already", layer=layer_id, step="commit-layer")
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        os.rename(tmp, final)
        fd = os.open(store.layers_path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    emit(layer=layer_id)
    return 0


def _check_copy(tmp: Path, layer_id: str, manifest_sha256: str) -> None:
    """Every file of a copied layer must match its manifest, the manifest the sender's."""

    def bad(message: str) -> StoreError:
        return StoreError(f"the copy is damaged: {message}", layer=layer_id, step="check-copy")

    manifest_path = tmp / MANIFEST
    if not manifest_path.is_file():
        raise bad(f"{MANIFEST} is missing")
    found = _sha256(manifest_path)
    if found != manifest_sha256:
        raise bad(f"{MANIFEST} sha256 {found[:16]}… differs from the sent {manifest_sha256[:16]}…")
    manifest = parse_manifest(manifest_path.read_bytes(), layer_id, "check-copy")
    for name, entry in manifest.files.items():
        path = tmp / name
        if not path.is_file():
            raise bad(f"{name} is missing")
        if path.stat().st_size != entry.size:
            raise bad(f"{name} is {path.stat().st_size} bytes, manifest says {entry.size}")
        found = _sha256(path)
        if found != entry.sha256:
            raise bad(f"{name} sha256 {found[:16]}… differs from the manifest's")
    extra = {p.name for p in tmp.iterdir()} - set(manifest.files) - {MANIFEST}
    if extra:
        raise bad(f"unexpected files {sorted(extra)}")


def cmd_media(args: argparse.Namespace) -> int:
    store_path = Path(args.store)
    result = []
    for medium in json.loads(args.media):
        wanted = BootMedium(**medium)
        found = find_medium(store_path, wanted)
        result.append({"role": wanted.role, "sha256": wanted.sha256, "found": str(found or "")})
    emit(media=result)
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    store = Store(Path(args.store))
    record = GuestRecord.load(store.path / "guests" / args.name, args.name)
    process = record.running_process()
    with process.monitor() as mon:
        machine = str(mon.execute("qom-get", {"path": "/machine", "property": "type"}))
        state = mon.status()
    machine = machine.removesuffix("-machine")
    emit(
        name=record.name,
        spec=record.spec.to_dict(),
        machine_type=machine,
        head=record.head,
        state=state,
        pid=process.pid,
    )
    return 0


# -- live migration --------------------------------------------------------------


class _Control:
    """The orchestrator's lines on stdin, with the heartbeat rule."""

    def __init__(self, heartbeat_s: float, what: str, vm: str) -> None:
        self.heartbeat_s = heartbeat_s
        self.what = what
        self.vm = vm
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.last_seen = time.monotonic()
        thread = threading.Thread(target=self._read, daemon=True, name="vmckpt-agent-stdin")
        thread.start()

    def _read(self) -> None:
        for line in sys.stdin:
            self.lines.put(line.strip())
        self.lines.put(None)

    def poll(self) -> str | None:
        """``commit`` if it arrived; raises if the orchestrator aborted or went silent."""
        command = None
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                break
            self.last_seen = time.monotonic()
            if line is None:
                raise RemoteError("the orchestrator's connection ended", vm=self.vm, step=self.what)
            if line == "abort":
                raise RemoteError("aborted by the orchestrator", vm=self.vm, step=self.what)
            if line == "commit":
                command = line
        if time.monotonic() - self.last_seen > self.heartbeat_s:
            raise RemoteError(
                f"no word from the orchestrator for {self.heartbeat_s:.0f} s (connection lost?)",
                vm=self.vm,
                step=self.what,
            )
        return command


def _wait_migration_event(mon: Monitor, mark: int, timeout: float) -> str | None:
    """The status of a finished migration (completed/failed/cancelled), if one was reported."""
    try:
        event = mon.wait_event(
            {"MIGRATION"},
            timeout,
            lambda e: str(e.data.get("status")) in {"completed", "failed", "cancelled"},
            since=mark,
        )
    except QMPError as exc:
        if exc.step == "wait-event":
            return None
        raise
    return str(event.data["status"])


def cmd_receive(args: argparse.Namespace) -> int:
    """Start QEMU waiting for the guest on tcp:LISTEN:port; run it once it arrived.

    Prints ``listening`` (host, port, pid), ``alive`` every second, ``running``
    (QEMU's RESUME timestamp) once the guest runs here, and ``committed`` once
    the orchestrator said ``commit``. Anything else ends the QEMU it started.
    """
    name = args.name
    store = Store.create(Path(args.store))
    runtime_dir = store.guest_dir(name)
    with contextlib.suppress(MachineError):
        old = GuestRecord.load(runtime_dir, name)
        if old.process is not None and old.process.alive():
            raise RemoteError(
                f"a guest of this name runs here already (PID {old.process.pid})",
                vm=name,
                step="receive",
            )
    spec = relocate_media(GuestSpec.from_dict(json.loads(args.spec)), store.path)
    spec.check_media(vm=name)
    control = _Control(args.heartbeat, "receive", name)
    process = QemuProcess.launch(
        spec, name=name, runtime_dir=runtime_dir, machine_type=args.machine_type, incoming=True
    )
    try:
        with process.monitor() as mon:
            mon.set_migrate_capabilities({"events": True})
            mark = mon.mark()
            mon.migrate_incoming(f"tcp:{args.listen}:0")
            info = mon.execute("query-migrate")
            port = int(info["socket-address"][0]["port"])
            emit(event="listening", host=args.listen, port=port, pid=process.pid)
            deadline = time.monotonic() + args.timeout
            last_alive = 0.0
            while True:
                control.poll()
                if not process.alive():
                    raise MachineError(
                        f"QEMU exited while receiving: {process.log_tail()}",
                        vm=name,
                        step="receive",
                    )
                if time.monotonic() > deadline:
                    raise RemoteError(
                        f"the guest did not arrive within {args.timeout:.0f} s",
                        vm=name,
                        step="receive",
                    )
                if time.monotonic() - last_alive >= 1.0:
                    emit(event="alive")
                    last_alive = time.monotonic()
                status = _wait_migration_event(mon, mark, 0.05)
                if status == "completed":
                    break
                if status is not None:
                    raise RemoteError(
                        f"the incoming migration {status}: {process.log_tail()}",
                        vm=name,
                        step="receive",
                    )
            resume_mark = mon.mark()
            mon.cont(retry_s=5.0)
            if not mon.is_running():
                raise MachineError(f"the guest did not run: {mon.status()}", vm=name, step="resume")
            resumed = [e for e in mon.events_since(resume_mark) if e.name == "RESUME"]
            emit(event="running", resume_ts=resumed[0].timestamp if resumed else time.time())
            mon.set_migrate_capabilities({"events": False})
            while control.poll() != "commit":
                if time.monotonic() - last_alive >= 1.0:
                    emit(event="alive")
                    last_alive = time.monotonic()
                time.sleep(0.02)
        GuestRecord(name, spec, process, head=args.head, machine_type=args.machine_type).save(
            runtime_dir
        )
    except BaseException:
        process.kill()
        raise
    emit(event="committed", pid=process.pid)
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    """Live-migrate a guest running here to ``--uri``; end its QEMU only on ``commit``.

    Prints ``progress`` lines, ``completed`` (QEMU's downtime, total time, bytes
    and the STOP timestamp) when QEMU has sent everything, and ``done`` once
    the orchestrator said ``commit`` and the QEMU here ended. On any failure or
    ``abort`` the migration is cancelled, the settings put back, and the guest
    resumed here; the last line says so.
    """
    name = args.name
    store = Store(Path(args.store))
    runtime_dir = store.path / "guests" / name
    record = GuestRecord.load(runtime_dir, name)
    process = record.running_process()
    control = _Control(args.heartbeat, "send", name)
    with process.monitor() as mon:
        status = mon.execute("query-status")
        if not status["running"]:
            raise RemoteError(
                f"the guest is not running here (state {status['status']})", vm=name, step="send"
            )
        if mon.query_migrate().status in ACTIVE_MIGRATION:
            raise RemoteError("a migration is already in progress", vm=name, step="send")
        old_caps = mon.migrate_capabilities()
        old_params = mon.migrate_parameters()
        try:
            mon.set_migrate_capabilities({"events": True})
            params: dict[str, object] = {"downtime-limit": args.downtime_limit}
            if args.bandwidth:
                params["max-bandwidth"] = args.bandwidth
            mon.set_migrate_parameters(params)
            mark = mon.mark()
            started = time.monotonic()
            mon.migrate(args.uri)
            last_bytes, last_change, last_report = -1, time.monotonic(), 0.0
            while True:
                control.poll()
                finished = _wait_migration_event(mon, mark, 0.1)
                info = mon.query_migrate()
                now = time.monotonic()
                if finished is None and info.status in {"failed", "cancelled"}:
                    finished = info.status
                if finished == "completed":
                    break
                if finished is not None:
                    raise RemoteError(
                        f"QEMU's migration {finished}: {info.error or 'no reason given'}",
                        vm=name,
                        step="send",
                    )
                transferred = info.transferred or 0
                if transferred != last_bytes:
                    last_bytes, last_change = transferred, now
                elif now - last_change > args.stall:
                    raise RemoteError(
                        f"no progress for {args.stall:.0f} s at {transferred} bytes "
                        "(connection cut?)",
                        vm=name,
                        step="send",
                    )
                if now - last_report >= 0.5:
                    emit(event="progress", status=info.status, transferred=transferred)
                    last_report = now
            info = mon.query_migrate()
            events = mon.events_since(mark)
            stops = [e.timestamp for e in events if e.name == "STOP"]
            emit(
                event="completed",
                downtime_ms=info.downtime_ms,
                total_ms=info.total_time_ms,
                transferred=info.transferred,
                stop_ts=stops[-1] if stops else None,
                elapsed_s=time.monotonic() - started,
            )
            while control.poll() != "commit":
                time.sleep(0.02)
        except BaseException:
            # The guest was running here before the migration: leave it so.
            leave_guest_as_found(mon, True, False, old_caps, old_params)
            with contextlib.suppress(Exception):
                emit(event="resumed", running=mon.is_running())
            raise
    process.shutdown()
    record.process = None
    record.save(runtime_dir)
    emit(event="done")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python3 -m vmckpt.remote.agent")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name)
        p.add_argument("--store", required=True)
        p.set_defaults(func=func)
        return p

    command("prepare", cmd_prepare)
    p = command("commit-layer", cmd_commit_layer)
    p.add_argument("--id", required=True)
    p.add_argument("--tmp", required=True)
    p.add_argument("--manifest-sha256", default="")
    p.add_argument("--discard", action="store_true")
    p = command("media", cmd_media)
    p.add_argument("--media", required=True, help="JSON list of boot media")
    p = command("describe", cmd_describe)
    p.add_argument("--name", required=True)
    p = command("receive", cmd_receive)
    p.add_argument("--name", required=True)
    p.add_argument("--spec", required=True, help="the guest spec as JSON")
    p.add_argument("--machine-type", required=True)
    p.add_argument("--listen", required=True, help="address to wait for the guest on")
    p.add_argument("--head", default=None)
    p.add_argument("--heartbeat", type=float, default=10.0)
    p.add_argument("--timeout", type=float, default=600.0)
    p = command("send", cmd_send)
    p.add_argument("--name", required=True)
    p.add_argument("--uri", required=True)
    p.add_argument("--bandwidth", type=int, default=0, help="bytes/s, 0: QEMU's default")
    p.add_argument("--downtime-limit", type=int, default=50, help="ms")
    p.add_argument("--stall", type=float, default=10.0)
    p.add_argument("--heartbeat", type=float, default=10.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except VmckptError as exc:
        emit(error=exc.one_line(), exit=exc.exit_code, kind=type(exc).__name__)
        return exc.exit_code
    except KeyboardInterrupt:
        emit(error="interrupted", exit=130, kind="KeyboardInterrupt")
        return 130


if __name__ == "__main__":
    sys.exit(main())
