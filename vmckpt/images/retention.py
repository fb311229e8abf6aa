"""Retention rules: which layers a prune keeps (borg's ``--keep-*`` rules, for layers).

Pure: layer ids and creation times in, the kept ids and why out. Each rule
selects on its own and a layer is kept if any rule selects it:

- ``within``: every layer created less than that long before ``now``;
- ``last N``: the N newest layers;
- ``minutely/hourly/daily/weekly/monthly N``: the newest layer of each of the
  N most recent minutes (hours, days, ISO weeks, months) that have layers, in
  local time.

(borg applies its rules one after the other and lets a rule skip what an
earlier one kept, so rules reach further back; here each counts on its own,
so ``--keep-daily 7`` means the last 7 days that have layers, whatever else
is kept.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, tzinfo

from vmckpt.errors import UsageError

CREATED_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


def _week(t: datetime) -> tuple[int, ...]:
    year, week, _ = t.isocalendar()
    return (year, week)


# The periods of the period rules, newest first in the order they are applied.
PERIODS: dict[str, Callable[[datetime], tuple[int, ...]]] = {
    "minutely": lambda t: (t.year, t.month, t.day, t.hour, t.minute),
    "hourly": lambda t: (t.year, t.month, t.day, t.hour),
    "daily": lambda t: (t.year, t.month, t.day),
    "weekly": _week,
    "monthly": lambda t: (t.year, t.month),
}


@dataclass(frozen=True)
class KeepRules:
    """What a prune keeps; zero (or no ``within_s``) turns a rule off."""

    last: int = 0
    within_s: float = 0.0
    minutely: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0

    def __post_init__(self) -> None:
        for name in ("last", *PERIODS):
            if getattr(self, name) < 0:
                raise UsageError(f"--keep-{name} must not be negative")
        if not math.isfinite(self.within_s) or self.within_s < 0:
            raise UsageError("--keep-within must be a finite, positive duration")

    def any(self) -> bool:
        return bool(self.last or self.within_s or any(getattr(self, p) for p in PERIODS))

    def describe(self) -> str:
        parts = []
        if self.within_s:
            parts.append(f"within {format_duration(self.within_s)}")
        if self.last:
            parts.append(f"last {self.last}")
        parts += [f"{p} {getattr(self, p)}" for p in PERIODS if getattr(self, p)]
        return ", ".join(parts) or "nothing"


def keep_arguments(rules: KeepRules) -> list[str]:
    """The command-line options that give ``rules`` (to run a prune or watch elsewhere)."""
    args = ["--keep-last", str(rules.last)] if rules.last else []
    if rules.within_s:
        args += ["--keep-within", f"{rules.within_s}s"]
    for period in PERIODS:
        if getattr(rules, period):
            args += [f"--keep-{period}", str(getattr(rules, period))]
    return args


def format_duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def parse_created(text: str) -> datetime:
    """A manifest's ``created`` (UTC) as an aware datetime; ValueError if malformed."""
    return datetime.strptime(text, CREATED_FORMAT).replace(tzinfo=UTC)


def select(
    layers: Sequence[tuple[str, datetime]],
    rules: KeepRules,
    now: datetime,
    tz: tzinfo | None = None,
) -> dict[str, str]:
    """The ids the rules keep among ``layers`` (id, created), each with the first reason
    that keeps it (e.g. ``daily 3``: the newest layer of the third most recent day).
    Periods are taken in ``tz`` (default: local time)."""
    newest_first = sorted(layers, key=lambda item: (item[1], item[0]), reverse=True)
    kept: dict[str, str] = {}
    if rules.within_s:
        for layer_id, created in newest_first:
            if (now - created).total_seconds() <= rules.within_s:
                kept.setdefault(layer_id, f"within {format_duration(rules.within_s)}")
    for number, (layer_id, _) in enumerate(newest_first[: rules.last], 1):
        kept.setdefault(layer_id, f"last {number}")
    for name, period_of in PERIODS.items():
        count = getattr(rules, name)
        seen: set[tuple[int, ...]] = set()
        for layer_id, created in newest_first:
            if len(seen) >= count:
                break
            period = period_of(created.astimezone(tz))
            if period not in seen:
                seen.add(period)
                kept.setdefault(layer_id, f"{name} {len(seen)}")
    return kept
