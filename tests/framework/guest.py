"""The test harness for real guests: run the vmckpt CLI as a user does, read the guest's
console, and check that a restored guest continues exactly where it was.

zdtm-style: the test guest's workload checks itself (its STATE lines say ``ok``
only while its buffer matches its checksum) and is deterministic, so a restored
guest must print, for every step, the very checksum the original printed.

Every QEMU a runner starts lives in the runner's store; :meth:`Vmckpt.kill_all`
ends each by the PID and start time the store recorded, never by name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from vmckpt.errors import StoreError
from vmckpt.guests.local import GuestRecord, LocalGuest, local_guest_names
from vmckpt.images import Store
from vmckpt.machine.qemu import SERIAL_LOG
from vmckpt.qmp import Monitor

REPO = Path(__file__).resolve().parent.parent.parent
GUEST_BUILD = REPO / "guest" / "build"
STATE_LINE = re.compile(r"^STATE seq=(\d+) sum=([0-9a-f]{16}) ok$")
BOOT_TIMEOUT = 120.0
POLL_S = 0.1
# For a command whose stderr a test checks: every object left for the garbage collector to
# close (an event loop, a socket, a file) says so there, instead of only when the
# collector happens to run in an order that makes its finalizer print a traceback.
LEAKS_SHOWN = {"PYTHONWARNINGS": "always::ResourceWarning"}

T = TypeVar("T")


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


def guest_append(*, pages: int, buf_mb: int) -> str:
    return f"console=ttyS0 quiet panic=-1 vmckpt.buf_mb={buf_mb} vmckpt.pages={pages}"


def wait_for(
    condition: Callable[[], T | None],
    what: str,
    timeout: float,
    *,
    poll: float = POLL_S,
    evidence: Callable[[], object] | None = None,
) -> T:
    """Wait until ``condition()`` returns something true and return it (so a condition can
    hand back what it found: ``wait_for(lambda: states if len(states := ...) >= n else
    None, ...)``). The one wait loop of the tests: ``poll`` is only how often it looks.

    If ``timeout`` passes first: AssertionError saying what did not happen, what the
    condition last returned, and ``evidence()`` (a console's tail, a log...). An exception
    the condition raises goes through at once."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            message = f"{what} did not happen within {timeout:.0f} s (last seen: {value!r})"
            if evidence is not None:
                message += f"; evidence:\n{evidence()}"
            raise AssertionError(message)
        time.sleep(poll)


def tail(text: str, lines: int = 20) -> str:
    """The last ``lines`` lines of a console or log, for a failure message."""
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def open_store(path: Path) -> Store | None:
    """The store at ``path``, or None if there is none (yet): teardown asks before it looks."""
    try:
        return Store(path)
    except StoreError:
        return None


@dataclass
class Vmckpt:
    """Runs the vmckpt CLI the way a user does and keeps track of what it started."""

    store: Path
    media: Path = GUEST_BUILD
    env: dict[str, str] = field(default_factory=dict)  # e.g. VMCKPT_QEMU for every command
    started: set[str] = field(default_factory=set)

    def __call__(
        self,
        *args: str,
        check: bool = True,
        env: dict[str, str] | None = None,
        timeout: float = 300,
    ) -> subprocess.CompletedProcess[str]:
        full_env = dict(os.environ)
        full_env.update(self.env)
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
        self,
        name: str,
        *,
        memory: str = "256M",
        pages: int = 4,
        buf_mb: int = 64,
        extra: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.started.add(name)
        self(
            "run", name, "--store", str(self.store), "--create",
            "--kernel", str(self.media / "vmlinuz"), "--initrd", str(self.media / "initrd.img"),
            "--append", guest_append(pages=pages, buf_mb=buf_mb),
            "--memory", memory, "--accel", "tcg", "--detach", *extra, env=env,
        )  # fmt: skip

    def restore(
        self, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = self("restore", "--store", str(self.store), "--detach", "--json", *extra, env=env)
        name = extra[extra.index("--name") + 1] if "--name" in extra else None
        if name:
            self.started.add(name)
        return result

    def checkpoint(self, name: str, *extra: str) -> dict[str, object]:
        out = self("checkpoint", name, "--store", str(self.store), "--json", *extra).stdout
        row = json.loads(out)
        assert isinstance(row, dict)
        return row

    def listing(self) -> dict[str, list[dict[str, object]]]:
        data = json.loads(self("list", "--store", str(self.store), "--json").stdout)
        assert isinstance(data, dict)
        return data

    def guest(self, name: str) -> LocalGuest:
        return LocalGuest(Store(self.store), name)

    def monitor(self, name: str) -> Monitor:
        """A QMP connection to a running guest of this store (its socket from the record)."""
        return self.guest(name).monitor()

    def runtime(self, name: str) -> Path:
        """A guest's runtime directory on this host (its record, console, journal)."""
        return Store(self.store).host.runtime_path(name)

    def serial(self, name: str) -> str:
        log = self.runtime(name) / SERIAL_LOG
        return log.read_text(errors="replace") if log.exists() else ""

    def states(self, name: str) -> list[State]:
        return parse_states(self.serial(name))

    def wait_states(self, name: str, count: int, timeout: float = BOOT_TIMEOUT) -> list[State]:
        """Wait until the guest has printed ``count`` STATE lines in its current log."""
        return wait_for(
            lambda: states if len(states := self.states(name)) >= count else None,
            f"guest {name} printing {count} STATE lines",
            timeout,
            evidence=lambda: f"console of {name}:\n{tail(self.serial(name))}",
        )

    def last_seq(self, name: str) -> int:
        states = self.states(name)
        return states[-1].seq if states else -1

    def records(self) -> list[GuestRecord]:
        store = open_store(self.store)
        if store is None:
            return []
        records = []
        for name in local_guest_names(store):
            with contextlib.suppress(Exception):
                records.append(LocalGuest(store, name).record)
        return records

    def kill_all(self) -> None:
        for record in self.records():
            if record.process is not None:
                record.process.kill()


@dataclass(frozen=True)
class Taken:
    layer: str
    before: int  # last seq the guest printed before the checkpoint started
    after: int  # last seq printed once the checkpoint command returned
    pages: int
    bytes: int
    pause_ms: float
    mechanism: str = ""


def take(vmckpt: Vmckpt, name: str) -> Taken:
    before = vmckpt.last_seq(name)
    out = vmckpt.checkpoint(name)
    after = vmckpt.last_seq(name)
    return Taken(
        str(out["layer"]), before, after, int(str(out["pages_stored"])), int(str(out["bytes"])),
        float(str(out["pause_ms"])), str(out["mechanism"]),
    )  # fmt: skip


def assert_continues(restored: list[State], original: list[State], taken: Taken) -> None:
    """The restored guest starts where the checkpoint was taken and, step for step, prints
    the checksums the original printed."""
    assert restored, "the restored guest printed no STATE line"
    first = restored[0].seq
    assert taken.before <= first <= taken.after + 1, (
        f"restored guest starts at seq {first}, checkpoint was taken between "
        f"seq {taken.before} and {taken.after}"
    )
    seqs = [s.seq for s in restored]
    assert seqs == list(range(first, first + len(seqs))), f"seq does not increase by one: {seqs}"
    by_seq = {s.seq: s.sum for s in original}
    overlap = [s for s in restored if s.seq in by_seq]
    assert overlap, "no step of the restored run overlaps the original run"
    for state in overlap:
        assert state.sum == by_seq[state.seq], f"seq {state.seq}: checksum differs from original"


def assert_guest_untouched(vmckpt: Vmckpt, name: str) -> None:
    """Running, no migration, migration settings at QEMU's defaults, and still counting."""
    with vmckpt.monitor(name) as mon:
        assert mon.status() == "running"
        assert mon.query_migrate().status not in {"setup", "active", "device", "cancelling", "colo"}
        caps = mon.migrate_capabilities()
        assert caps["events"] is False, "migration events left on"
        assert caps.get("x-colo", False) is False, "x-colo left on"
        assert caps.get("return-path", False) is False, "return-path left on"
        parameters = mon.migrate_parameters()
        assert parameters["downtime-limit"] == 300, "downtime-limit left changed"
        assert parameters["max-bandwidth"] == 134217728, "max-bandwidth left changed"
        assert parameters.get("x-checkpoint-delay", 20000) == 20000, "x-checkpoint-delay changed"
    seq = vmckpt.last_seq(name)
    vmckpt.wait_states(name, len(vmckpt.states(name)) + 3, timeout=30)
    assert vmckpt.last_seq(name) > seq
    assert "BAD" not in vmckpt.serial(name)


@contextlib.contextmanager
def sigint_disposition(*, ignored: bool) -> Iterator[None]:
    """Inside, SIGINT is ignored (as in a background job of a script, which every process
    it starts inherits) or raises KeyboardInterrupt in this process, whose children start
    with the default action (a Python handler is not inherited across exec); whatever this
    test process was started with."""
    handler = signal.SIG_IGN if ignored else signal.default_int_handler
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def one_line_error(
    result: subprocess.CompletedProcess[str], *needles: str, code: int | None = None
) -> str:
    """The command failed (with ``code``), saying so in one line that holds every needle."""
    assert result.returncode != 0, result.stdout
    if code is not None:
        assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def snapshot(store: Path) -> dict[str, str]:
    """Path -> sha256 of every file under the store's layers (what must not change); empty
    if the store has no layers directory (yet)."""
    layers = Store(store).layers_path
    return {
        str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(layers.rglob("*"))
        if p.is_file()
    }


def qemu_pids_of(store: Path) -> list[int]:
    """PIDs of live QEMU processes of this store (ours only): their command lines name the
    store's runtime directory on this host (sockets, logs), or the store."""
    marks = [str(store).encode()]
    opened = open_store(store)
    if opened is not None:
        marks.append(str(opened.host.runtime).encode())
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            stat = (proc / "stat").read_text()
            ours = any(mark in cmdline for mark in marks)
            if ours and b"qemu-system" in cmdline and ") Z" not in stat:
                pids.append(int(proc.name))
    return pids
