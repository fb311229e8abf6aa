"""Bring a guest back to life from a layer.

The chain is verified and composed first (nothing is started for a broken
chain), then a QEMU is started from the stored spec with the layer's exact
machine type, waiting for an incoming migration on a socket pair; vmckpt
writes the composed stream into it and resumes the guest. A restore that
fails ends the QEMU it started; the store is only ever read.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, cast

from vmckpt.disks import discard_restored, materialize, track_restored
from vmckpt.errors import MachineError, QMPError, RestoreError, VmckptError
from vmckpt.images import Store
from vmckpt.machine import GuestRecord, GuestSpec, QemuProcess
from vmckpt.qmp import Monitor
from vmckpt.ram import RamImage
from vmckpt.remote.media import relocate_media
from vmckpt.stream import StreamEnvelope, write_stream

FD_NAME = "vmckpt-restore"


@dataclass(frozen=True)
class RestoreResult:
    name: str
    layer: str
    pid: int
    compose_s: float
    load_s: float
    total_s: float
    stream_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "pid": self.pid,
            "compose_s": round(self.compose_s, 3),
            "load_s": round(self.load_s, 3),
            "total_s": round(self.total_s, 3),
            "stream_bytes": self.stream_bytes,
        }


def restore_guest(
    store: Store, layer_ref: str | None, name: str | None, *, timeout_s: float = 120.0
) -> RestoreResult:
    started = time.monotonic()
    layer_ids = store.layer_ids()
    if not layer_ids:
        raise RestoreError(f"store {store.path} holds no layers", step="resolve")
    layer_id = store.resolve(layer_ref) if layer_ref else layer_ids[-1]
    manifest = store.manifest(layer_id)
    name = name or manifest.guest
    runtime_dir = store.guest_dir(name)
    _refuse_if_running(runtime_dir, name)

    # Boot media found by content: their own path, else a copy in the store (restore on
    # another host, see vmckpt.remote.media).
    spec = relocate_media(GuestSpec.from_dict(manifest.spec), store.path)
    spec.check_media(vm=name)
    ram, prelude, epilogue = store.compose(layer_id)
    envelope = StreamEnvelope(
        prelude=prelude,
        machine_type=manifest.machine_type,
        ram_section_id=manifest.ram_section[0],
        ram_instance_id=manifest.ram_section[1],
        ram_version_id=manifest.ram_section[2],
        epilogue=epilogue,
    )
    # Writable disks are rebuilt as new images beside the guest's runtime files.
    spec = replace(spec, disks=materialize(store, manifest, spec.disks, runtime_dir, vm=name))
    composed = time.monotonic()

    try:
        process = QemuProcess.launch(
            spec,
            name=name,
            runtime_dir=runtime_dir,
            machine_type=manifest.machine_type or None,
            incoming=True,
        )
    except BaseException:
        discard_restored(spec.disks, runtime_dir)
        raise
    try:
        written = _load_into(
            process,
            envelope,
            ram,
            timeout_s,
            before_resume=lambda mon: track_restored(mon, spec.disks, manifest),
        )
        loaded = time.monotonic()
        GuestRecord(name, spec, process, head=layer_id, machine_type=manifest.machine_type).save(
            runtime_dir
        )
    except BaseException as exc:
        process.kill()
        discard_restored(spec.disks, runtime_dir)
        if isinstance(exc, VmckptError) and not isinstance(exc, RestoreError):
            raise RestoreError(exc.message, vm=name, layer=layer_id, step=exc.step) from exc
        raise
    return RestoreResult(
        name=name,
        layer=layer_id,
        pid=process.pid,
        compose_s=composed - started,
        load_s=loaded - composed,
        total_s=time.monotonic() - started,
        stream_bytes=written,
    )


def _refuse_if_running(runtime_dir: Any, name: str) -> None:
    with contextlib.suppress(MachineError):
        record = GuestRecord.load(runtime_dir, name)
        if record.process is not None and record.process.alive():
            raise RestoreError(
                f"a guest of this name is running (PID {record.process.pid}); "
                "stop it or restore with --name",
                vm=name,
                step="restore",
            )


class _StreamSender(threading.Thread):
    def __init__(self, sock: socket.socket, envelope: StreamEnvelope, ram: RamImage) -> None:
        super().__init__(name="vmckpt-sender", daemon=True)
        self.sock = sock
        self.envelope = envelope
        self.ram = ram
        self.written = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.sock.makefile("wb", buffering=1 << 20) as sink:
                self.written = write_stream(cast(BinaryIO, sink), self.envelope, self.ram)
        except BaseException as exc:
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self.sock.close()


def _load_into(
    process: QemuProcess,
    envelope: StreamEnvelope,
    ram: RamImage,
    timeout_s: float,
    before_resume: Callable[[Monitor], None] | None = None,
) -> int:
    ours, theirs = socket.socketpair()
    sender = _StreamSender(ours, envelope, ram)
    try:
        with process.monitor() as mon:
            mon.set_migrate_capabilities({"events": True})
            mark = mon.mark()
            mon.send_fd(FD_NAME, theirs.fileno())
            theirs.close()
            sender.start()
            mon.migrate_incoming(f"fd:{FD_NAME}")
            deadline = time.monotonic() + timeout_s
            while True:
                if not process.alive():
                    raise RestoreError(
                        f"QEMU exited while loading the checkpoint: {process.log_tail()}",
                        step="load",
                    )
                status = mon.query_migrate().status
                if status == "completed":
                    break
                if status in {"failed", "cancelled"}:
                    raise RestoreError(
                        f"QEMU rejected the checkpoint stream: {process.log_tail()}",
                        step="load",
                    )
                if time.monotonic() > deadline:
                    raise RestoreError(
                        f"QEMU did not finish loading within {timeout_s:.0f} s", step="load"
                    )
                with contextlib.suppress(QMPError):
                    mon.wait_event({"MIGRATION"}, 0.2, since=mark)
                mark = mon.mark()
            sender.join(timeout=30)
            if sender.error is not None:
                raise RestoreError(f"writing the stream failed: {sender.error}", step="load")
            mon.set_migrate_capabilities({"events": False})
            if before_resume is not None:
                before_resume(mon)
            mon.cont(retry_s=5.0)
            if not mon.is_running():
                raise RestoreError(f"the guest did not start: {mon.status()}", step="resume")
            return sender.written
    finally:
        with contextlib.suppress(OSError):
            theirs.close()
        sender.join(timeout=5)
