"""A monitor connection handed from one holder to another, with QMP's out-of-band commands,
against a real QEMU (vmckpt/qmp/transport.py: ``LineTransport.adopt``). A lazy restore's
recovery relies on it (vmckpt/mechanisms/pageserver/recovery.py): the page server's
connection outlives the server in its guard, and the next server takes it up mid-stream.
"""

from __future__ import annotations

import os
import select
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import short_tmp
from tests.framework.bareqemu import BareQemu
from tests.framework.mechanisms import SYSTEM_QEMU, qemu11
from vmckpt.errors import QMPError
from vmckpt.machine.binary import qemu_version, version_tuple
from vmckpt.qmp import CommandRefused, Monitor

pytestmark = pytest.mark.qemu


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = short_tmp("vk-oob-")  # QMP socket paths are short
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["qemu10", "qemu11"])
def binary(request: pytest.FixtureRequest) -> str:
    found = shutil.which(SYSTEM_QEMU if request.param == "qemu10" else qemu11())
    assert found is not None, f"no QEMU for {request.param}"
    return found


def bare(binary: str, path: Path) -> list[str]:
    """QEMU arguments for a machine of nothing with a second QMP monitor at ``path``."""
    machine = ["-machine", "none", "-display", "none", "-nodefaults"]
    chardev = ["-chardev", f"socket,id=second,path={path},server=on,wait=off"]
    if version_tuple(qemu_version(binary))[0] >= 11:  # -mon is deprecated there
        return [*machine, *chardev, "-object", "monitor-qmp,id=second-mon,chardev=second"]
    return [*machine, *chardev, "-mon", "chardev=second,mode=control"]


def test_a_handed_on_connection_keeps_out_of_band_and_drops_the_old_holders_replies(
    binary: str, workdir: Path
) -> None:
    path = workdir / "second.qmp"
    with BareQemu(workdir, "oob", bare(binary, path), binary=binary):
        first = Monitor.lines(path, vm="oob", timeout=30, oob=True)
        assert first.oob, "QEMU did not offer out-of-band commands on a socket monitor"
        # The first holder sends two commands and reads only the start of the first reply,
        # then ends: the next holder finds the rest of that line in the stream, then the other.
        first.submit("query-status")
        first.submit("query-name")  # a whole reply the next holder must not take for its own
        sock = first.handover_socket()
        assert select.select([sock], [], [], 30)[0], "no reply to query-status"
        partial = sock.recv(5)
        assert partial.startswith(b"{") and b"\n" not in partial, partial
        handed = socket.socket(fileno=os.dup(sock.fileno()))
        first.close()
        second = Monitor.adopt(handed, vm="oob", description=str(path), timeout=30)
        try:
            assert second.oob
            version = second.execute("query-version")  # its own reply, not query-status'
            assert isinstance(version, dict) and "qemu" in version, version
            # Out of band still: migrate-recover runs in the monitor's thread and refuses
            # for what it is (no paused migration), not for being out of band.
            with pytest.raises(CommandRefused, match="postcopy is paused"):
                second.execute_oob("migrate-recover", {"uri": f"unix:{workdir / 'r.sock'}"})
        finally:
            second.close()


def test_out_of_band_needs_a_connection_that_negotiated_it(binary: str, workdir: Path) -> None:
    path = workdir / "second.qmp"
    with (
        BareQemu(workdir, "oob", bare(binary, path), binary=binary),
        Monitor.lines(path, vm="oob") as mon,
    ):
        assert not mon.oob
        with pytest.raises(QMPError, match="did not negotiate it"):
            mon.execute_oob("migrate-recover", {"uri": f"unix:{workdir / 'r.sock'}"})
        assert mon.status()  # the connection is still fine
