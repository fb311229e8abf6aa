"""One checkpoint of a running guest, end to end.

Mechanism ``precopy-diff`` (mechanism 2 of DESIGN.md): QEMU live-migrates
the guest into vmckpt over a socket pair it was handed with ``getfd``; the
guest runs while RAM is copied and is stopped only for QEMU's final
iteration and the device state. As soon as QEMU reports the migration
complete, vmckpt resumes the guest, and only then diffs the received RAM
against the parent layer and writes the pages that changed.

Every path that could leave the guest stopped or migrating goes through
:func:`_leave_guest_as_found`: a failed checkpoint cancels the migration,
restores the migration settings it changed and resumes the guest.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from vmckpt.errors import CheckpointError, QMPError, VmckptError
from vmckpt.images import LayerContent, LayerManifest, Store
from vmckpt.machine import GuestRecord
from vmckpt.qmp import Event, Monitor
from vmckpt.ram import PAGE_SIZE, RamImage
from vmckpt.stream import StreamEnvelope, read_stream

MECHANISM_PRECOPY = "precopy-diff"
FD_NAME = "vmckpt-checkpoint"
ACTIVE_MIGRATION = {
    "setup", "active", "pre-switchover", "device", "postcopy-active",
    "postcopy-paused", "postcopy-recover", "cancelling", "wait-unplug", "colo",
}  # fmt: skip
FINISHED = {"completed", "failed", "cancelled"}


@dataclass(frozen=True)
class CheckpointSettings:
    downtime_limit_ms: int = 50  # QEMU's target for the final stop
    max_bandwidth: int = 8 << 30  # bytes/s; a local socket, so don't throttle
    timeout_s: float = 300.0  # give up (cancel, guest keeps running) after this


@dataclass(frozen=True)
class CheckpointResult:
    layer: LayerManifest
    pause_ms: float
    pages_stored: int
    pages_zeroed: int
    bytes_written: int
    total_s: float
    mechanism: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer.id,
            "parent": self.layer.parent,
            "mechanism": self.mechanism,
            "pause_ms": round(self.pause_ms, 3),
            "pages_stored": self.pages_stored,
            "pages_zeroed": self.pages_zeroed,
            "bytes_written": self.bytes_written,
            "total_s": round(self.total_s, 3),
        }


class _StreamReceiver(threading.Thread):
    """Reads QEMU's migration stream from our end of the socket pair."""

    def __init__(self, sock: socket.socket, fault_after: int | None) -> None:
        super().__init__(name="vmckpt-receiver", daemon=True)
        self.sock = sock
        self.fault_after = fault_after
        self.envelope: StreamEnvelope | None = None
        self.ram: RamImage | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            source = cast(BinaryIO, self.sock.makefile("rb", buffering=1 << 20))
            if self.fault_after is not None:
                source = cast(BinaryIO, _FailingReader(source, self.fault_after))
            self.envelope, self.ram = read_stream(source)
        except BaseException as exc:  # reported to the main thread, never lost
            self.error = exc
        finally:
            # Closing our end makes QEMU's writes fail, so its migration fails
            # instead of blocking forever if we stopped reading early.
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()


