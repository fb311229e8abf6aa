"""vmckpt as the receiving side of QEMU's COLO checkpointing (the protocol, on one socket).

After an ordinary live migration with the ``x-colo`` capability, QEMU keeps
dirty logging running and, at each checkpoint, stops the guest, sends the
RAM pages written since the previous checkpoint and the device state, waits
for two acknowledgements and resumes the guest. The main stream goes from
QEMU to vmckpt, the return path back on the same socket. As seen with QEMU
11.1 (x-colo needs ``return-path`` there):

Opening (the initial full migration)::

    QEMU    header, configuration, OPEN_RETURN_PATH, PING, ram START/PART/END,
            device sections, EOF, device description (JSON); then waits, guest stopped
    vmckpt  MIG_RP_MSG_SHUT (return path)     QEMU's return-path thread ends,
                                              migration state "colo"
    vmckpt  CHECKPOINT_READY                  QEMU resumes the guest

Each checkpoint (triggered by setting ``x-checkpoint-delay`` over QMP)::

    QEMU    CHECKPOINT_REQUEST                 vmckpt  CHECKPOINT_REPLY (guest stops)
    QEMU    VMSTATE_SEND, one ram END section (the dirty pages, EOS, footer), EOF,
            VMSTATE_SIZE be64 n, n bytes of device state (FULL sections, EOF)
    vmckpt  VMSTATE_RECEIVED, VMSTATE_LOADED  (QEMU resumes the guest)

The guest is stopped from CHECKPOINT_REPLY to the acknowledgement, so that
stretch does as little as it can: the checkpoint is read in large chunks into
one reusable buffer and only its framing is parsed, a run of page records at a
time with numpy (a run of ``PAGE|CONTINUE`` records has a fixed stride); the
pages are copied out of the buffer after the acknowledgement
(:meth:`ReceivedCheckpoint.checkpoint`). Measured on QEMU 11.1 under TCG at
~1,100 pages per checkpoint (make bench): median pause 4.3-5.5 ms when each page
was parsed and copied through a buffered reader inside the pause, 3.0-3.3 ms so.

Pages of a checkpoint are kept sparsely (:class:`~vmckpt.ram.PageSet`): the
receiver's memory is O(pages written), not O(RAM). The first page of a
checkpoint may carry CONTINUE: the current RAM block carries over from the
previous part of the stream.
"""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, BinaryIO, cast

import numpy as np
import numpy.typing as npt

from vmckpt import faults
from vmckpt.errors import StreamError
from vmckpt.ram import PAGE_SIZE, PageSet, RamBlock, RamImage
from vmckpt.stream import format as fmt
from vmckpt.stream.envelope import StreamEnvelope
from vmckpt.stream.reader import _Reader

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

STEP = "COLO checkpoint"
MAX_DEVICE_STATE = 256 << 20  # a sanity cap on VMSTATE_SIZE
# The receive buffer starts at this size, touched in advance (a first touch inside the
# pause costs a page fault per 4 KiB), and grows to the largest checkpoint seen.
RECEIVE_BUFFER = 16 << 20
SHRINK_ABOVE = 4 * RECEIVE_BUFFER
_RECORD = 8 + PAGE_SIZE  # a PAGE record of the current block: header word and data
_RUN_FLAGS = fmt.RAM_FLAG_PAGE | fmt.RAM_FLAG_CONTINUE
_FLAGS_MASK = fmt.RAM_FLAGS_MASK
_WORD = np.dtype(">u8")


@dataclass(frozen=True)
class ColoCheckpoint:
    """What one COLO checkpoint delivered: the pages written since the last one and the
    device state (a stream epilogue as it stands: FULL sections and EOF)."""

    pages: PageSet
    device_state: bytes
    stream_bytes: int


@dataclass
class _BlockRecords:
    """The page records of one RAM block in a checkpoint, in arrival order: page number
    and where its data starts in the receive buffer (-1: a ZERO page)."""

    numbers: list[npt.NDArray[np.int64]] = field(default_factory=list)
    positions: list[npt.NDArray[np.int64]] = field(default_factory=list)

    def add(self, numbers: npt.NDArray[np.int64], positions: npt.NDArray[np.int64]) -> None:
        self.numbers.append(numbers)
        self.positions.append(positions)

    def add_one(self, number: int, position: int) -> None:
        self.add(np.array([number], dtype=np.int64), np.array([position], dtype=np.int64))


