"""vmckpt/qmp without QEMU: the Monitor's typed commands, its event history, and errors.

The Monitor runs over the fake QEMU of tests/framework/fakeqmp.py through each of the
three ways in: the fake's own Transport, vmckpt's PassthroughTransport over a fake
libvirt-style channel, and vmckpt's SocketTransport (qemu.qmp) over a real Unix socket
the fake serves. Every failure must be a QMPError of one line naming the guest and the
command.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.framework.fakeqmp import STALL, FakeChannel, FakeQemu, FakeQmpServer
from vmckpt.errors import QMPError
from vmckpt.qmp import (
    BlockNode,
    CommandRefused,
    JobInfo,
    MigrationInfo,
    Monitor,
    PassthroughTransport,
)

VM = "g1"


def connected(qemu: FakeQemu) -> Monitor:
    return Monitor(qemu.transport(VM), vm=VM).connect()


def assert_one_line(error: QMPError, *needles: str) -> None:
    text = str(error)
    assert text == error.one_line() and "\n" not in text, text
    assert text.startswith(f"guest {VM}"), text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"


# -- typed commands ------------------------------------------------------------------------------


def test_run_state_and_its_events() -> None:
    qemu = FakeQemu()
    with connected(qemu) as mon:
        assert mon.version == "10.0.2"
        assert (mon.status(), mon.is_running()) == ("running", True)
        mark = mon.mark()
        mon.stop()
        assert (mon.status(), mon.is_running()) == ("paused", False)
        mon.cont()
        assert [e.name for e in mon.events_since(mark)] == ["STOP", "RESUME"]
        stop, resume = mon.events_since(mark)
        assert resume.timestamp > stop.timestamp > 1e9  # QEMU's clock, seconds since the epoch
        assert "migrate" in mon.commands()


def test_migration_settings_round_trip() -> None:
    qemu = FakeQemu()
    with connected(qemu) as mon:
        caps = mon.migrate_capabilities()
        assert caps["events"] is False and caps == qemu.capabilities
        mon.set_migrate_capabilities({"events": True, "x-colo": True})
        assert mon.migrate_capabilities()["events"] is True
        assert qemu.capabilities["x-colo"] is True
        assert mon.migrate_parameters()["downtime-limit"] == 300
        mon.set_migrate_parameters({"downtime-limit": 20})
        assert mon.migrate_parameters()["downtime-limit"] == 20
    sent = qemu.calls("migrate-set-capabilities")[0].arguments
    assert sent == {
        "capabilities": [
            {"capability": "events", "state": True},
            {"capability": "x-colo", "state": True},
        ]
    }


def test_query_migrate_is_typed_from_none_to_completed() -> None:
    qemu = FakeQemu()
    with connected(qemu) as mon:
        assert mon.query_migrate() == MigrationInfo("none", None, None, None, None)
        mon.set_migrate_capabilities({"events": True})
        mon.migrate("unix:/nowhere")
        mon.wait_event({"MIGRATION"}, 5, lambda e: e.data["status"] == "completed")
        info = mon.query_migrate()
    assert info.status == "completed"
    assert info.downtime_ms == round(qemu.downtime_s * 1000)
    assert info.transferred == qemu.transferred > 0
    assert info.error is None


def test_a_failed_migration_says_why_and_incoming_tells_its_port() -> None:
    qemu = FakeQemu(outcome="failed", error_desc="Connection reset by peer")
    with connected(qemu) as mon:
        mon.migrate("unix:/nowhere")
        qemu.progress()
        qemu.progress()
        info = mon.query_migrate()
    assert (info.status, info.error) == ("failed", "Connection reset by peer")
    receiving = FakeQemu(run_state="inmigrate")
    with connected(receiving) as mon:
        mon.migrate_incoming("tcp:127.0.0.1:0")
        assert mon.incoming_port() == 45678  # QEMU reports it as a string


def test_machine_cpu_and_flags() -> None:
    cpu = "/machine/unattached/device[0]"
    qemu = FakeQemu(
        qom={
            ("/machine", "type"): "pc-i440fx-10.0-machine",
            (cpu, "type"): "qemu64-x86_64-cpu",
            (cpu, "sse4.2"): False,
            (cpu, "popcnt"): True,
        },
        cpus=[{"cpu-index": 0, "qom-path": cpu}],
    )
    with connected(qemu) as mon:
        assert mon.machine_type() == "pc-i440fx-10.0"
        assert mon.cpu_model() == (cpu, "qemu64")
        # A feature this QEMU does not know is left out, not an error.
        assert mon.cpu_flags(cpu, ["sse4.2", "popcnt", "x-unknown"]) == {
            "sse4.2": False,
            "popcnt": True,
        }
    with connected(FakeQemu()) as mon, pytest.raises(QMPError) as none:
        mon.cpu_model()
    assert_one_line(none.value, "reports no vCPU", "query-cpus-fast")


def test_block_nodes_and_jobs_are_typed() -> None:
    qemu = FakeQemu(
        block_nodes=[
            {
                "node-name": "vmckpt-disk0",
                "drv": "qcow2",
                "file": "/tmp/d.qcow2",
                "ro": False,
                "image": {"virtual-size": 1 << 26},
                "dirty-bitmaps": [{"name": "vmckpt-0002"}],
            },
            {"node-name": "vmckpt-disk0-file", "drv": "file", "file": "/tmp/d.qcow2"},
        ],
        jobs=[{"id": "vmckpt-backup", "status": "concluded", "error": "No space left"}],
    )
    with connected(qemu) as mon:
        nodes = mon.block_nodes()
        jobs = mon.jobs()
        mon.job_dismiss("vmckpt-backup")
        assert mon.jobs() == {}
    assert nodes[0] == BlockNode("vmckpt-disk0", "qcow2", "/tmp/d.qcow2", False, 1 << 26,
                                 ("vmckpt-0002",))  # fmt: skip
    assert nodes[1].bitmaps == () and nodes[1].size == 0
    assert jobs == {"vmckpt-backup": JobInfo("vmckpt-backup", "concluded", "No space left")}


def test_close_fd_is_quiet_about_a_descriptor_qemu_does_not_have() -> None:
    qemu = FakeQemu()
    ours, theirs = socket.socketpair()
    with ours, theirs, connected(qemu) as mon:
        mon.close_fd("vmckpt-migration")  # never passed: quiet
        mon.send_fd("vmckpt-migration", theirs.fileno())
        assert qemu.fds == {"vmckpt-migration": socket_inode(theirs)}
        mon.close_fd("vmckpt-migration")
    assert qemu.fds == {}
    assert [c.outcome for c in qemu.calls("closefd")] == ["refused GenericError", "ok"]


def socket_inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


# -- the event history -----------------------------------------------------------------------


def test_marks_and_waits_see_each_event_once_in_order() -> None:
    qemu = FakeQemu()
    with connected(qemu) as mon:
        qemu.emit("RESET", {"guest": True})
        first = mon.mark()
        qemu.emit("STOP")
        second = mon.mark()
        qemu.emit("RESUME")
        assert [e.name for e in mon.events_since(first)] == ["STOP", "RESUME"]
        assert [e.name for e in mon.events_since(second)] == ["RESUME"]
        # An event before the mark is not found after it...
        with pytest.raises(QMPError) as late:
            mon.wait_event({"RESET"}, 0.01, since=first)
        assert_one_line(late.value, "no RESET event within 0 s", "wait-event")
        # ...but is from the start, and a predicate picks among events of one name.
        assert mon.wait_event({"RESET"}, 0.01).data == {"guest": True}
        qemu.emit("RESET", {"guest": False})
        found = mon.wait_event({"RESET"}, 1, lambda e: e.data["guest"] is False, since=0)
        assert found.data == {"guest": False}


def test_forgetting_keeps_marks_valid() -> None:
    qemu = FakeQemu()
    with connected(qemu) as mon:
        for name in ("STOP", "RESUME", "STOP"):
            qemu.emit(name)
        mark = mon.mark()
        qemu.emit("RESUME")
        mon.forget_before(mark)
        assert [e.name for e in mon.events_since(mark)] == ["RESUME"]
        assert [e.name for e in mon.events_since(0)] == ["RESUME"]  # the rest is gone
        assert mon.mark() == mark + 1
        assert mon.wait_event({"RESUME"}, 0.01, since=mark).name == "RESUME"


def test_a_wait_is_answered_as_qemu_moves_on() -> None:
    """wait_event pulls from the transport until the event comes: the migration's MIGRATION
    events arrive one at a time while the monitor waits."""
    qemu = FakeQemu()
    with connected(qemu) as mon:
        mon.set_migrate_capabilities({"events": True})
        mark = mon.mark()
        mon.migrate("unix:/nowhere")
        completed = mon.wait_event({"MIGRATION"}, 5, lambda e: e.data["status"] == "completed",
                                   since=mark)  # fmt: skip
        statuses = [e.data.get("status") for e in mon.events_since(mark) if e.name == "MIGRATION"]
    assert statuses == ["setup", "active", "completed"]
    assert completed.timestamp == pytest.approx(qemu.clock - 0.001, abs=1e-6)


# -- errors ----------------------------------------------------------------------------------------


def test_a_refused_command_is_one_line_naming_guest_command_and_class() -> None:
    qemu = FakeQemu(outcome=STALL)
    channel = FakeChannel(qemu)
    mon = Monitor(PassthroughTransport(channel, vm=VM), vm=VM).connect()
    assert mon.version == "10.0.2" and channel.opened
    qemu.fail("migrate", error_class="DeviceNotFound", desc="first line\nsecond line")
    with pytest.raises(CommandRefused) as refused:
        mon.migrate("unix:/nowhere")
    assert refused.value.error_class == "DeviceNotFound"  # callers branch on it
    assert_one_line(refused.value, "during migrate", "first line second line", "(DeviceNotFound)")
    mon.close()
    assert channel.closed


def test_a_passthrough_reply_that_is_not_qmp_is_a_qmp_error() -> None:
    qemu = FakeQemu()
    channel = FakeChannel(qemu)
    mon = Monitor(PassthroughTransport(channel, vm=VM), vm=VM).connect()
    channel.garble("query-status", "<html>proxy error</html>")
    with pytest.raises(QMPError) as garbled:
        mon.status()
    assert not isinstance(garbled.value, CommandRefused)
    assert_one_line(garbled.value, "returned no JSON for query-status", "<html>")
    channel.garble("query-migrate", "[1, 2]")
    with pytest.raises(QMPError, match="reply to query-migrate is not an object"):
        mon.query_migrate()
    channel.garble("query-version", '{"return": {"package": ""}}')
    with pytest.raises(QMPError) as versionless:
        Monitor(PassthroughTransport(channel, vm=VM), vm=VM).connect()
    assert_one_line(versionless.value, "without a QEMU version", "during connect")


def test_passthrough_events_keep_qemus_timestamps() -> None:
    qemu = FakeQemu()
    channel = FakeChannel(qemu)
    mon = Monitor(PassthroughTransport(channel, vm=VM), vm=VM).connect()
    qemu.advance(0.250_001)
    sent = qemu.emit("MIGRATION", {"status": "active"})
    channel.events.put(("RESET", 1, 500_000, "not json"))  # a broken payload: no data
    got = mon.wait_event({"MIGRATION"}, 1)
    assert got.data == {"status": "active"}
    assert got.timestamp == pytest.approx(sent.timestamp, abs=1e-6)
    reset = mon.wait_event({"RESET"}, 1)
    assert (reset.timestamp, dict(reset.data)) == (1.5, {})


# -- the socket transport (qemu.qmp), against a real socket ----------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[FakeQemu, FakeQmpServer]]:
    qemu = FakeQemu(version=(11, 1, 3))
    with FakeQmpServer(qemu, tmp_path / "qmp.sock") as server:
        yield qemu, server
    assert server.errors == []


def test_socket_transport_speaks_qmp(served: tuple[FakeQemu, FakeQmpServer]) -> None:
    qemu, server = served
    with Monitor.unix(server.path, vm=VM, timeout=5) as mon:
        assert mon.version == "11.1.3"
        mark = mon.mark()
        mon.stop()
        assert mon.wait_event({"STOP"}, 5, since=mark).timestamp == pytest.approx(
            qemu.clock - 0.001, abs=1e-6
        )
        ours, theirs = socket.socketpair()
        with ours, theirs:
            mon.send_fd("vmckpt-migration", theirs.fileno())
            assert qemu.fds["vmckpt-migration"] == socket_inode(theirs)
        mon.close_fd("vmckpt-migration")
        with pytest.raises(CommandRefused) as refused:
            mon.execute("x-colo-lost-heartbeat")
        assert refused.value.error_class == "GenericError"
        assert_one_line(refused.value, "QEMU refused x-colo-lost-heartbeat", "'colo'")
    assert server.connections == 1
    assert qemu.commands() == ["stop", "getfd", "closefd", "x-colo-lost-heartbeat"]


def test_a_connection_lost_mid_command(served: tuple[FakeQemu, FakeQmpServer]) -> None:
    qemu, server = served
    qemu.fail("query-migrate", lost=True)
    with Monitor.unix(server.path, vm=VM, timeout=5) as mon, pytest.raises(QMPError) as lost:
        mon.query_migrate()
    assert not isinstance(lost.value, CommandRefused)
    assert_one_line(lost.value, "lost the monitor connection during query-migrate")


def test_no_monitor_at_the_path(tmp_path: Path) -> None:
    with pytest.raises(QMPError) as missing:
        Monitor.unix(tmp_path / "none.sock", vm=VM, timeout=1)
    assert_one_line(missing.value, "no QMP socket at", "during connect")
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as gone:
        gone.bind(str(stale))  # a socket file nobody listens on any more
    with pytest.raises(QMPError) as refused:
        Monitor.unix(stale, vm=VM, timeout=1)
    assert_one_line(refused.value, "nobody listens there", "during connect")


def test_a_socket_that_is_not_qmp(tmp_path: Path) -> None:
    path = tmp_path / "other.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)
    listener.settimeout(0.05)
    done = threading.Event()
    answered: list[socket.socket] = []

    def answer_wrongly() -> None:
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                conn, _ = listener.accept()
                conn.sendall(b'{"hello": "I am not QEMU"}\n')
                answered.append(conn)  # held open until the client has given up

    thread = threading.Thread(target=answer_wrongly, daemon=True)
    thread.start()
    try:
        with pytest.raises(QMPError) as wrong:
            Monitor.unix(path, vm=VM, timeout=2)
    finally:
        done.set()
        thread.join(5)
        listener.close()
        for conn in answered:
            conn.close()
    assert answered, "the transport never connected"
    assert_one_line(wrong.value, f"cannot connect to {path}", "not QEMU's QMP", "during connect")
