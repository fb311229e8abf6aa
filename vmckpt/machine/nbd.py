"""Writing into a disk image QEMU's block layer owns: a qemu-storage-daemon serving the image
over NBD, and vmckpt as its one client.

A restore applies a layer's disk deltas into a qcow2 overlay (vmckpt/mechanisms/disk_restore.py):
only the clusters the deltas name are written, the overlay's backing image is never touched,
and zeroed ranges become qcow2 zero clusters (no data written). qemu-img has no command that
writes bytes from a stream at an offset, hence the daemon.

The daemon is started by vmckpt as its child and handed an already listening socket (an
abstract Unix socket: no path anyone could plant or race for); vmckpt connects at once (the
connection waits in the backlog until the daemon accepts it). The client speaks the fixed
newstyle handshake with ``NBD_OPT_EXPORT_NAME`` and simple replies: ``NBD_CMD_WRITE`` (at
most 4 MiB each), ``NBD_CMD_WRITE_ZEROES``, ``NBD_CMD_FLUSH``, ``NBD_CMD_DISC``
(https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md). Up to
:data:`MAX_IN_FLIGHT` writes are in flight at once (a reply's round trip per cluster made a
delta of scattered clusters slow); the server may complete them in any order, so a write
that overlaps one in flight waits until every one in flight is answered. The
daemon is ended by its PID (SIGTERM, which makes it close its images in order; SIGKILL
after a timeout).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
from pathlib import Path
from types import TracebackType

from vmckpt.errors import MachineError
from vmckpt.machine.binary import qemu_binary

EXPORT = b"vmckpt"
OPTS_MAGIC = b"IHAVEOPT"
HELLO = b"NBDMAGIC" + OPTS_MAGIC
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_EXPORT_NAME = 1
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_WRITE_ZEROES = 1 << 6
REQUEST = struct.Struct(">IHHQQI")
REQUEST_MAGIC = 0x25609513
REPLY = struct.Struct(">IIQ")
REPLY_MAGIC = 0x67446698
CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_WRITE_ZEROES = 1, 2, 3, 6
MAX_WRITE = 4 << 20  # bytes per NBD_CMD_WRITE (QEMU's server takes up to 32 MiB)
MAX_ZEROES = 1 << 30  # bytes per NBD_CMD_WRITE_ZEROES
END_TIMEOUT_S = 30.0
# Requests sent before their replies are read: QEMU's server serves 16 at once; their
# replies (16 bytes each) always fit the socket's buffer, so neither side blocks the other.
MAX_IN_FLIGHT = 16


def storage_daemon() -> str:
    """qemu-storage-daemon beside the QEMU in use, else PATH's."""
    beside = Path(qemu_binary()).with_name("qemu-storage-daemon")
    if beside.is_file():
        return str(beside)
    found = shutil.which("qemu-storage-daemon")
    if found is None:
        raise MachineError(
            "qemu-storage-daemon not found (install qemu-system-common)", step="disk-write"
        )
    return found


