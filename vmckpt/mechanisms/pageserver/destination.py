"""One destination of a page server: a restoring QEMU fed by one socket.

Two threads per destination: :meth:`Destination.read_loop` reads its return path (page
requests, the PONG of the package's PING, the recovery's bitmaps and acknowledgement), and
:meth:`Destination.send_loop` sends: the preamble (or, recovering, the handshake), then the
requested pages first and the pushed chunks between them, then the end of the stream once
QEMU has loaded the device state. Each page is sent to a destination exactly once (a
boolean per page, numpy): QEMU asks again for pages already on their way, and those
requests are counted as duplicates and dropped; zero pages are sent only when asked for.
While the guest is faulting, at most BUSY_AHEAD bytes of pushed pages wait in the socket
ahead of a requested page (SIOCOUTQ).
"""

from __future__ import annotations

import array
import collections
import contextlib
import fcntl
import queue
import socket
import termios
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeAlias

from vmckpt import log
from vmckpt.errors import CorruptLayerError, StreamError
from vmckpt.images.pagesource import ZERO, PageReader, PageSource
from vmckpt.lazy_numpy import np
from vmckpt.machine.qemu import QemuProcess
from vmckpt.ram import PAGE_SIZE, distinct
from vmckpt.ram import quantile as ram_quantile
from vmckpt.stream import postcopy as pc

if TYPE_CHECKING:
    import numpy.typing as npt

SEND_PAGES = 256  # pages pushed per section (1 MiB)
QUEUE_DEPTH = 3  # read runs queued ahead per destination
SEND_BUFFER = 4 << 20  # bytes
# A page QEMU asks for queues behind the pushed pages already in the socket (one stream).
# While the guest is faulting (a request in the last BUSY_S), at most BUSY_AHEAD bytes of
# pushed pages may wait there; otherwise the whole buffer fills.
BUSY_S = 0.05
BUSY_AHEAD = 256 << 10
HOLD_POLL_S = 0.0005
HANDSHAKE_TIMEOUT_S = 60.0
_log = log.get("vmckpt.pageserver")

Chunk: TypeAlias = "tuple[npt.NDArray[np.int64], npt.NDArray[np.uint8]]"  # pages, their rows


@dataclass
class Counters:
    """What a destination got, and how: the benchmark's and ``list``'s numbers."""

    stored_total: int = 0  # stored pages of the layer's chain (what "all in" means)
    stored_in: int = 0  # of them, in the destination
    pushed: int = 0  # pages sent by the background push
    on_demand: int = 0  # pages sent because the destination asked (zero pages included)
    zero_on_demand: int = 0
    requests: int = 0  # page requests received
    duplicates: int = 0  # requests for pages already sent
    late: int = 0  # requests after the end of the stream (QEMU zero-fills those)
    latencies: list[float] = field(default_factory=list)  # request arrival to its answer, s
    started: float = field(default_factory=time.monotonic)
    all_in_s: float | None = None  # from the start of serving to the last page sent
    # Where the sender's time went while pushing (s): what limits the push rate.
    starved_s: float = 0.0  # waiting for the next read run (the reader is behind)
    held_s: float = 0.0  # holding pushed pages back while the guest faults (BUSY_AHEAD)
    sending_s: float = 0.0  # in send() of pushed pages (blocked: the destination is behind)

    def latency_ms(self, quantile: float) -> float | None:
        if not self.latencies:
            return None
        return round(ram_quantile(self.latencies, quantile) * 1000, 3)


