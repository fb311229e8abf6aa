"""One checkpoint of a running guest, end to end: mechanism ``precopy-diff``.

QEMU live-migrates the guest into vmckpt over a socket pair it was handed
with ``getfd`` (a :class:`~vmckpt.session.MigrationSession`); the guest runs
while RAM is copied and is stopped only for QEMU's final iteration and the
device state. As soon as QEMU reports the migration complete, vmckpt resumes
the guest, and writes the pages that changed as a layer (vmckpt/images). Writable disks
are captured at the instant the guest is stopped (vmckpt/mechanisms/disk_capture.py).

Memory is bounded, not O(RAM): each batch of pages the receiver decodes is compared with
the parent's (this host's copy of the head layer's RAM, vmckpt/mechanisms/parent_ram.py,
read a batch at a time) and only the pages that differ are kept, in an unnamed file of
the guest's scratch directory (`~vmckpt.ram.RamDiff`); the layer is written from there,
and the same pages then bring the parent file up to the new layer.

The session leaves the guest as found on every exit; a guard process
(vmckpt/guard.py) does it if this process dies; the guest's checkpoint lock
serialises checkpoints of one guest.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Generic, TypeVar, cast

from vmckpt import faults, log
from vmckpt.errors import CheckpointError, VmckptError
from vmckpt.guests.base import Guest
from vmckpt.hostdirs import private_dir
from vmckpt.mechanisms.disk_capture import DiskTracker
from vmckpt.mechanisms.layers import (
    CheckpointResult,
    CheckpointSettings,
    LayerParts,
    write_checkpoint_layer,
)
from vmckpt.mechanisms.parent_ram import ParentRam
from vmckpt.progress import NO_PROGRESS, Progress
from vmckpt.qmp import Monitor
from vmckpt.ram import PageTarget, RamBlock, RamDiff
from vmckpt.session import JOURNAL, MigrationSession, recover
from vmckpt.stream import StreamEnvelope
from vmckpt.stream.reader import read_stream_to

MECHANISM_PRECOPY = "precopy-diff"
T = TypeVar("T", bound=PageTarget)
TIGHT_DOWNTIME_MS = 5  # QEMU's downtime limit a precopy-diff migration starts with
RELAX_AFTER_SYNCS = 8  # passes over RAM after which the configured limit applies
CONVERGE_POLL_S = 0.2
SWITCH_INTERVAL_S = 0.0002  # sys.setswitchinterval while a migration is received
RECEIVER_JOIN_S = 30.0
# The receiver decodes (and diffs) at most this much before it reads again: QEMU, whose
# writes block meanwhile once the socket is full, waits for it at most that long, also
# in the guest's pause.
RECEIVE_CHUNK = 1 << 20  # after the migration ended, the receiver has read all or fails
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


class _StreamReceiver(threading.Thread, Generic[T]):
    """Reads QEMU's migration stream from our end of the socket pair into the `PageTarget`
    ``on_blocks`` makes."""

    def __init__(
        self,
        sock: socket.socket,
        on_bytes: Callable[[int], None],
        on_blocks: Callable[[list[RamBlock]], T],
    ) -> None:
        super().__init__(name="vmckpt-receiver", daemon=True)
        self.sock = sock
        self.on_bytes = on_bytes
        self.on_blocks = on_blocks
        self.envelope: StreamEnvelope | None = None
        self.ram: T | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            # Closed here, not left to the collector: the error kept below holds this frame,
            # and a socket with an open file object stays open after sock.close().
            with cast(BinaryIO, self.sock.makefile("rb", buffering=1 << 20)) as source:
                counted = _CountingReader(
                    source, self.on_bytes, faults.value("receiver-dies-after")
                )
                self.envelope, self.ram = read_stream_to(
                    cast(BinaryIO, counted), self.on_blocks, max_read=RECEIVE_CHUNK
                )
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


def _converge(session: MigrationSession, mon: Monitor, limit_ms: int) -> None:
    """QEMU stops the guest once it estimates the rest fits in its downtime limit: with
    ``limit_ms`` (50 ms by default) and a receiver as fast as this one, it stopped with up
    to ~18 MB left (a 12-40 ms pause at 1 GiB); the migration starts with
    `TIGHT_DOWNTIME_MS` instead (one more short pass, then a pause of a few ms), and gets
    ``limit_ms`` only if it has not ended after `RELAX_AFTER_SYNCS` passes (a guest that
    writes faster than a tight limit lets the migration converge)."""
    if limit_ms <= TIGHT_DOWNTIME_MS:
        return
    while not session.finished_within(CONVERGE_POLL_S):
        info = mon.query_migrate()
        if info.status not in ("setup", "active"):
            return  # ending (device state) or ended: wait() takes it
        if (info.dirty_sync_count or 0) >= RELAX_AFTER_SYNCS:
            session.retune({"downtime-limit": limit_ms})
            return


@contextlib.contextmanager
def _prompt_threads() -> Iterator[None]:
    """While the receiver thread decodes, the thread that waits for QEMU's end of the
    migration and resumes the guest gets Python's lock at once when it wakes, not after
    the default switch interval (5 ms, inside the guest's pause)."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@dataclass(frozen=True)
class Received(Generic[T]):
    """What one live migration into vmckpt delivered."""

    envelope: StreamEnvelope
    ram: T
    pause_ms: float
    qemu_downtime_ms: int | None
    qemu_version: str


def receive_precopy(
    mon: Monitor,
    vm: str,
    settings: CheckpointSettings,
    *,
    journal: Path | None,
    on_blocks: Callable[[list[RamBlock]], T],
    at_instant: Callable[[Monitor], None] | None = None,
    progress: Progress = NO_PROGRESS,
    memory_bytes: int = 0,
) -> Received[T]:
    """Live-migrate the guest into a receiver thread; resume it the moment QEMU is done.

    ``at_instant`` runs while the guest is still stopped after the final
    iteration (the disks' point). ``on_blocks`` makes what the pages go into, once the
    stream named its RAM blocks. Whatever happens, the guest is left as found.
    """
    session = MigrationSession(
        mon,
        vm=vm,
        error=CheckpointError,
        capabilities={"events": True},
        parameters={
            "downtime-limit": min(settings.downtime_limit_ms, TIGHT_DOWNTIME_MS),
            "max-bandwidth": settings.max_bandwidth,
        },
        journal=journal,
        timeout_s=settings.timeout_s,
    )
    with (
        _prompt_threads(),
        session,
        progress.task("receiving RAM", memory_bytes or None, unit="B") as task,
    ):
        faults.point(faults.AFTER_SETTINGS)
        receiver = _StreamReceiver(session.socket(), task.advance, on_blocks)
        receiver.start()
        try:
            session.start()
            faults.point(faults.MID_MIGRATION)
            _converge(session, mon, settings.downtime_limit_ms)
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
    if isinstance(receiver.error, CheckpointError):  # (what on_blocks refused: said as it is)
        raise receiver.error
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
    progress: Progress = NO_PROGRESS,
) -> CheckpointResult:
    """Checkpoint a running guest into a new layer whose parent is the guest's head."""
    settings = settings or CheckpointSettings()
    store = target.store
    store.check_writable()  # before the guest is paused for anything
    with store.host.guest_lock(
        target.name, what="checkpoint", wait_s=settings.lock_wait_s, kind=target.kind
    ):
        return _take(target, settings, progress)


