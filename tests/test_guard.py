"""vmckpt/guard.py without QEMU: released, the guard exits without acting; its parent dead,
it recovers the guest.

The recovery runs in this process against the fake QEMU (tests/framework/fakeqmp.py); the
pipe protocol runs with real processes: a guard released by a real ``Guard``, and a real
vmckpt-like parent that opens a migration session on a QMP socket the fake serves and is
killed (SIGKILL, by its PID) in the middle of it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.framework.fakeqmp import STALL, FakeQemu, FakeQmpServer
from tests.framework.guest import REPO, wait_for
from tests.framework.journal import owner_dies
from vmckpt import guard
from vmckpt.errors import CheckpointError, QMPError, StoreError
from vmckpt.images import Store
from vmckpt.machine.qemu import process_start_time
from vmckpt.mechanisms.pageserver import records
from vmckpt.qmp import Monitor
from vmckpt.session import JOURNAL, MigrationSession

VM = "g1"
EXIT_S = 30.0  # a Python process starting and ending on 2 busy cores


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store.create(tmp_path / "store")


def journal_of(store: Store) -> Path:
    return store.host.journal_path(VM, JOURNAL)


def guard_args(store: Store, qmp: Path) -> argparse.Namespace:
    """What ``python -m vmckpt.guard`` parses from Guard.for_qmp's command line."""
    return argparse.Namespace(
        store=str(store.path), name=VM, kind="guest", qmp=str(qmp), libvirt_uri=None
    )


def left_open_by_a_dead_checkpoint(qemu: FakeQemu, journal: Path) -> None:
    """A checkpoint's session, migrating, whose vmckpt died: its journal names a process that
    has ended (PID and start time)."""
    mon = Monitor(qemu.transport(VM), vm=VM).connect()
    session = MigrationSession(
        mon, vm=VM, error=CheckpointError, capabilities={"events": True},
        parameters={"downtime-limit": 50}, journal=journal,
    )  # fmt: skip
    session.open()
    session.start("unix:/nowhere")
    owner_dies(journal)


@pytest.fixture
def fake_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeQemu, list[Path]]]:
    """Monitor.unix connects to the fake QEMU instead of a socket; the paths asked for are
    recorded."""
    qemu = FakeQemu(outcome=STALL)
    asked: list[Path] = []

    def unix(address: Any, *, vm: str | None = None, timeout: float = 10.0) -> Monitor:
        asked.append(Path(address))
        return Monitor(qemu.transport(vm), vm=vm, timeout=timeout).connect()

    monkeypatch.setattr(Monitor, "unix", unix)
    yield qemu, asked


# -- the recovery, in this process -------------------------------------------------------------


def test_the_guard_recovers_what_its_dead_parent_left(
    store: Store, tmp_path: Path, fake_socket: tuple[FakeQemu, list[Path]]
) -> None:
    qemu, asked = fake_socket
    found = (dict(qemu.capabilities), dict(qemu.parameters))
    journal = journal_of(store)
    left_open_by_a_dead_checkpoint(qemu, journal)

    def holds_the_lock(_args: dict[str, Any]) -> None:
        assert store.host.guest_locked(VM), "the guard recovers without the guest's checkpoint lock"

    qemu.before("migrate_cancel", holds_the_lock)
    assert guard._recover(guard_args(store, tmp_path / "qmp.sock")) == 0
    assert asked == [tmp_path / "qmp.sock"]
    assert qemu.calls("migrate_cancel") and qemu.migration_status == "cancelled"
    assert (dict(qemu.capabilities), dict(qemu.parameters)) == found
    assert qemu.running
    assert not journal.exists()


def test_without_a_journal_the_guard_does_not_even_connect(
    store: Store, tmp_path: Path, fake_socket: tuple[FakeQemu, list[Path]]
) -> None:
    qemu, asked = fake_socket
    assert guard._recover(guard_args(store, tmp_path / "qmp.sock")) == 0
    assert asked == [] and qemu.log == []
    # Nor does it make the guest's directories (a guard outliving its guest and store).
    assert not store.host.has_runtime(VM)
    assert not store.host.data_path(VM).exists()


def test_a_page_server_outliving_its_guest_makes_no_directory_again(store: Store) -> None:
    """A lazy restore's page server writes its records into the guest's runtime directory
    while it is there; once a teardown removed it (the guest's QEMU killed, its store and
    directories removed: a test's scratch), a last record fails in one line instead of
    making the directory again (seen: a CI run left /tmp/vk-b-*/b/vmckpt_runtime_dir)."""
    with pytest.raises(StoreError, match="No such file"):  # nor before the restore made it
        records.write(store, VM, records.RECORD, {"state": "serving"})
    store.host.runtime_dir(VM)  # as the restore command does
    records.write(store, VM, records.RECORD, {"state": "serving"})
    assert store.host.read_record(VM, records.RECORD) == {"state": "serving"}
    shutil.rmtree(store.host.runtime)
    with pytest.raises(StoreError, match="No such file"):
        records.write(store, VM, records.DONE, {"state": "done"})
    assert not store.host.runtime.exists()