class Destination:
    """One restoring QEMU the server feeds (module doc)."""

    def __init__(self, name: str, source: PageSource, section_id: int) -> None:
        self.name = name
        self.source = source
        self.layout = pc.PageLayout(source.blocks)
        self.writer = pc.RecordWriter(self.layout, section_id)
        self.section_id = section_id
        self.sent = np.zeros(self.layout.total, dtype=np.bool_)
        self.requests: collections.deque[tuple[pc.PageRequest, float]] = collections.deque()
        self.control: queue.Queue[pc.Message | None] = queue.Queue()
        self.chunks: queue.Queue[Chunk | None] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.wake = threading.Event()
        self.counters = Counters(stored_total=int(source.stored.size))
        self.sock: socket.socket | None = None
        self.process: QemuProcess | None = None
        self.state = "starting"  # serving, ending, done, gone, failed
        self.error: str | None = None
        self.shut = threading.Event()  # the return path ended (SHUT or closed)
        # QEMU answered the PING inside the package: its device state is loaded. Until then
        # its main thread may still fault on a page (zero pages included), so the stream
        # must not end before.
        self.package_loaded = threading.Event()
        self.closing = False
        self.threads: list[threading.Thread] = []
        self.last_request = 0.0  # monotonic time of the latest page request

    @property
    def finished(self) -> bool:
        return self.state in ("done", "gone", "failed")

    # -- the return path ----------------------------------------------------------------

    def read_loop(self, sock: socket.socket) -> None:
        path = pc.ReturnPath(sock, self.layout)
        try:
            while True:
                message = path.next()
                if message is None or isinstance(message, pc.Shut):
                    if isinstance(message, pc.Shut) and message.status:
                        self.error = f"QEMU ended the migration with status {message.status}"
                    break
                if isinstance(message, pc.PageRequest):
                    self.counters.requests += 1
                    if self.state == "ending":
                        self.counters.late += 1
                        continue
                    self.last_request = time.monotonic()
                    self.requests.append((message, self.last_request))
                    self.wake.set()
                elif isinstance(message, pc.Pong) and message.value == pc.PACKAGE_LOADED:
                    self.package_loaded.set()
                    self.wake.set()
                elif isinstance(message, pc.ReceivedBitmap | pc.ResumeAck):
                    self.control.put(message)
        except (OSError, EOFError, StreamError) as exc:
            if not self.closing:
                _log.info("%s: return path: %s", self.name, exc)
        finally:
            self.shut.set()
            self.control.put(None)
            self.wake.set()

    # -- sending ------------------------------------------------------------------------

    def send(self, buffers: Sequence[memoryview | bytes]) -> None:
        assert self.sock is not None
        pc.send_buffers(self.sock, buffers)

    def handshake(self) -> None:
        """Recovery: learn what the destination holds (RECV_BITMAP per block), resume it."""
        for block in self.layout.blocks:
            self.send([pc.recv_bitmap_command(block.idstr)])
        for _ in self.layout.blocks:
            message = self._control("a received bitmap")
            if not isinstance(message, pc.ReceivedBitmap):
                raise StreamError(f"expected a received bitmap, got {message}", step="recover")
            start = int(self.layout.starts[message.block])
            self.sent[start : start + message.received.size] = message.received
        stored = self.source.stored
        self.counters.stored_in = int(np.count_nonzero(self.sent[stored]))
        self.send([pc.resume_command()])
        message = self._control("the resume acknowledgement")
        if not isinstance(message, pc.ResumeAck):
            raise StreamError(f"expected RESUME_ACK, got {message}", step="recover")
        self.package_loaded.set()  # a destination is paused only once it ran
        _log.info(
            "%s: resumed: %d of %d stored pages were in", self.name, self.counters.stored_in,
            stored.size,
        )  # fmt: skip

    def _control(self, what: str) -> pc.Message:
        try:
            message = self.control.get(timeout=HANDSHAKE_TIMEOUT_S)
        except queue.Empty:
            raise StreamError(f"{what} did not come", step="recover") from None
        if message is None:
            raise StreamError(f"the return path ended before {what}", step="recover")
        return message

    def serve_requests(self, reader: PageReader) -> None:
        """Answer every pending request (one section), pages not sent yet only."""
        if not self.requests:
            return
        wanted: list[npt.NDArray[np.int64]] = []
        arrivals: list[float] = []
        while self.requests:
            request, arrived = self.requests.popleft()
            pages = np.arange(request.first, request.first + request.count, dtype=np.int64)
            fresh = pages[~self.sent[pages]]
            if fresh.size:
                wanted.append(fresh)
                arrivals.append(arrived)
            else:
                self.counters.duplicates += 1
        if not wanted:
            return
        pages = distinct(np.concatenate(wanted))
        owners = self.source.owner[pages]
        stored, zero = pages[owners != ZERO], pages[owners == ZERO]
        rows = np.empty((stored.size, PAGE_SIZE), dtype=np.uint8)
        reader.read(stored, rows)
        self.send(self.writer.section(stored, rows, zero))
        self.sent[pages] = True
        self.counters.on_demand += int(pages.size)
        self.counters.zero_on_demand += int(zero.size)
        self.counters.stored_in += int(stored.size)
        answered = time.monotonic()
        self.counters.latencies.extend(answered - arrived for arrived in arrivals)

    def hold_back(self, reader: PageReader) -> None:
        """While the guest is faulting, push no more until the socket holds at most
        BUSY_AHEAD bytes the destination has not read (requests answered meanwhile)."""
        assert self.sock is not None
        while (
            time.monotonic() - self.last_request < BUSY_S
            and _unsent(self.sock) > BUSY_AHEAD
            and not self.closing
            and not self.shut.is_set()
        ):
            if self.requests:
                self.serve_requests(reader)
            elif self.wake.wait(HOLD_POLL_S):
                self.wake.clear()

    def push(self, pages: npt.NDArray[np.int64], rows: npt.NDArray[np.uint8]) -> None:
        fresh = ~self.sent[pages]
        if not fresh.all():
            pages, rows = pages[fresh], rows[fresh]
        if not pages.size:
            return
        self.send(self.writer.section(pages, rows))
        self.sent[pages] = True
        self.counters.pushed += int(pages.size)
        self.counters.stored_in += int(pages.size)

    def send_loop(self, preamble: bytes | None) -> None:
        """The destination's sender: preamble (or the recovery handshake), then requests
        first and pushed chunks in between, then the end of the stream."""
        try:
            with self.source.reader() as reader:
                if preamble is not None:
                    self.send([preamble])
                else:
                    self.handshake()
                self.state = "serving"
                self.counters.started = time.monotonic()
                while not self.closing:
                    self.serve_requests(reader)
                    try:
                        item = self.chunks.get_nowait()
                    except queue.Empty:
                        if self.shut.is_set():
                            raise OSError("the destination closed the stream") from None
                        waited = time.monotonic()
                        self.wake.wait(0.01)
                        self.wake.clear()
                        self.counters.starved_s += time.monotonic() - waited
                        continue
                    if item is None:
                        break
                    pages, rows = item
                    for start in range(0, pages.size, SEND_PAGES):
                        self.serve_requests(reader)
                        began = time.monotonic()
                        self.hold_back(reader)
                        held = time.monotonic()
                        end = start + SEND_PAGES
                        self.push(pages[start:end], rows[start:end])
                        self.counters.held_s += held - began
                        self.counters.sending_s += time.monotonic() - held
                # Every stored page is sent; the stream ends once the device state is loaded
                # (requests answered meanwhile).
                while not self.closing and not self.package_loaded.is_set():
                    self.serve_requests(reader)
                    if self.shut.is_set():
                        raise OSError("the destination closed the stream") from None
                    self.wake.wait(0.01)
                    self.wake.clear()
                if self.closing:
                    return
                self.serve_requests(reader)
                missing = int(self.source.stored.size) - self.counters.stored_in
                if missing:
                    raise StreamError(f"{missing} stored page(s) were never sent", step="push")
                self.counters.all_in_s = time.monotonic() - self.counters.started
                self.state = "ending"
                self.send([pc.end_of_stream(self.section_id)])
                _log.info(
                    "%s: all pages in after %.3f s (%d pushed, %d on demand, %d duplicate "
                    "requests)", self.name, self.counters.all_in_s, self.counters.pushed,
                    self.counters.on_demand, self.counters.duplicates,
                )  # fmt: skip
        except CorruptLayerError as exc:
            self.fail(exc.one_line())
        except (OSError, StreamError) as exc:
            if not self.closing and self.state not in ("gone", "failed"):
                self.state = "broken"
                self.error = str(exc)
                _log.warning("%s: the stream broke: %s", self.name, exc)

    def fail(self, message: str) -> None:
        self.state = "failed"
        self.error = message
        _log.error("%s: %s", self.name, message)

    def close(self) -> None:
        self.closing = True
        self.wake.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self.chunks.get_nowait()
        with contextlib.suppress(queue.Full):
            self.chunks.put_nowait(None)
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


def hand(
    destination: Destination,
    item: Chunk | None,
) -> None:
    """Queue a read run (None: the end of the push) for a destination's sender, waiting while
    its queue is full, unless it is closing or finished."""
    while not destination.closing and not destination.finished:
        try:
            destination.chunks.put(item, timeout=0.1)
            destination.wake.set()
            return
        except queue.Full:
            continue


def _unsent(sock: socket.socket) -> int:
    """Bytes written to the socket that the destination has not read yet (SIOCOUTQ)."""
    count = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, count, True)
    except OSError:
        return 0
    return int(count[0])


def widen(sock: socket.socket) -> None:
    """A send buffer of SEND_BUFFER (as root beyond net.core.wmem_max): the push then wakes
    QEMU's loader a few times per MiB, not per page run."""
    for option in (getattr(socket, "SO_SNDBUFFORCE", None), socket.SO_SNDBUF):
        if option is None:
            continue
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
            return
