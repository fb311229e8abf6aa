"""The host side of remote work: ``python3 -m vmckpt.remote.agent COMMAND --store DIR ...``.

vmckpt runs this on whichever host holds the store and the QEMU concerned,
over SSH on another host and as a child process on this one, so both ends
run the same code. Every command prints JSON lines on stdout; a failure is a
last line ``{"error": {...}}`` (vmckpt.errors.VmckptError.to_wire) and that exit
code. All store work goes through :class:`vmckpt.images.Store` (its commit path, its checks).

Commands:

- ``prepare``: create the store if needed; list its layers (id -> sha256 of manifest.json).
- ``receive-layers``: layers on stdin (a JSON header line per layer naming its files
  and sizes, then their bytes), each published only once every file matches its
  manifest and the manifest the sender's hash (``Store.receive_layer``).
- ``receive-medium``: a boot medium on stdin, kept under ``media/<sha256>/``.
- ``media``: which boot media (role, sha256, path) this host has, by content.
- ``describe``: a guest's spec, versioned machine type and head layer.
- ``receive``: the destination of a live migration (see :func:`cmd_receive`).
- ``send``: the source of a live migration (see :func:`cmd_send`).

``receive`` and ``send`` read commands from stdin, one per line: ``ping``
(the orchestrator is alive), ``commit``, ``abort``. No ``ping`` for
``--heartbeat`` seconds, or end of input, counts as ``abort``: a migration
that loses its orchestrator leaves the guest running at the source and no
QEMU at the destination.
"""

from __future__ import annotations

import argparse
import json
import queue
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from vmckpt import log
from vmckpt.errors import RemoteError, StoreError, VmckptError
from vmckpt.guests.local import LocalGuest
from vmckpt.images import Store, keys
from vmckpt.images.media import find_medium, import_medium
from vmckpt.images.transfer import receive_layer
from vmckpt.machine.spec import BootMedium, GuestSpec
from vmckpt.mechanisms.colo import end_session
from vmckpt.mechanisms.restore_prep import relocate_media
from vmckpt.session import JOURNAL, MigrationSession

CHUNK = 1 << 20
MAX_HEADER = 1 << 20
POLL_S = 0.05
REPORT_EVERY_S = 0.5


def emit(**data: Any) -> None:
    print(json.dumps(data, sort_keys=True), flush=True)


# -- store commands ---------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    # The store there is the one the user named (default ~/.vmckpt/store): made on first use.
    store = Store.create(Path(args.store), parents=True)
    layers = {layer_id: store.manifest_sha256(layer_id) for layer_id in store.layer_ids()}
    emit(store=str(store.path), layers=layers, free_bytes=store.free_bytes())
    return 0


def _header(source: BinaryIO) -> dict[str, Any] | None:
    line = source.readline(MAX_HEADER)
    if not line:
        return None
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise StoreError(f"bad transfer header {line[:60]!r}", step="receive") from exc
    if not isinstance(data, dict):
        raise StoreError("bad transfer header", step="receive")
    return data


def _exactly(source: BinaryIO, size: int, what: str) -> Iterator[bytes]:
    remaining = size
    while remaining:
        chunk = source.read(min(CHUNK, remaining))
        if not chunk:
            raise StoreError(
                f"the transfer of {what} ended {remaining} bytes early", step="receive"
            )
        remaining -= len(chunk)
        yield chunk


def cmd_receive_layers(args: argparse.Namespace) -> int:
    store = Store(Path(args.store))
    # Whatever the sender says, it is another host: never "local".
    origin = keys.host_origin(args.sender)
    source = sys.stdin.buffer
    while (header := _header(source)) is not None:
        if header.get("end"):
            break
        layer_id = str(header.get("layer"))
        files = header.get("files")
        if not isinstance(files, list):
            raise StoreError("transfer header without files", layer=layer_id, step="receive")
        parts = [
            (str(name), _exactly(source, int(size), f"{layer_id}/{name}")) for name, size in files
        ]
        added = receive_layer(
            store, layer_id, str(header.get("manifest_sha256")), parts, origin=origin
        )
        emit(event="layer", layer=layer_id, added=added)
    emit(event="done")
    return 0


def cmd_receive_medium(args: argparse.Namespace) -> int:
    store = Store(Path(args.store))
    header = _header(sys.stdin.buffer)
    if header is None:
        raise StoreError("no medium was sent", step="receive-medium")
    sha256, name, size = str(header["sha256"]), str(header["name"]), int(header["size"])
    path = import_medium(store, sha256, name, _exactly(sys.stdin.buffer, size, name))
    emit(event="medium", sha256=sha256, path=str(path))
    return 0