class ImageWriter:
    """Write ranges of one image (``fmt``: qcow2 or raw) through a qemu-storage-daemon.

    Use as a context manager: on a clean exit the image is flushed and the daemon ended;
    on an exception the daemon is ended (what was written may be partial: the caller
    discards the image). Not ``durable``: the flush writes everything into the file but does
    not sync it to the device (for an image a QEMU opens next, whose guest's own flushes sync
    the file). ``written`` counts the data bytes sent, ``zeroed`` the bytes
    zeroed. Errors are MachineError naming ``vm`` and the step.
    """

    def __init__(
        self, image: Path, fmt: str, *, vm: str, step: str = "disk-write", durable: bool = True
    ) -> None:
        if fmt not in ("qcow2", "raw"):
            raise MachineError(f"cannot write a {fmt!r} image", vm=vm, step=step)
        self.image = image
        self.fmt = fmt
        self.vm = vm
        self.step = step
        self.durable = durable
        self.size = 0
        self.written = 0
        self.zeroed = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._cookie = 0
        self._in_flight: dict[int, tuple[int, int]] = {}  # cookie: (offset, length)

    def _fail(self, message: str) -> MachineError:
        return MachineError(message, vm=self.vm, step=self.step)

    def __enter__(self) -> ImageWriter:
        try:
            self._start()
        except BaseException:
            self._end()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            if kind is None:  # qcow2 writes its metadata out (and syncs, if durable)
                self._drain()
                self._request(CMD_FLUSH, 0, 0)
                self._drain()
                self._send(REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        finally:
            self._end()

    def _start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(b"\0vmckpt-nbd-" + secrets.token_hex(8).encode())
            listener.listen(1)
            fd = listener.fileno()
            command = [
                storage_daemon(),
                "--blockdev", f"driver=file,node-name=file,filename={_escape(self.image)}"
                + ("" if self.durable else ",cache.no-flush=on"),
                "--blockdev", f"driver={self.fmt},node-name=image,file=file",
                "--nbd-server", f"addr.type=fd,addr.str={fd}",
                "--export", f"type=nbd,id=out,node-name=image,name={EXPORT.decode()},"
                "writable=on",
            ]  # fmt: skip
            try:
                self._process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                    pass_fds=(fd,),
                    start_new_session=True,
                )
            except OSError as exc:
                raise self._fail(f"cannot start qemu-storage-daemon: {exc}") from exc
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._sock.settimeout(END_TIMEOUT_S)
            self._sock.connect(listener.getsockname())
        finally:
            listener.close()  # the daemon has its own copy
        self._handshake()

    def _handshake(self) -> None:
        hello = self._recv(len(HELLO) + 2)
        if hello[: len(HELLO)] != HELLO:
            raise self._fail("the NBD server does not speak the newstyle protocol")
        (server_flags,) = struct.unpack(">H", hello[len(HELLO) :])
        no_zeroes = bool(server_flags & FLAG_NO_ZEROES)
        flags = FLAG_FIXED_NEWSTYLE | (FLAG_NO_ZEROES if no_zeroes else 0)
        self._send(struct.pack(">I", flags))
        self._send(OPTS_MAGIC + struct.pack(">II", OPT_EXPORT_NAME, len(EXPORT)) + EXPORT)
        size, tflags = struct.unpack(">QH", self._recv(10))
        if not no_zeroes:
            self._recv(124)
        if tflags & TFLAG_READ_ONLY:
            raise self._fail(f"{self.image} is exported read-only")
        if not tflags & TFLAG_SEND_WRITE_ZEROES:
            raise self._fail("the NBD server cannot write zeroes")
        self.size = size

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset``."""
        view = memoryview(data)
        while view:
            piece = view[:MAX_WRITE]
            self._request(CMD_WRITE, offset, len(piece), piece)
            self.written += len(piece)
            offset += len(piece)
            view = view[len(piece) :]

    def write_zeroes(self, offset: int, length: int) -> None:
        """Make ``length`` bytes at ``offset`` read as zero (qcow2: zero clusters, no data)."""
        while length:
            piece = min(length, MAX_ZEROES)
            self._request(CMD_WRITE_ZEROES, offset, piece)
            self.zeroed += piece
            offset += piece
            length -= piece

    def _request(
        self, command: int, offset: int, length: int, data: memoryview | None = None
    ) -> None:
        if offset < 0 or offset + length > self.size:
            raise self._fail(f"range {offset}+{length} is outside the image ({self.size} bytes)")
        end = offset + length
        if len(self._in_flight) >= MAX_IN_FLIGHT or any(
            start < end and offset < start + size for start, size in self._in_flight.values()
        ):
            self._drain()
        self._cookie += 1
        self._send(REQUEST.pack(REQUEST_MAGIC, 0, command, self._cookie, offset, length))
        if data is not None:
            self._send(data)
        self._in_flight[self._cookie] = (offset, length)

    def _drain(self) -> None:
        """Read the replies of every request in flight; the first error raises."""
        while self._in_flight:
            magic, error, cookie = REPLY.unpack(self._recv(REPLY.size))
            where = self._in_flight.pop(cookie, None)
            if magic != REPLY_MAGIC or where is None:
                raise self._fail("the NBD server sent a reply out of protocol")
            if error:
                offset, length = where
                raise self._fail(
                    f"writing {self.image} at {offset}+{length} failed: {os.strerror(error)}"
                )

    def _send(self, data: bytes | memoryview) -> None:
        assert self._sock is not None
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise self._fail(f"the NBD connection failed: {exc}; {self._said()}") from exc

    def _recv(self, count: int) -> bytes:
        assert self._sock is not None
        parts: list[bytes] = []
        while count:
            try:
                chunk = self._sock.recv(count)
            except OSError as exc:
                raise self._fail(f"the NBD connection failed: {exc}; {self._said()}") from exc
            if not chunk:
                raise self._fail(f"qemu-storage-daemon closed the connection: {self._said()}")
            parts.append(chunk)
            count -= len(chunk)
        return b"".join(parts)

    def _said(self) -> str:
        """What the daemon printed, once it has exited (else that it runs)."""
        process = self._process
        if process is None or process.poll() is None:
            return "qemu-storage-daemon still runs"
        err = process.stderr.read().decode(errors="replace") if process.stderr else ""
        return f"qemu-storage-daemon exited ({process.returncode}): {' '.join(err.split())[-300:]}"

    def _end(self) -> None:
        """Close the connection and end the daemon by its PID."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        process, self._process = self._process, None
        if process is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=END_TIMEOUT_S)
        if process.stderr is not None:
            process.stderr.close()


def _escape(path: Path) -> str:
    """A path as a value of QEMU's key=value options (a comma is doubled)."""
    return str(path).replace(",", ",,")
