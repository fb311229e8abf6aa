"""vmckpt/session.py without QEMU: every exit of a migration session leaves the guest as found.

Driven through the fake QEMU of tests/framework/fakeqmp.py (milliseconds per test): the
settings put back as they were (not as QEMU's defaults), a migration under way cancelled,
COLO ended by failover, the guest resumed only if it ran before, the journal written
before anything changes and removed after, a failure at each step of leaving reported
while the others are still done (the journal then kept), and ``recover`` closing what a
dead vmckpt left open.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest

from tests.framework.fakeqmp import (
    COLO,
    COMPLETED,
    FAILED,
    MIGRATION_RUNNING,
    STALL,
    FakeQemu,
)
from tests.framework.journal import owner_dies
from vmckpt.errors import CheckpointError, QMPError
from vmckpt.qmp import Monitor
from vmckpt.session import FD_NAME, MigrationSession, State, read_journal, recover

VM = "g1"
CAPABILITIES = {"events": True}
PARAMETERS = {"downtime-limit": 50, "max-bandwidth": 1 << 30}
COLO_CAPABILITIES = {"x-colo": True, "return-path": True, "events": True}


@pytest.fixture
def journal(tmp_path: Path) -> Path:
    return tmp_path / "migration.json"


def monitor(qemu: FakeQemu) -> Monitor:
    return Monitor(qemu.transport(VM), vm=VM).connect()


def session(qemu: FakeQemu, journal: Path | None, **overrides: Any) -> MigrationSession:
    """A checkpoint's session (as vmckpt/checkpoint.py opens it) on a new connection."""
    options: dict[str, Any] = {
        "capabilities": CAPABILITIES,
        "parameters": PARAMETERS,
        "journal": journal,
        "timeout_s": 5.0,
        **overrides,
    }
    return MigrationSession(monitor(qemu), vm=VM, error=CheckpointError, **options)


def settings(qemu: FakeQemu) -> tuple[dict[str, bool], dict[str, Any]]:
    return dict(qemu.capabilities), dict(qemu.parameters)


def assert_as_found(
    qemu: FakeQemu, found: tuple[dict[str, bool], dict[str, Any]], *, running: bool
) -> None:
    assert settings(qemu) == found, "the migration settings were not put back as they were"
    assert qemu.migration_status not in MIGRATION_RUNNING, qemu.migration_status
    assert qemu.fds == {}, "the migration descriptor was left with QEMU"
    assert qemu.running is running, qemu.run_state


def journal_holds_the_old_settings(journal: Path, found: dict[str, Any]) -> None:
    data = read_journal(journal)
    assert data is not None, "QEMU's settings change before the journal is written"
    assert data["owner_pid"] == os.getpid()
    assert data["capabilities"] == {k: found["capabilities"][k] for k in CAPABILITIES}
    assert data["parameters"] == {k: found["parameters"][k] for k in PARAMETERS}


def checkpoint(s: MigrationSession) -> None:
    """A checkpoint's path through the session, up to the guest running again."""
    s.socket().close()
    s.start()
    s.wait()
    s.resume()


# -- the way through -------------------------------------------------------------------------


def test_a_checkpoint_leaves_the_guest_as_found(journal: Path) -> None:
    qemu = FakeQemu()
    found = settings(qemu)
    old = {"capabilities": found[0], "parameters": found[1]}
    for command in ("migrate-set-capabilities", "migrate-set-parameters", "getfd", "migrate"):
        qemu.before(command, lambda _args: journal_holds_the_old_settings(journal, old))
    s = session(qemu, journal)
    with s:
        assert s.state.value == "open" and s.was_running
        assert qemu.capabilities["events"] and qemu.parameters["downtime-limit"] == 50
        checkpoint(s)
        stop, resume = s.pause_window()
    events = {e.name: e.timestamp for e in s.events()}
    assert (stop, resume) == (events["STOP"], events["RESUME"])
    assert resume - stop >= qemu.downtime_s
    assert_as_found(qemu, found, running=True)
    assert not journal.exists(), "the journal outlived the session"
    assert len(qemu.calls("cont")) == 1
    assert s.state is State.CLOSED