def test_a_recovery_that_fails_is_logged_and_keeps_the_journal(
    store: Store,
    tmp_path: Path,
    fake_socket: tuple[FakeQemu, list[Path]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    qemu, _ = fake_socket
    journal = journal_of(store)
    left_open_by_a_dead_checkpoint(qemu, journal)
    qemu.fail("migrate-set-parameters", desc="not now", times=None)
    with caplog.at_level(logging.ERROR, logger="vmckpt.guard"):
        assert guard._recover(guard_args(store, tmp_path / "qmp.sock")) == 1
    assert journal.exists(), "the next vmckpt command must be able to retry"
    assert any("recovery failed" in r.message and "not now" in r.message for r in caplog.records), (
        caplog.text
    )
    assert qemu.migration_status == "cancelled", "the other steps were still done"


def test_a_monitor_that_never_answers_is_given_up_on(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    journal = journal_of(store)
    left_open_by_a_dead_checkpoint(FakeQemu(outcome=STALL), journal)
    tries: list[Path] = []

    def unreachable(address: Any, **_: Any) -> Monitor:
        tries.append(Path(address))
        raise QMPError("nobody listens there", vm=VM, step="connect")

    monkeypatch.setattr(Monitor, "unix", unreachable)
    monkeypatch.setattr(guard, "CONNECT_RETRY_S", 0.0)
    with caplog.at_level(logging.ERROR, logger="vmckpt.guard"):
        assert guard._recover(guard_args(store, tmp_path / "qmp.sock")) == 1
    assert tries and journal.exists()
    assert "cannot recover" in caplog.text and "nobody listens there" in caplog.text


# -- the pipe protocol --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pieces", "released"),
    [
        ([guard.RELEASE], True),
        ([b"rel", b"ease\n"], True),  # a release that arrives in pieces
        ([], False),  # the parent died: the pipe ended
        ([b"rel"], False),  # the parent died while writing
        ([b"bye\n"], False),  # not a release
    ],
)
def test_only_a_complete_release_releases(pieces: list[bytes], released: bool) -> None:
    read_fd, write_fd = os.pipe()
    try:
        for piece in pieces:
            os.write(write_fd, piece)
        os.close(write_fd)
        write_fd = -1
        assert guard.wait_for_parent(read_fd) is released
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)


def guard_processes(store: Store) -> list[int]:
    """PIDs of the guard processes working for ``store`` (their command lines name it)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                argv = (proc / "cmdline").read_bytes().split(b"\0")
                if b"vmckpt.guard" in argv and os.fsencode(store.path) in argv:
                    pids.append(int(proc.name))
    return pids


@contextlib.contextmanager
def ended_afterwards(store: Store) -> Iterator[None]:
    """Whatever happens, no guard of ``store`` outlives the test (killed by PID: a guard
    ignores SIGTERM)."""
    try:
        yield
    finally:
        for pid in guard_processes(store):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_released_guard_exits_without_acting(store: Store, tmp_path: Path) -> None:
    qemu = FakeQemu(outcome=STALL)
    journal = journal_of(store)
    left_open_by_a_dead_checkpoint(qemu, journal)  # it would recover this, were it to act
    mark = len(qemu.log)
    with (
        ended_afterwards(store),
        FakeQmpServer(qemu, tmp_path / "qmp.sock") as server,
    ):
        with guard.Guard.for_qmp(store=store.path, name=VM, kind="guest",
                                 qmp_socket=server.path):  # fmt: skip
            # Found once it runs Python (a child between fork and exec shows our command line).
            pids = wait_for(lambda: guard_processes(store), "the guard's start", EXIT_S)
            assert len(pids) == 1, pids
        wait_for(lambda: process_start_time(pids[0]) is None, "the released guard's exit", EXIT_S)
        assert server.errors == []
    assert server.connections == 0, "a released guard connected to the guest"
    assert qemu.log[mark:] == []
    assert journal.exists()


PARENT = """
import sys
from pathlib import Path
from vmckpt.errors import CheckpointError
from vmckpt.guard import Guard
from vmckpt.images import Store
from vmckpt.qmp import Monitor
from vmckpt.session import JOURNAL, MigrationSession

store, name, qmp = Store(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
with Guard.for_qmp(store=store.path, name=name, kind="guest", qmp_socket=qmp):
    mon = Monitor.unix(qmp, vm=name)
    session = MigrationSession(
        mon, vm=name, error=CheckpointError, capabilities={"events": True},
        parameters={"downtime-limit": 50}, journal=store.host.journal_path(name, JOURNAL),
    )
    session.open()
    session.start("unix:/nowhere")
    print("migrating", flush=True)
    sys.stdin.read()  # until killed
"""


def test_a_guard_whose_parent_is_killed_recovers_the_guest(store: Store, tmp_path: Path) -> None:
    qemu = FakeQemu(outcome=STALL)
    found = (dict(qemu.capabilities), dict(qemu.parameters))
    journal = journal_of(store)
    with (
        ended_afterwards(store),
        FakeQmpServer(qemu, tmp_path / "qmp.sock") as server,
    ):
        parent = subprocess.Popen(
            [sys.executable, "-c", PARENT, str(store.path), VM, str(server.path)],
            cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert parent.stdout is not None
            assert parent.stdout.readline() == "migrating\n", "the parent did not get going"
            assert journal.exists() and qemu.capabilities["events"]
            pids = wait_for(lambda: guard_processes(store), "the guard's start", EXIT_S)
            assert len(pids) == 1, pids
            parent.send_signal(signal.SIGKILL)  # our own child, by its handle
        finally:
            if parent.poll() is None:
                parent.kill()
            parent.wait()
            if parent.stdin is not None:
                parent.stdin.close()
            if parent.stdout is not None:
                parent.stdout.close()
        wait_for(lambda: not journal.exists(), "the guard's recovery", EXIT_S)
        wait_for(lambda: process_start_time(pids[0]) is None, "the guard's exit", EXIT_S)
        assert server.errors == []
    assert server.connections == 2, "the parent's connection, then the guard's"
    assert qemu.calls("migrate_cancel") and qemu.migration_status == "cancelled"
    assert (dict(qemu.capabilities), dict(qemu.parameters)) == found
    assert qemu.running
