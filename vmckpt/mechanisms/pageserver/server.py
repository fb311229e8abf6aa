"""The page server's work: one :class:`PageServer` feeds every destination of a restore.

It reads each chunk of the push once, checked, for every destination still served (clones
share one read of the store: :meth:`PageServer.produce`), starts each destination's threads
(vmckpt/mechanisms/pageserver/destination.py), watches them until each is done (its QEMU
reports the migration ``completed``) or gone, writes their records (records.py) and puts
the capabilities the restore set back. :func:`serve` is the body of every page server
process, forked by a restore (fork.py) or spawned to recover (recovery.py): it holds the
guests' checkpoint locks, runs the server's guard, and decides its exit code: 0 done, 1 a
destination failed (its QEMU ended), 3 a stream broke while its QEMU runs (the guard then
starts a recovery, as if this server had died).
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from vmckpt import faults, log
from vmckpt.errors import CorruptLayerError, QMPError, VmckptError
from vmckpt.guard import Guard
from vmckpt.guests.local import LocalGuest
from vmckpt.images import Store
from vmckpt.images.pagesource import PageSource
from vmckpt.lazy_numpy import np
from vmckpt.machine.qemu import QemuProcess, process_start_time
from vmckpt.mechanisms.pageserver import records
from vmckpt.mechanisms.pageserver.destination import Destination, hand, widen
from vmckpt.qmp import Monitor
from vmckpt.ram import PAGE_SIZE

MODULE = "vmckpt.mechanisms.pageserver"  # python -m MODULE resume: a recovery server
# python -m GUARD_MODULE: the server's guard (a module outside this package: light to start)
GUARD_MODULE = "vmckpt.mechanisms.pageserver_guard"
READ_PAGES = 2048  # pages read and checked at a time for the push (8 MiB)
STATUS_EVERY_S = 0.5
POLL_S = 0.05
MONITOR_TIMEOUT_S = 30.0
END_TIMEOUT_S = 120.0  # after EOF: the destination reports completion within this
LOADED_WAIT_S = 10.0  # a first server's push and guard wait at most this for the guests to run
PUSH_PACE = "push-pace-ms"  # VMCKPT_FAULT=push-pace-ms:N: N ms between pushed chunks (tests)
_log = log.get("vmckpt.pageserver")


class PageServer:
    """Feeds every destination of one restore (module doc)."""

    def __init__(self, store: Store, source: PageSource, names: Sequence[str]) -> None:
        self.store = store
        self.source = source
        self.names = list(names)
        section_id = source.manifest.ram_section[0]
        self.destinations = {name: Destination(name, source, section_id) for name in names}
        self.stop = threading.Event()
        self.guard: Guard | None = None
        self.failure: str | None = None
        self.mode = "initial"
        self.reading_s = 0.0  # the push's reads (and page checks), s
        self.handing_s = 0.0  # the push waiting for a destination's queue (it is behind), s

    # -- records ------------------------------------------------------------------------

    def record(self, destination: Destination) -> dict[str, Any]:
        counters = destination.counters
        total = max(1, counters.stored_total)
        return {
            "pid": os.getpid(),
            "start_time": process_start_time(os.getpid()),
            "guard_pid": self.guard.pid if self.guard is not None else None,
            "layer": self.source.manifest.id,
            "guests": self.names,
            "mode": self.mode,
            "state": destination.state,
            "error": destination.error or self.failure,
            "pages_total": counters.stored_total,
            "pages_in": counters.stored_in,
            "percent": int(100 * counters.stored_in / total),
            "pushed": counters.pushed,
            "on_demand": counters.on_demand,
            "zero_on_demand": counters.zero_on_demand,
            "requests": counters.requests,
            "duplicates": counters.duplicates,
            "late_requests": counters.late,
            "request_ms_median": counters.latency_ms(0.5),
            "request_ms_p99": counters.latency_ms(0.99),
            "request_ms_max": counters.latency_ms(1.0),
            "all_in_s": counters.all_in_s,
            "starved_s": round(counters.starved_s, 3),
            "held_s": round(counters.held_s, 3),
            "sending_s": round(counters.sending_s, 3),
            "reading_s": round(self.reading_s, 3),
            "handing_s": round(self.handing_s, 3),
        }

    def wait_loaded(self, timeout: float) -> None:
        """Until every destination has loaded its device state (QEMU answered the package's
        PING: its guest runs), or is done for; at most ``timeout``."""
        deadline = time.monotonic() + timeout
        for destination in self.destinations.values():
            while not destination.package_loaded.wait(0.002):
                if destination.closing or destination.finished or destination.shut.is_set():
                    break
                if destination.state == "broken" or time.monotonic() > deadline:
                    break

    def write_records(self) -> None:
        for name, destination in self.destinations.items():
            with contextlib.suppress(OSError, VmckptError):
                records.write(self.store, name, records.RECORD, self.record(destination))

    # -- the work -----------------------------------------------------------------------

    def produce(self) -> None:
        """Read each chunk of the push once, checked, for every destination still served."""
        pace = faults.value(PUSH_PACE) or 0  # tests: a push slow enough to be interrupted
        try:
            with self.source.reader() as reader:
                for pages in self.source.push_order(READ_PAGES):
                    if pace:
                        time.sleep(pace / 1000)
                    live = [
                        d for d in self.destinations.values() if not d.finished and not d.closing
                    ]
                    if not live or self.stop.is_set():
                        return
                    need = np.zeros(pages.size, dtype=np.bool_)
                    for destination in live:
                        need |= ~destination.sent[pages]
                    if not need.all():
                        pages = pages[need]
                        if not pages.size:
                            continue
                    rows = np.empty((pages.size, PAGE_SIZE), dtype=np.uint8)
                    began = time.monotonic()
                    reader.read(pages, rows)
                    self.reading_s += time.monotonic() - began
                    began = time.monotonic()
                    for destination in live:
                        hand(destination, (pages, rows))
                    self.handing_s += time.monotonic() - began
        except CorruptLayerError as exc:
            self.failure = exc.one_line()
            for destination in self.destinations.values():
                destination.fail(self.failure)
        finally:
            for destination in self.destinations.values():
                hand(destination, None)  # the end of the push

    def start_destination(
        self, destination: Destination, sock: socket.socket, preamble: bytes | None
    ) -> None:
        widen(sock)
        destination.sock = sock
        reader = threading.Thread(
            target=destination.read_loop, args=(sock,), name=f"rp-{destination.name}", daemon=True
        )
        sender = threading.Thread(
            target=destination.send_loop, args=(preamble,), name=f"send-{destination.name}",
            daemon=True,
        )  # fmt: skip
        destination.threads = [reader, sender]
        reader.start()
        sender.start()

    def watch(self, monitors: dict[str, Monitor]) -> None:
        """Until every destination is done: progress records, QEMUs alive, completion."""
        last = 0.0
        while not self.stop.is_set():
            for name, destination in self.destinations.items():
                if name not in monitors and destination.process is not None:
                    with contextlib.suppress(VmckptError):
                        monitors[name] = monitor_of(destination.process)
                self._check(name, destination, monitors.get(name))
            if all(d.finished or d.state == "broken" for d in self.destinations.values()):
                break
            if time.monotonic() - last >= STATUS_EVERY_S:
                self.write_records()
                last = time.monotonic()
            self.stop.wait(POLL_S)

    def _check(self, name: str, destination: Destination, mon: Monitor | None) -> None:
        process = destination.process
        if destination.finished:
            return
        if process is not None and not process.alive():
            destination.state = "gone"
            _log.info("%s: its QEMU is gone; nothing more to serve it", name)
            destination.close()
            return
        if destination.state == "failed":
            return
        if destination.state == "ending" and destination.shut.is_set():
            status = ""
            if mon is not None:
                with contextlib.suppress(QMPError):
                    deadline = time.monotonic() + END_TIMEOUT_S
                    while time.monotonic() < deadline:
                        status = mon.query_migrate().status
                        if status in ("completed", "failed"):
                            break
                        time.sleep(POLL_S)
            if status == "completed" or (mon is None and destination.error is None):
                destination.state = "done"
                _log.info("%s: migration completed", name)
            else:
                destination.fail(
                    f"the destination did not complete the migration ({status or 'no answer'}"
                    f"{': ' + destination.error if destination.error else ''})"
                )

    def end_failed(self) -> None:
        """The restore of a destination failed after its guest started (a page that did not
        check out, a migration QEMU did not complete): that guest cannot go on; end its QEMU."""
        for destination in self.destinations.values():
            if destination.state != "failed":
                continue
            destination.close()
            if destination.process is not None:
                destination.process.kill()


def monitor_of(process: QemuProcess, timeout: float = MONITOR_TIMEOUT_S) -> Monitor:
    """A destination's monitor for its page server: the session monitor (no checkpoint runs
    while its pages come in), with out-of-band commands. The server hands the connection
    to its guard, and the guard to the server it starts: a recovery must be able to send
    ``migrate-recover`` while a vCPU waiting for a page holds QEMU's big lock, and a new
    connection could not even be negotiated then."""
    return process.session_monitor(timeout=timeout, oob=True)


def open_monitors(server: PageServer, monitors: dict[str, Monitor]) -> None:
    """A monitor for each destination whose QEMU is known and that has none yet."""
    for name, destination in server.destinations.items():
        if name in monitors or destination.process is None or destination.finished:
            continue
        try:
            monitors[name] = monitor_of(destination.process)
        except VmckptError as exc:
            _log.warning("%s: no monitor for its recovery: %s", name, exc.one_line())


def start_guard(server: PageServer, monitors: dict[str, Monitor]) -> None:
    """Start the server's guard, holding the destinations' monitor connections."""
    handed = {name: mon.handover_socket().fileno() for name, mon in monitors.items() if mon.oob}
    argv = guard_argv(server.store, server.source.manifest.id, server.names, handed)
    server.guard = Guard(argv, module=GUARD_MODULE, pass_fds=list(handed.values()))
    server.guard.start()


def settle(mon: Monitor, name: str) -> None:
    """The migration completed: the capabilities the restore set go back to QEMU's defaults
    (a guest whose QEMU keeps postcopy-ram would offer postcopy to its next checkpoint)."""
    try:
        mon.set_migrate_capabilities({"postcopy-ram": False, "events": False})
    except QMPError as exc:
        _log.warning("%s: the migration capabilities stay set: %s", name, exc.message)


def guest_process(store: Store, name: str) -> QemuProcess:
    return LocalGuest(store, name).process()


def guard_argv(
    store: Store, layer: str, names: Sequence[str], monitors: Mapping[str, int] | None = None
) -> list[str]:
    """The arguments of a guard or a recovery server: ``monitors`` are the descriptors of
    monitor connections it inherits, per guest."""
    argv = ["--store", str(store.path), "--layer", layer]
    for name in names:
        argv += ["--guest", name]
    for name, fd in (monitors or {}).items():
        argv += ["--monitor", f"{name}={fd}"]
    return argv


def parse_monitors(values: Sequence[str] | None) -> dict[str, int]:
    """``--monitor NAME=FD`` arguments back into {name: fd}."""
    result: dict[str, int] = {}
    for value in values or []:
        name, _, fd = value.rpartition("=")
        result[name] = int(fd)
    return result


@contextlib.contextmanager
def held(store: Store, names: Sequence[str], wait_s: float = 60.0) -> Iterator[None]:
    """Each guest's checkpoint lock: no checkpoint while its pages are coming in (and no
    second page server)."""
    with contextlib.ExitStack() as stack:
        for name in names:
            stack.enter_context(store.host.guest_lock(name, what="page server", wait_s=wait_s))
        yield


def serve(
    server: PageServer,
    sockets: dict[str, socket.socket],
    preambles: dict[str, bytes] | None,
    announce: Callable[[], None] | None = None,
    guarded: Callable[[], None] | None = None,
    monitors: dict[str, Monitor] | None = None,
) -> int:
    """The body of a page server process once its destinations are connected (or about to
    be), holding their checkpoint locks: returns its exit code. A restore command's first
    server calls ``announce()`` once its records are written and it serves, and
    ``guarded()`` once its guard runs (the command waits for both). A recovery server
    brings the destinations' ``monitors`` (:func:`monitor_of`)."""
    store = server.store
    monitors = {} if monitors is None else monitors
    released = False
    first = announce is not None
    try:
        if not first:
            start_guard(server, monitors)
        server.write_records()
        if announce is not None:
            announce()
        for name, destination in server.destinations.items():
            preamble = preambles[name] if preambles is not None else None
            server.start_destination(destination, sockets[name], preamble)
        producer = threading.Thread(target=server.produce, name="push", daemon=True)
        if preambles is None:  # recovery: push only once every handshake is done
            for destination in server.destinations.values():
                while destination.state == "starting" and not destination.shut.is_set():
                    time.sleep(POLL_S)
        if first:
            # The QEMUs load their device state first (with the pages they ask for meanwhile):
            # the push, and the guard's start (a Python's: ~25 ms of CPU), wait for that so as
            # not to take the host's CPUs from it (measured at 4 GiB on 2 cores: 40 ms of the
            # command's 0.31 s). The command returns only once the guard runs (guarded).
            server.wait_loaded(LOADED_WAIT_S)
            open_monitors(server, monitors)
            start_guard(server, monitors)
            server.write_records()
            if guarded is not None:
                guarded()
        producer.start()
        server.watch(monitors)
        for name, destination in server.destinations.items():
            if destination.state != "done":
                continue
            if name in monitors:
                settle(monitors[name], name)
            # Only now is the guest's memory all the layer's: it becomes the guest's head
            # (a restore whose page failed its digest never makes a damaged layer a head).
            # Before the record goes: a checkpoint waiting for it then has its parent.
            try:
                store.set_head(name, server.source.manifest.id)
            except VmckptError as exc:
                destination.error = f"its head could not be set: {exc.one_line()}"
                _log.error("%s: %s", name, destination.error)
        server.write_records()
        if any(d.state == "failed" for d in server.destinations.values()):
            server.end_failed()
        for destination in server.destinations.values():
            if destination.state == "broken" and (
                destination.process is not None and not destination.process.alive()
            ):
                destination.state = "gone"  # its stream broke because its QEMU ended
        broken = [d for d in server.destinations.values() if d.state == "broken"]
        if broken:
            # A stream broke while its QEMU runs: leave it to the guard (a new server
            # recovers it), as if this one had died.
            _log.warning("%s: stream broken, leaving it to recovery", broken[0].name)
            return 3
        if server.guard is not None:
            server.guard.release()
        released = True
    finally:
        for destination in server.destinations.values():
            destination.close()
        for mon in monitors.values():
            with contextlib.suppress(Exception):
                mon.close()
        if released:
            for name, destination in server.destinations.items():
                if destination.state == "failed":
                    continue
                with contextlib.suppress(OSError, VmckptError):
                    if destination.state == "done":
                        done = {**server.record(destination), "completed": time.time()}
                        records.write(store, name, records.DONE, done)
                    records.remove(store, name)
    return 1 if any(d.state == "failed" for d in server.destinations.values()) else 0