def test_settings_come_back_as_they_were_not_as_qemus_defaults(journal: Path) -> None:
    qemu = FakeQemu()
    qemu.capabilities["events"] = True
    qemu.parameters.update({"downtime-limit": 1234, "max-bandwidth": 999})
    found = settings(qemu)
    s = session(qemu, journal)
    with s:
        checkpoint(s)
    assert_as_found(qemu, found, running=True)
    assert qemu.parameters["downtime-limit"] == 1234


def test_a_parameter_retuned_mid_migration_is_put_back_too(journal: Path) -> None:
    """precopy-diff starts with a tight downtime limit and relaxes it if the migration does
    not end: the session changes only what it set, and puts it back as it was found."""
    qemu = FakeQemu(outcome=STALL)
    found = settings(qemu)
    s = session(qemu, journal)
    with pytest.raises(RuntimeError), s:
        s.socket().close()
        s.start()
        assert not s.finished_within(0.05)  # stalled: not at an end, and no error
        s.retune({"downtime-limit": 80})
        assert qemu.parameters["downtime-limit"] == 80
        with pytest.raises(ValueError, match="did not set"):
            s.retune({"multifd-channels": 4})
        raise RuntimeError("stop here")
    assert_as_found(qemu, found, running=True)
    done = FakeQemu()
    t = session(done, None)
    with t:
        t.socket().close()
        t.start()
        assert t.finished_within(5.0)
        assert t.wait() == "completed"
        t.resume()


@pytest.mark.parametrize("error", [RuntimeError("receiver broke"), KeyboardInterrupt()])
def test_an_error_mid_migration_cancels_it(journal: Path, error: BaseException) -> None:
    qemu = FakeQemu(outcome=STALL)
    found = settings(qemu)
    s = session(qemu, journal)
    with pytest.raises(type(error)), s:
        s.socket().close()
        s.start()
        assert qemu.progress() and qemu.migration_status == "active"
        raise error
    assert qemu.calls("migrate_cancel"), "the migration was not cancelled"
    assert qemu.migration_status == "cancelled"
    assert_as_found(qemu, found, running=True)
    assert not journal.exists()


def test_an_error_while_the_guest_is_stopped_resumes_it(journal: Path) -> None:
    qemu = FakeQemu()
    found = settings(qemu)
    s = session(qemu, journal)
    with pytest.raises(RuntimeError, match="disk capture"), s:
        s.socket().close()
        s.start()
        s.wait()
        assert qemu.run_state == "postmigrate"
        raise RuntimeError("disk capture failed")
    assert_as_found(qemu, found, running=True)
    assert not journal.exists()


@pytest.mark.parametrize("fail_mid_migration", [False, True])
def test_a_guest_that_was_paused_stays_paused(journal: Path, fail_mid_migration: bool) -> None:
    qemu = FakeQemu(run_state="paused", outcome=STALL if fail_mid_migration else COMPLETED)
    found = settings(qemu)
    qemu.forbid("cont", "the guest was paused before the checkpoint and must stay so")
    s = session(qemu, journal)
    with pytest.raises(RuntimeError) if fail_mid_migration else contextlib.nullcontext(), s:
        assert not s.was_running
        s.socket().close()
        s.start()
        if fail_mid_migration:
            qemu.progress()
            raise RuntimeError("receiver broke")
        s.wait()
        s.resume()
    assert_as_found(qemu, found, running=False)
    assert not journal.exists()


def test_colo_is_ended_by_failover_not_by_cancel(journal: Path) -> None:
    qemu = FakeQemu(outcome=COLO, version=(11, 1, 3))
    found = settings(qemu)
    qemu.forbid("migrate_cancel", "COLO ends only by failover (x-colo-lost-heartbeat)")
    s = session(qemu, journal, capabilities=COLO_CAPABILITIES)
    with s:
        s.socket().close()
        s.start()
        assert s.wait(accept=frozenset({"colo"})) == "colo"
        assert qemu.migration_status == "colo" and qemu.running
    assert qemu.commands().count("x-colo-lost-heartbeat") == 1
    assert qemu.migration_status == "completed"
    # The capabilities could be put back only once COLO had ended (QEMU refuses before).
    assert_as_found(qemu, found, running=True)
    assert not journal.exists()


