"""Is a guest alive? One watcher, from outside, for the few seconds after it starts or resumes.

Three callers share it: a restore (the guest is watched for a second after it
resumes; one that dies, panics or resets at once is a failed restore), ``vmckpt
verify --boot`` (a layer restored in a throw-away QEMU, watched for seconds and
judged), and ``vmckpt run``'s hint for a guest that stays silent or keeps
resetting (vmckpt/machine/diagnose.py). It looks only at what QEMU and the console
show, and never touches the guest:

- the QEMU process (by the PID and start time vmckpt recorded);
- QMP events on the caller's connection, from the position the caller marked
  *before* resuming the guest (QEMU does not replay events to a later
  connection): GUEST_PANICKED, GUEST_CRASHLOADED, SHUTDOWN, RESET, STOP;
- the run state (``query-status``) at the end;
- the serial console: the bytes and complete lines written during the watch.

A panic is seen only if the guest reports it to QEMU (a panic device such as
pvpanic, which the guest's spec must already have: a restore cannot add one).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vmckpt.errors import QMPError
from vmckpt.machine.qemu import QemuProcess
from vmckpt.qmp import Monitor

# The events that say the guest stopped being itself, and those worth reporting.
PANIC_EVENTS = frozenset({"GUEST_PANICKED", "GUEST_CRASHLOADED"})
FATAL_EVENTS = PANIC_EVENTS | {"SHUTDOWN", "RESET"}
WATCHED_EVENTS = FATAL_EVENTS | {"STOP"}
VERDICTS = ("alive", "dead", "panicked", "reset", "stopped", "silent")
# Console output must go on: quiet for the second half of the watch (and at least this
# long) is silent, even after a first burst (e.g. a boot loader's one error line).
MIN_QUIET_S = 1.0
POLL_S = 0.2
MAX_PARTIAL_BYTES = 4096  # of a console line without its end yet
EVIDENCE_LINES = 3
MAX_EVENTS_SHOWN = 50  # of a reboot loop's many RESETs: the first ones tell the story
_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\-_]|c)")


def clean_console(raw: bytes) -> list[str]:
    """Complete console lines, with ANSI codes and CRs removed and blank lines dropped."""
    complete = raw.decode("utf-8", errors="replace").split("\n")[:-1]
    lines = (_ANSI.sub("", line.replace("\r", "")).strip() for line in complete)
    return [line for line in lines if line]


@dataclass(frozen=True)
class Observation:
    """What a few seconds of watching a guest showed."""

    seconds: float  # how long it was watched
    events: tuple[tuple[str, str, float], ...] = ()  # name, detail, seconds into the watch
    exited: bool = False  # QEMU's process is gone
    status: str = ""  # QEMU's run state at the end ("" once QEMU is gone or unreachable)
    console_bytes: int = 0  # written to the console during the watch
    console_lines: int = 0  # complete lines among them
    last_output_s: float | None = None  # seconds into the watch of the last console output
    last_lines: tuple[str, ...] = ()  # the last few of them, cleaned
    qemu_said: str = ""  # QEMU's last output lines, if it exited

    def count(self, name: str) -> int:
        return sum(1 for event in self.events if event[0] == name)

    def first(self, names: frozenset[str] | set[str]) -> tuple[str, str, float] | None:
        return next((event for event in self.events if event[0] in names), None)

    @property
    def fatal(self) -> bool:
        """The guest died, panicked, shut down or reset (a restore that failed at once)."""
        return (
            self.exited
            or self.first(FATAL_EVENTS) is not None
            or self.status in {"shutdown", "guest-panicked"}
        )

    @property
    def verdict(self) -> str:
        """alive, or how it is not: dead, panicked, reset, stopped, silent."""
        if self.first(PANIC_EVENTS) is not None or self.status == "guest-panicked":
            return "panicked"
        if self.exited or self.count("SHUTDOWN") or self.status == "shutdown":
            return "dead"
        if self.count("RESET"):
            return "reset"
        if self.status != "running":
            return "stopped"
        if self.quiet_s > max(MIN_QUIET_S, self.seconds / 2):
            return "silent"
        return "alive"

    @property
    def quiet_s(self) -> float:
        """How long the console had been quiet when the watch ended (all of it: no output)."""
        if self.last_output_s is None or self.console_bytes == 0:
            return self.seconds
        return max(0.0, self.seconds - self.last_output_s)

    def evidence(self) -> str:
        """The facts behind the verdict, in one line."""
        parts = []
        if self.exited:
            said = self.qemu_said if not self.qemu_said.startswith("(") else ""
            parts.append(f"QEMU exited, saying {said!r}" if said else "QEMU exited")
        else:
            parts.append(f"run state {self.status or 'unknown (QMP did not answer)'}")
        shown: dict[str, list[str]] = {}
        for name, detail, _at in self.events:
            shown.setdefault(name, [])
            if detail and detail not in shown[name]:
                shown[name].append(detail)
        if shown:
            parts.append(
                ", ".join(
                    f"{self.count(name)} {name}" + (f" ({', '.join(details)})" if details else "")
                    for name, details in shown.items()
                )
            )
        else:
            parts.append("no panic, reset or shutdown event")
        if self.console_bytes:
            last = f", last: {self.last_lines[-1]!r}" if self.last_lines else ""
            quiet = (
                f", then nothing for {self.quiet_s:.1f} s" if self.quiet_s >= MIN_QUIET_S else ""
            )
            parts.append(
                f"console: {self.console_lines} new line(s), {self.console_bytes} bytes"
                f"{last}{quiet}"
            )
        else:
            parts.append("console: no output")
        return f"in {self.seconds:.1f} s: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "seconds": round(self.seconds, 3),
            "events": [
                {"event": name, "detail": detail, "at_s": round(at, 3)}
                for name, detail, at in self.events[:MAX_EVENTS_SHOWN]
            ],
            "exited": self.exited,
            "status": self.status,
            "console_bytes": self.console_bytes,
            "console_lines": self.console_lines,
            "quiet_s": round(self.quiet_s, 3),
            "last_lines": list(self.last_lines),
            "qemu_said": self.qemu_said,
            "evidence": self.evidence(),
        }


@dataclass
class ConsoleReader:
    """The console log read as it grows: what was written since the watch began."""

    path: Path
    position: int  # where the next read starts
    written: int = 0
    lines: int = 0
    last: tuple[str, ...] = ()
    partial: bytes = field(default=b"", repr=False)  # a line not finished yet

    def read(self) -> None:
        try:
            size = self.path.stat().st_size
        except OSError:
            return
        if size <= self.position:
            return
        with self.path.open("rb") as handle:
            handle.seek(self.position)
            data = handle.read(size - self.position)
        self.position += len(data)
        self.written += len(data)
        data = self.partial + data
        cut = data.rfind(b"\n") + 1
        self.partial = data[cut:][-MAX_PARTIAL_BYTES:]
        new = clean_console(data[:cut])
        self.lines += len(new)
        if new:
            self.last = (*self.last, *new)[-EVIDENCE_LINES:]


def _detail(data: Any) -> str:
    for key in ("reason", "action"):
        value = data.get(key) if hasattr(data, "get") else None
        if isinstance(value, str) and value:
            return value
    return ""


def observe(
    process: QemuProcess,
    mon: Monitor,
    *,
    since: int,
    seconds: float,
    console_from: int = 0,
    until: Callable[[Observation], bool] | None = None,
    stop: threading.Event | None = None,
) -> Observation:
    """Watch the guest for ``seconds`` (or until ``until`` says enough, or QEMU exits).

    ``since`` is the event position (:meth:`Monitor.mark`) taken before the guest was
    started or resumed; ``console_from`` the console log's size at that moment. ``stop``
    (set from another thread) ends the watch within one poll, and then QEMU is asked
    nothing more: whoever set it is about to stop the guest, and waits for this monitor.
    """
    console = ConsoleReader(process.serial_log, console_from)
    started = time.monotonic()
    deadline = started + seconds
    seen = since
    events: list[tuple[str, str, float]] = []
    exited = False
    last_written, last_output_s = 0, None
    while True:
        arrived = mon.events_since(seen)
        seen += len(arrived)
        for event in arrived:
            if event.name in WATCHED_EVENTS:
                events.append((event.name, _detail(event.data), time.monotonic() - started))
        exited = not process.alive()
        now = time.monotonic()
        console.read()
        if console.written > last_written:
            last_written, last_output_s = console.written, now - started
        partial = Observation(
            seconds=now - started, events=tuple(events), exited=exited,
            console_bytes=console.written, console_lines=console.lines, last_lines=console.last,
            last_output_s=last_output_s,
        )  # fmt: skip
        stopped = stop is not None and stop.is_set()
        if exited or stopped or now >= deadline or (until is not None and until(partial)):
            break
        with contextlib.suppress(QMPError):
            mon.wait_event(set(WATCHED_EVENTS), min(POLL_S, deadline - now), since=seen)
    status = ""
    if not exited and not stopped:
        with contextlib.suppress(QMPError):
            status = mon.status()
    return replace(
        partial,
        status=status,
        qemu_said=process.log_tail() if exited else "",
    )
