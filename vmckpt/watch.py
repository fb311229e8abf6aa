"""Periodic checkpoints whose cost follows what the guest wrote (mechanism 1).

An :class:`IncrementalSession` puts the guest under QEMU's COLO
checkpointing with vmckpt as the receiving side: one ordinary live
migration, after which QEMU keeps dirty logging on and every checkpoint
moves only the pages written since the previous one plus the device state.
vmckpt keeps the guest's RAM image in memory and writes each checkpoint as a
layer whose pages are exactly the pages QEMU reported dirty.

Where QEMU cannot enter COLO (QEMU 10.0 and 10.1 complete the migration
instead: their "always set DEVICE state" change broke the transition, fixed
upstream by "migration: Fix transition to COLO state from precopy"), the
session says so and every checkpoint falls back to ``precopy-diff``, with
QEMU's downtime limit set to the pause budget.

Leaving a session (count reached, SIGINT/SIGTERM, any error) always ends
COLO with ``x-colo-lost-heartbeat``, puts back the migration settings it
changed and makes sure the guest runs.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np

from vmckpt.checkpoint import (
    ACTIVE_MIGRATION,
    CheckpointResult,
    CheckpointSettings,
    LayerParts,
    diff_against_parent,
    split_zero,
    take_checkpoint,
    write_checkpoint_layer,
)
from vmckpt.errors import CheckpointError, QMPError, StreamError
from vmckpt.images import Store
from vmckpt.machine import GuestRecord
from vmckpt.qmp import Monitor
from vmckpt.ram import RamImage
from vmckpt.stream import StreamEnvelope
from vmckpt.stream import format as fmt
from vmckpt.stream.colo import ColoReceiver

MECHANISM_COLO = "colo-incremental"
FD_NAME = "vmckpt-colo"
NEVER_MS = 2**31 - 1  # x-checkpoint-delay: QEMU checkpoints only when vmckpt asks
SOCKET_TIMEOUT_S = 60.0


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the session ends in order."""


@dataclass(frozen=True)
class WatchSettings:
    interval_s: float = 1.0
    count: int | None = None
    pause_budget_ms: float | None = None
    use_colo: bool = False  # experimental: see colo_refusal()


