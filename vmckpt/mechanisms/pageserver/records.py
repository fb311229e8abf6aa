"""A lazy restore's records on this host, and what the rest of vmckpt asks of them.

The page server keeps a record per guest it serves (``pageserver.json`` in the guest's
runtime directory, through :class:`vmckpt.hostdirs.HostDirs`: its PID and start time, its
guard's PID, the layer, progress, the state of its stream; never in the store), and once
every page is in, ``restored.json`` (what the restore did: pages pushed and sent on demand,
repeated requests, each request's wait). Its log is ``pageserver.log``, beside them.

From them: ``vmckpt list`` shows a guest as ``restoring (NN %)`` (:func:`restoring_state`);
a checkpoint waits for the last pages or is refused in one line (:func:`wait_restored`); a
foreground ``vmckpt restore`` reports a page found damaged while served (:func:`failure_of`).
A PID in a record is used only together with its start time: a record of a process that is
gone is never acted on.
"""

from __future__ import annotations

import time
from typing import Any

from vmckpt.errors import CheckpointError, VmckptError
from vmckpt.images import Store
from vmckpt.machine.qemu import process_start_time

RECORD = "pageserver.json"
DONE = "restored.json"  # what the last lazy restore of the guest did, kept once it completed
LOG = "pageserver.log"
POLL_S = 0.05
ACTIVE_STATES = frozenset({"starting", "serving", "ending", "broken"})
ORPHANED_S = 15.0  # a guard starts a new server within this


def write(store: Store, name: str, record: str, data: dict[str, Any]) -> None:
    """Replace one of a guest's page server records (atomically), in its runtime directory
    as it is: StoreError if that is gone. A server outliving its guest's teardown (the
    guest's QEMU killed, its store and runtime directory removed) must not make it again."""
    store.host.write_record(name, record, data, create=False)


def remove(store: Store, name: str) -> None:
    """The guest is no longer being restored lazily: its page server record goes."""
    store.host.remove_record(name, RECORD)


def status_of(store: Store, name: str) -> dict[str, Any] | None:
    """A guest's page server record, with ``alive`` (whether that server runs), or None
    if the guest is not being restored lazily."""
    try:
        data = store.host.read_record(name, RECORD)
    except (OSError, VmckptError):
        return None
    if data is None:
        return None
    pid, start = data.get("pid"), data.get("start_time")
    data["alive"] = isinstance(pid, int) and start is not None and process_start_time(pid) == start
    return data


def failure_of(store: Store, name: str) -> str | None:
    """Why a guest's lazy restore failed after the guest started (its page server found a
    page that does not match its digest, or the destination failed the migration), or None."""
    record = status_of(store, name)
    if record is None or record.get("state") != "failed":
        return None
    return str(record.get("error") or "the page server failed")


def restoring_state(store: Store, name: str) -> str | None:
    """What ``vmckpt list`` shows for a guest being restored lazily (``restoring (NN %)``),
    or None if it is not."""
    record = status_of(store, name)
    if record is None:
        return None
    if record.get("state") == "failed":
        return "restore failed"
    if record.get("state") not in ACTIVE_STATES:
        return None
    percent = record.get("percent", 0)
    if not record["alive"]:
        return f"restoring ({percent} %, no page server: vmckpt resume {name})"
    return f"restoring ({percent} %)"


def wait_restored(store: Store, name: str, timeout: float) -> None:
    """Return once a guest's lazy restore is over (every page in), waiting up to ``timeout``;
    CheckpointError in one line if it is not, or cannot be (no page server, failed)."""
    deadline = time.monotonic() + timeout
    orphaned: float | None = None  # since when no server or guard is seen
    while True:
        record = status_of(store, name)
        if record is None or record.get("state") not in ACTIVE_STATES | {"failed"}:
            return
        percent = record.get("percent", 0)
        if record.get("state") == "failed":
            raise CheckpointError(
                f"its lazy restore failed: {record.get('error')}", vm=name, step="wait-restore"
            )
        if record["alive"] or _alive(record.get("guard_pid")):
            orphaned = None
        elif orphaned is None:
            orphaned = time.monotonic()
        if orphaned is not None and time.monotonic() - orphaned > ORPHANED_S:
            raise CheckpointError(
                f"it is still being restored ({percent} % of its pages in) and no page server "
                f"runs: `vmckpt resume {name}` starts one",
                vm=name,
                step="wait-restore",
            )
        if time.monotonic() > deadline:
            raise CheckpointError(
                f"it is still being restored ({percent} % of its pages in after {timeout:.0f} s "
                "of waiting); checkpoint it once `vmckpt list` shows it running",
                vm=name,
                step="wait-restore",
            )
        time.sleep(POLL_S)


def _alive(pid: Any) -> bool:
    return isinstance(pid, int) and process_start_time(pid) is not None