class ReceivedCheckpoint:
    """A checkpoint as it arrived, still in the receiver's buffer: framing checked, page
    data not yet copied. :meth:`checkpoint` copies it out; call it after acknowledging
    and before receiving the next checkpoint, which reuses the buffer."""

    def __init__(
        self,
        receiver: ColoReceiver,
        records: dict[str, _BlockRecords],
        device_state: bytes,
        stream_bytes: int,
        end: int,
    ) -> None:
        self._receiver = receiver
        self._generation = receiver.generation
        self._records = records
        self._end = end
        self.device_state = device_state
        self.stream_bytes = stream_bytes

    def checkpoint(self) -> ColoCheckpoint:
        if self._receiver.generation != self._generation:
            raise StreamError("the receive buffer was reused before its pages were taken",
                              step=STEP)  # fmt: skip
        buffer = np.frombuffer(self._receiver.buffer, dtype=np.uint8, count=self._end)
        pages = PageSet(list(self._receiver.blocks))
        for idstr, records in self._records.items():
            numbers = np.concatenate(records.numbers).astype(np.uint32)
            positions = np.concatenate(records.positions)
            # A page sent more than once keeps its last copy: the last record of each
            # page is the first of the reversed sequence.
            _, first_reversed = np.unique(numbers[::-1], return_index=True)
            last = numbers.size - 1 - first_reversed
            has_data = positions[last] >= 0
            data_last, zero_last = last[has_data], last[~has_data]
            if data_last.size:
                windows = np.lib.stride_tricks.sliding_window_view(buffer, PAGE_SIZE)
                rows = windows[positions[data_last]]  # a copy: the buffer is reused
            else:
                rows = np.empty((0, PAGE_SIZE), dtype=np.uint8)
            pages.stored[idstr], pages.rows[idstr] = numbers[data_last], rows
            pages.zeroed[idstr] = numbers[zero_last]
        return ColoCheckpoint(pages, self.device_state, self.stream_bytes)


def _touched_buffer(size: int) -> bytearray:
    buffer = bytearray(size)
    np.frombuffer(buffer, dtype=np.uint8)[::PAGE_SIZE] = 0  # fault every page in now
    return buffer


def _rp_message(kind: int, value: int) -> bytes:
    return fmt.BE16.pack(kind) + fmt.BE16.pack(4) + fmt.BE32.pack(value)


