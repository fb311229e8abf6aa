"""Lazy restore: the guest runs in milliseconds, its pages come from the store as it needs them.

``vmckpt restore`` is lazy wherever the host allows it (lazy_host.py says why not, in one
line, and the full restore of restore.py runs instead). A lazy restore:

1. takes its page server, forked before anything else (vmckpt/mechanisms/pageserver_fork.py:
   by the CLI as the command starts): it imports what it serves with (numpy: ~60 ms) while
   this process works;
2. checks the layer's chain (vmckpt/images/pagesource.py, ``PageSource.head``): every
   manifest and seal, the RAM size, page digests present; reads its device state, cuts it
   for postcopy and builds the stream's preamble (vmckpt/stream/postcopy.py);
3. checks the guests (names, media, the host's memory), then orders the server: the layer,
   one socket per guest. The server opens the chain as a page source (each index and page
   digest file checked, the page index built: ~0.1 s at 8 GiB) and builds the preamble
   itself (it must be the one this process built) while this process starts the QEMUs, and
   says on its ready pipe whether it could;
4. starts each QEMU waiting for an incoming migration, sets ``postcopy-ram`` and hands it
   its socket; once the server is ready, starts ``migrate-incoming``: the server sends the
   device state and answers QEMU's page requests at once;
5. asks QEMU to run the guest as soon as the device state is loaded (``cont`` while the
   migration is incoming; writable disks are activated and their dirty bitmaps recreated
   before ``migrate-incoming``) and waits for QEMU's RESUME event, then for the server's
   word that its guard runs (it starts the guard, and the push, once the guests run);
6. returns: the guest runs, the server pushes the rest of the pages and ends the
   migration ``completed`` (``vmckpt list``: ``restoring (NN %)`` until then); only then
   does the layer become the guest's head (a page that fails its digest on the way never
   makes a damaged layer a head).

A failure before the guests run kills every QEMU it started and ends the server; the
store is only read. A page that fails its digest later is the server's to report (it
ends the QEMUs then).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from vmckpt import faults, log
from vmckpt.errors import QMPError, RestoreError, StoreError, StreamError, VmckptError
from vmckpt.guests.local import RECORD as GUEST_RECORD
from vmckpt.guests.local import LocalGuest
from vmckpt.images import LayerManifest, Store
from vmckpt.images.pagesource import NoPageDigests, PageSource, SourceHead
from vmckpt.machine.liveness import FATAL_EVENTS, observe
from vmckpt.machine.qemu import QemuProcess
from vmckpt.machine.spec import GuestSpec, check_name
from vmckpt.mechanisms.disk_restore import discard_restored, materialize, track_restored
from vmckpt.mechanisms.lazy_host import memory_refusal, userfaultfd_refusal
from vmckpt.mechanisms.pageserver import records
from vmckpt.mechanisms.pageserver.fork import preamble_of
from vmckpt.mechanisms.pageserver_fork import ForkedServer, take_server
from vmckpt.mechanisms.restore_prep import (
    RestoreResult,
    check_machine_type,
    qemu_args_for,
    relocate_media,
    step_clock,
)
from vmckpt.progress import NO_PROGRESS, Progress
from vmckpt.qmp import Monitor

LOAD_TIMEOUT_S = 120.0
FD_NAME = "vmckpt-postcopy"
QEMU_REFUSES = "qemu-refuses-postcopy"  # VMCKPT_FAULT value: as if QEMU refused postcopy-ram
_log = log.get(__name__)


class CannotBeLazy(RestoreError):
    """The restoring QEMU refused to be a postcopy destination (its own checks of the host
    and of the guest's RAM): the restore is to be a full one."""


@dataclass
class Prepared:
    """A layer ready to be served: its head (checked, no page index yet: the page server
    builds that while the QEMUs start) and the preamble every destination gets."""

    head: SourceHead
    preamble: bytes


def prepare(store: Store, manifest: LayerManifest) -> Prepared | str:
    """Check the layer's chain and build the preamble; or (a string) why it cannot be served
    lazily (the chain cannot be checked page by page, or its device state is not as vmckpt
    stores it). A damaged chain raises, as a compose would."""
    try:
        head = PageSource.head(store, manifest.id)
    except NoPageDigests as exc:
        return exc.message
    try:
        preamble = preamble_of(head)
    except StreamError as exc:
        return f"layer {manifest.id}: {exc.message}"
    return Prepared(head, preamble)


@dataclass(frozen=True)
class Started:
    """One guest of a lazy restore, running."""

    name: str
    pid: int
    resume_ms: float | None  # QEMU's RESUME after migrate-incoming (QEMU's and our clock)
    running_s: float  # from the restore's start until the guest ran
    clock: str = ""  # its clock stepped to now, or why not


@dataclass
class _Launch:
    name: str
    spec: GuestSpec
    guest: LocalGuest | None = None
    mon: Monitor | None = None
    mark: int = 0
    incoming_wall: float = 0.0
    console_from: int = 0
    disk_dir: Path | None = None  # its rebuilt disks, in a fresh directory of this host


def restore_lazy(
    store: Store,
    manifest: LayerManifest,
    prepared: Prepared,
    guests: Sequence[tuple[str, GuestSpec]],
    *,
    server: ForkedServer,
    extra_args: tuple[str, ...],
    started: float,
    watch_s: float = 0.0,
) -> tuple[list[Started], int]:
    """Start one QEMU per ``(name, spec)`` as a postcopy destination of ``prepared``, served
    by ``server`` (forked by fork_server, not yet ordered: this orders it, and ends it on
    failure), and return once every guest runs (and, with ``watch_s``, was watched that
    long): each guest's figures and the page server's PID. On failure every QEMU started is
    killed, the page server ends, rebuilt disks are removed, and RestoreError is raised."""
    launches = [_Launch(name, spec) for name, spec in guests]
    serving: ForkedServer | None = server
    try:
        for launch in launches:
            # As the full restore: in a fresh directory of this host's data directory.
            launch.disk_dir = store.host.fresh(
                store.host.data_dir(launch.name), f"disks-{manifest.id}-"
            )
            disks = materialize(store, manifest, launch.spec.disks, launch.disk_dir, vm=launch.name)
            launch.spec = replace(launch.spec, disks=disks)
            # The server records each guest's restore there from its start; it never makes
            # the directory itself (pageserver/records.py).
            store.host.runtime_dir(launch.name)
        names = [launch.name for launch in launches]
        log_path = store.host.runtime_dir(names[0]) / records.LOG
        server.order(store, manifest.id, names, log_path, prepared.preamble)
        for launch in launches:
            _start(store, manifest, launch, extra_args, server)
        # Each QEMU's incoming migration begins once its source serves: the page server
        # opens the chain (numpy, the index and digests: 0.1-0.2 s at 8 GiB) while the QEMUs
        # start, and a QEMU loading the device state asks for pages at once.
        pid = server.wait_ready()
        for launch in launches:
            _begin_incoming(launch, server)
        results = [_wait_running(launch, started) for launch in launches]
        server.wait_guarded()  # started once the guests run: none is left unguarded
        if watch_s > 0:
            for launch in launches:
                _watch(launch, watch_s)
        for index, launch in enumerate(launches):  # once every guest runs: no one waits
            assert launch.guest is not None
            clock = step_clock(launch.spec, launch.guest.process(), launch.mon)
            results[index] = replace(results[index], clock=clock)
        server.done()  # the page server sets each guest's head once its pages are all in
        serving = None
        return results, pid
    except BaseException as exc:
        for launch in launches:
            if launch.guest is not None:
                with contextlib.suppress(VmckptError):
                    launch.guest.process().kill()
                # Not listed as a guest that ran (its logs stay in its runtime directory).
                with contextlib.suppress(OSError, VmckptError):
                    store.host.remove_record(launch.name, GUEST_RECORD)
            if launch.disk_dir is not None:
                discard_restored(launch.spec.disks, launch.disk_dir)
        if serving is not None:
            reported = serving.failure() if isinstance(exc, VmckptError) else None
            serving.abort()
            if reported is not None and reported is not exc:
                exc = reported  # the cause: the server could not open the chain
        if isinstance(exc, RestoreError):
            raise exc.in_context(layer=manifest.id) from exc
        if isinstance(exc, StoreError):  # the page server found the chain damaged: as it is
            raise exc from None
        if isinstance(exc, VmckptError):
            raise RestoreError(exc.message, vm=exc.vm, layer=manifest.id, step=exc.step) from exc
        raise
    finally:
        for launch in launches:
            if launch.mon is not None:
                launch.mon.close()


def _start(
    store: Store,
    manifest: LayerManifest,
    launch: _Launch,
    extra_args: tuple[str, ...],
    server: ForkedServer,
) -> None:
    """Start the QEMU, make it a postcopy destination, hand it its socket to the server."""
    name = launch.name
    launch.guest = LocalGuest.start(
        store, name, launch.spec, extra_args=extra_args,
        machine_type=manifest.machine_type or None, incoming=True,
    )  # fmt: skip
    process = launch.guest.process()
    mon = process.direct_monitor(timeout=30.0)
    launch.mon = mon
    try:
        if os.environ.get(faults.ENV) == QEMU_REFUSES:
            raise QMPError(f"({faults.ENV}={QEMU_REFUSES})", vm=name, step="postcopy")
        mon.set_migrate_capabilities({"postcopy-ram": True, "events": True})
    except QMPError as exc:
        # QEMU checks, as a destination, userfaultfd and its RAM (shared, file-backed).
        raise CannotBeLazy(
            f"QEMU {mon.version} cannot be a postcopy destination here: {exc.message}",
            vm=name,
            step="postcopy",
        ) from exc
    peer = server.sockets[name]
    mon.send_fd(FD_NAME, peer.fileno())
    peer.close()
    # Writable disks: activated and given their dirty bitmaps now, before the guest can
    # write. No other QEMU holds the images (the page server serves memory only), so QEMU's
    # reason to keep an incoming guest's disks inactive until it runs does not apply; and so
    # QEMU can start the guest itself the moment its device state is loaded.
    track_restored(mon, launch.spec.disks, manifest)


def _begin_incoming(launch: _Launch, server: ForkedServer) -> None:
    """Start the QEMU's incoming migration from the server, and have it run the guest."""
    assert launch.guest is not None and launch.mon is not None
    mon = launch.mon
    launch.mark = mon.mark()
    launch.console_from = _size(launch.guest.process().serial_log)
    launch.incoming_wall = time.time()
    mon.migrate_incoming(f"fd:{FD_NAME}")
    server.go(launch.name)
    mon.cont()  # while incoming: QEMU runs the guest once the device state is loaded


def _wait_running(launch: _Launch, started: float) -> Started:
    """Wait until QEMU runs the guest (its RESUME event)."""
    assert launch.guest is not None and launch.mon is not None
    mon, process, name = launch.mon, launch.guest.process(), launch.name
    deadline = time.monotonic() + LOAD_TIMEOUT_S
    while True:
        with contextlib.suppress(QMPError):
            event = mon.wait_event({"RESUME"}, 0.05, since=launch.mark)
            running = time.monotonic()
            resume_ms = (event.timestamp - launch.incoming_wall) * 1000
            return Started(name, process.pid, round(resume_ms, 3), running - started)
        _check_loading(mon, process, launch, deadline)


def _check_loading(mon: Monitor, process: QemuProcess, launch: _Launch, deadline: float) -> None:
    if not process.alive():
        raise RestoreError(
            f"QEMU exited while loading the device state: {process.log_tail()}",
            vm=launch.name,
            step="load",
        )
    failed = [
        e for e in mon.events_since(launch.mark)
        if e.name == "MIGRATION" and e.data.get("status") == "failed"
    ]  # fmt: skip
    if failed:
        raise RestoreError(
            f"QEMU failed the incoming migration: {process.log_tail()}", vm=launch.name,
            step="load",
        )  # fmt: skip
    if time.monotonic() > deadline:
        raise RestoreError(
            f"the guest did not start within {LOAD_TIMEOUT_S:.0f} s", vm=launch.name, step="load"
        )


def _watch(launch: _Launch, seconds: float) -> None:
    """As the full restore does: a guest that dies, panics or resets at once failed."""
    assert launch.guest is not None and launch.mon is not None
    process = launch.guest.process()
    observation = observe(
        process, launch.mon, since=launch.mark, seconds=seconds,
        console_from=launch.console_from, until=lambda o: o.fatal,
    )  # fmt: skip
    if observation.exited:
        raise RestoreError(
            f"QEMU exited right after the restore: {observation.qemu_said}",
            vm=launch.name, step="check-alive",
        )  # fmt: skip
    fatal = observation.first(FATAL_EVENTS)
    if fatal is not None:
        what = f"{fatal[0]}: {fatal[1]}" if fatal[1] else fatal[0]
        raise RestoreError(
            f"the restored guest failed at once ({what}); QEMU says: {process.log_tail()}",
            vm=launch.name, step="check-alive",
        )  # fmt: skip


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def restore_lazily(
    store: Store,
    layer_ref: str | None,
    names: Sequence[str | None],
    *,
    extra_args: tuple[str, ...] | None,
    watch_s: float,
    started: float,
    same_identity: bool = False,
    progress: Progress = NO_PROGRESS,
) -> list[RestoreResult] | str:
    """``vmckpt restore`` of one guest, or of clones, lazily (one page server for them all):
    a result per guest, or (a string) why this restore cannot be lazy (the caller restores
    in full). A name None is the layer's guest. Each guest gets a new VM generation ID
    unless ``same_identity``. Anything else wrong (a damaged chain, a guest of that name
    running, media changed) raises as the full restore would."""
    why = userfaultfd_refusal()
    if why is not None:
        return why
    # Forked first, while this process has no thread (by the CLI as the command started, or
    # now): it imports and then builds the page index while this one checks the layer and
    # starts the QEMUs (pageserver_fork.py).
    server = take_server()
    try:
        return _restore_lazily(
            store, layer_ref, names, server, extra_args=extra_args, watch_s=watch_s,
            started=started, same_identity=same_identity, progress=progress,
        )  # fmt: skip
    finally:
        server.abort()  # unless it was ordered (restore_lazy's then): it exits untouched


def _restore_lazily(
    store: Store,
    layer_ref: str | None,
    names: Sequence[str | None],
    server: ForkedServer,
    *,
    extra_args: tuple[str, ...] | None,
    watch_s: float,
    started: float,
    same_identity: bool,
    progress: Progress,
) -> list[RestoreResult] | str:
    layer_id = store.resolve(layer_ref) if layer_ref else store.newest()
    manifest = store.manifest(layer_id)
    with progress.task(f"opening layer {layer_id}", None):
        prepared = prepare(store, manifest)
    if isinstance(prepared, str):
        return prepared
    opened = time.monotonic()
    guests: list[tuple[str, GuestSpec]] = []
    args: tuple[str, ...] = ()
    for given in names:
        name = check_name(given or manifest.guest)
        LocalGuest(store, name).refuse_if_running()
        check_machine_type(manifest, name)
        spec = relocate_media(GuestSpec.from_dict(manifest.spec), store)
        spec.check_media(vm=name)
        args = qemu_args_for(manifest, spec, extra_args, name, warn=not guests)
        guests.append((name, spec if same_identity else spec.with_new_identity()))
    why = memory_refusal(args)
    if why is not None:
        return why
    try:
        running, server_pid = restore_lazy(
            store, manifest, prepared, guests, server=server, extra_args=args, started=started,
            watch_s=watch_s,
        )  # fmt: skip
    except CannotBeLazy as exc:  # its QEMUs are ended: the full restore starts anew
        return exc.message
    results = []
    for guest in running:
        _log.info("%s: restored lazily from layer %s, running after %.3f s", guest.name,
                  layer_id, guest.running_s)  # fmt: skip
        results.append(
            RestoreResult(
                name=guest.name,
                layer=layer_id,
                pid=guest.pid,
                compose_s=opened - started,
                load_s=guest.running_s - (opened - started),
                total_s=time.monotonic() - started,
                stream_bytes=len(prepared.preamble),
                lazy=True,
                notes=(guest.clock,),
                resume_ms=guest.resume_ms,
                page_server=server_pid,
            )
        )
    return results