def cmd_media(args: argparse.Namespace) -> int:
    store = Store(Path(args.store))
    result = []
    for medium in json.loads(args.media):
        wanted = BootMedium.from_dict(medium)
        found = find_medium(store, wanted.sha256, wanted.path)
        result.append({"role": wanted.role, "sha256": wanted.sha256, "found": str(found or "")})
    emit(media=result)
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    store = Store(Path(args.store))
    guest = LocalGuest(store, args.name)
    process = guest.process()
    with process.monitor() as mon:
        machine = mon.machine_type()
        state = mon.status()
    emit(
        name=args.name,
        spec=guest.spec().to_dict(),
        trusted_args=list(guest.record.trusted_args),
        machine_type=machine,
        head=guest.head(),
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


def cmd_receive(args: argparse.Namespace) -> int:
    """Start QEMU waiting for the guest on tcp:LISTEN:port; run it once it arrived.

    Prints ``listening`` (host, port, pid), ``alive`` every second, ``running``
    (QEMU's RESUME timestamp) once the guest runs here, and ``committed`` once
    the orchestrator said ``commit``. Anything else ends the QEMU it started.
    """
    name = args.name
    store = Store(Path(args.store))
    spec = relocate_media(GuestSpec.from_dict(json.loads(args.spec)), store)
    spec.check_media(vm=name)
    control = _Control(args.heartbeat, "receive", name)
    guest = LocalGuest.start(
        store, name, spec, extra_args=tuple(json.loads(args.trusted_args)),
        machine_type=args.machine_type, incoming=True,
    )  # fmt: skip
    process = guest.process()
    try:
        with process.monitor() as mon:
            session = MigrationSession(
                mon, vm=name, error=RemoteError, capabilities={"events": True}, incoming=True,
                timeout_s=args.timeout,
            )  # fmt: skip
            with session:
                session.start(f"tcp:{args.listen}:0")
                emit(event="listening", host=args.listen, port=mon.incoming_port(), pid=process.pid)
                deadline = time.monotonic() + args.timeout
                last_alive = 0.0
                while session.poll() not in {"completed", "failed", "cancelled"}:
                    control.poll()
                    if not process.alive():
                        raise RemoteError(
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
                    time.sleep(POLL_S)
                session.wait(timeout=5.0)  # raises for failed/cancelled, with QEMU's reason
                mark = mon.mark()
                session.resume()
            resumed = [e for e in mon.events_since(mark) if e.name == "RESUME"]
            emit(event="running", resume_ts=resumed[0].timestamp if resumed else time.time())
            while control.poll() != "commit":
                if time.monotonic() - last_alive >= 1.0:
                    emit(event="alive")
                    last_alive = time.monotonic()
                time.sleep(POLL_S)
        if args.head and store.has_layer(args.head):
            store.set_head(name, args.head)
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
    ``abort`` the session cancels the migration, puts the settings back and
    resumes the guest here; the last line says so.
    """
    name = args.name
    store = Store(Path(args.store))
    guest = LocalGuest(store, name)
    process = guest.process()
    end_session(guest.store, guest.name)  # a COLO checkpoint session must let go of it first
    control = _Control(args.heartbeat, "send", name)
    parameters: dict[str, object] = {"downtime-limit": args.downtime_limit}
    if args.bandwidth:
        parameters["max-bandwidth"] = args.bandwidth
    with (
        store.host.guest_lock(name, what="migrate", wait_s=60),
        guest.guard(),
        process.monitor() as mon,
    ):
        if not mon.is_running():
            raise RemoteError(
                f"the guest is not running here (state {mon.status()})", vm=name, step="send"
            )
        session = MigrationSession(
            mon, vm=name, error=RemoteError, capabilities={"events": True},
            parameters=parameters, journal=store.host.journal_path(name, JOURNAL),
            timeout_s=24 * 3600.0,
        )  # fmt: skip
        try:
            with session:
                started = time.monotonic()
                session.start(args.uri)
                last_bytes, last_change, last_report = -1, time.monotonic(), 0.0
                while True:
                    control.poll()
                    info = mon.query_migrate()
                    now = time.monotonic()
                    if info.status in {"completed", "failed", "cancelled"}:
                        break
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
                    if now - last_report >= REPORT_EVERY_S:
                        emit(event="progress", status=info.status, transferred=transferred)
                        last_report = now
                    time.sleep(POLL_S)
                session.wait(timeout=5.0)
                info = mon.query_migrate()
                stops = [e.timestamp for e in session.events() if e.name == "STOP"]
                emit(
                    event="completed",
                    downtime_ms=info.downtime_ms,
                    total_ms=info.total_time_ms,
                    transferred=info.transferred,
                    stop_ts=stops[-1] if stops else None,
                    elapsed_s=time.monotonic() - started,
                )
                while control.poll() != "commit":
                    time.sleep(POLL_S)
                session.hand_over()  # the guest runs at the destination now
        except BaseException:
            # The session has put the guest back as it ran before the migration.
            running = False
            try:
                running = mon.is_running()
            finally:
                emit(event="resumed", running=running)
            raise
    process.shutdown()
    guest.record.process = None
    guest.save()
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
    p = command("receive-layers", cmd_receive_layers)
    p.add_argument(
        "--sender", required=True, help="the host that sends the layers: they are sealed here "
        "with origin host:SENDER, so their free-form QEMU arguments are not used on restore",
    )  # fmt: skip
    command("receive-medium", cmd_receive_medium)
    p = command("media", cmd_media)
    p.add_argument("--media", required=True, help="JSON list of boot media")
    p = command("describe", cmd_describe)
    p.add_argument("--name", required=True)
    p = command("receive", cmd_receive)
    p.add_argument("--name", required=True)
    p.add_argument("--spec", required=True, help="the guest spec as JSON")
    p.add_argument("--trusted-args", default="[]", help="JSON list of extra QEMU arguments")
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
    log.configure(0)
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
        return code
    except VmckptError as exc:
        emit(**exc.to_wire())
        return exc.exit_code
    except KeyboardInterrupt:
        interrupted = VmckptError("interrupted", step=args.command)
        interrupted.exit_code = 130
        emit(**interrupted.to_wire())
        return 130


if __name__ == "__main__":
    sys.exit(main())