class _FailingReader:
    """Fault injection (VMCKPT_FAULT=receiver-dies-after:BYTES): the receiver dies midway."""

    def __init__(self, inner: BinaryIO, budget: int) -> None:
        self.inner = inner
        self.budget = budget

    def _spend(self, n: int) -> None:
        self.budget -= n
        if self.budget < 0:
            raise OSError("injected fault: receiver died")

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self._spend(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        count = int(cast(Any, self.inner).readinto(buffer))
        self._spend(count)
        return count

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _fault(point: str) -> int | None:
    """Parse VMCKPT_FAULT=point:value, the fault-injection hook the tests use."""
    spec = os.environ.get("VMCKPT_FAULT", "")
    if spec.startswith(point + ":"):
        return int(spec.split(":", 1)[1])
    return None


def take_checkpoint(
    store: Store,
    guest: GuestRecord,
    runtime_dir: Path,
    settings: CheckpointSettings | None = None,
) -> CheckpointResult:
    """Checkpoint a running guest into a new layer whose parent is the guest's head."""
    settings = settings or CheckpointSettings()
    started = time.monotonic()
    process = guest.running_process()
    parent = guest.head
    if parent is not None:
        store.manifest(parent)  # fail early, before touching the guest, if it is unreadable

    with process.monitor() as mon:
        envelope, ram, stop, resume, downtime = _receive_live(mon, guest.name, settings)
        qemu_version = mon.greeting_version
    received = time.monotonic()

    base: RamImage | None = None
    if parent is not None:
        base, _, _ = store.compose(parent)
        if not base.same_layout(ram):
            raise CheckpointError(
                f"the guest's RAM blocks differ from parent layer {parent}'s",
                vm=guest.name,
                step="diff",
            )
    pages: dict[str, np.ndarray] = {}
    zeroed: dict[str, np.ndarray] = {}
    for block in ram.blocks:
        if base is None:
            pages[block.idstr] = ram.nonzero_pages(block.idstr)
            zeroed[block.idstr] = np.zeros(0, dtype=np.uint32)
            continue
        changed = ram.changed_pages(block.idstr, base)
        nonzero = ram.words_of(block.idstr)[changed].any(axis=1)
        pages[block.idstr] = changed[nonzero]
        zeroed[block.idstr] = changed[~nonzero]
    diffed = time.monotonic()

    pause_ms = (resume - stop) * 1000.0
    stats: dict[str, Any] = {
        "pause_ms": round(pause_ms, 3),
        "qemu_downtime_ms": downtime,
        "receive_s": round(received - started, 3),
        "diff_s": round(diffed - received, 3),
    }
    content = LayerContent(
        parent=parent,
        guest=guest.name,
        spec=guest.spec.to_dict(),
        qemu_version=qemu_version,
        machine_type=envelope.machine_type,
        mechanism=MECHANISM_PRECOPY,
        ram_section=(envelope.ram_section_id, envelope.ram_instance_id, envelope.ram_version_id),
        stats=stats,
        ram=ram,
        pages=pages,
        zeroed=zeroed,
        prelude=envelope.prelude,
        epilogue=envelope.epilogue,
    )
    try:
        manifest = store.write_layer(content)
    except VmckptError as exc:
        exc.vm = exc.vm or guest.name
        raise
    except OSError as exc:
        raise CheckpointError(
            f"cannot write the layer: {exc} (the guest runs on; the store is unchanged)",
            vm=guest.name,
            step="write-layer",
        ) from exc
    guest.head = manifest.id
    guest.machine_type = envelope.machine_type
    guest.save(runtime_dir)
    stored = sum(len(p) for p in pages.values())
    return CheckpointResult(
        layer=manifest,
        pause_ms=pause_ms,
        pages_stored=stored,
        pages_zeroed=sum(len(z) for z in zeroed.values()),
        bytes_written=manifest.bytes_total,
        total_s=time.monotonic() - started,
        mechanism=MECHANISM_PRECOPY,
    )


def _receive_live(
    mon: Monitor, vm: str, settings: CheckpointSettings
) -> tuple[StreamEnvelope, RamImage, float, float, int | None]:
    """Live-migrate the guest into a receiver thread; resume it the moment QEMU is done.

    Returns the stream, the RAM, the STOP and RESUME timestamps and QEMU's
    own downtime figure. Whatever happens, the guest is left as it was found.
    """
    status = mon.execute("query-status")
    was_running = bool(status["running"])
    if status["status"] in {"inmigrate", "finish-migrate", "save-vm", "restore-vm"}:
        raise CheckpointError(f"the guest is in state {status['status']}", vm=vm, step="prepare")
    current = mon.query_migrate().status
    if current in ACTIVE_MIGRATION:
        raise CheckpointError(
            f"a migration is already in progress (state {current})", vm=vm, step="prepare"
        )

    old_caps = mon.migrate_capabilities()
    old_params = mon.migrate_parameters()
    ours, theirs = socket.socketpair()
    receiver = _StreamReceiver(ours, _fault("receiver-dies-after"))
    migrating = False
    try:
        mon.set_migrate_capabilities({"events": True})
        mon.set_migrate_parameters(
            {"downtime-limit": settings.downtime_limit_ms, "max-bandwidth": settings.max_bandwidth}
        )
        mark = mon.mark()
        mon.send_fd(FD_NAME, theirs.fileno())
        theirs.close()
        receiver.start()
        mon.migrate(f"fd:{FD_NAME}")
        migrating = True
        finished = mon.wait_event(
            {"MIGRATION"},
            settings.timeout_s,
            lambda e: str(e.data.get("status")) in FINISHED,
            since=mark,
        )
        if finished.data["status"] == "completed":
            migrating = False
            if was_running:
                mon.cont()  # the pause ends here: everything after runs beside the guest
        else:
            migrating = False
            info = mon.query_migrate()
            raise CheckpointError(
                f"QEMU's migration {finished.data['status']}: {info.error or 'no reason given'}",
                vm=vm,
                step="migrate",
            )
        stop_event, resume_event = _pause_events(mon, mark, finished)
        downtime = mon.query_migrate().downtime_ms
    except QMPError as exc:
        raise CheckpointError(str(exc.message), vm=vm, step=exc.step or "migrate") from exc
    finally:
        _leave_guest_as_found(mon, was_running, migrating, old_caps, old_params)
        with contextlib.suppress(OSError):
            theirs.close()
        receiver.join(timeout=30)
        if receiver.is_alive():
            # QEMU holds its end open: cut ours so the thread ends.
            with contextlib.suppress(OSError):
                ours.shutdown(socket.SHUT_RDWR)
            receiver.join(timeout=5)

    if receiver.error is not None or receiver.envelope is None or receiver.ram is None:
        raise CheckpointError(
            f"reading QEMU's stream failed: {receiver.error}", vm=vm, step="receive"
        ) from receiver.error
    return receiver.envelope, receiver.ram, stop_event, resume_event, downtime


def _pause_events(mon: Monitor, mark: int, finished: Event) -> tuple[float, float]:
    """QEMU's timestamps of the guest's STOP before, and RESUME after, the final iteration."""
    if mon.is_running():
        mon.wait_event({"RESUME"}, 10.0, lambda e: e.timestamp >= finished.timestamp, since=mark)
    events = mon.events_since(mark)
    stops = [e.timestamp for e in events if e.name == "STOP" and e.timestamp <= finished.timestamp]
    resumes = [
        e.timestamp for e in events if e.name == "RESUME" and e.timestamp >= finished.timestamp
    ]
    stop = stops[-1] if stops else finished.timestamp
    resume = resumes[0] if resumes else finished.timestamp
    return stop, resume


def _leave_guest_as_found(
    mon: Monitor,
    was_running: bool,
    migrating: bool,
    old_caps: dict[str, bool],
    old_params: dict[str, Any],
) -> None:
    """Cancel our migration, put the settings back and make sure the guest runs."""
    with contextlib.suppress(QMPError):
        if migrating or mon.query_migrate().status in ACTIVE_MIGRATION:
            mon.migrate_cancel()
            deadline = time.monotonic() + 10
            while mon.query_migrate().status in ACTIVE_MIGRATION and time.monotonic() < deadline:
                time.sleep(0.05)
    with contextlib.suppress(QMPError):
        mon.set_migrate_capabilities({"events": old_caps.get("events", False)})
    with contextlib.suppress(QMPError):
        mon.set_migrate_parameters(
            {
                key: old_params[key]
                for key in ("downtime-limit", "max-bandwidth")
                if key in old_params
            }
        )
    mon.close_fd(FD_NAME)
    with contextlib.suppress(QMPError):
        if was_running and not mon.is_running():
            mon.cont()


def page_bytes(pages: int) -> int:
    return pages * PAGE_SIZE
