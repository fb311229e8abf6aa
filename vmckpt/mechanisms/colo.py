"""Mechanism ``colo``: a checkpoint session per guest; each checkpoint costs O(pages written).

QEMU's COLO checkpointing (vmckpt/stream/colo.py has the protocol) keeps
dirty logging on after one full migration and, per checkpoint, stops the
guest only to send the pages written since the previous checkpoint and the
device state. vmckpt is the receiving side, in one long-lived process per
guest — the **checkpoint session** (``python -m vmckpt.colo``):

- It is started by the first ``vmckpt checkpoint`` or ``vmckpt watch`` of a
  guest whose mechanism is ``colo`` (vmckpt/mechanisms.py) and lives until
  ``vmckpt stop`` (or a precopy-diff checkpoint, a migration) ends it, or the
  guest's QEMU exits. ``vmckpt list`` shows it.
- It holds, for its whole life, the guest's checkpoint lock, QEMU's second
  QMP monitor (reserved for it, so other commands keep the first), the COLO
  socket, and a guard process (vmckpt/guard.py) that ends COLO and restores
  the migration settings if the session dies.
- Commands reach it as JSON lines on a control socket in the guest's runtime
  directory (:class:`SessionClient`): ``checkpoint``, ``watch``, ``status``, ``stop``.
- The first checkpoint opens COLO: a full live migration, whose layer is a
  delta against the guest's head (a base layer if it has none). Every later
  checkpoint is triggered over QMP (setting ``x-checkpoint-delay`` makes QEMU
  checkpoint at once) and moves only the pages written since the previous one.
- A receiver thread takes each checkpoint into memory (a sparse page set) and
  acknowledges it at once: the guest's pause ends there. A writer thread then
  commits the layer (same format and checks as every layer; mechanism ``colo``).
- Writable disks are captured at the same instant, inside the pause: the new
  dirty bitmaps are added just before the trigger; as soon as QEMU has stopped
  the guest (VMSTATE_SEND), the receiver sends one ``blockdev-backup`` with
  ``sync: none`` per disk on the session's monitor (a copy-before-write filter
  into a fleece image prepared beforehand: the disk's instant), reads the pages
  meanwhile, and takes QEMU's answer before it acknowledges. With the guest
  running again, the writer copies the clusters dirty since the previous
  checkpoint out of the instant's snapshot into the layer, drops the previous
  bitmap once the layer is written, and prepares the next checkpoint's images
  (vmckpt/disk_capture.py). Such a guest's next checkpoint is triggered only
  once all of that is done.
  A watchdog cuts the socket if a checkpoint stalls, since a QEMU blocked on a
  stalled receiver stops answering on all its monitors.
- Leaving (stop, error, SIGTERM) ends COLO with ``x-colo-lost-heartbeat``
  (never ``migrate_cancel``, which leaves QEMU in ``cancelling`` for good),
  restores the settings and makes sure the guest runs: the MigrationSession's
  exit path. A layer that cannot be written ends the session (its pages would
  be missing from the chain); the next checkpoint opens a new one.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import FrameType
from typing import Any

from vmckpt import faults, log
from vmckpt.errors import (
    CheckpointError,
    LockError,
    QMPError,
    StreamError,
    UsageError,
    VmckptError,
    from_wire,
)
from vmckpt.fsutil import FILE_MODE, read_json, write_json_atomic
from vmckpt.guests.local import LocalGuest
from vmckpt.images import DiskDelta, LayerManifest, Store
from vmckpt.machine.qemu import process_start_time
from vmckpt.mechanisms.choice import COLO
from vmckpt.mechanisms.disk_capture import DiskTracker, clear_leftovers, head_bitmaps
from vmckpt.mechanisms.layers import (
    CheckpointSettings,
    LayerParts,
    diff_against_parent,
    write_checkpoint_layer,
)
from vmckpt.qmp import Monitor, Pending
from vmckpt.ram import PageSet, RamImage
from vmckpt.session import JOURNAL, MigrationSession, recover
from vmckpt.stream import StreamEnvelope
from vmckpt.stream import format as fmt
from vmckpt.stream.colo import ColoReceiver

NEVER_MS = 2**31 - 1  # x-checkpoint-delay: QEMU checkpoints only when vmckpt asks
CONTROL = "session-control.sock"  # the session's control socket, in the runtime dir
RECORD = "session.json"
LOG = "session.log"
START_TIMEOUT_S = 30.0  # a new session answers on its control socket within this
TRIGGER_RETRY_S = 2.0  # no CHECKPOINT_REQUEST this long after a trigger: trigger again
TRIGGER_ATTEMPTS = 5
CHECKPOINT_TIMEOUT_S = 60.0  # a checkpoint stalled this long: the watchdog cuts the socket
RESULT_TIMEOUT_S = 600.0
PAUSE_EVENT_TIMEOUT_S = 5.0
CLOCK_MARGIN_S = 0.05
# After its acknowledgement the receiver gives QEMU this long to resume the guest before it
# copies the pages out: copying at once kept a CPU from QEMU's migration thread and delayed
# the RESUME by ~0.5 ms (median over 30 checkpoints on 2 cores: 0.53 ms, 0.02 ms so).
RESUME_GRACE_S = 0.002
WRITE_QUEUE = 8  # checkpoints received but not yet written; the receiver waits beyond
CLIENT_POLL_S = 0.2
DISK_INSTANT_TIMEOUT_S = 2.0  # the disks' instant answers within this, or the session ends
_log = log.get(__name__)


@dataclass
class _Taken:
    """A checkpoint in memory, on its way to becoming a layer."""

    seq: int
    envelope: StreamEnvelope
    image: RamImage | None = None  # the opening: the whole RAM
    pages: PageSet | None = None  # a checkpoint: the pages written since the previous one
    requested: float = 0.0  # monotonic time it was asked for
    received_s: float = 0.0
    stream_bytes: int = 0
    reply_wall: float = 0.0  # wall clock when vmckpt let QEMU stop the guest
    ack_wall: float = 0.0  # wall clock of the acknowledgement (the guest runs on after it)
    stats: dict[str, Any] = field(default_factory=dict)
    disks: DiskTracker | None = None  # the writable disks, marked at this checkpoint's instant
    disk_stats: dict[str, Any] = field(default_factory=dict)


class ColoSession:
    """One guest's COLO stream, receiver, writer and watchdog, in this process."""

    def __init__(self, guest: LocalGuest, settings: CheckpointSettings | None = None) -> None:
        self.guest = guest
        self.name: str = guest.name
        self.store: Store = guest.store
        self.settings = settings or CheckpointSettings()
        self.mon: Monitor | None = None
        self.mon_lock = threading.Lock()  # the monitor is driven by one thread at a time
        self.session: MigrationSession | None = None
        self.receiver: ColoReceiver | None = None
        self.opened = False
        self.closing = False
        self.failure: VmckptError | None = None
        self.cond = threading.Condition()
        self.received = 0  # checkpoints taken in (the opening is 0)
        self.settled = -1  # checkpoints whose RESUME was seen (QEMU is ready for the next)
        self.results: dict[int, dict[str, Any]] = {}
        self.in_checkpoint: float | None = None  # monotonic start of the one in flight
        self._queue: queue.Queue[_Taken | None] = queue.Queue(maxsize=WRITE_QUEUE)
        self._threads: list[threading.Thread] = []
        self._trigger = threading.Lock()
        self._events_mark = 0  # where the next checkpoint's events start
        self.has_disks = bool(guest.spec().writable_disks)
        self._disk_next: DiskTracker | None = None  # prepared for the next checkpoint
        # The checkpoint in flight: its tracker, and its transaction awaiting QEMU's answer.
        self._disk_now: DiskTracker | None = None
        self._disk_pending: Pending | None = None
        self._disk_began = 0.0

    # -- opening ------------------------------------------------------------------

    def open(self) -> dict[str, Any]:
        """The full migration that starts COLO; returns its layer's row."""
        started = time.monotonic()
        process = self.guest.process()
        journal = self.store.host.journal_path(self.name, JOURNAL)
        parent_id = self.store.head(self.name)
        parent = self.store.manifest(parent_id) if parent_id else None
        mon = process.session_monitor(timeout=30.0)
        try:
            recover(mon, journal, vm=self.name)  # a session a dead vmckpt left open
            session = MigrationSession(
                mon,
                vm=self.name,
                error=CheckpointError,
                capabilities={"x-colo": True, "return-path": True, "events": True},
                parameters={
                    "x-checkpoint-delay": NEVER_MS,
                    "downtime-limit": self.settings.downtime_limit_ms,
                    "max-bandwidth": self.settings.max_bandwidth,
                },
                journal=journal,
                timeout_s=self.settings.timeout_s,
            )
            session.open()  # a failed open has put the settings back itself
        except BaseException:
            # QEMU serves one client per monitor: the next request's opening connects
            # again, and would wait for this connection until the garbage collector ran.
            mon.close()
            raise
        self.mon, self.session = mon, session
        opening: DiskTracker | None = None
        try:
            if self.has_disks:
                # The opening's disks are taken against the head layer's bitmaps (in full
                # if the guest has none), leftovers of a dead checkpoint cleared first.
                # The nodes are activated at its instant, should the migration have left
                # them inactive (outside the pause that counts: the opening's).
                opening = self._disk_tracker(
                    parent=parent, since=None, activate=True, fleecing=False
                )
                opening.prepare(self.mon)
            self.receiver = ColoReceiver(self.session.socket())
            initial: dict[str, Any] = {}

            def read_initial() -> None:
                try:
                    assert self.receiver is not None
                    initial["result"] = self.receiver.read_initial()
                except BaseException as exc:  # reported below, never lost
                    initial["error"] = exc
                    if self.receiver is not None:
                        self.receiver.cut()

            reader = threading.Thread(target=read_initial, name="vmckpt-colo-open", daemon=True)
            reader.start()
            self.session.start()
            faults.point("colo-open")
            reader.join(self.settings.timeout_s)
            if "result" not in initial:
                raise CheckpointError(
                    f"reading QEMU's stream failed: {initial.get('error', 'no data in time')}",
                    vm=self.name,
                    step="colo-open",
                )
            envelope, image = initial["result"]
            self.receiver.end_return_path()
            status = self.session.wait(frozenset({"colo", "completed"}))
            if status != "colo":
                raise CheckpointError(
                    f"QEMU {self.mon.version} completed the migration instead of entering COLO",
                    vm=self.name,
                    step="colo-open",
                )
            if opening is not None:
                # The guest is stopped since the migration completed: the disks' instant.
                opening.mark_instant(self.mon)
            self.receiver.send(fmt.COLO_CHECKPOINT_READY)  # QEMU resumes the guest
            stop, resume = self.session.pause_window()
        except BaseException:
            if opening is not None:
                opening.abort(self.mon)
            self._abandon()
            raise
        self.opened = True
        if not self.has_disks:
            self.settled = 0  # with disks: once the writer has the next target ready
        self._events_mark = self.mon.mark()
        taken = _Taken(0, envelope, image=image, requested=started, disks=opening)
        taken.stats = {"pause_ms": round((resume - stop) * 1000, 3), "session": "open"}
        for target, name in (
            (self._receive_loop, "vmckpt-colo-receiver"),
            (self._write_loop, "vmckpt-colo-writer"),
            (self._watchdog, "vmckpt-colo-watchdog"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        self._queue.put(taken)
        _log.info("%s: COLO session open", self.name)
        return self._result(0)

    def _abandon(self) -> None:
        """Undo a failed opening: the session's exit path, then drop what is left."""
        if self.receiver is not None:
            self.receiver.cut()
        if self.session is not None:
            with self.mon_lock:
                self.session.close(failed=True)
        if self.receiver is not None:
            self.receiver.close()
        if self.mon is not None:
            self.mon.close()

    # -- the threads ------------------------------------------------------------------

    def _receive_loop(self) -> None:
        receiver = self.receiver
        assert receiver is not None and receiver.envelope is not None
        envelope = receiver.envelope
        while not self.closing:
            try:
                receiver.wait_request()
                requested = time.monotonic()
                with self.cond:
                    self.in_checkpoint = requested
                    self.cond.notify_all()
                reply_wall = time.time()
                try:
                    received = receiver.receive_checkpoint(
                        on_stopped=self._begin_disk_instant if self.has_disks else None
                    )
                    faults.point("colo-before-ack")
                finally:
                    disks, disk_stats, problem = self._end_disk_instant()
                if disks is not None:
                    faults.point("colo-disk-instant")  # the disks' jobs run, not yet acked
                receiver.acknowledge()  # the pause ends here
                ack_wall = time.time()
                if problem is not None:
                    # The pages of this checkpoint are gone from QEMU's dirty log, and its
                    # disk cannot be had: no layer can follow; the session ends.
                    self._abort_disks(disks)
                    self._fail(problem)
                    return
                time.sleep(RESUME_GRACE_S)
                taken = received.checkpoint()  # copies the pages, the guest running
            except (StreamError, OSError) as exc:
                if not self.closing:
                    self._fail(CheckpointError(f"the COLO stream broke: {exc}", vm=self.name))
                return
            finally:
                with self.cond:
                    self.in_checkpoint = None
                    self.cond.notify_all()
            with self.cond:
                self.received += 1
                seq = self.received
                self.cond.notify_all()
            item = _Taken(
                seq,
                replace(envelope, epilogue=taken.device_state),
                pages=taken.pages,
                requested=requested,
                received_s=time.monotonic() - requested,
                stream_bytes=taken.stream_bytes,
                reply_wall=reply_wall,
                ack_wall=ack_wall,
                disks=disks,
                disk_stats=disk_stats,
            )
            self._queue.put(item)  # waits when the writer is behind: the guest runs meanwhile

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                if item.seq > 0:
                    item.stats = {"pause_ms": self._pause_of(item), **item.disk_stats}
                if not self.has_disks:
                    self._settle(item.seq)  # QEMU may take the next one while this is written
                began = time.perf_counter()
                disks = self._collect_disks(item)
                if disks:
                    item.stats["disk_collect_ms"] = round((time.perf_counter() - began) * 1000, 1)
                row = self._write(item, disks)
                if self.has_disks:
                    # Only now the previous bitmap may go (the layer that needs it is written).
                    self._commit_disks(item)
            except VmckptError as exc:
                self._abort_disks(item.disks)
                self._fail(exc)
                return
            except Exception as exc:  # a bug must still end the session cleanly
                self._abort_disks(item.disks)
                self._fail(CheckpointError(f"writing the layer failed: {exc!r}", vm=self.name))
                return
            with self.cond:
                self.results[item.seq] = row
                self.cond.notify_all()
            if self.has_disks:
                # The next checkpoint gets its images (the caller has its row already); then
                # it may be taken.
                try:
                    self._prepare_next_disks(item)
                except VmckptError as exc:
                    self._fail(exc)
                    return
                except Exception as exc:  # a bug must still end the session cleanly
                    self._fail(CheckpointError(f"preparing the disks failed: {exc!r}",
                                               vm=self.name, step="disk-prepare"))  # fmt: skip
                    return
                self._settle(item.seq)

    # -- writable disks ---------------------------------------------------------------

    def _disk_tracker(
        self,
        *,
        parent: LayerManifest | None,
        since: dict[str, str] | None,
        activate: bool = False,  # COLO keeps the block nodes active
        fleecing: bool = True,  # the least work in the pause (vmckpt/disk_capture.py)
    ) -> DiskTracker:
        return DiskTracker(
            self.name,
            self.guest.spec().disks,
            parent,
            self.store.host.scratch_dir(self.name),
            since=since,
            activate=activate,
            fleecing=fleecing,
        )

    def _arm_disks(self) -> None:
        """Just before the trigger: the next checkpoint's new bitmaps (outside the pause)."""
        tracker = self._disk_next
        if tracker is not None and self.mon is not None:
            with self.mon_lock:
                tracker.arm(self.mon)

    def _begin_disk_instant(self) -> None:
        """QEMU has stopped the guest: send the disks' transaction (the prepared tracker's)
        and go on reading the checkpoint; :meth:`_end_disk_instant` takes the answer. The
        monitor stays locked in between. (QEMU 11 runs the command once it has sent the
        pages: it holds its big lock while it sends them.)"""
        self._disk_now, self._disk_next = self._disk_next, None
        self._disk_began = time.perf_counter()
        if self._disk_now is None or self.mon is None:
            return
        self.mon_lock.acquire()
        try:
            self._disk_pending = self._disk_now.begin_instant(self.mon)
        except BaseException:
            self.mon_lock.release()
            raise

    def _end_disk_instant(
        self,
    ) -> tuple[DiskTracker | None, dict[str, Any], VmckptError | None]:
        """Before the acknowledgement: QEMU's answer to the disks' transaction. Returns the
        tracker, the instant's timings and what failed (None if the instant holds)."""
        if not self.has_disks:
            return None, {}, None
        tracker, self._disk_now = self._disk_now, None
        pending, self._disk_pending = self._disk_pending, None
        waited = time.perf_counter()
        problem: VmckptError | None = None
        if tracker is None:
            problem = CheckpointError(
                "no backup target was prepared for the writable disks",
                vm=self.name,
                step="colo-disk-instant",
            )
        elif pending is None:
            problem = CheckpointError(
                "the disks' transaction was not sent (the stream broke first?)",
                vm=self.name,
                step="colo-disk-instant",
            )
        else:
            assert self.mon is not None
            try:
                # Bounded: the guest stays stopped until then. (With a bitmap and a sync=bitmap
                # backup in one transaction sent this early, QEMU 11 sometimes answered only
                # after 30 s; never with the fleecing instant.) Late: the session ends.
                tracker.end_instant(self.mon, pending, timeout=DISK_INSTANT_TIMEOUT_S)
            except VmckptError as exc:
                problem = exc
            finally:
                self.mon_lock.release()
        now = time.perf_counter()
        stats = {
            "disk_instant_ms": round((now - self._disk_began) * 1000, 3),
            "disk_wait_ms": round((now - waited) * 1000, 3),
        }
        return tracker, stats, problem

    def _collect_disks(self, item: _Taken) -> list[DiskDelta]:
        if item.disks is None:
            return []
        assert self.mon is not None
        with self.mon_lock:
            return item.disks.collect(self.mon)

    def _commit_disks(self, item: _Taken) -> None:
        if item.disks is not None and self.mon is not None:
            with self.mon_lock:
                item.disks.commit(self.mon)

    def _prepare_next_disks(self, item: _Taken) -> None:
        if item.disks is None or self.closing:
            return
        tracker = self._disk_tracker(parent=None, since=item.disks.new_bitmaps)
        assert self.mon is not None
        with self.mon_lock:
            tracker.prepare(self.mon, clear=False)
        self._disk_next = tracker

    def _abort_disks(self, tracker: DiskTracker | None) -> None:
        if tracker is not None and self.mon is not None:
            with self.mon_lock:
                tracker.abort(self.mon)

    def _clear_disks(self) -> VmckptError | None:
        """As the session ends: remove every vmckpt job, target and bitmap from QEMU but the
        bitmaps the guest's head layer records (they track writes since it)."""
        if not self.has_disks or self.mon is None:
            return None
        with self.mon_lock:
            try:
                clear_leftovers(
                    self.mon,
                    vm=self.name,
                    keep=head_bitmaps(self.store, self.name),
                    scratch=self.store.host.scratch_dir(self.name),
                )
            except QMPError as exc:
                return CheckpointError(
                    f"cannot remove the session's disk bitmaps and jobs: {exc.message}",
                    vm=self.name,
                    step="colo-close",
                )
        return None

    def _watchdog(self) -> None:
        while not self.closing and self.failure is None:
            since = self.in_checkpoint
            if since is not None and time.monotonic() - since > CHECKPOINT_TIMEOUT_S:
                _log.error("%s: checkpoint stalled for %.0f s, cutting the stream", self.name,
                           CHECKPOINT_TIMEOUT_S)  # fmt: skip
                if self.receiver is not None:
                    self.receiver.cut()
                return
            time.sleep(1.0)

    def _pause_of(self, item: _Taken) -> float | None:
        """The guest's pause for this checkpoint, from QEMU's STOP and RESUME events (the
        STOP after vmckpt's reply, the RESUME after its acknowledgement; wall clocks of
        one host, with a margin for the clocks' granularity)."""
        mon = self.mon
        assert mon is not None
        early, late = item.reply_wall - CLOCK_MARGIN_S, item.ack_wall + CLOCK_MARGIN_S
        with self.mon_lock:
            start = self._events_mark
            with contextlib.suppress(QMPError):
                mon.wait_event(
                    {"RESUME"},
                    PAUSE_EVENT_TIMEOUT_S,
                    lambda e: e.timestamp >= item.ack_wall - CLOCK_MARGIN_S,
                    since=start,
                )
            events = mon.events_since(start)
            stops = [
                e.timestamp for e in events if e.name == "STOP" and early <= e.timestamp <= late
            ]
            resumes = [
                e.timestamp
                for e in events
                if e.name == "RESUME" and stops and e.timestamp >= stops[-1]
            ]
            # The next checkpoint's events come after these: keep the history small.
            self._events_mark = mon.mark()
            mon.forget_before(self._events_mark)
        if not stops or not resumes:
            return None
        return round((resumes[0] - stops[-1]) * 1000, 3)

    def _settle(self, seq: int) -> None:
        """QEMU and the session are ready for the checkpoint after ``seq``."""
        with self.cond:
            self.settled = max(self.settled, seq)
            self.cond.notify_all()

    def _write(self, item: _Taken, disks: list[DiskDelta]) -> dict[str, Any]:
        faults.point("colo-mid-write")
        guest = self.guest
        parent = self.store.head(self.name)
        stats = {**item.stats, "accel": guest.accel}
        if item.image is not None:
            pages, zeroed = diff_against_parent(self.store, self.name, parent, item.image)
            parts = LayerParts(item.envelope, item.image, pages, zeroed, self._version(), disks)
            item.image = None  # the whole RAM is needed no longer: O(dirty) from here
        else:
            assert item.pages is not None
            pages_set = item.pages
            stats.update(
                pages_sent=pages_set.pages,
                stream_bytes=item.stream_bytes,
                receive_s=round(item.received_s, 4),
            )
            parts = LayerParts(
                item.envelope,
                pages_set,
                dict(pages_set.stored),
                dict(pages_set.zeroed),
                self._version(),
                disks,
            )
        result = write_checkpoint_layer(
            guest, parent, parts, mechanism=COLO, stats=stats, started=item.requested
        )
        return {**result.to_dict(), "host": "local"}

    def _version(self) -> str:
        return self.mon.version if self.mon is not None else ""

    def _fail(self, exc: VmckptError) -> None:
        _log.error("%s: %s", self.name, exc.one_line())
        with self.cond:
            if self.failure is None:
                self.failure = exc
            self.cond.notify_all()

    # -- checkpoints ------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """Take one checkpoint now; returns its layer's row once the layer is written."""
        with self._trigger:
            with self.cond:
                wanted = self.received + 1
                # Never trigger while a checkpoint is in flight: QEMU would drop the trigger.
                self._wait(lambda: self.settled >= self.received, "the previous checkpoint")
            self._arm_disks()
            for _attempt in range(TRIGGER_ATTEMPTS):
                self._raise_failure()
                assert self.mon is not None
                with self.mon_lock:
                    self.mon.set_migrate_parameters({"x-checkpoint-delay": NEVER_MS})
                with self.cond:
                    if self.cond.wait_for(
                        lambda: (
                            self.received >= wanted
                            or self.in_checkpoint is not None
                            or self.failure is not None
                        ),
                        TRIGGER_RETRY_S,
                    ):
                        break
            else:
                raise CheckpointError(
                    "QEMU did not start a COLO checkpoint", vm=self.name, step="colo-trigger"
                )
            return self._result(wanted)

    def _result(self, seq: int) -> dict[str, Any]:
        with self.cond:
            self._wait(lambda: seq in self.results, f"layer {seq} of the session")
            return self.results.pop(seq)

    def _wait(self, predicate: Callable[[], bool], what: str) -> None:
        """Wait (holding ``self.cond``) until predicate holds; raise the session's failure."""
        if not self.cond.wait_for(
            lambda: predicate() or self.failure is not None, RESULT_TIMEOUT_S
        ):
            raise CheckpointError(f"{what} did not come in time", vm=self.name, step="colo")
        self._raise_failure()

    def _raise_failure(self) -> None:
        if self.failure is not None:
            raise CheckpointError(
                f"the COLO session ended: {self.failure.message}", vm=self.name, step="colo"
            )

    # -- leaving ----------------------------------------------------------------------

    def close(self) -> None:
        """End COLO, write what was received, put the settings back, leave the guest running."""
        if self.closing:
            return
        self.closing = True
        with self.cond:  # a checkpoint in flight is finished first (the guest is stopped)
            self.cond.wait_for(lambda: self.in_checkpoint is None, CHECKPOINT_TIMEOUT_S)
        if self.in_checkpoint is not None and self.receiver is not None:
            self.receiver.cut()
        problem: VmckptError | None = None
        if self.session is not None:
            with self.mon_lock:
                try:
                    self.session.close()
                except VmckptError as exc:
                    problem = exc
        if self.receiver is not None:
            self.receiver.cut()  # QEMU has let go of the stream; so do we
        threads = {thread.name: thread for thread in self._threads}
        if "vmckpt-colo-receiver" in threads:
            threads["vmckpt-colo-receiver"].join(timeout=CHECKPOINT_TIMEOUT_S)
            self._queue.put(None)  # after what the receiver took in: it is written first
        for thread in self._threads:
            thread.join(timeout=RESULT_TIMEOUT_S)
        disk_problem = self._clear_disks()
        problem = problem or disk_problem
        if self.receiver is not None:
            self.receiver.close()
        if self.mon is not None:
            self.mon.close()
        _log.info("%s: COLO session closed", self.name)
        if problem is not None:
            raise problem


# -- the session process ------------------------------------------------------------------


def _send(conn: socket.socket, data: dict[str, Any]) -> None:
    conn.sendall((json.dumps(data, sort_keys=True) + "\n").encode())


def _error_reply(exc: VmckptError) -> dict[str, Any]:
    return exc.to_wire()


class _Daemon:
    """The session process: a control socket in front of a ColoSession."""

    def __init__(self, guest: LocalGuest) -> None:
        self.guest = guest
        self.session = ColoSession(guest)
        self.stop = threading.Event()
        self.busy = threading.Lock()  # one command at a time touches the session

    def serve(self, listener: socket.socket) -> None:
        listener.settimeout(0.5)
        while not self.stop.is_set():
            if self.session.failure is not None or not self.guest.process().alive():
                break
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(
                target=self._handle, args=(conn,), name="vmckpt-colo-client", daemon=True
            ).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            for line in lines:
                try:
                    request = json.loads(line)
                    op = str(request.get("op"))
                except (ValueError, AttributeError):
                    _send(conn, UsageError("bad request").to_wire())
                    return
                try:
                    if op == "status":
                        _send(conn, self._status())
                    elif op == "stop":
                        self.stop.set()
                        _send(conn, {"ok": True})
                    elif op == "checkpoint":
                        with self.busy:
                            _send(conn, {"row": self._checkpoint()})
                    else:
                        _send(conn, UsageError(f"unknown op {op!r}").to_wire())
                except VmckptError as exc:
                    _send(conn, _error_reply(exc))
                except OSError:
                    return  # the client went away

    def _checkpoint(self) -> dict[str, Any]:
        if not self.session.opened:
            return self.session.open()
        return self.session.checkpoint()

    def _status(self) -> dict[str, Any]:
        session = self.session
        return {
            "pid": os.getpid(),
            "open": session.opened,
            "layers": session.received + (1 if session.opened else 0),
            "failure": session.failure.one_line() if session.failure else None,
        }


def run_session(store_path: Path, name: str) -> int:
    """The body of ``python -m vmckpt.colo``: serve one guest until told to stop."""
    store = Store(store_path)
    guest = LocalGuest(store, name)
    runtime = store.host.runtime_dir(name)
    control = runtime / CONTROL
    daemon = _Daemon(guest)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        daemon.stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    with (
        store.host.guest_lock(name, what="COLO checkpoint session", wait_s=60),
        guest.guard(),
    ):
        control.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(control))
        os.chmod(control, FILE_MODE)
        # The record first: a client that can connect can also find the session's PID.
        write_json_atomic(
            runtime / RECORD,
            {"pid": os.getpid(), "start_time": process_start_time(os.getpid())},
        )
        listener.listen(8)
        try:
            daemon.serve(listener)
        finally:
            listener.close()
            control.unlink(missing_ok=True)
            try:
                daemon.session.close()
            finally:
                (runtime / RECORD).unlink(missing_ok=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmckpt.mechanisms.colo", description=__doc__)
    parser.add_argument("--store", required=True, type=Path)
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    log.configure(1)
    try:
        return run_session(args.store, args.name)
    except VmckptError as exc:
        _log.error("%s", exc.one_line())
        return exc.exit_code


# -- the client side ---------------------------------------------------------------------


class SessionClient:
    """A command's connection to a guest's checkpoint session."""

    def __init__(self, conn: socket.socket, name: str) -> None:
        self.conn = conn
        self.name = name
        self.lines = conn.makefile("rb")

    @classmethod
    def connect(cls, store: Store, name: str) -> SessionClient | None:
        """The guest's running session, or None if it has none."""
        path = store.host.runtime_dir(name) / CONTROL
        if not path.exists():
            return None
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))
        except OSError:
            conn.close()
            return None
        return cls(conn, name)

    @classmethod
    def ensure(cls, guest: LocalGuest) -> SessionClient:
        """The guest's session, started now if it has none."""
        client = cls.connect(guest.store, guest.name)
        if client is not None:
            return client
        runtime = guest.store.host.runtime_dir(guest.name)
        log_path = runtime / LOG
        with open(log_path, "ab") as log_handle:
            os.fchmod(log_handle.fileno(), FILE_MODE)
            proc = subprocess.Popen(
                [sys.executable, "-m", "vmckpt.mechanisms.colo", "--store", str(guest.store.path),
                 "--name", guest.name],
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # it outlives this command
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            client = cls.connect(guest.store, guest.name)
            if client is not None:
                return client
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise CheckpointError(
                    f"the checkpoint session ended at once: {tail[0] if tail else 'no output'}",
                    vm=guest.name,
                    step="colo-session",
                )
            time.sleep(0.02)
        raise LockError(
            f"the checkpoint session did not answer within {START_TIMEOUT_S:.0f} s "
            "(another checkpoint holds the guest?)",
            vm=guest.name,
            step="colo-session",
        )

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.lines.close()
        self.conn.close()

    def _replies(self, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        try:
            _send(self.conn, request)
            for line in self.lines:
                reply = json.loads(line)
                if "error" in reply:
                    raise _remote_error(reply, self.name)
                yield reply
        except OSError as exc:
            raise CheckpointError(
                f"lost the checkpoint session: {exc}", vm=self.name, step="colo-session"
            ) from exc
        raise CheckpointError("the checkpoint session ended", vm=self.name, step="colo-session")

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        return next(self._replies({"op": op, **args}))


def _remote_error(reply: dict[str, Any], name: str) -> VmckptError:
    """The session's error as it sent it (errors.to_wire), with the guest named."""
    return from_wire(reply, default=CheckpointError).in_context(vm=name, step="colo-session")


def session_pid(store: Store, name: str) -> int | None:
    """The PID of a guest's running checkpoint session, if one runs."""
    try:
        data = read_json(store.host.runtime_path(name) / RECORD)
    except (OSError, ValueError):
        return None
    pid, start = data.get("pid"), data.get("start_time")
    if isinstance(pid, int) and process_start_time(pid) == start:
        return pid
    return None


def end_session(store: Store, name: str, timeout: float = 60.0) -> bool:
    """Ask a guest's session to end and wait until it has; whether there was one."""
    pid = session_pid(store, name)
    if pid is None:
        return False
    client = SessionClient.connect(store, name)
    if client is not None:
        with contextlib.suppress(VmckptError):
            client.request("stop")
        client.close()
    deadline = time.monotonic() + timeout
    while session_pid(store, name) is not None:
        if time.monotonic() > deadline:
            raise CheckpointError(
                "the checkpoint session did not end", vm=name, step="colo-session"
            )
        time.sleep(0.02)
    return True


if __name__ == "__main__":
    sys.exit(main())
