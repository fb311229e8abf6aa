"""A migration journal (vmckpt/session.py) whose owner has died, as a killed vmckpt leaves it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from vmckpt.machine.qemu import process_start_time


def owner_dies(journal: Path) -> None:
    """The journal's owner is gone: it names a process (PID and start time) that has ended."""
    stand_in = subprocess.Popen(["sleep", "60"])
    start = process_start_time(stand_in.pid)
    stand_in.kill()  # our own child, by its handle
    stand_in.wait()
    data = json.loads(journal.read_text())
    data.update(owner_pid=stand_in.pid, owner_start=start)
    journal.write_text(json.dumps(data))