def _diff_target(
    vm: str, parent: ParentRam, parent_id: str | None, spill: int
) -> Callable[[list[RamBlock]], RamDiff]:
    def make(blocks: list[RamBlock]) -> RamDiff:
        if parent.ram is not None and parent.ram.blocks != blocks:
            raise CheckpointError(
                f"the guest's RAM blocks differ from parent layer {parent_id}'s",
                vm=vm,
                step="diff",
            )
        return RamDiff(blocks, parent.ram, spill)

    return make


def _take(target: Guest, settings: CheckpointSettings, progress: Progress) -> CheckpointResult:
    started = time.monotonic()
    store, name, kind = target.store, target.name, target.kind
    parent_id = store.head(name, kind)
    parent = store.manifest(parent_id) if parent_id else None  # fails before touching the guest
    spec = target.spec()
    journal = store.host.journal_path(name, JOURNAL, kind)
    scratch = private_dir(store.host.scratch_dir(name, kind))
    tracker = DiskTracker(name, spec.disks, parent, scratch, by_fd=target.files_by_fd)
    committed = False
    with (
        progress.task("composing the parent", None),
        ParentRam.open(store, name, kind, parent) as parent_ram,
        tempfile.TemporaryFile(dir=scratch) as spill,
    ):
        compose_s = time.monotonic() - started
        try:
            with target.guard(), target.checkpoint_monitor() as mon:
                recover(mon, journal, vm=name)  # a session a dead vmckpt left open
                tracker.prepare(mon)
                received = receive_precopy(
                    mon, name, settings, journal=journal,
                    on_blocks=_diff_target(name, parent_ram, parent_id, spill.fileno()),
                    at_instant=tracker.mark_instant, progress=progress,
                    memory_bytes=spec.memory_mib << 20,
                )  # fmt: skip
                disk_deltas = tracker.collect(mon)
            receive_s = time.monotonic() - started - compose_s
            pages, stored, zeroed = received.ram.result()
            stats: dict[str, Any] = {
                "pause_ms": round(received.pause_ms, 3),
                "qemu_downtime_ms": received.qemu_downtime_ms,
                "receive_s": round(receive_s, 3),
                "compose_s": round(compose_s, 3),
                "accel": target.accel,
            }
            result = write_checkpoint_layer(
                target,
                parent_id,
                LayerParts(
                    received.envelope,
                    pages,
                    dict(stored),
                    dict(zeroed),
                    received.qemu_version,
                    disk_deltas,
                ),
                mechanism=MECHANISM_PRECOPY,
                stats=stats,
                started=started,
            )
            committed = True
        finally:
            if tracker.active:
                with contextlib.suppress(VmckptError), target.monitor() as mon:
                    tracker.commit(mon) if committed else tracker.abort(mon)
        parent_ram.advance(result.layer, pages, zeroed)
        return result
