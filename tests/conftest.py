"""Fixtures that boot the real test guest under QEMU (TCG) through the vmckpt CLI.

Every guest a test starts is registered with the store it lives in; at
teardown every QEMU that the store's records name is ended by its PID and
start time, never by name.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vmckpt.machine import GuestRecord

REPO = Path(__file__).resolve().parent.parent
GUEST_BUILD = REPO / "guest" / "build"
STATE_LINE = re.compile(r"^STATE seq=(\d+) sum=([0-9a-f]{16}) ok$")
BAD_LINE = re.compile(r"\bBAD\b")
BOOT_TIMEOUT = 120.0


@dataclass(frozen=True)
class State:
    seq: int
    sum: str


def parse_states(text: str) -> list[State]:
    """Every complete STATE line; a line torn by a checkpoint at the log's start is skipped."""
    return [
        State(int(m.group(1)), m.group(2))
        for line in text.splitlines()
        if (m := STATE_LINE.match(line.strip()))
    ]


@dataclass
class Vmckpt:
    """Runs the vmckpt CLI the way a user does and keeps track of what it started."""

    store: Path
    started: set[str] = field(default_factory=set)

    def __call__(
        self,
        *args: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        full_env = dict(os.environ)
        full_env.update(env or {})
        result = subprocess.run(
            [sys.executable, "-m", "vmckpt", *args],
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout,
            cwd=REPO,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"vmckpt {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result

    def run_guest(
        self, name: str, *, memory: str = "256M", pages: int = 4, buf_mb: int = 64
    ) -> None:
        self.started.add(name)
        self(
            "run", name, "--store", str(self.store),
            "--kernel", str(GUEST_BUILD / "vmlinuz"),
            "--initrd", str(GUEST_BUILD / "initrd.img"),
            "--append", guest_append(pages=pages, buf_mb=buf_mb),
            "--memory", memory, "--accel", "tcg", "--detach",
        )  # fmt: skip

    def restore(self, *extra: str) -> subprocess.CompletedProcess[str]:
        result = self("restore", "--store", str(self.store), "--detach", "--json", *extra)
        name = extra[extra.index("--name") + 1] if "--name" in extra else None
        if name:
            self.started.add(name)
        return result

    def serial(self, name: str) -> str:
        return (self.store / "guests" / name / "serial.log").read_text(errors="replace")

    def states(self, name: str) -> list[State]:
        return parse_states(self.serial(name))

    def wait_states(self, name: str, count: int, timeout: float = BOOT_TIMEOUT) -> list[State]:
        """Wait until the guest has printed ``count`` STATE lines in its current log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.states(name)
            if len(states) >= count:
                return states
            time.sleep(0.2)
        raise AssertionError(
            f"guest {name} printed fewer than {count} STATE lines in {timeout:.0f} s:\n"
            + self.serial(name)[-2000:]
        )

    def last_seq(self, name: str) -> int:
        states = self.states(name)
        return states[-1].seq if states else -1

    def kill_all(self) -> None:
        guests = self.store / "guests"
        if not guests.is_dir():
            return
        for runtime in guests.iterdir():
            try:
                record = GuestRecord.load(runtime, runtime.name)
            except Exception:
                continue
            if record.process is not None:
                record.process.kill()


def guest_append(*, pages: int, buf_mb: int) -> str:
    return f"console=ttyS0 quiet panic=-1 vmckpt.buf_mb={buf_mb} vmckpt.pages={pages}"


@pytest.fixture(scope="session")
def guest_images() -> Path:
    """The test guest, built by `make -C guest` (a no-op when up to date)."""
    subprocess.run(["make", "-s", "-C", str(REPO / "guest")], check=True)
    for name in ("vmlinuz", "initrd.img"):
        assert (GUEST_BUILD / name).is_file(), f"guest/build/{name} was not built"
    return GUEST_BUILD


@pytest.fixture
def store_dir() -> Iterator[Path]:
    # A short path: QEMU's QMP socket lives inside the store (108-byte limit).
    path = Path(tempfile.mkdtemp(prefix="vk-", dir="/tmp"))
    try:
        yield path / "store"
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def vmckpt(store_dir: Path, guest_images: Path) -> Iterator[Vmckpt]:
    runner = Vmckpt(store_dir)
    try:
        yield runner
    finally:
        runner.kill_all()
