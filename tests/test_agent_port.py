"""Whether a restored guest has its guest agent's port open, read from QEMU's
VSERPORT_CHANGE event rather than from ``query-chardev``: QEMU applies a loaded port's state
on a timer that fires once the guest runs, so right after RESUME ``query-chardev`` can say
closed for a guest whose agent runs (a restore then wrongly said "no guest agent runs")."""

from __future__ import annotations

from tests.framework.fakeqmp import FakeQemu
from vmckpt.mechanisms.restore_prep import _agent_port_open
from vmckpt.qmp import Monitor
from vmckpt.qmp.agent import PORT_ID

VM = "g1"
# The fake does not play query-chardev: were it asked, the test would fail (UnexpectedCommand).


def test_the_ports_event_says_open() -> None:
    qemu = FakeQemu()
    with Monitor(qemu.transport(VM), vm=VM).connect() as mon:
        since = mon.mark()
        qemu.emit("VSERPORT_CHANGE", {"id": "another-port", "open": False})
        qemu.emit("VSERPORT_CHANGE", {"id": PORT_ID, "open": True})
        assert _agent_port_open(mon, since) is True


def test_the_ports_event_says_closed() -> None:
    qemu = FakeQemu()
    with Monitor(qemu.transport(VM), vm=VM).connect() as mon:
        before = mon.mark()
        qemu.emit("VSERPORT_CHANGE", {"id": PORT_ID, "open": True})
        since = mon.mark()  # that was before this guest ran: not its restore's
        qemu.emit("VSERPORT_CHANGE", {"id": "another-port", "open": True})
        qemu.emit("VSERPORT_CHANGE", {"id": PORT_ID, "open": False})
        assert _agent_port_open(mon, since) is False
        assert _agent_port_open(mon, before) is True
