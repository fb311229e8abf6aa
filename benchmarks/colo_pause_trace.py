"""Where a COLO checkpoint's pause goes, read from QEMU's own trace.

A COLO checkpoint's pause is QEMU's work (vmckpt only reads the stream and acknowledges
it), so the parts of it are measured inside QEMU: the guest's QEMU is started with a few of
its trace events enabled (``-trace events=FILE``), written with wall-clock timestamps to a
log (``-D LOG -msg timestamp=on``; QEMU's ``log`` trace backend, which Debian's builds
have). :func:`parse_pauses` cuts the log into pauses (the run state going to ``colo``
until it is ``running`` again) and times, from the start of each:

- ``stopped``: the vCPUs stopped and QEMU's STOP event sent;
- ``drained``: in-flight guest I/O drained and the disks flushed (``vm_stop``'s work);
- ``devices``: every device's state saved (the sections before RAM), and which device
  took longest;
- ``ram synced``: the dirty bitmap synchronised (the disk capture's QMP command, which
  needs QEMU's big lock, usually runs here: ``capture`` says when its job was created);
- ``ram sent``: the dirty pages written into the stream;
- ``acknowledged``: vmckpt has read the device state and acknowledged the checkpoint
  (QEMU received VMSTATE_LOADED);
- ``resumed``: QEMU's RESUME event.

Used by ``python -m benchmarks.colo_disk_instant --breakdown``. Benchmarks never assert.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

# The trace events a breakdown needs: few, so tracing costs the pause next to nothing.
EVENTS = (
    "runstate_set",
    "colo_vm_state_change",
    "colo_receive_message",
    "savevm_section_start",
    "savevm_section_end",
    "migration_bitmap_sync_start",
    "migration_bitmap_sync_end",
    "job_state_transition",
    "monitor_qmp_respond",
)
# The phases in pause order: (key, what the table calls it).
PHASES = (
    ("stopped", "vCPUs stopped, STOP sent"),
    ("drained", "guest I/O drained, disks flushed"),
    ("devices", "device state saved"),
    ("ram_synced", "dirty bitmap synced"),
    ("ram_sent", "dirty pages sent"),
    ("acknowledged", "vmckpt read and acknowledged"),
    ("resumed", "guest resumed (RESUME)"),
)
_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z (\w+) ?(.*)$")
_SECTION = re.compile(r"^(\S+), section_id \d+")


def trace_args(events_file: Path, log_file: Path) -> list[str]:
    """QEMU's arguments that trace :data:`EVENTS` into ``log_file`` (``events_file`` is
    written here)."""
    events_file.write_text("".join(f"{event}\n" for event in EVENTS))
    return ["-trace", f"events={events_file}", "-D", str(log_file), "-msg", "timestamp=on"]


@dataclass
class Pause:
    """One checkpoint's pause: each phase's end, in ms from the pause's start."""

    started: float  # wall clock (seconds since the epoch)
    marks: dict[str, float] = field(default_factory=dict)
    sections: dict[str, float] = field(default_factory=dict)  # device: ms to save
    capture_ms: float | None = None  # the disk capture's job created, from the start

    @property
    def complete(self) -> bool:
        return all(key in self.marks for key, _ in PHASES)

    def phase_ms(self, key: str) -> float:
        """How long ``key`` took: its end minus the end of the phase before it."""
        keys = [k for k, _ in PHASES]
        at = keys.index(key)
        before = self.marks[keys[at - 1]] if at else 0.0
        return self.marks[key] - before

    @property
    def total_ms(self) -> float:
        return self.marks["resumed"]


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text + "+00:00").timestamp()


def parse_pauses(lines: Iterable[str]) -> list[Pause]:
    """Every complete pause in a trace log (:func:`trace_args`), in order."""
    pauses: list[Pause] = []
    current: Pause | None = None
    section: tuple[str, float] | None = None
    for line in lines:
        m = _LINE.match(line)
        if m is None:
            continue
        at, event, rest = _stamp(m.group(1)), m.group(2), m.group(3)
        if event == "runstate_set" and "new_state 15 (colo)" in rest:
            current, section = Pause(at), None
            continue
        if current is None:
            continue
        ms = (at - current.started) * 1000
        marks = current.marks
        if event == "monitor_qmp_respond" and '"event": "STOP"' in rest:
            marks.setdefault("stopped", ms)
        elif event == "colo_vm_state_change" and "'run' => 'stop'" in rest:
            marks["drained"] = ms
        elif event == "savevm_section_start":
            name = _SECTION.match(rest)
            if name is not None:
                section = (name.group(1), ms)
        elif event == "savevm_section_end":
            name = _SECTION.match(rest)
            if name is not None and section is not None and section[0] == name.group(1):
                if name.group(1) == "ram":
                    marks["ram_sent"] = ms
                else:
                    current.sections[name.group(1)] = ms - section[1]
            section = None
        elif event == "migration_bitmap_sync_start":
            marks.setdefault("devices", ms)  # the devices are saved before the RAM
        elif event == "migration_bitmap_sync_end":
            marks["ram_synced"] = ms
        elif event == "job_state_transition" and "-->created" in rest:
            if current.capture_ms is None:
                current.capture_ms = ms
        elif event == "colo_receive_message" and "'vmstate-loaded'" in rest:
            marks["acknowledged"] = ms
        elif event == "monitor_qmp_respond" and '"event": "RESUME"' in rest:
            marks.setdefault("resumed", ms)
        elif event == "runstate_set" and "new_state 9 (running)" in rest:
            if current.complete:
                pauses.append(current)
            current = None
    return pauses


def format_breakdown(label: str, pauses: Sequence[Pause]) -> str:
    """The medians of each phase of ``pauses`` (ms), the devices slowest to save, and when
    the disk capture ran."""
    if not pauses:
        return (f"{label}: no complete pause in QEMU's trace (is its trace backend 'log'? "
                "`qemu-system-x86_64 -trace help` lists the events it knows)")  # fmt: skip
    lines = [f"{label}: where the pause goes (QEMU's trace; medians of {len(pauses)}, ms)"]
    for key, what in PHASES:
        values = [p.phase_ms(key) for p in pauses]
        p95 = np.percentile(values, 95)
        lines.append(f"  {what:<34} {np.median(values):6.2f}  (p95 {p95:.2f})")
    lines.append(f"  {'pause (to RESUME)':<34} {np.median([p.total_ms for p in pauses]):6.2f}")
    names = sorted({name for p in pauses for name in p.sections})
    slowest = sorted(
        ((float(np.median([p.sections.get(n, 0.0) for p in pauses])), n) for n in names),
        reverse=True,
    )[:3]
    lines.append(
        "  slowest devices to save: "
        + ", ".join(f"{name} {ms:.2f}" for ms, name in slowest if ms > 0)
    )
    captures = [p.capture_ms for p in pauses if p.capture_ms is not None]
    if captures:
        lines.append(
            f"  disk capture's job created at {np.median(captures):.2f} ms "
            f"(in {len(captures)} of {len(pauses)} pauses)"
        )
    return "\n".join(lines)