class IncrementalSession:
    """One guest under COLO checkpointing, vmckpt receiving."""

    def __init__(
        self,
        store: Store,
        guest: GuestRecord,
        runtime_dir: Path,
        settings: CheckpointSettings | None = None,
        monitor: Callable[[], Monitor] | None = None,
    ) -> None:
        self.store = store
        self.connect = monitor  # for a guest vmckpt did not start (precopy-diff only)
        self.guest = guest
        self.runtime_dir = runtime_dir
        self.settings = settings or CheckpointSettings()
        self.mon: Monitor | None = None
        self.receiver: ColoReceiver | None = None
        self.envelope: StreamEnvelope | None = None
        self.active = False  # COLO is running: checkpoints are incremental
        self.unavailable_reason: str | None = None
        self._old_caps: dict[str, bool] = {}
        self._old_params: dict[str, Any] = {}
        self._was_running = True
        self._head_image: RamImage | None = None  # RAM of the guest's head layer, if known

    # -- opening: the one full migration ------------------------------------------------

    def open(self) -> CheckpointResult:
        """Migrate the whole guest once; the result is the session's first layer."""
        started = time.monotonic()
        name = self.guest.name
        process = self.guest.running_process()
        mon = process.monitor()
        self.mon = mon
        status = mon.execute("query-status")
        self._was_running = bool(status["running"])
        current = mon.query_migrate().status
        if current in ACTIVE_MIGRATION:
            mon.close()
            self.mon = None
            raise CheckpointError(
                f"a migration is already in progress (state {current})", vm=name, step="prepare"
            )
        refusal = colo_refusal(mon.greeting_version)
        if refusal:
            mon.close()
            self.mon = None
            raise CheckpointError(refusal, vm=name, step="colo")
        caps = mon.migrate_capabilities()
        if "x-colo" not in caps:
            self.unavailable_reason = "this QEMU has no x-colo capability"
            return self._fallback_checkpoint(started)
        self._old_caps = {k: caps[k] for k in ("x-colo", "events")}
        self._old_params = mon.migrate_parameters()
        ours, theirs = socket.socketpair()
        ours.settimeout(SOCKET_TIMEOUT_S)
        self.receiver = ColoReceiver(ours)
        initial: dict[str, Any] = {}

        def read_initial() -> None:
            try:
                assert self.receiver is not None
                initial["result"] = self.receiver.read_initial()
            except BaseException as exc:
                initial["error"] = exc

        reader = threading.Thread(target=read_initial, name="vmckpt-colo-initial", daemon=True)
        try:
            mon.set_migrate_capabilities({"x-colo": True, "events": True})
            mon.set_migrate_parameters(
                {
                    "x-checkpoint-delay": NEVER_MS,
                    "downtime-limit": self.settings.downtime_limit_ms,
                    "max-bandwidth": self.settings.max_bandwidth,
                }
            )
            mark = mon.mark()
            mon.send_fd(FD_NAME, theirs.fileno())
            theirs.close()
            reader.start()
            mon.migrate(f"fd:{FD_NAME}")
            event = mon.wait_event(
                {"MIGRATION"},
                self.settings.timeout_s,
                lambda e: e.data.get("status") in {"colo", "completed", "failed", "cancelled"},
                since=mark,
            )
            state = str(event.data["status"])
            reader.join(SOCKET_TIMEOUT_S)
            if "error" in initial or "result" not in initial:
                raise CheckpointError(
                    f"reading QEMU's stream failed: {initial.get('error', 'no data')}",
                    vm=name,
                    step="receive",
                )
            if state == "colo":
                self.receiver.send(fmt.COLO_CHECKPOINT_READY)  # QEMU resumes the guest
                self.active = True
            elif state == "completed":
                if self._was_running:
                    mon.cont(retry_s=5.0)
                self.unavailable_reason = (
                    f"QEMU {mon.greeting_version} completed the migration instead of entering "
                    "COLO (QEMU 10.0/10.1 regression, fixed upstream)"
                )
            else:
                raise CheckpointError(f"QEMU's migration {state}", vm=name, step="migrate")
            envelope, ram = initial["result"]
            self.envelope = envelope
            stop, resume = _pause_window(mon, mark)
            pages, zeroed = diff_against_parent(self.store, name, self.guest.head, ram)
            stats = {"pause_ms": round((resume - stop) * 1000, 3), "session": "open"}
            result = write_checkpoint_layer(
                self.store,
                self.guest,
                self.runtime_dir,
                LayerParts(envelope, ram, pages, zeroed, mon.greeting_version),
                mechanism=MECHANISM_COLO if self.active else "precopy-diff",
                stats=stats,
                started=started,
            )
        except BaseException:
            self.close()
            raise
        self._head_image = result.image
        if not self.active:
            self._restore_settings()
        return result

    # -- one incremental checkpoint --------------------------------------------------

    def checkpoint(self, pause_budget_ms: float | None = None) -> CheckpointResult:
        if not self.active:
            return self._fallback_checkpoint(time.monotonic(), pause_budget_ms)
        assert self.mon is not None and self.receiver is not None and self.envelope is not None
        started = time.monotonic()
        mon, receiver = self.mon, self.receiver
        try:
            mark = mon.mark()
            # Setting the delay makes QEMU checkpoint now and re-arm its timer.
            mon.set_migrate_parameters({"x-checkpoint-delay": NEVER_MS})
            receiver.expect(fmt.COLO_CHECKPOINT_REQUEST)
            taken = receiver.receive_checkpoint()
            receiver.acknowledge()  # the pause ends here
            received = time.monotonic()
            ram = receiver.ram
            assert ram is not None
            pages: dict[str, np.ndarray] = {}
            zeroed: dict[str, np.ndarray] = {}
            empty = np.zeros(0, dtype=np.uint32)
            for block in ram.blocks:
                touched = taken.touched.get(block.idstr, empty)
                pages[block.idstr], zeroed[block.idstr] = split_zero(ram, block.idstr, touched)
            stop, resume = _pause_window(mon, mark)
            envelope = replace(self.envelope, epilogue=taken.device_state)
            stats = {
                "pause_ms": round((resume - stop) * 1000, 3),
                "pages_sent": taken.pages,
                "stream_bytes": taken.stream_bytes,
                "receive_s": round(received - started, 3),
            }
            return write_checkpoint_layer(
                self.store,
                self.guest,
                self.runtime_dir,
                LayerParts(envelope, ram, pages, zeroed, mon.greeting_version),
                mechanism=MECHANISM_COLO,
                stats=stats,
                started=started,
            )
        except (StreamError, QMPError, OSError) as exc:
            self.close()
            raise CheckpointError(
                f"incremental checkpoint failed ({exc}); COLO ended, the guest runs on",
                vm=self.guest.name,
                step="colo-checkpoint",
            ) from exc
        except BaseException:
            self.close()
            raise

    def _fallback_checkpoint(
        self, started: float, pause_budget_ms: float | None = None
    ) -> CheckpointResult:
        if self.mon is not None and not self.active:
            self.mon.close()
            self.mon = None
        settings = self.settings
        if pause_budget_ms is not None:
            settings = replace(settings, downtime_limit_ms=max(1, int(pause_budget_ms)))
        result = take_checkpoint(
            self.store,
            self.guest,
            self.runtime_dir,
            settings,
            base=self._head_image,
            monitor=self.connect,
        )
        # The image just written is the next diff's base: no compose of a long chain.
        self._head_image = result.image
        return result

    # -- leaving -------------------------------------------------------------------

    def close(self) -> None:
        """End COLO (if on), restore the settings, make sure the guest runs."""
        # COLO updates the image in place: after a failure it may hold pages no
        # layer stores, so it must never serve as a diff base again.
        if self.active:
            self._head_image = None
        mon = self.mon
        if mon is not None:
            with contextlib.suppress(QMPError):
                if mon.query_migrate().status == "colo":
                    mon.execute("x-colo-lost-heartbeat")
                    deadline = time.monotonic() + 10
                    while mon.query_migrate().status == "colo" and time.monotonic() < deadline:
                        time.sleep(0.05)
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        self.active = False
        if mon is not None:
            self._restore_settings()
            with contextlib.suppress(QMPError):
                deadline = time.monotonic() + 5
                while mon.query_migrate().status in ACTIVE_MIGRATION:
                    if time.monotonic() > deadline:
                        mon.migrate_cancel()
                        break
                    time.sleep(0.05)
            with contextlib.suppress(QMPError):
                if self._was_running and not mon.is_running():
                    mon.cont(retry_s=5.0)
            mon.close_fd(FD_NAME)
            mon.close()
            self.mon = None

    def _restore_settings(self) -> None:
        mon = self.mon
        if mon is None or not self._old_params:
            return
        with contextlib.suppress(QMPError):
            mon.set_migrate_capabilities(self._old_caps)
        with contextlib.suppress(QMPError):
            mon.set_migrate_parameters(
                {
                    k: self._old_params[k]
                    for k in ("x-checkpoint-delay", "downtime-limit", "max-bandwidth")
                    if k in self._old_params
                }
            )
        self._old_params = {}

    def __enter__(self) -> IncrementalSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def colo_refusal(qemu_version: str) -> str | None:
    """Why COLO must not be tried with this QEMU, or None.

    QEMU 7.x: seen on this project's machines (QEMU 7.2.22, TCG): the first
    incremental checkpoint is taken and acknowledged, then QEMU's migration
    thread and main loop both wait for the big QEMU lock forever; the guest
    stays stopped and the monitor stops answering. vmckpt never does that to
    a guest. (QEMU 10.0/10.1 are harmless: they complete the migration
    instead of entering COLO, and the session falls back to precopy-diff.)
    """
    major = int(qemu_version.split(".")[0]) if qemu_version else 0
    if major and major < 8:
        return (
            f"COLO on QEMU {qemu_version} deadlocks the guest after the first incremental "
            "checkpoint (seen under TCG); refusing --colo with this QEMU"
        )
    return None


