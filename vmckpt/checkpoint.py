"""One checkpoint of a running guest, end to end.

Mechanism ``precopy-diff`` (mechanism 2 of DESIGN.md): QEMU live-migrates
the guest into vmckpt over a socket pair it was handed with ``getfd``; the
guest runs while RAM is copied and is stopped only for QEMU's final
iteration and the device state. As soon as QEMU reports the migration
complete, vmckpt resumes the guest, and only then diffs the received RAM
against the parent layer and writes the pages that changed.

Every path that could leave the guest stopped or migrating goes through
:func:`leave_guest_as_found`: a failed checkpoint cancels the migration,
restores the migration settings it changed and resumes the guest.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np

from vmckpt.disks import DiskTracker
from vmckpt.errors import CheckpointError, QMPError, VmckptError
from vmckpt.images import DiskDelta, LayerContent, LayerManifest, Store
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

    # The guest's RAM as this layer holds it: the next checkpoint's diff base.
    image: RamImage | None = field(default=None, repr=False, compare=False)

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
    *,
    base: RamImage | None = None,
    monitor: Callable[[], Monitor] | None = None,
) -> CheckpointResult:
    """Checkpoint a running guest into a new layer whose parent is the guest's head.

    ``base``, when given, is the RAM the head layer holds (the image a
    previous checkpoint returned), so the diff needs no compose of the chain.
    ``monitor``, when given, connects to a guest vmckpt did not start (e.g. a
    libvirt domain, vmckpt/libvirt.py); by default the guest's own QEMU's QMP.

    Writable disks are captured at the instant the guest is stopped for the final
    iteration (vmckpt/disks.py); on any failure what that added to QEMU is removed.
    """
    parent = store.manifest(guest.head) if guest.head is not None else None
    tracker = DiskTracker(guest.name, guest.spec.disks, parent, runtime_dir / "disk-scratch")
    connect = monitor or (lambda: guest.running_process().monitor())
    committed = False
    try:
        result = _take_checkpoint(store, guest, runtime_dir, settings, tracker, base, connect)
        committed = True
        return result
    finally:
        if tracker.active:
            with contextlib.suppress(VmckptError), connect() as mon:
                tracker.commit(mon) if committed else tracker.abort(mon)


def _take_checkpoint(
    store: Store,
    guest: GuestRecord,
    runtime_dir: Path,
    settings: CheckpointSettings | None,
    tracker: DiskTracker,
    base: RamImage | None,
    connect: Callable[[], Monitor],
) -> CheckpointResult:
    settings = settings or CheckpointSettings()
    started = time.monotonic()
    parent = guest.head
    if parent is not None:
        store.manifest(parent)  # fail early, before touching the guest, if it is unreadable

    with connect() as mon:
        tracker.prepare(mon)
        envelope, ram, stop, resume, downtime = _receive_live(
            mon, guest.name, settings, at_instant=tracker.mark_instant
        )
        disk_deltas = tracker.collect(mon)
        qemu_version = mon.greeting_version
    received = time.monotonic()

    pages, zeroed = diff_against_parent(store, guest.name, parent, ram, base=base)
    diffed = time.monotonic()
    pause_ms = (resume - stop) * 1000.0
    stats: dict[str, Any] = {
        "pause_ms": round(pause_ms, 3),
        "qemu_downtime_ms": downtime,
        "receive_s": round(received - started, 3),
        "diff_s": round(diffed - received, 3),
    }
    return write_checkpoint_layer(
        store,
        guest,
        runtime_dir,
        LayerParts(envelope, ram, pages, zeroed, qemu_version, disk_deltas),
        mechanism=MECHANISM_PRECOPY,
        stats=stats,
        started=started,
    )


@dataclass(frozen=True)
class LayerParts:
    """What a mechanism hands over to become a layer."""

    envelope: StreamEnvelope
    ram: RamImage
    pages: dict[str, np.ndarray]
    zeroed: dict[str, np.ndarray]
    qemu_version: str
    disks: list[DiskDelta] = field(default_factory=list)  # from DiskTracker.collect


def diff_against_parent(
    store: Store, vm: str, parent: str | None, ram: RamImage, *, base: RamImage | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pages to store (non-zero, changed) and pages that became zero, per RAM block.

    Without a parent every non-zero page is stored. Vectorised over whole
    blocks: no Python loop over pages.
    """
    if parent is None:
        base = None
    elif base is None:
        base, _, _ = store.compose(parent)
    if base is not None and not base.same_layout(ram):
        raise CheckpointError(
            f"the guest's RAM blocks differ from parent layer {parent}'s", vm=vm, step="diff"
        )
    pages: dict[str, np.ndarray] = {}
    zeroed: dict[str, np.ndarray] = {}
    for block in ram.blocks:
        if base is None:
            pages[block.idstr] = ram.nonzero_pages(block.idstr)
            zeroed[block.idstr] = np.zeros(0, dtype=np.uint32)
        else:
            pages[block.idstr], zeroed[block.idstr] = split_zero(
                ram, block.idstr, ram.changed_pages(block.idstr, base)
            )
    return pages, zeroed


