"""What the commands do with a guest, whatever reaches it (vmckpt/guests/) and whatever
mechanism checkpoints it: the one place that chooses the mechanism (choice.py) and knows
that a guest vmckpt runs may have a COLO checkpoint session holding it (colo.py), so that
a checkpoint, a watch, a pause or a stop goes through it, and that a guest on another host
is checkpointed by that host's vmckpt.

- :func:`checkpoint`: one checkpoint, its row in vmckpt's JSON vocabulary;
- :func:`watch`: periodic checkpoints through the one watch loop (watch.py);
- :func:`status`: a guest's row in ``list``, with its mechanism and session;
- :func:`stop`, :func:`pause`, :func:`resume`, :func:`release`: a guest's life cycle with its
  session ended first where one would get in the way;
- :func:`restore`: a layer brought back here, as a libvirt domain, or on another host.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vmckpt.errors import MachineError, UsageError
from vmckpt.guests.base import Guest, GuestStatus
from vmckpt.guests.local import LocalGuest
from vmckpt.guests.remote import RemoteGuest, RemoteTarget
from vmckpt.images import Store
from vmckpt.images.retention import keep_arguments
from vmckpt.mechanisms.choice import COLO, PRECOPY, Choice, choose_mechanism
from vmckpt.mechanisms.colo import SessionClient, end_session, session_pid
from vmckpt.mechanisms.layers import CheckpointResult, CheckpointSettings
from vmckpt.mechanisms.precopy import take_checkpoint
from vmckpt.mechanisms.remote import RemoteRestoreResult, restore_remote
from vmckpt.mechanisms.restore import RestoreResult, restore_guest
from vmckpt.mechanisms.restore_libvirt import DomainRestoreResult, restore_domain
from vmckpt.mechanisms.watch import WatchSettings, checkpoint_settings, watch_loop
from vmckpt.progress import NO_PROGRESS, Progress
from vmckpt.ram import RamImage

Row = dict[str, Any]


def mechanism_of(guest: Guest) -> Choice:
    """The checkpoint mechanism the guest gets, and why."""
    return choose_mechanism(guest.qemu_version(), guest.accel, guest.spec(), local=guest.owns_qemu)


def choose(guest: Guest, requested: str) -> Choice:
    """The mechanism to use: the guest's own (``auto``), or the one asked for if allowed."""
    choice = mechanism_of(guest)
    if requested in ("auto", choice.mechanism):
        return choice
    if requested == COLO:
        raise UsageError(f"guest {guest.name}: COLO is refused here: {choice.reason}")
    if requested != PRECOPY:
        raise UsageError(f"unknown mechanism {requested!r} (auto, {COLO} or {PRECOPY})")
    return Choice(PRECOPY, "asked for")


def _row(result: CheckpointResult) -> Row:
    return {**result.to_dict(), "host": "local"}


def _colo_checkpoint(guest: LocalGuest) -> Row:
    client = SessionClient.ensure(guest)
    try:
        row: Row = client.request("checkpoint")["row"]
    finally:
        client.close()
    return row


def checkpoint(
    guest: Guest,
    settings: CheckpointSettings | None = None,
    *,
    progress: Progress = NO_PROGRESS,
    mechanism: str = "auto",
) -> Row:
    """One checkpoint of the guest, as the row ``checkpoint --json`` prints."""
    if isinstance(guest, RemoteGuest):
        return guest.checkpoint_row("--mechanism", mechanism)
    if _uses_colo(guest, mechanism):
        assert isinstance(guest, LocalGuest)
        return _colo_checkpoint(guest)
    release(guest)  # a precopy-diff checkpoint needs the guest to itself
    return _row(take_checkpoint(guest, settings, progress=progress))


def watch(
    guest: Guest,
    settings: WatchSettings,
    report: Callable[[Row], None],
    *,
    progress: Progress = NO_PROGRESS,
    mechanism: str = "auto",
) -> int:
    """Periodic checkpoints; ``report`` gets each one's row (with a ``note``)."""
    if isinstance(guest, RemoteGuest):
        return _remote_watch(guest, settings, report, mechanism)
    take: Callable[[], Row]
    if _uses_colo(guest, mechanism):
        assert isinstance(guest, LocalGuest)
        client = SessionClient.ensure(guest)
        try:
            return watch_loop(
                lambda: client.request("checkpoint")["row"], settings, report, prune_for=guest
            )
        finally:
            client.close()
    release(guest)
    take = _PrecopyTaker(guest, checkpoint_settings(settings), progress)
    return watch_loop(take, settings, report, prune_for=guest)


