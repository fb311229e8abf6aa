"""A lazy restore's first page server, forked by the restore command: the server's side.

vmckpt/mechanisms/pageserver_fork.py forks it (as the command starts) and keeps the
command's side. Here, in the forked process: while its main thread imports the server and
numpy, a thread waits for the command's order (the store, the layer, the guests, one socket
each) and then reads and hashes the chain's indexes and page digests ahead; the server then
opens the chain as a page source, builds the stream's preamble (:func:`preamble_of`, as the
command did) and serves only if both are the same. No order (the command closed its socket:
a full restore, a failure) and it exits, having touched nothing.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import socket
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vmckpt import log
from vmckpt.errors import RestoreError, StreamError, VmckptError
from vmckpt.fsutil import FILE_MODE
from vmckpt.images import Store
from vmckpt.images.format import INDEX, SUMS
from vmckpt.images.pagesource import STEP, PageSource, SourceHead
from vmckpt.lazy_numpy import np
from vmckpt.stream import StreamEnvelope
from vmckpt.stream import postcopy as pc

# The server's own modules (and numpy, through them) are imported by the forked server,
# while the restore command starts the QEMUs: not by the command before it forks.
if TYPE_CHECKING:
    from vmckpt.mechanisms.pageserver.server import PageServer

ORDER_LIMIT = 64 * 1024  # the order's bytes, at most (a few hundred names' worth)
_log = log.get("vmckpt.pageserver")


def preamble_of(head: SourceHead) -> bytes:
    """What a destination of ``head`` is sent first (vmckpt/stream/postcopy.py): the stored
    device state cut for postcopy. StreamError if it is not as vmckpt stores it."""
    manifest = head.manifest
    envelope = StreamEnvelope(
        prelude=head.prelude,
        machine_type=manifest.machine_type,
        ram_section_id=manifest.ram_section[0],
        ram_instance_id=manifest.ram_section[1],
        ram_version_id=manifest.ram_section[2],
        epilogue=head.device_state,
    )
    return pc.preamble(envelope, head.blocks, pc.split_device_state(head.device_state))


def _log_to(log_path: Path) -> None:
    """Stdout and stderr to the guest's pageserver.log (the command's terminal never)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, FILE_MODE)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115


@dataclass(frozen=True)
class _Order:
    store: Path
    layer: str
    names: list[str]
    log: Path
    preamble: str  # its SHA-256, as the command built it
    sockets: dict[str, socket.socket]


def _receive_order(control: socket.socket) -> _Order | None:
    """The command's order, or None if it closed the socket instead (no lazy restore)."""
    data, fds, _flags, _addr = socket.recv_fds(control, ORDER_LIMIT, 64)
    control.close()
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    order = json.loads(data)
    names = list(order["names"])
    if len(fds) != len(names):
        for fd in fds:
            os.close(fd)
        raise RestoreError(f"{len(fds)} sockets came for {len(names)} guests", step="page-server")
    sockets = {name: socket.socket(fileno=fd) for name, fd in zip(names, fds, strict=True)}
    return _Order(
        Path(order["store"]), str(order["layer"]), names, Path(order["log"]),
        str(order["preamble"]), sockets,
    )  # fmt: skip


