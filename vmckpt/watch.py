"""Periodic checkpoints: ``vmckpt watch``.

One checkpoint per interval until a count is reached or SIGINT/SIGTERM
arrives; each is a layer whose parent is the previous one. With precopy-diff
the image the previous checkpoint received is kept as the next diff's base,
so no checkpoint composes the chain. A pause budget maps onto QEMU's
downtime limit (QEMU then runs more pre-copy rounds before it stops the
guest); a layer whose pause still exceeded it is reported as such. With
retention rules (``--keep-*``), the guest's layers the rules do not keep are
pruned as it goes (vmckpt/images/maintenance.py), at most once per
``prune_every_s``, between two checkpoints; what a prune did is reported with
the checkpoint before it, and a prune that fails is reported and retried at
the next occasion (the checkpoints go on).
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
from vmckpt.errors import UsageError, VmckptError
from vmckpt.images.maintenance import prune
from vmckpt.images.retention import KeepRules
from vmckpt.progress import NO_PROGRESS, Progress

if TYPE_CHECKING:
    from vmckpt.checkpoint import CheckpointTarget

MIN_INTERVAL_S = 0.01
LOCK_WAIT_S = 120.0


class Interrupted(KeyboardInterrupt):
    """A second SIGINT or SIGTERM arrived: abort the checkpoint under way (cleanly).

    An interrupt, not an error: like a Ctrl-C it passes every ``except Exception`` (a
    ``contextlib.suppress(Exception)`` in a clean-up must not swallow it), clean-ups that
    catch BaseException still run, and the CLI reports it as ``interrupted`` (exit 130).
    """


@dataclass(frozen=True)
class WatchSettings:
    interval_s: float = 1.0
    count: int | None = None
    pause_budget_ms: float | None = None
    keep: KeepRules | None = None  # prune the guest's layers by these rules as it goes
    prune_every_s: float = 60.0

    def __post_init__(self) -> None:
        if not math.isfinite(self.interval_s) or self.interval_s < MIN_INTERVAL_S:
            raise UsageError(f"interval {self.interval_s} s is not a finite time of 10 ms or more")
        if self.count is not None and self.count < 1:
            raise UsageError(f"count {self.count} must be at least 1")
        budget = self.pause_budget_ms
        if budget is not None and (not math.isfinite(budget) or budget < 1):
            raise UsageError(f"pause budget {budget} ms is not a finite time of 1 ms or more")
        if self.keep is not None and not self.keep.any():
            raise UsageError("--keep-* rules for watch: give at least one")
        if not math.isfinite(self.prune_every_s) or self.prune_every_s < 0:
            raise UsageError("--prune-every must be a finite duration")


STOP_NOTICE = "vmckpt: stopping once the checkpoint under way is written (again to abort it)"


@contextlib.contextmanager
def stop_on_signals(notice: str | None = STOP_NOTICE) -> Iterator[threading.Event]:
    """SIGINT/SIGTERM ask the work to stop once the checkpoint under way is done.

    An exception raised from a signal handler could land inside the cleanup
    that resumes the guest and cut it short, so the first signal only sets a
    flag (and prints ``notice`` on stderr, if given); a second one (the user
    insists) raises Interrupted, and the cleanup in ``finally`` still runs.
    The handlers replace whatever was there, an inherited SIG_IGN included: a
    command run from a script's background job stops on the signals as well.
    """
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise Interrupted(signal.Signals(signum).name)
        stop.set()
        if notice:
            print(notice, file=sys.stderr)

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
    pruned_at: float | None = None
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
                keep = settings.keep
                if keep and (
                    pruned_at is None or time.monotonic() - pruned_at >= settings.prune_every_s
                ):
                    pruned_at = time.monotonic()
                    note = "; ".join(filter(None, [note, prune_note(target, keep)]))
                report(result, note)
                note = ""
                if stop.is_set():
                    break
        except Interrupted:
            pass
    return taken


def prune_note(target: CheckpointTarget, keep: KeepRules) -> str:
    """Prune the guest's layers; a note on what happened (a failure does not stop watch)."""
    try:
        # A prune of someone else under way: skip this one rather than hold up checkpoints.
        done = prune(target.store, keep, guest=target.name, wait_s=0.0)
    except VmckptError as exc:
        return f"prune skipped: {exc.one_line()}"
    if not done.removed:
        return ""
    return (
        f"pruned {len(done.removed)} layer(s) ({done.bytes_freed} bytes freed, "
        f"{len(done.rewritten)} rewritten)"
    )
