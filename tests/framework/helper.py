"""A ``vmckpt helper`` for a test: started with the test's environment, its lines collected,
ended by its PID (SIGTERM) when the test is done."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tests.framework.guest import REPO, wait_for

START_S = 60.0


@dataclass
class HelperProcess:
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def said(self, text: str) -> bool:
        return any(text in line for line in list(self.lines))

    def wait_said(self, text: str, timeout: float = START_S) -> None:
        wait_for(lambda: self.said(text), f"the helper saying {text!r}", timeout,
                 evidence=lambda: "\n".join(self.lines))  # fmt: skip

    def command_pids(self) -> list[int]:
        """The PIDs of the commands it ran (its -v lines 'pid N: ARGS')."""
        return [int(line.split()[3].rstrip(":")) for line in list(self.lines)
                if line.startswith("vmckpt helper: pid ") and ": exit " not in line]  # fmt: skip


@contextmanager
def running_helper(env: dict[str, str] | None = None) -> Iterator[HelperProcess]:
    """``vmckpt -v helper`` serving the runtime root of ``env`` (this process's by default)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    process = subprocess.Popen(
        [sys.executable, "-m", "vmckpt", "-v", "helper"], cwd=REPO, env=full_env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    helper = HelperProcess(process)

    def collect() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            helper.lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=collect, daemon=True)
    reader.start()
    try:
        wait_for(lambda: helper.said("serving") or process.poll() is not None,
                 "the helper serving", START_S)  # fmt: skip
        assert process.poll() is None, "\n".join(helper.lines)
        yield helper
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
        reader.join(timeout=10)
