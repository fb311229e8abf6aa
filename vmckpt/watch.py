"""Periodic checkpoints: ``vmckpt watch``.

One checkpoint per interval until a count is reached or SIGINT/SIGTERM
arrives; each is a layer whose parent is the previous one. With precopy-diff
the image the previous checkpoint received is kept as the next diff's base,
so no checkpoint composes the chain. A pause budget maps onto QEMU's
downtime limit (QEMU then runs more pre-copy rounds before it stops the
guest); a layer whose pause still exceeded it is reported as such.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from types import FrameType
from typing import TYPE_CHECKING

from vmckpt.checkpoint import CheckpointResult, CheckpointSettings, take_checkpoint
from vmckpt.errors import UsageError
from vmckpt.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    from vmckpt.checkpoint import CheckpointTarget

MIN_INTERVAL_S = 0.01
LOCK_WAIT_S = 120.0


class Interrupted(Exception):
    """A second SIGINT or SIGTERM arrived: abort the checkpoint under way (cleanly)."""


@dataclass(frozen=True)
class WatchSettings:
    interval_s: float = 1.0
    count: int | None = None
    pause_budget_ms: float | None = None

    def __post_init__(self) -> None:
        if not math.isfinite(self.interval_s) or self.interval_s < MIN_INTERVAL_S:
            raise UsageError(f"interval {self.interval_s} s is not a finite time of 10 ms or more")
        if self.count is not None and self.count < 1:
            raise UsageError(f"count {self.count} must be at least 1")
        budget = self.pause_budget_ms
        if budget is not None and (not math.isfinite(budget) or budget < 1):
            raise UsageError(f"pause budget {budget} ms is not a finite time of 1 ms or more")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM ask the work to stop once the checkpoint under way is done.

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
    target: CheckpointTarget,
    settings: WatchSettings,
    report: Callable[[CheckpointResult, str], None],
    *,
    progress: Progress = NO_PROGRESS,
) -> int:
    """Checkpoint every interval until count or a signal; returns the layers taken."""
    note = ""
    # A checkpoint someone else started (vmckpt checkpoint) is waited for, not an error.
    checkpoint = CheckpointSettings(lock_wait_s=LOCK_WAIT_S)
    if settings.pause_budget_ms is not None:
        checkpoint = replace(checkpoint, downtime_limit_ms=max(1, int(settings.pause_budget_ms)))
    taken = 0
    base = None
    budget = settings.pause_budget_ms
    with stop_on_signals() as stop:
        try:
            next_at = time.monotonic()
            while settings.count is None or taken < settings.count:
                if taken and stop.wait(max(0.0, next_at - time.monotonic())):
                    break
                next_at = time.monotonic() + settings.interval_s
                result = take_checkpoint(target, checkpoint, base=base, progress=progress)
                # The image just written is the next diff's base: no compose of the chain.
                base = result.image
                taken += 1
                if budget is not None and result.pause_ms > budget:
                    note = "pause over budget (QEMU's downtime limit is set to the budget)"
                report(result, note)
                note = ""
                if stop.is_set():
                    break
        except Interrupted:
            pass
    return taken
