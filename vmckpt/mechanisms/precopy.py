"""One checkpoint of a running guest, end to end: mechanism ``precopy-diff``.

QEMU live-migrates the guest into vmckpt over a socket pair it was handed
with ``getfd`` (a :class:`~vmckpt.session.MigrationSession`); the guest runs
while RAM is copied and is stopped only for QEMU's final iteration and the
device state. As soon as QEMU reports the migration complete, vmckpt resumes
the guest, and only then diffs the received RAM against the parent layer and
writes the pages that changed (vmckpt/images). Writable disks are captured
at the instant the guest is stopped (vmckpt/mechanisms/disk_capture.py).

The session leaves the guest as found on every exit; a guard process
(vmckpt/guard.py) does it if this process dies; the guest's checkpoint lock
serialises checkpoints of one guest.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

from vmckpt import faults, log
from vmckpt.errors import CheckpointError, VmckptError
from vmckpt.guests.base import Guest
from vmckpt.mechanisms.disk_capture import DiskTracker
from vmckpt.mechanisms.layers import (
    CheckpointResult,
    CheckpointSettings,
    LayerParts,
    diff_against_parent,
    write_checkpoint_layer,
)
from vmckpt.progress import NO_PROGRESS, Progress
from vmckpt.qmp import Monitor
from vmckpt.ram import RamImage
from vmckpt.session import JOURNAL, MigrationSession, recover
from vmckpt.stream import StreamEnvelope, read_stream

MECHANISM_PRECOPY = "precopy-diff"
RECEIVER_JOIN_S = 30.0  # after the migration ended, the receiver has read all or fails
_log = log.get(__name__)


class _CountingReader:
    """A stream source that reports bytes read (progress) and can fail on purpose (faults)."""

    def __init__(self, inner: BinaryIO, on_bytes: Callable[[int], None], fail_after: int | None):
        self.inner = inner
        self.on_bytes = on_bytes
        self.budget = fail_after
        self._pending = 0

    def _count(self, n: int) -> None:
        self._pending += n
        if self._pending >= 4 << 20:
            self.on_bytes(self._pending)
            self._pending = 0
        if self.budget is not None:
            self.budget -= n
            if self.budget < 0:
                raise OSError("injected fault: receiver died")

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        self._count(len(data))
        return data

    def readinto(self, buffer: Any) -> int:
        count = int(cast(Any, self.inner).readinto(buffer) or 0)
        self._count(count)
        return count

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _StreamReceiver(threading.Thread):
    """Reads QEMU's migration stream from our end of the socket pair."""

    def __init__(self, sock: socket.socket, on_bytes: Callable[[int], None]) -> None:
        super().__init__(name="vmckpt-receiver", daemon=True)
        self.sock = sock
        self.on_bytes = on_bytes
        self.envelope: StreamEnvelope | None = None
        self.ram: RamImage | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # Closed here, not left to the collector: the error kept below holds this frame,
            # and a socket with an open file object stays open after sock.close().
            with cast(BinaryIO, self.sock.makefile("rb", buffering=1 << 20)) as source:
                counted = _CountingReader(
                    source, self.on_bytes, faults.value("receiver-dies-after")
                )
                self.envelope, self.ram = read_stream(cast(BinaryIO, counted))
        except BaseException as exc:  # reported to the main thread, never lost
            self.error = exc
        finally:
            # Closing our end makes QEMU's writes fail, so its migration fails
            # instead of blocking forever if we stopped reading early.
            self.cut()

    def cut(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def finish(self) -> None:
        self.join(timeout=RECEIVER_JOIN_S)
        if self.is_alive():
            self.cut()  # QEMU holds its end open: cut ours so the thread ends
            self.join(timeout=5)
        self.sock.close()


@dataclass(frozen=True)
class Received:
    """What one live migration into vmckpt delivered."""

    envelope: StreamEnvelope
    ram: RamImage
    pause_ms: float
    qemu_downtime_ms: int | None
    qemu_version: str


def receive_precopy(
    mon: Monitor,
    vm: str,
    settings: CheckpointSettings,
    *,
    journal: Path | None,
    at_instant: Callable[[Monitor], None] | None = None,
    progress: Progress = NO_PROGRESS,
    memory_bytes: int = 0,
) -> Received:
    """Live-migrate the guest into a receiver thread; resume it the moment QEMU is done.

    ``at_instant`` runs while the guest is still stopped after the final
    iteration (the disks' point). Whatever happens, the guest is left as found.
    """
    session = MigrationSession(
        mon,
        vm=vm,
        error=CheckpointError,
        capabilities={"events": True},
        parameters={
            "downtime-limit": settings.downtime_limit_ms,
            "max-bandwidth": settings.max_bandwidth,
        },
        journal=journal,
        timeout_s=settings.timeout_s,
    )
    with session, progress.task("receiving RAM", memory_bytes or None, unit="B") as task:
        faults.point(faults.AFTER_SETTINGS)
        receiver = _StreamReceiver(session.socket(), task.advance)
        receiver.start()
        try:
            session.start()
            faults.point(faults.MID_MIGRATION)
            session.wait()
            faults.point(faults.BEFORE_RESUME)
            if at_instant is not None:
                at_instant(mon)
            session.resume()  # the pause ends here: everything after runs beside the guest
            stop, resume = session.pause_window()
            downtime = mon.query_migrate().downtime_ms
        except BaseException:
            receiver.cut()
            raise
        finally:
            receiver.finish()
    if receiver.error is not None or receiver.envelope is None or receiver.ram is None:
        raise CheckpointError(
            f"reading QEMU's stream failed: {receiver.error}", vm=vm, step="receive"
        ) from receiver.error
    return Received(
        receiver.envelope, receiver.ram, (resume - stop) * 1000.0, downtime, mon.version
    )


def take_checkpoint(
    target: Guest,
    settings: CheckpointSettings | None = None,
    *,
    base: RamImage | None = None,
    progress: Progress = NO_PROGRESS,
) -> CheckpointResult:
    """Checkpoint a running guest into a new layer whose parent is the guest's head.

    ``base``, when given, is the RAM the head layer holds (the image a previous
    checkpoint returned), so the diff needs no compose of the chain.
    """
    settings = settings or CheckpointSettings()
    store = target.store
    store.check_writable()  # before the guest is paused for anything
    with store.host.guest_lock(
        target.name, what="checkpoint", wait_s=settings.lock_wait_s, kind=target.kind
    ):
        return _take(target, settings, base, progress)


def _take(
    target: Guest,
    settings: CheckpointSettings,
    base: RamImage | None,
    progress: Progress,
) -> CheckpointResult:
    started = time.monotonic()
    store, name, kind = target.store, target.name, target.kind
    parent_id = store.head(name, kind)
    parent = store.manifest(parent_id) if parent_id else None  # fails before touching the guest
    spec = target.spec()
    journal = store.host.journal_path(name, JOURNAL, kind)
    tracker = DiskTracker(
        name, spec.disks, parent, store.host.scratch_dir(name, kind), by_fd=target.files_by_fd
    )
    committed = False
    try:
        with target.guard(), target.monitor() as mon:
            recover(mon, journal, vm=name)  # a session a dead vmckpt left open
            tracker.prepare(mon)
            received = receive_precopy(
                mon, name, settings, journal=journal, at_instant=tracker.mark_instant,
                progress=progress, memory_bytes=spec.memory_mib << 20,
            )  # fmt: skip
            disk_deltas = tracker.collect(mon)
        receive_s = time.monotonic() - started
        with progress.task("diffing against the parent", None):
            pages, zeroed = diff_against_parent(store, name, parent_id, received.ram, base=base)
        stats: dict[str, Any] = {
            "pause_ms": round(received.pause_ms, 3),
            "qemu_downtime_ms": received.qemu_downtime_ms,
            "receive_s": round(receive_s, 3),
            "diff_s": round(time.monotonic() - started - receive_s, 3),
            "accel": target.accel,
        }
        result = write_checkpoint_layer(
            target,
            parent_id,
            LayerParts(
                received.envelope, received.ram, pages, zeroed, received.qemu_version, disk_deltas
            ),
            mechanism=MECHANISM_PRECOPY,
            stats=stats,
            started=started,
        )
        committed = True
        return result
    finally:
        if tracker.active:
            with contextlib.suppress(VmckptError), target.monitor() as mon:
                tracker.commit(mon) if committed else tracker.abort(mon)
