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
- :func:`restore`: a layer brought back here (lazily where the host allows it; clones), as a
  libvirt domain, or on another host;
- a guest still being restored lazily: ``restoring (NN %)`` in its status, a checkpoint that
  waits for its last pages (:func:`wait_for_pages`), ``resume`` that starts a new page server
  for it if its own died.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

from vmckpt.errors import MachineError, UsageError
from vmckpt.guests.base import LIBVIRT_KIND, Guest, GuestStatus
from vmckpt.guests.local import LocalGuest
from vmckpt.images import Store
from vmckpt.machine.spec import GuestSpec
from vmckpt.progress import NO_PROGRESS, Progress

# Each command imports the mechanisms it uses, in the functions that use them: a command's
# imports are most of its start (a lazy restore's is timed from it), and each command uses
# a few of these only.
if TYPE_CHECKING:
    from vmckpt.guests.remote import RemoteGuest, RemoteTarget
    from vmckpt.mechanisms.choice import Choice
    from vmckpt.mechanisms.layers import CheckpointResult, CheckpointSettings
    from vmckpt.mechanisms.remote import RemoteRestoreResult
    from vmckpt.mechanisms.restore_libvirt import DomainRestoreResult
    from vmckpt.mechanisms.restore_prep import RestoreResult
    from vmckpt.mechanisms.watch import WatchSettings

Row = dict[str, Any]
RESTORE_WAIT_S = 60.0  # a checkpoint waits this long for a lazy restore's last pages


def mechanism_of(guest: Guest) -> Choice:
    """The checkpoint mechanism the guest gets, and why."""
    from vmckpt.mechanisms.choice import choose_mechanism

    if guest.kind == LIBVIRT_KIND:  # (asks libvirt nothing: the reason is libvirt's)
        return choose_mechanism("", "", GuestSpec(), local=False, libvirt=True)
    return choose_mechanism(guest.qemu_version(), guest.accel, guest.spec(), local=guest.owns_qemu)


def choose(guest: Guest, requested: str) -> Choice:
    """The mechanism to use: the guest's own (``auto``), or the one asked for if allowed."""
    from vmckpt.mechanisms.choice import COLO, PRECOPY, Choice

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
    from vmckpt.mechanisms.colo import SessionClient

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
    from vmckpt.guests.remote import RemoteGuest
    from vmckpt.mechanisms.precopy import take_checkpoint

    if isinstance(guest, RemoteGuest):
        return guest.checkpoint_row("--mechanism", mechanism)
    wait_for_pages(guest)
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
    from vmckpt.guests.remote import RemoteGuest
    from vmckpt.mechanisms.colo import SessionClient
    from vmckpt.mechanisms.watch import checkpoint_settings, watch_loop

    if isinstance(guest, RemoteGuest):
        return _remote_watch(guest, settings, report, mechanism)
    wait_for_pages(guest)
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
    """precopy-diff checkpoints of a watch: each is diffed against this host's copy of the
    previous one's RAM (vmckpt/mechanisms/parent_ram.py), so no checkpoint composes the
    chain and none holds a whole image."""

    def __init__(self, guest: Guest, settings: CheckpointSettings, progress: Progress) -> None:
        self.guest = guest
        self.settings = settings
        self.progress = progress

    def __call__(self) -> Row:
        from vmckpt.mechanisms.precopy import take_checkpoint

        return _row(take_checkpoint(self.guest, self.settings, progress=self.progress))


def _remote_watch(
    guest: RemoteGuest, settings: WatchSettings, report: Callable[[Row], None], mechanism: str
) -> int:
    """The other host's vmckpt runs the watch (the layers are there: pruned there too)."""
    from vmckpt.images.retention import keep_arguments

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


def wait_for_pages(guest: Guest, timeout: float = RESTORE_WAIT_S) -> None:
    """A guest still being restored lazily is checkpointed once all its pages are in: wait
    for that, or refuse in one line (vmckpt/mechanisms/pageserver/records.py)."""
    from vmckpt.mechanisms.pageserver.records import wait_restored

    if isinstance(guest, LocalGuest):
        wait_restored(guest.store, guest.name, timeout)


def _uses_colo(guest: Guest, mechanism: str) -> bool:
    from vmckpt.mechanisms.choice import COLO

    return choose(guest, mechanism).mechanism == COLO