def _pause_window(mon: Monitor, mark: int) -> tuple[float, float]:
    """QEMU's timestamps of the last STOP and the RESUME that follows it."""
    deadline = time.monotonic() + 10
    while True:
        events = mon.events_since(mark)
        stops = [e.timestamp for e in events if e.name == "STOP"]
        if stops:
            resumes = [
                e.timestamp for e in events if e.name == "RESUME" and e.timestamp >= stops[-1]
            ]
            if resumes:
                return stops[-1], resumes[0]
        if time.monotonic() > deadline:
            stamp = events[-1].timestamp if events else time.time()
            return (stops[-1] if stops else stamp), stamp
        with contextlib.suppress(QMPError):
            mon.wait_event({"RESUME"}, 0.5, since=mark)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM ask the watch to stop once the checkpoint under way is done.

    An exception raised from a signal handler could land inside the cleanup
    that resumes the guest and cut it short, so the first signal only sets a
    flag; a second one (the user insists) raises Interrupted, and the cleanup
    in ``finally`` still runs.
    """
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise Interrupted(signal.Signals(signum).name)
        stop.set()
        print(
            "vmckpt: stopping once the checkpoint under way is written (again to abort it)",
            file=sys.stderr,
        )

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, previous in old.items():
            signal.signal(sig, previous)


def watch(
    store: Store,
    guest: GuestRecord,
    runtime_dir: Path,
    settings: WatchSettings,
    report: Callable[[CheckpointResult, str], None],
    *,
    monitor: Callable[[], Monitor] | None = None,
) -> int:
    """Checkpoint every interval until count or a signal; returns layers taken.

    ``monitor`` connects to a guest vmckpt did not start (a libvirt domain); such a
    guest is checkpointed with precopy-diff only (COLO needs a monitor vmckpt owns).
    """
    if monitor is not None and settings.use_colo:
        raise CheckpointError(
            "--colo needs a guest vmckpt started; this one is checkpointed with precopy-diff",
            vm=guest.name,
            step="watch",
        )
    taken = 0
    interval = settings.interval_s
    budget = settings.pause_budget_ms
    with stop_on_signals() as stop:
        session = IncrementalSession(store, guest, runtime_dir, monitor=monitor)
        try:
            if not settings.use_colo:
                session.unavailable_reason = "precopy-diff (COLO not requested)"
                result = session.checkpoint(budget)
            else:
                result = session.open()
            note = (
                f"COLO unavailable: {session.unavailable_reason}; using precopy-diff"
                if settings.use_colo and not session.active
                else ""
            )
            report(result, note)
            taken = 1
            next_at = time.monotonic() + interval
            while (settings.count is None or taken < settings.count) and not stop.is_set():
                if stop.wait(max(0.0, next_at - time.monotonic())):
                    break
                next_at = time.monotonic() + interval
                result = session.checkpoint(budget)
                taken += 1
                note = ""
                if budget is not None and result.pause_ms > budget:
                    if session.active:
                        # Fewer pages accumulate between closer checkpoints.
                        interval = max(0.1, interval / 2)
                        note = f"pause over budget: interval now {interval:.2f} s"
                    else:
                        note = "pause over budget: QEMU's downtime limit set to the budget"
                elif interval < settings.interval_s:
                    interval = min(settings.interval_s, interval * 1.25)
                report(result, note)
        except Interrupted:
            pass
        finally:
            session.close()
    return taken
