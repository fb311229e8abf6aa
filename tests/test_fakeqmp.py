"""The fake QEMU itself (tests/framework/fakeqmp.py): a checker is tested with wrong input.

A fake that answered every command would let a test of vmckpt pass that sends the wrong
one; these tests show it refuses what QEMU refuses, rejects what it does not play, and
moves a migration only while someone waits.
"""

from __future__ import annotations

import pytest

from tests.framework.fakeqmp import (
    COMPLETED,
    STALL,
    FakeQemu,
    UnexpectedCommand,
)
from vmckpt.errors import QMPError
from vmckpt.qmp import CommandRefused, Monitor


def connected(qemu: FakeQemu) -> Monitor:
    return Monitor(qemu.transport("g"), vm="g").connect()


def test_a_command_the_fake_does_not_play_is_rejected_not_answered() -> None:
    qemu = FakeQemu()
    mon = connected(qemu)
    with pytest.raises(UnexpectedCommand, match="does not play 'x-no-such-command'"):
        mon.execute("x-no-such-command", {"a": 1})
    assert qemu.log[-1].outcome == "unknown"
    # Nor can a test script a command the fake does not know (a typo would fail silently).
    with pytest.raises(UnexpectedCommand, match="cannot script it"):
        qemu.fail("migrate-cancel")  # QEMU's command is migrate_cancel


def test_arguments_qemu_would_not_parse_are_rejected() -> None:
    qemu = FakeQemu()
    mon = connected(qemu)
    with pytest.raises(UnexpectedCommand, match="state 'on'"):
        mon.execute(
            "migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": "on"}]}
        )
    with pytest.raises(UnexpectedCommand, match="takes no argument"):
        mon.execute("query-status", {"verbose": True})
    with pytest.raises(UnexpectedCommand, match="'uri' must be a string"):
        mon.execute("migrate", {"uri": 7})
    assert qemu.capabilities["events"] is False  # nothing of it took effect
    assert [c.outcome for c in qemu.log] == ["malformed"] * 3


def test_it_refuses_what_qemu_refuses() -> None:
    qemu = FakeQemu(outcome=STALL)
    mon = connected(qemu)
    with pytest.raises(CommandRefused, match="does not accept value 'x-bogus'"):
        mon.set_migrate_capabilities({"x-bogus": True})
    with pytest.raises(CommandRefused, match="Parameter 'bogus' is unexpected"):
        mon.set_migrate_parameters({"bogus": 1})
    with pytest.raises(CommandRefused, match="'colo' is not enabled"):
        mon.execute("x-colo-lost-heartbeat")
    with pytest.raises(CommandRefused, match="has not been found"):
        mon.migrate("fd:vmckpt-migration")  # no getfd before
    mon.migrate("unix:/nowhere")
    with pytest.raises(CommandRefused, match="migration process in progress") as refused:
        mon.set_migrate_capabilities({"events": True})
    assert refused.value.error_class == "GenericError"
    with pytest.raises(CommandRefused, match="migration process in progress"):
        mon.migrate("unix:/nowhere")


def test_forbidden_commands_raise_and_say_why() -> None:
    qemu = FakeQemu()
    mon = connected(qemu)
    qemu.forbid("cont", "the guest was paused and must stay so")
    with pytest.raises(UnexpectedCommand, match="must stay so"):
        mon.cont()
    assert qemu.running and qemu.log[-1].outcome == "forbidden"
    qemu.allow("cont")
    mon.cont()


def test_faults_hit_the_calls_they_name() -> None:
    qemu = FakeQemu()
    mon = connected(qemu)
    qemu.fail("query-status", skip=1, times=2, error_class="DeviceNotFound", desc="gone")
    assert mon.status() == "running"  # the first call is skipped
    for _ in range(2):
        with pytest.raises(CommandRefused, match="gone") as refused:
            mon.status()
        assert refused.value.error_class == "DeviceNotFound"
    assert mon.status() == "running"  # and the fault is spent
    qemu.fail("query-migrate", lost=True)
    with pytest.raises(QMPError, match="lost the monitor connection during query-migrate"):
        mon.query_migrate()
    # A lost connection stays lost, whatever comes next.
    with pytest.raises(QMPError, match="lost the monitor connection before query-status"):
        mon.status()
    outcomes = [c.outcome for c in qemu.log]
    assert outcomes == ["ok", "refused DeviceNotFound", "refused DeviceNotFound", "ok", "lost"]


def test_a_migration_moves_only_while_someone_waits() -> None:
    qemu = FakeQemu(outcome=COMPLETED)
    mon = connected(qemu)
    mon.set_migrate_capabilities({"events": True})
    mark = mon.mark()
    mon.migrate("unix:/nowhere")
    for _ in range(3):
        mon.mark()  # looking at what arrived does not move QEMU
    assert mon.query_migrate().status == "setup"
    done = mon.wait_event({"MIGRATION"}, 5, lambda e: e.data.get("status") == "completed")
    names = [(e.name, e.data.get("status")) for e in mon.events_since(mark)]
    assert names == [
        ("MIGRATION", "setup"),
        ("MIGRATION", "active"),
        ("STOP", None),
        ("MIGRATION", "completed"),
    ]
    stop = mon.events_since(mark)[2]
    assert done.timestamp - stop.timestamp == pytest.approx(qemu.downtime_s, abs=2e-3)
    assert mon.status() == "postmigrate"


def test_no_migration_events_without_the_events_capability() -> None:
    """As QEMU: MIGRATION events only with the ``events`` capability on."""
    qemu = FakeQemu(outcome=COMPLETED)
    mon = connected(qemu)
    mark = mon.mark()
    mon.migrate("unix:/nowhere")
    with pytest.raises(QMPError, match="no MIGRATION event"):
        mon.wait_event({"MIGRATION"}, 0.05)
    assert [e.name for e in mon.events_since(mark)] == ["STOP"]
    assert qemu.migration_status == "completed"