def test_a_guest_handed_over_is_not_resumed_here(journal: Path) -> None:
    qemu = FakeQemu()
    found = settings(qemu)
    s = session(qemu, journal)
    with s:
        s.socket().close()
        s.start()
        s.wait()
        s.hand_over()
        data = read_journal(journal)
        assert data is not None and data["was_running"] is False, "a recovery would resume it"
        qemu.forbid("cont", "the guest runs on another host now")
    assert qemu.run_state == "postmigrate"
    assert_as_found(qemu, found, running=False)
    assert not journal.exists()


def test_an_incoming_session_leaves_nothing_to_put_back(journal: Path) -> None:
    qemu = FakeQemu(run_state="inmigrate")
    s = session(qemu, journal, incoming=True, parameters={})
    with s:
        s.socket().close()
        s.start()
        s.wait()
        s.resume()
        sent = len(qemu.log)
    assert qemu.running
    assert len(qemu.log) == sent, f"closing an incoming session sent {qemu.commands()[sent:]}"
    assert not journal.exists()


# -- refusals and failures -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("run_state", "migration", "capabilities", "message"),
    [
        ("postmigrate", "none", CAPABILITIES, "has not run since; resume it"),
        ("inmigrate", "none", CAPABILITIES, "the guest is in state inmigrate"),
        ("running", "active", CAPABILITIES, r"a migration is already in progress \(state active\)"),
        ("running", "none", {"events": True, "x-missing": True}, "lacks .* capabilities x-missing"),
    ],
)
def test_a_guest_that_cannot_migrate_now_is_refused_before_anything_changes(
    journal: Path, run_state: str, migration: str, capabilities: dict[str, bool], message: str
) -> None:
    qemu = FakeQemu(run_state=run_state)
    qemu.migration_status = migration  # e.g. someone else's migration under way
    found = settings(qemu)
    qemu.forbid("migrate_cancel", "the migration under way is someone else's")
    s = session(qemu, journal, capabilities=capabilities)
    with pytest.raises(CheckpointError, match=message) as refused:
        s.open()
    assert refused.value.vm == VM and refused.value.step == "prepare"
    assert settings(qemu) == found
    changing = {"migrate-set-capabilities", "migrate-set-parameters", "cont", "stop"}
    assert not changing & set(qemu.commands()), qemu.commands()
    assert not journal.exists()


def test_open_failing_halfway_puts_back_what_it_had_set(journal: Path) -> None:
    qemu = FakeQemu()
    found = settings(qemu)
    qemu.fail("migrate-set-parameters", desc="bad value")
    s = session(qemu, journal)
    with pytest.raises(CheckpointError, match="bad value") as failed:
        s.open()
    assert failed.value.step == "migrate-set-parameters"
    assert_as_found(qemu, found, running=True)
    assert not journal.exists()


def test_a_failed_migration_is_reported_with_qemus_reason(journal: Path) -> None:
    qemu = FakeQemu(outcome=FAILED, error_desc="Unable to write to socket: Broken pipe")
    found = settings(qemu)
    qemu.forbid("migrate_cancel", "a failed migration has nothing left to cancel")
    s = session(qemu, journal)
    with pytest.raises(CheckpointError) as failed, s:
        s.socket().close()
        s.start()
        s.wait()
    assert "QEMU's migration failed: Unable to write to socket: Broken pipe" in str(failed.value)
    assert failed.value.one_line().startswith(f"guest {VM}, during migrate:")
    assert_as_found(qemu, found, running=True)
    assert not journal.exists()


def test_a_migration_that_does_not_finish_in_time_is_cancelled(journal: Path) -> None:
    qemu = FakeQemu(outcome=STALL)
    found = settings(qemu)
    s = session(qemu, journal, timeout_s=0.05)
    with pytest.raises(CheckpointError, match="did not finish within"), s:
        s.socket().close()
        s.start()
        s.wait()
    assert qemu.migration_status == "cancelled"
    assert_as_found(qemu, found, running=True)


def test_calls_out_of_order_are_refused() -> None:
    qemu = FakeQemu()
    s = session(qemu, None)
    with pytest.raises(CheckpointError, match="session is new, not open"):
        s.start()
    with s:
        with pytest.raises(CheckpointError, match="session is open, not completed"):
            s.resume()
        s.start("unix:/nowhere")
        with pytest.raises(CheckpointError, match="session is migrating, not open"):
            s.socket()
        with pytest.raises(CheckpointError, match="session is migrating, not completed"):
            s.hand_over()
        s.wait()
        s.resume()
    assert qemu.running