class _PrecopyTaker:
    """precopy-diff checkpoints of a watch: the image each one received is the next one's
    diff base, so no checkpoint composes the chain."""

    def __init__(self, guest: Guest, settings: CheckpointSettings, progress: Progress) -> None:
        self.guest = guest
        self.settings = settings
        self.progress = progress
        self.base: RamImage | None = None

    def __call__(self) -> Row:
        result = take_checkpoint(self.guest, self.settings, base=self.base, progress=self.progress)
        self.base = result.image
        return _row(result)


def _remote_watch(
    guest: RemoteGuest, settings: WatchSettings, report: Callable[[Row], None], mechanism: str
) -> int:
    """The other host's vmckpt runs the watch (the layers are there: pruned there too)."""
    args = ["--interval", f"{settings.interval_s}s", "--mechanism", mechanism]
    if settings.count is not None:
        args += ["--count", str(settings.count)]
    if settings.pause_budget_ms is not None:
        args += ["--pause-budget", str(settings.pause_budget_ms)]
    if settings.keep is not None:
        args += [*keep_arguments(settings.keep), "--prune-every", f"{settings.prune_every_s}s"]
    taken = 0
    for row in guest.rows("watch", *args):
        report(row)
        taken += 1
    return taken


def _uses_colo(guest: Guest, mechanism: str) -> bool:
    return choose(guest, mechanism).mechanism == COLO


def status(guest: Guest) -> GuestStatus:
    """The guest's row in ``vmckpt list``: its state, its mechanism and why, its session."""
    if not isinstance(guest, LocalGuest):
        row = guest.status()
        if isinstance(guest, RemoteGuest) or row.state == "unreachable":
            return row
        with contextlib.suppress(MachineError, OSError):
            choice = mechanism_of(guest)
            row = replace(row, mechanism=choice.mechanism, mechanism_reason=choice.reason)
        return row
    session = session_pid(guest.store, guest.name)
    # A session holds the guest's checkpoint lock for its whole life, and a monitor of its
    # own: the guest's first monitor stays free to ask.
    row = guest.status(ask_qemu=True if session is not None else None)
    if row.pid is None:
        return row
    choice = Choice("", "")
    with contextlib.suppress(MachineError, OSError):
        choice = mechanism_of(guest)
    return replace(
        row, mechanism=choice.mechanism, mechanism_reason=choice.reason,
        session=f"open, PID {session}" if session else "",
    )  # fmt: skip


def release(guest: Guest) -> bool:
    """End the guest's COLO checkpoint session, if one runs (before anything that needs the
    guest to itself: a precopy-diff checkpoint, a migration, a pause, a stop)."""
    if isinstance(guest, LocalGuest):
        return end_session(guest.store, guest.name)
    return False


def stop(guest: Guest) -> str:
    release(guest)
    return guest.stop()


def pause(guest: Guest) -> None:
    release(guest)  # a COLO checkpoint would run the guest again
    guest.pause()


def resume(guest: Guest) -> bool:
    return guest.resume()


@dataclass(frozen=True)
class Here:
    """Restore into a new QEMU on this host, named ``name`` (default: the layer's guest)."""

    name: str | None = None


@dataclass(frozen=True)
class AsDomain:
    """Restore as a new libvirt domain ``name`` (the layer's domain XML, this store's only)."""

    name: str
    uri: str
    disk_dir: Path | None = None  # where its restored disks go (default: beside the originals)


@dataclass(frozen=True)
class OnHost:
    """Restore on another host (its vmckpt, its store), as ``name``."""

    target: RemoteTarget
    name: str | None = None


Destination = Here | AsDomain | OnHost
Restored = RestoreResult | DomainRestoreResult | RemoteRestoreResult


def restore(
    store: Store,
    layer: str | None,
    into: Destination,
    *,
    qemu_args: tuple[str, ...] | None = None,
    progress: Progress = NO_PROGRESS,
) -> tuple[Restored, Guest | None]:
    """Restore ``layer`` (default: the newest) ``into`` a destination; the result, and the
    restored guest where vmckpt can reach it afterwards (its console, a stop)."""
    if isinstance(into, AsDomain):
        if qemu_args:
            raise UsageError("--qemu-arg does not go with --libvirt-define (the domain XML says)")
        restored = restore_domain(
            store, layer, into.name, uri=into.uri, disk_dir=into.disk_dir, progress=progress
        )
        return restored, None
    if isinstance(into, OnHost):
        remote = restore_remote(
            store, layer, into.name, into.target, qemu_args=qemu_args, progress=progress
        )
        return remote, RemoteGuest.load(store, remote.name)
    result = restore_guest(store, layer, into.name, extra_args=qemu_args, progress=progress)
    return result, LocalGuest(store, result.name)