def split_zero(ram: RamImage, idstr: str, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split page numbers into those with data and those that are all zero now."""
    nonzero = ram.words_of(idstr)[candidates].any(axis=1)
    return candidates[nonzero], candidates[~nonzero]


def write_checkpoint_layer(
    store: Store,
    guest: GuestRecord,
    runtime_dir: Path,
    parts: LayerParts,
    *,
    mechanism: str,
    stats: dict[str, Any],
    started: float,
) -> CheckpointResult:
    """Write the layer (atomically, via images), move the guest's head to it."""
    envelope = parts.envelope
    content = LayerContent(
        parent=guest.head,
        guest=guest.name,
        spec=guest.spec.to_dict(),
        qemu_version=parts.qemu_version,
        machine_type=envelope.machine_type,
        mechanism=mechanism,
        ram_section=(envelope.ram_section_id, envelope.ram_instance_id, envelope.ram_version_id),
        stats=stats,
        ram=parts.ram,
        pages=parts.pages,
        zeroed=parts.zeroed,
        prelude=envelope.prelude,
        epilogue=envelope.epilogue,
        disks=parts.disks,
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
    return CheckpointResult(
        layer=manifest,
        pause_ms=float(stats.get("pause_ms", 0.0)),
        pages_stored=sum(len(p) for p in parts.pages.values()),
        pages_zeroed=sum(len(z) for z in parts.zeroed.values()),
        bytes_written=manifest.bytes_total,
        total_s=time.monotonic() - started,
        mechanism=mechanism,
        image=parts.ram,
    )


def _receive_live(
    mon: Monitor,
    vm: str,
    settings: CheckpointSettings,
    at_instant: Callable[[Monitor], None] | None = None,
) -> tuple[StreamEnvelope, RamImage, float, float, int | None]:
    """Live-migrate the guest into a receiver thread; resume it the moment QEMU is done.

    Returns the stream, the RAM, the STOP and RESUME timestamps and QEMU's
    own downtime figure. Whatever happens, the guest is left as it was found.
    """
    status = mon.execute("query-status")
    was_running = bool(status["running"])
    if status["status"] in {"inmigrate", "finish-migrate", "save-vm", "restore-vm"}:
        raise CheckpointError(f"the guest is in state {status['status']}", vm=vm, step="prepare")
    if status["status"] == "postmigrate":
        # QEMU refuses to migrate a guest stopped by an earlier migration.
        raise CheckpointError(
            "the guest was paused when its last checkpoint was taken and has not run since; "
            "QEMU cannot checkpoint it again until it is resumed",
            vm=vm,
            step="prepare",
        )
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
            if at_instant is not None:
                at_instant(mon)  # e.g. the disks' point: the guest is still stopped here
            if was_running:
                mon.cont(retry_s=5.0)  # the pause ends here: everything after runs beside the guest
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
        leave_guest_as_found(mon, was_running, migrating, old_caps, old_params)
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


def leave_guest_as_found(
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
            mon.cont(retry_s=5.0)


def page_bytes(pages: int) -> int:
    return pages * PAGE_SIZE