def test_resume_retries_while_qemu_finalizes_the_migration(journal: Path) -> None:
    qemu = FakeQemu()
    s = session(qemu, journal)
    with s:
        s.socket().close()
        s.start()
        s.wait()
        qemu.fail("cont", desc="Migration is not finalized yet", times=3)
        s.resume()
        assert qemu.running
    assert [c.outcome for c in qemu.calls("cont")] == ["refused GenericError"] * 3 + ["ok"]


def test_a_resume_qemu_refuses_is_reported(journal: Path) -> None:
    qemu = FakeQemu()
    s = session(qemu, journal)
    with pytest.raises(CheckpointError, match="resetting") as failed, s:
        s.socket().close()
        s.start()
        s.wait()
        qemu.fail("cont", desc="resetting", times=None)
        s.resume()
    assert failed.value.step == "resume"
    assert journal.exists(), "the guest is not running: the journal must stay for a retry"


# Each step of leaving, as leave_as_found names it, and the fault that makes it fail.
LEAVING = [
    ("ending the migration", "query-migrate", False),
    ("restoring migration capabilities", "migrate-set-capabilities", False),
    ("restoring migration parameters", "migrate-set-parameters", False),
    ("resuming the guest", "query-status", False),
    ("resuming the guest", "cont", False),
    ("closing the migration descriptor", "closefd", True),  # a refusal is quiet: lost
]


@pytest.mark.parametrize(("step", "command", "lost"), LEAVING)
@pytest.mark.parametrize("with_error", [False, True])
def test_a_step_of_leaving_that_fails_is_reported_and_the_others_still_done(
    journal: Path, step: str, command: str, lost: bool, with_error: bool
) -> None:
    qemu = FakeQemu()
    caps, params = settings(qemu)
    s = session(qemu, journal)
    mark = 0
    # Leaving after a normal exit raises the problem; after the caller's own error, that
    # error goes on (the problem is logged).
    expected_error = (RuntimeError, "the caller's") if with_error else (CheckpointError, step)
    with pytest.raises(expected_error[0], match=expected_error[1]) as raised, s:
        s.socket().close()
        s.start()
        s.wait()  # the guest is stopped (postmigrate): leaving must resume it
        qemu.fail(command, desc="fake refusal", lost=lost, times=None)
        mark = len(qemu.log)
        if with_error:
            raise RuntimeError("the caller's own error wins")
    error = raised.value
    if isinstance(error, CheckpointError):
        assert error.step == "restore-settings" and error.vm == VM
        assert f"{step}: " in error.message, error.message
        assert "\n" not in str(error)
    leaving = qemu.commands()[mark:]
    # Every step was tried, whichever failed (after a lost connection, nothing reaches QEMU).
    tried = ["query-migrate", "migrate-set-capabilities", "migrate-set-parameters", "closefd"]
    assert [c for c in leaving if c in tried] == tried
    assert lost or "query-status" in leaving
    assert journal.exists(), "a step failed: the journal must stay for the next command"
    if lost:
        return
    assert (qemu.capabilities == caps) is (command != "migrate-set-capabilities")
    assert (qemu.parameters == params) is (command != "migrate-set-parameters")
    assert qemu.fds == {}
    assert qemu.running is (step != "resuming the guest")


# -- recover: what a dead vmckpt left ----------------------------------------------------------


def abandoned(qemu: FakeQemu, journal: Path, until: str, **options: Any) -> None:
    """A session that got as far as ``until`` (migrating, completed, colo) when its vmckpt was
    killed: nothing of its closing ran."""
    s = session(qemu, journal, **options)
    s.open()
    s.start("unix:/nowhere")
    if until != "migrating":
        s.wait(accept=frozenset({until}))
    owner_dies(journal)