def status(guest: Guest) -> GuestStatus:
    """The guest's row in ``vmckpt list``: its state, its mechanism and why, its session."""
    from vmckpt.guests.remote import RemoteGuest
    from vmckpt.mechanisms.choice import Choice
    from vmckpt.mechanisms.colo import session_pid
    from vmckpt.mechanisms.pageserver.records import restoring_state

    if not isinstance(guest, LocalGuest):
        row = guest.status()
        if isinstance(guest, RemoteGuest) or (
            row.state == "unreachable" and guest.kind != LIBVIRT_KIND
        ):
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
    restoring = restoring_state(guest.store, guest.name)
    if restoring is not None:  # its page server holds the checkpoint lock meanwhile
        row = replace(row, state=restoring)
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
    from vmckpt.mechanisms.colo import end_session

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
    """Resume the guest; a lazy restore that lost its page server (and guard) gets a new one
    (vmckpt/mechanisms/pageserver/recovery.py)."""
    from vmckpt.mechanisms.pageserver.recovery import resume_restore

    if isinstance(guest, LocalGuest) and resume_restore(guest.store, guest.name):
        return True
    return guest.resume()


@dataclass(frozen=True)
class Here:
    """Restore into a new QEMU on this host, named ``name`` (default: the layer's guest), or
    ``clones`` guests NAME-1..NAME-N, each with its own identity."""

    name: str | None = None
    clones: int | None = None


@dataclass(frozen=True)
class RestoreOptions:
    """How a restore loads the guest: ``lazy`` (``auto``: lazily where the host allows it,
    ``always``, ``never``), ``same_identity`` (keep the layer's VM generation ID), ``watch_s``
    (watch the guest this long before the restore counts; None: the kind's default)."""

    lazy: str = "auto"
    same_identity: bool = False
    watch_s: float | None = None

    def arguments(self) -> tuple[str, ...]:
        """The options as another host's ``vmckpt restore`` is to be given them."""
        flags = {"always": "--lazy", "never": "--no-lazy"}
        options: tuple[str, ...] = (flags[self.lazy],) if self.lazy in flags else ()
        if self.same_identity:
            options += ("--same-identity",)
        if self.watch_s is not None:
            options += ("--watch", str(self.watch_s))
        return options


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
Restored: TypeAlias = "RestoreResult | DomainRestoreResult | RemoteRestoreResult"


def restore(
    store: Store,
    layer: str | None,
    into: Destination,
    *,
    qemu_args: tuple[str, ...] | None = None,
    progress: Progress = NO_PROGRESS,
    options: RestoreOptions | None = None,
) -> tuple[list[Restored], Guest | None]:
    """Restore ``layer`` (default: the newest) ``into`` a destination; the results (one per
    guest: several for clones), and the restored guest where vmckpt can reach it afterwards
    (its console, a stop; None for clones)."""
    options = options or RestoreOptions()
    if isinstance(into, Here):
        from vmckpt.mechanisms.restore import restore_clones, restore_guest

        if into.clones is not None:
            clones = restore_clones(
                store, layer, into.name, into.clones, extra_args=qemu_args, lazy=options.lazy,
                check_s=options.watch_s, progress=progress,
            )  # fmt: skip
            return list(clones), None
        result = restore_guest(
            store, layer, into.name, extra_args=qemu_args, progress=progress, lazy=options.lazy,
            check_s=options.watch_s, same_identity=options.same_identity,
        )  # fmt: skip
        return [result], LocalGuest(store, result.name)
    if isinstance(into, AsDomain):
        from vmckpt.mechanisms.restore_libvirt import restore_domain

        if qemu_args:
            raise UsageError("--qemu-arg does not go with --libvirt-define (the domain XML says)")
        restored = restore_domain(
            store, layer, into.name, uri=into.uri, disk_dir=into.disk_dir, progress=progress
        )
        return [restored], None
    from vmckpt.guests.remote import RemoteGuest
    from vmckpt.mechanisms.remote import restore_remote

    remote = restore_remote(
        store, layer, into.name, into.target, qemu_args=qemu_args, progress=progress,
        options=options.arguments(),
    )  # fmt: skip
    return [remote], RemoteGuest.load(store, remote.name)
