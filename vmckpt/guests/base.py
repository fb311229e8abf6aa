"""A guest the commands act on: how to reach it — its spec, its monitor, a guard for the
work done on it, its head in the store, its status, console and life cycle. No checkpoint
mechanism is here: vmckpt/mechanisms/ works on a :class:`Guest` through these methods.

Kinds of guest (one module each): a QEMU vmckpt started on this host (local.py), a running
libvirt domain (libvirt.py), a guest vmckpt runs on another host (remote.py). A method a kind
cannot offer raises a UsageError saying so.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vmckpt.errors import UsageError
from vmckpt.guard import Guard
from vmckpt.images import Store
from vmckpt.machine.spec import GuestSpec
from vmckpt.qmp import CONT_RETRY_S, Monitor
from vmckpt.session import JOURNAL, recover

# The kind of a libvirt domain (guests/libvirt.py): the store's name space for domains' heads
# and this host's files of them. Here, so that code that only compares kinds loads no libvirt.
LIBVIRT_KIND = "libvirt"


@dataclass(frozen=True)
class GuestStatus:
    """One guest's row in ``vmckpt list`` (the JSON vocabulary of the README)."""

    name: str
    kind: str  # guest (vmckpt runs it here), libvirt, remote
    state: str  # QEMU's run state, "stopped", "unknown", "unreachable", "restoring (NN %)"
    pid: int | None
    head: str | None
    host: str = "local"
    mechanism: str = ""  # what its next checkpoint uses
    mechanism_reason: str = ""
    session: str = ""  # its COLO checkpoint session, if one is open

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "state": self.state,
            "pid": self.pid,
            "head": self.head,
            "host": self.host,
            "mechanism": self.mechanism,
            "mechanism_reason": self.mechanism_reason,
            "session": self.session,
        }


class Guest:
    """A guest (see the module doc)."""

    kind = "guest"  # the store's name space for its head and this host's files of it
    # Whether its QEMU gets vmckpt's files (disk scratch) as descriptors, never by path: it
    # runs as another user (a libvirt domain's), who cannot open them.
    files_by_fd = False
    owns_qemu = False  # vmckpt started its QEMU here (so a checkpoint session may hold it)

    def __init__(self, store: Store, name: str) -> None:
        self.store = store
        self.name = name

    def spec(self) -> GuestSpec:
        raise self._unsupported("has no spec")

    def monitor(self) -> Monitor:
        raise self._unsupported("has no monitor here")

    def checkpoint_monitor(self) -> Monitor:
        """The monitor a checkpoint's migration session drives (the guest's pause is timed
        through it): `monitor` unless the guest has a cheaper one."""
        return self.monitor()

    def guard(self) -> Guard:
        raise self._unsupported("cannot be guarded from here")

    @property
    def accel(self) -> str:
        return ""

    def qemu_version(self) -> str:
        """The version of the QEMU that runs the guest."""
        with self.monitor() as mon:
            return mon.version

    def head(self) -> str | None:
        return self.store.head(self.name, self.kind)

    def status(self) -> GuestStatus:
        raise self._unsupported("has no status here")

    def console(self, follow: bool) -> Iterator[str]:
        raise self._unsupported("has no console here")

    def stop(self) -> str:
        raise self._unsupported("is not stopped by vmckpt")

    def pause(self) -> None:
        with self.monitor() as mon:
            mon.stop()

    def resume(self) -> bool:
        """Run the guest (after a pause, or a checkpoint a dead vmckpt left half done).
        Returns whether a left-over migration session was recovered."""
        lock = self.store.host.guest_lock(self.name, what="resume", wait_s=30, kind=self.kind)
        with lock, self.monitor() as mon:
            recovered = recover(
                mon, self.store.host.journal_path(self.name, JOURNAL, self.kind), vm=self.name
            )
            if not mon.is_running():
                mon.cont(retry_s=CONT_RETRY_S)
        return recovered

    def _unsupported(self, what: str) -> UsageError:
        return UsageError(f"guest {self.name} ({self.kind}) {what}")
