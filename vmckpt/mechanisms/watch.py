"""Periodic checkpoints: ``vmckpt watch``, one loop whatever the mechanism.

One checkpoint per interval until a count is reached or SIGINT/SIGTERM
arrives; each is a layer whose parent is the previous one (vmckpt/mechanisms/api.py
says how a checkpoint is taken: precopy-diff diffs against this host's copy of the
previous checkpoint's RAM, which each checkpoint brings up to date, so no checkpoint
composes the chain; COLO asks its session). A pause budget maps onto QEMU's
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
from typing import Any

from vmckpt.errors import UsageError, VmckptError
from vmckpt.guests.base import Guest
from vmckpt.images.maintenance import prune
from vmckpt.images.retention import KeepRules
from vmckpt.mechanisms.layers import CheckpointSettings

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


def watch_loop(
    take: Callable[[], dict[str, Any]],
    settings: WatchSettings,
    report: Callable[[dict[str, Any]], None],
    *,
    prune_for: Guest | None = None,
) -> int:
    """The one watch loop every mechanism uses: ``take`` a checkpoint (its row) every
    interval until the count or a signal, report each row with its ``note`` (the pause over
    budget, what a prune after it did); returns the checkpoints taken. ``prune_for``: the
    guest whose layers ``settings.keep`` prunes as it goes."""
    budget = settings.pause_budget_ms
    taken = 0
    pruned_at: float | None = None
    with stop_on_signals() as stop:
        try:
            next_at = time.monotonic()
            while settings.count is None or taken < settings.count:
                if taken and stop.wait(max(0.0, next_at - time.monotonic())):
                    break
                next_at = time.monotonic() + settings.interval_s
                row = take()
                taken += 1
                notes = [str(row.get("note") or "")]
                pause = row.get("pause_ms")
                if budget is not None and isinstance(pause, int | float) and pause > budget:
                    notes.append("pause over budget (QEMU's downtime limit is set to the budget)")
                keep = settings.keep
                due = pruned_at is None or time.monotonic() - pruned_at >= settings.prune_every_s
                if keep and prune_for is not None and due:
                    pruned_at = time.monotonic()
                    notes.append(prune_note(prune_for, keep))
                report({**row, "note": "; ".join(filter(None, notes))})
                if stop.is_set():
                    break
        except Interrupted:
            pass
    return taken


def checkpoint_settings(settings: WatchSettings) -> CheckpointSettings:
    """The checkpoint settings of a watch: a pause budget is QEMU's downtime limit, and a
    checkpoint someone else started (vmckpt checkpoint) is waited for, not an error."""
    checkpoint = CheckpointSettings(lock_wait_s=LOCK_WAIT_S)
    if settings.pause_budget_ms is not None:
        checkpoint = replace(checkpoint, downtime_limit_ms=max(1, int(settings.pause_budget_ms)))
    return checkpoint


def prune_note(target: Guest, keep: KeepRules) -> str:
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