class _CountingSocketIO(io.RawIOBase):
    """The socket as a raw stream for the opening's buffered reader, counting what it
    delivered: what the reader holds unread when the opening ends is known exactly."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__()
        self.sock = sock
        self.received = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        got = self.sock.recv_into(buffer)
        self.received += got
        return got


class ColoReceiver:
    """The receiving end of one COLO session, on one connected socket.

    The opening goes through a buffered :class:`~vmckpt.stream.reader._Reader`; from
    then on the receiver reads the socket into its own buffer: ``buffer[pos:filled]``
    is received and not yet parsed, and ``buffer[0]`` is at stream offset ``base``.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._raw = _CountingSocketIO(sock)
        self.source = io.BufferedReader(self._raw, buffer_size=1 << 20)
        self.reader = _Reader(cast(BinaryIO, self.source), None)
        self.reader.colo = True
        self.envelope: StreamEnvelope | None = None
        self.blocks: list[RamBlock] = []
        self.last_block: str | None = None  # the block a CONTINUE record refers to
        self.buffer = _touched_buffer(RECEIVE_BUFFER)
        self.pos = 0
        self.filled = 0
        self.base = 0
        self.generation = 0  # counts checkpoints received into the buffer

    def read_initial(self) -> tuple[StreamEnvelope, RamImage]:
        """The first, ordinary migration: the whole RAM and the device state. The RAM
        image is the caller's; the receiver keeps only the block layout."""
        self.envelope, image = self.reader.run()
        self.blocks = list(image.blocks)
        last = self.reader.last_block
        self.last_block = last.idstr if last is not None else None
        # What the buffered reader read ahead (nothing, as QEMU waits for vmckpt now,
        # but it is not lost if there is) moves to the receiver's own buffer.
        ahead = self.source.read(self._raw.received - self.reader.pos)
        self.buffer[: len(ahead)] = ahead
        self.pos, self.filled, self.base = 0, len(ahead), self.reader.pos
        # Checkpoints are parsed here, not by the reader: drop its hold on the image.
        self.reader.image = None
        self.reader.blocks = {}
        self.reader.last_block = None
        return self.envelope, image

    # -- reading -------------------------------------------------------------------

    def at(self) -> int:
        """The stream offset of the next unparsed byte."""
        return self.base + self.pos

    def need(self, n: int, what: str) -> None:
        """Make n bytes from pos available, reading from the socket as they come."""
        while self.filled - self.pos < n:
            if self.filled == len(self.buffer):
                grown = bytearray(max(2 * len(self.buffer), self.pos + n))
                grown[: self.filled] = memoryview(self.buffer)[: self.filled]
                self.buffer = grown
            try:
                got = self.sock.recv_into(memoryview(self.buffer)[self.filled :])
            except OSError as exc:
                raise StreamError(
                    f"reading {what} at byte offset {self.base + self.filled} failed: {exc}",
                    step=STEP,
                ) from exc
            if not got:
                raise StreamError(
                    f"stream truncated at byte offset {self.base + self.filled}: expected "
                    f"{n - (self.filled - self.pos)} more bytes of {what}",
                    step=STEP,
                )
            self.filled += got

    def u8(self, what: str) -> int:
        self.need(1, what)
        self.pos += 1
        return self.buffer[self.pos - 1]

    def be32(self, what: str) -> int:
        self.need(4, what)
        self.pos += 4
        return int.from_bytes(self.buffer[self.pos - 4 : self.pos], "big")

    def be64(self, what: str) -> int:
        self.need(8, what)
        self.pos += 8
        return int.from_bytes(self.buffer[self.pos - 8 : self.pos], "big")

    def _start_over(self) -> None:
        """Move what is not parsed yet to the front: the buffer is reused. (The guest
        runs meanwhile.) A buffer grown large by a burst of writes shrinks back."""
        rest = self.filled - self.pos
        if len(self.buffer) > SHRINK_ABOVE and rest <= RECEIVE_BUFFER:
            smaller = _touched_buffer(RECEIVE_BUFFER)
            smaller[:rest] = memoryview(self.buffer)[self.pos : self.filled]
            self.buffer = smaller
        elif self.pos:
            self.buffer[:rest] = memoryview(self.buffer)[self.pos : self.filled]
        self.base += self.pos
        self.pos, self.filled = 0, rest
        self.generation += 1

    # -- messages ----------------------------------------------------------------

    def _send(self, data: bytes, what: str) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise StreamError(f"cannot send {what} to QEMU: {exc}", step=STEP) from exc

    def send(self, message: int) -> None:
        self._send(fmt.BE32.pack(message), fmt.COLO_MESSAGE_NAMES[message])

    def end_return_path(self) -> None:
        """Answer the initial stream's PINGs and end QEMU's return-path thread (SHUT):
        QEMU then enters state ``colo`` and waits for CHECKPOINT_READY."""
        pongs = b"".join(_rp_message(fmt.MIG_RP_MSG_PONG, v) for v in self.reader.pings)
        self._send(pongs + _rp_message(fmt.MIG_RP_MSG_SHUT, 0), "MIG_RP_MSG_SHUT")

    def expect(self, message: int) -> None:
        at = self.at()
        got = self.be32(f"COLO message {fmt.COLO_MESSAGE_NAMES[message]}")
        if got != message:
            raise StreamError(
                f"expected COLO message {fmt.COLO_MESSAGE_NAMES[message]} at byte offset {at}, "
                f"got {fmt.COLO_MESSAGE_NAMES.get(got, f'unknown value {got}')}",
                step=STEP,
            )

    # -- one checkpoint ----------------------------------------------------------------

    def wait_request(self) -> None:
        """Block until QEMU asks for a checkpoint (CHECKPOINT_REQUEST)."""
        self.expect(fmt.COLO_CHECKPOINT_REQUEST)

    def receive_checkpoint(
        self, on_stopped: Callable[[], None] | None = None
    ) -> ReceivedCheckpoint:
        """Answer a CHECKPOINT_REQUEST (already read) and take in the checkpoint.

        The guest is stopped until the caller acknowledges (:meth:`acknowledge`), which
        it does as soon as this returns; then it takes the pages out with
        :meth:`ReceivedCheckpoint.checkpoint`. ``on_stopped`` is called as soon as the
        guest is known to be stopped (QEMU stops it before VMSTATE_SEND), while the rest
        of the checkpoint is still on its way.
        """
        if self.envelope is None:
            raise StreamError("no initial migration was received", step=STEP)
        self._start_over()
        start = self.at()
        self.send(fmt.COLO_CHECKPOINT_REPLY)  # QEMU stops the guest and sends
        faults.point("colo-mid-checkpoint")
        self.expect(fmt.COLO_VMSTATE_SEND)
        if on_stopped is not None:
            on_stopped()
        parse = _CheckpointParser(self)
        records = parse.sections()
        self.last_block = parse.block
        self.expect(fmt.COLO_VMSTATE_SIZE)
        size = self.be64("VMSTATE_SIZE value")
        if size > MAX_DEVICE_STATE:
            raise StreamError(f"device state of {size} bytes is implausibly large", step=STEP)
        self.need(size, "COLO device state")
        device_state = bytes(self.buffer[self.pos : self.pos + size])
        self.pos += size
        if self.filled != self.pos:
            # QEMU sends nothing more until it has the acknowledgement.
            raise StreamError(
                f"{self.filled - self.pos} bytes after the device state at byte offset "
                f"{self.at()}, before the acknowledgement",
                step=STEP,
            )
        return ReceivedCheckpoint(self, records, device_state, self.at() - start, self.pos)

    def acknowledge(self) -> None:
        """Tell QEMU the checkpoint is received and loaded: it resumes the guest."""
        # One write: the guest waits for the second message.
        self._send(
            fmt.BE32.pack(fmt.COLO_VMSTATE_RECEIVED) + fmt.BE32.pack(fmt.COLO_VMSTATE_LOADED),
            "VMSTATE_RECEIVED/LOADED",
        )

    def cut(self) -> None:
        """Shut the socket down: QEMU, blocked writing to us, gets an error and unblocks
        its monitors (a stalled receiver freezes every QMP monitor of that QEMU)."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.cut()
        with contextlib.suppress(OSError):
            self.source.close()
        self.sock.close()


class _CheckpointParser:
    """The RAM part of one checkpoint, read into the receiver's buffer with its framing
    checked: where each page's data lies, per block."""

    def __init__(self, receiver: ColoReceiver) -> None:
        self.receiver = receiver
        self.block = receiver.last_block
        self.limits = {b.idstr: b.length for b in receiver.blocks}
        self.records: dict[str, _BlockRecords] = {}

    def sections(self) -> dict[str, _BlockRecords]:
        """The sections up to EOF: the ram section's parts (and commands, skipped)."""
        rx = self.receiver
        assert rx.envelope is not None
        section_id = rx.envelope.ram_section_id
        while True:
            at = rx.at()
            section_type = rx.u8("section type")
            if section_type == fmt.SECTION_EOF:
                return self.records
            if section_type == fmt.COMMAND:
                rx.be32("command and its length")
                length = int.from_bytes(rx.buffer[rx.pos - 2 : rx.pos], "big")
                rx.need(length, "command data")
                rx.pos += length
                continue
            if section_type not in (fmt.SECTION_PART, fmt.SECTION_END):
                name = fmt.SECTION_NAMES.get(section_type, "unknown")
                raise StreamError(
                    f"unexpected section type {section_type:#04x} ({name}) at byte offset "
                    f"{at} in a COLO checkpoint's RAM part",
                    step=STEP,
                )
            sid = rx.be32("section id")
            if sid != section_id:
                raise StreamError(
                    f"section id {sid} at byte offset {at}: only the 'ram' section "
                    f"(id {section_id}) is handled",
                    step=STEP,
                )
            self.ram_records(sid, at)
            footer_at = rx.at()
            if rx.u8("section footer") != fmt.SECTION_FOOTER:
                raise StreamError(
                    f"expected section footer (0x7e) at byte offset {footer_at} after "
                    f"RAM section (section id {sid}) at byte offset {at}",
                    step=STEP,
                )
            footer_id = rx.be32("section footer id")
            if footer_id != sid:
                raise StreamError(
                    f"section footer at byte offset {footer_at} names section id "
                    f"{footer_id}, expected {sid}",
                    step=STEP,
                )

    def ram_records(self, section_id: int, section_at: int) -> None:
        """Page records up to EOS. Runs of PAGE|CONTINUE records already received are
        checked and noted with numpy; any other record, one by one."""
        rx = self.receiver
        while True:
            block = self.block
            run = (rx.filled - rx.pos) // _RECORD
            if block is not None and run:
                limit = self.limits[block]
                buffer = rx.buffer
                words = np.ndarray((run,), dtype=_WORD, buffer=buffer, offset=rx.pos,
                                   strides=(_RECORD,))  # fmt: skip
                flags = words & _FLAGS_MASK
                odd = np.flatnonzero((flags != _RUN_FLAGS) | (words - flags >= limit))
                taken = int(odd[0]) if odd.size else run
                if taken:
                    numbers = ((words[:taken] - flags[:taken]) // PAGE_SIZE).astype(np.int64)
                    first_data = rx.pos + 8
                    positions = first_data + _RECORD * np.arange(taken, dtype=np.int64)
                    self.records.setdefault(block, _BlockRecords()).add(numbers, positions)
                    rx.pos += taken * _RECORD
                    if taken == run:
                        continue  # the next record may still be on its way
            if not self.record(section_id, section_at):
                return

    def record(self, section_id: int, section_at: int) -> bool:
        """One RAM record, whatever it is; False after EOS."""
        rx = self.receiver
        at = rx.at()
        word = rx.be64("RAM record header")
        flags = word & _FLAGS_MASK
        kind = flags & ~fmt.RAM_FLAG_CONTINUE
        if kind == fmt.RAM_FLAG_EOS:
            return False
        if kind == fmt.RAM_FLAG_MULTIFD_FLUSH:
            return True
        if kind not in (fmt.RAM_FLAG_PAGE, fmt.RAM_FLAG_ZERO):
            raise StreamError(
                f"unsupported RAM record flags {fmt.ram_flag_names(flags)} ({flags:#x}) at "
                f"byte offset {at} in a COLO checkpoint (section id {section_id} at byte "
                f"offset {section_at})",
                step=STEP,
            )
        if flags & fmt.RAM_FLAG_CONTINUE:
            if self.block is None:
                raise StreamError(
                    f"RAM record with CONTINUE but no previous block at byte offset {at}",
                    step=STEP,
                )
        else:
            length = rx.u8("length of RAM block name")
            rx.need(length, "RAM block name")
            raw = bytes(rx.buffer[rx.pos : rx.pos + length])
            rx.pos += length
            name = raw.decode("ascii", errors="replace")
            if name not in self.limits:
                raise StreamError(f"page of unknown RAM block {raw!r} at byte offset {at}",
                                  step=STEP)  # fmt: skip
            self.block = name
        block = self.block
        offset = word - flags
        if offset >= self.limits[block]:
            raise StreamError(
                f"page offset {offset:#x} beyond RAM block {block!r} "
                f"({self.limits[block]:#x} bytes) at byte offset {at}",
                step=STEP,
            )
        records = self.records.setdefault(block, _BlockRecords())
        if kind == fmt.RAM_FLAG_PAGE:
            rx.need(PAGE_SIZE, "page data")
            records.add_one(offset // PAGE_SIZE, rx.pos)
            rx.pos += PAGE_SIZE
        else:
            fill = rx.u8("the fill byte of a ZERO page")
            if fill != 0:
                raise StreamError(
                    f"ZERO page with fill byte {fill:#04x} at byte offset {at} (RAM block "
                    f"{block!r}, offset {offset:#x}): only 0 is supported",
                    step=STEP,
                )
            records.add_one(offset // PAGE_SIZE, -1)
        return True