def forked_main(control: socket.socket, go_read: int, ready_write: int) -> int:
    """The forked page server's body (detached already): its exit code."""
    pipe = _ReadyPipe(ready_write)
    try:
        # The order comes once the command's checks passed; meanwhile this thread imports
        # (numpy: ~60 ms). Once it came, the chain's indexes and page digests are read and
        # hashed (30-60 ms at 8 GiB) beside the rest of the import and the index's build.
        ordering = _Ordering(control)
        ordering.start()
        from vmckpt.mechanisms.pageserver.server import PageServer, held, serve

        np.ndarray  # noqa: B018  (numpy itself, now: PageSource.open needs it)
        # As the command does (cli.main): what the imports made is never collected, so no
        # collection during the push scans it.
        gc.freeze()
        ordered = ordering.result()
        if ordered is None:
            return 0  # the command restores in full, failed or is gone: nothing was touched
        store, order = ordered
        _log_to(order.log)
        log.configure(1)
        try:
            source = PageSource.open(store, order.layer)
        finally:
            store.reader.drop_prefetched()
        try:
            preamble = preamble_of(SourceHead(source.chain, source.blocks, source.prelude,
                                              source.device_state))  # fmt: skip
        except StreamError as exc:
            source.close()
            raise RestoreError(exc.message, layer=order.layer, step="page-server") from exc
        if hashlib.sha256(preamble).hexdigest() != order.preamble:
            source.close()
            raise RestoreError(
                "the layer changed while the restore started", layer=order.layer,
                step="page-server",
            )  # fmt: skip
        server = PageServer(store, source, order.names)
        preambles = dict.fromkeys(order.names, preamble)

        follower = threading.Thread(
            target=_follow_go, args=(server, go_read), name="go", daemon=True
        )
        follower.start()
        _log.info("page server %d: layer %s for %s", os.getpid(), source.manifest.id,
                  ", ".join(order.names))  # fmt: skip
        with held(store, order.names):
            return serve(
                server, order.sockets, preambles,
                announce=lambda: pipe.say(f"ready {os.getpid()}"),
                guarded=lambda: pipe.say("guarded", last=True),
            )  # fmt: skip
    except VmckptError as exc:
        _log.error("%s", exc.one_line())
        pipe.say(f"failed {json.dumps(exc.to_wire())}", last=True)  # raised as it is
        return exc.exit_code
    except BaseException as exc:
        _log.exception("page server failed: %r", exc)
        pipe.say(f"error {exc!r}", last=True)
        return 1


class _Ordering(threading.Thread):
    """Waits for the command's order, opens its store, then reads the chain's indexes and
    digests ahead."""

    def __init__(self, control: socket.socket) -> None:
        super().__init__(name="order", daemon=True)
        self._control = control
        self._ordered: tuple[Store, _Order] | None = None
        self._error: BaseException | None = None

    def run(self) -> None:
        try:
            order = _receive_order(self._control)
            if order is None:
                return
            store = Store(order.store)
            self._ordered = (store, order)
        except BaseException as exc:  # raised by result(), in the server's main thread
            self._error = exc
            return
        with contextlib.suppress(VmckptError, OSError):  # the open reports it, if needed
            chain = store.chain(order.layer, STEP)
            store.reader.prefetch(reversed(chain), (INDEX, SUMS), STEP)

    def result(self) -> tuple[Store, _Order] | None:
        self.join()
        if self._error is not None:
            raise self._error
        return self._ordered


class _ReadyPipe:
    """The server's side of its ready pipe: lines until the last, then closed (and never
    written again: its descriptor's number may be another file's by then)."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def say(self, line: str, *, last: bool = False) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):  # the restore command is gone: nobody to tell
            os.write(self.fd, f"{line}\n".encode())
        if last:
            os.close(self.fd)
            self.fd = None


def _follow_go(server: PageServer, fd: int) -> None:
    """The restore command's word on each destination: go (its QEMU is receiving) or abort."""
    from vmckpt.mechanisms.pageserver.server import guest_process

    pending = set(server.names)
    aborted = False
    with os.fdopen(fd, "rb") as lines:
        for raw in lines:
            words = raw.decode(errors="replace").split()
            if words[:1] == ["go"] and len(words) == 2 and words[1] in pending:
                pending.discard(words[1])
                destination = server.destinations[words[1]]
                with contextlib.suppress(VmckptError):
                    destination.process = guest_process(server.store, words[1])
            elif words[:1] == ["abort"]:
                aborted = True
                break
    if pending or aborted:  # the restore failed (or died) before its guests all ran
        _log.info("the restore did not go ahead; ending")
        for destination in server.destinations.values():
            destination.state = "gone"
            destination.close()
        server.stop.set()