@pytest.mark.parametrize(
    ("outcome", "until", "ending"),
    [
        (STALL, "migrating", "migrate_cancel"),
        (COMPLETED, "completed", None),
        (COLO, "colo", "x-colo-lost-heartbeat"),
    ],
)
def test_recover_closes_a_session_its_dead_owner_left(
    journal: Path, outcome: str, until: str, ending: str | None
) -> None:
    qemu = FakeQemu(outcome=outcome)
    found = settings(qemu)
    capabilities = COLO_CAPABILITIES if outcome == COLO else CAPABILITIES
    abandoned(qemu, journal, until, capabilities=capabilities)
    assert settings(qemu) != found
    mark = len(qemu.log)
    with monitor(qemu) as mon:  # the next vmckpt command's connection
        assert recover(mon, journal, vm=VM) is True
    sent = qemu.commands()[mark:]
    if ending is not None:
        assert ending in sent
    assert ("cont" in sent) is (until == "completed")  # only a stopped guest is resumed
    assert_as_found(qemu, found, running=True)
    assert not journal.exists()


def test_recover_leaves_a_live_owners_session_alone(journal: Path) -> None:
    qemu = FakeQemu(outcome=STALL)
    s = session(qemu, journal)
    s.open()
    s.start("unix:/nowhere")  # its owner (this process) is alive and working
    mark = len(qemu.log)
    with monitor(qemu) as mon:
        assert recover(mon, journal, vm=VM) is False
    assert qemu.commands()[mark:] == []
    assert journal.exists() and qemu.migration_status == "setup"
    s.close()
    assert not journal.exists()


def test_recover_without_a_journal_does_nothing(journal: Path) -> None:
    qemu = FakeQemu()
    with monitor(qemu) as mon:
        assert recover(mon, journal, vm=VM) is False
    assert qemu.log == []


def test_recover_does_not_resume_a_guest_handed_over_or_receiving(journal: Path) -> None:
    qemu = FakeQemu()
    s = session(qemu, journal)
    s.open()
    s.start("unix:/nowhere")
    s.wait()
    s.hand_over()
    owner_dies(journal)
    qemu.forbid("cont", "the guest runs at the destination")
    with monitor(qemu) as mon:
        assert recover(mon, journal, vm=VM) is True
    assert qemu.run_state == "postmigrate" and not journal.exists()

    receiving = FakeQemu(run_state="inmigrate")
    abandoned(receiving, journal, "completed", incoming=True, parameters={})
    receiving.forbid("cont", "an incoming QEMU's caller decides whether it runs")
    with monitor(receiving) as mon:
        assert recover(mon, journal, vm=VM) is True
    assert receiving.run_state == "paused" and not journal.exists()


def test_a_recovery_that_fails_keeps_the_journal_and_a_retry_finishes(journal: Path) -> None:
    qemu = FakeQemu()
    found = settings(qemu)
    abandoned(qemu, journal, "completed")
    qemu.fail("migrate-set-parameters", desc="not now")
    with monitor(qemu) as mon, pytest.raises(QMPError, match="not now") as failed:
        recover(mon, journal, vm=VM)
    assert failed.value.step == "recover" and failed.value.vm == VM
    assert "restoring migration parameters" in failed.value.message
    assert journal.exists()
    assert qemu.running, "the other steps were still done"
    with monitor(qemu) as mon:
        assert recover(mon, journal, vm=VM) is True
    assert_as_found(qemu, found, running=True)
    assert not journal.exists()


def test_an_unreadable_journal_is_removed_not_acted_on(journal: Path) -> None:
    journal.write_text('{"vm": "g1", "owner_pid": ')
    qemu = FakeQemu()
    with monitor(qemu) as mon:
        assert recover(mon, journal, vm=VM) is False
    assert not journal.exists()
    assert qemu.log == []


def test_a_lost_connection_while_leaving_is_recovered_by_the_next_command(journal: Path) -> None:
    """The session's monitor breaks as it leaves: it reports, keeps the journal; once its
    owner is gone, the next command's recover finishes on a new connection."""
    qemu = FakeQemu()
    found = settings(qemu)
    s = session(qemu, journal)
    with pytest.raises(CheckpointError, match="lost the monitor connection"), s:
        s.socket().close()
        s.start()
        s.wait()
        qemu.fail("migrate-set-capabilities", lost=True)
    assert not qemu.running and journal.exists()
    owner_dies(journal)
    with monitor(qemu) as mon:
        assert recover(mon, journal, vm=VM) is True
    assert_as_found(qemu, found, running=True)
    assert FD_NAME not in qemu.fds
