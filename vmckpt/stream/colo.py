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
one reusable buffer (the stream's :class:`~vmckpt.stream.decoder.Decoder`, which
keeps the whole checkpoint there) and only its framing is parsed, a run of page
records at a time with numpy (a run of ``PAGE|CONTINUE`` records has a fixed
stride); the pages are copied out of the buffer after the acknowledgement
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
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vmckpt import faults
from vmckpt.errors import StreamError
from vmckpt.lazy_numpy import np
from vmckpt.ram import PAGE_SIZE, PageSet, RamBlock, RamImage
from vmckpt.stream import format as fmt
from vmckpt.stream import reader
from vmckpt.stream.decoder import Command, Decoder, PageNumbers, RamBlocks
from vmckpt.stream.envelope import StreamEnvelope

if TYPE_CHECKING:
    import numpy.typing as npt

STEP = "COLO checkpoint"
MAX_DEVICE_STATE = 256 << 20  # a sanity cap on VMSTATE_SIZE
# The receive buffer starts at this size, touched in advance (a first touch inside the
# pause costs a page fault per 4 KiB), and grows to the largest checkpoint seen.
RECEIVE_BUFFER = 16 << 20
SHRINK_ABOVE = 4 * RECEIVE_BUFFER


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
    and where its data starts in the receive buffer (-1: a ZERO page). Records that came
    one at a time wait in lists (an array each would cost more than the record, inside
    the pause) until the next run or the end."""

    numbers: list[npt.NDArray[np.int64]] = field(default_factory=list)
    positions: list[npt.NDArray[np.int64]] = field(default_factory=list)
    one_numbers: list[int] = field(default_factory=list)
    one_positions: list[int] = field(default_factory=list)

    def add(self, numbers: npt.NDArray[np.int64], positions: npt.NDArray[np.int64]) -> None:
        if self.one_numbers:
            self._flush()
        self.numbers.append(numbers)
        self.positions.append(positions)

    def add_one(self, number: int, position: int) -> None:
        self.one_numbers.append(number)
        self.one_positions.append(position)

    def _flush(self) -> None:
        self.numbers.append(np.array(self.one_numbers, dtype=np.int64))
        self.positions.append(np.array(self.one_positions, dtype=np.int64))
        self.one_numbers, self.one_positions = [], []

    def arrays(self) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
        """Every record's page number and position, in arrival order."""
        if self.one_numbers:
            self._flush()
        return np.concatenate(self.numbers), np.concatenate(self.positions)


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
        self._generation = receiver.decoder.generation
        self._records = records
        self._end = end
        self.device_state = device_state
        self.stream_bytes = stream_bytes

    def checkpoint(self) -> ColoCheckpoint:
        decoder = self._receiver.decoder
        if decoder.generation != self._generation:
            raise StreamError("the receive buffer was reused before its pages were taken",
                              step=STEP)  # fmt: skip
        buffer = np.frombuffer(decoder.buffer, dtype=np.uint8, count=self._end)
        pages = PageSet(list(self._receiver.blocks))
        for idstr, records in self._records.items():
            numbers64, positions = records.arrays()
            numbers = numbers64.astype(np.uint32)
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


class ColoReceiver:
    """The receiving end of one COLO session, on one connected socket.

    One :class:`~vmckpt.stream.decoder.Decoder` reads the socket, the opening and every
    checkpoint after it. A checkpoint stays in the decoder's buffer (it retains what it
    read) until the next one starts over (:meth:`receive_checkpoint`).
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.decoder = Decoder(sock.recv_into, step=STEP, buffer=_touched_buffer(RECEIVE_BUFFER))
        self.decoder.retain = True
        self.envelope: StreamEnvelope | None = None
        self.pings: list[int] = []  # the opening's PING values, answered on the return path
        self.blocks: list[RamBlock] = []
        self.last_block: str | None = None  # the block a CONTINUE record refers to

    def read_initial(self) -> tuple[StreamEnvelope, RamImage]:
        """The first, ordinary migration: the whole RAM and the device state. The RAM
        image is the caller's; the receiver keeps only the block layout."""
        decoder = self.decoder
        # The whole RAM passes through the buffer: what was decoded makes room.
        decoder.retain, decoder.step = False, reader.STEP
        migration = reader.read_migration(decoder, session=True)
        decoder.restart()
        decoder.retain, decoder.step = True, STEP
        self.envelope, self.pings = migration.envelope, migration.pings
        self.blocks = list(migration.image.blocks)
        self.last_block = migration.last_block
        return self.envelope, migration.image

    # -- reading -------------------------------------------------------------------

    def at(self) -> int:
        """The stream offset of the next unparsed byte."""
        return self.decoder.at()

    def _start_over(self) -> None:
        """Drop the previous checkpoint: what is not parsed yet moves to the front and
        the buffer is reused. (The guest runs meanwhile.) A buffer grown large by a
        burst of writes shrinks back."""
        decoder = self.decoder
        if len(decoder.buffer) > SHRINK_ABOVE and decoder.unparsed() <= RECEIVE_BUFFER:
            decoder.restart(_touched_buffer(RECEIVE_BUFFER))
        else:
            decoder.restart()

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
        pongs = b"".join(_rp_message(fmt.MIG_RP_MSG_PONG, v) for v in self.pings)
        self._send(pongs + _rp_message(fmt.MIG_RP_MSG_SHUT, 0), "MIG_RP_MSG_SHUT")

    def expect(self, message: int) -> None:
        at = self.at()
        got = self.decoder.be32(f"COLO message {fmt.COLO_MESSAGE_NAMES[message]}")
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
        decoder = self.decoder
        size = decoder.be64("VMSTATE_SIZE value")
        if size > MAX_DEVICE_STATE:
            raise StreamError(f"device state of {size} bytes is implausibly large", step=STEP)
        device_state = decoder.take(size, "COLO device state")
        if decoder.unparsed():
            # QEMU sends nothing more until it has the acknowledgement.
            raise StreamError(
                f"{decoder.unparsed()} bytes after the device state at byte offset "
                f"{self.at()}, before the acknowledgement",
                step=STEP,
            )
        return ReceivedCheckpoint(self, records, device_state, self.at() - start, decoder.pos)

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
        self.sock.close()


class _CheckpointParser:
    """The RAM part of one checkpoint, read into the receiver's buffer with its framing
    checked: where each page's data lies, per block (the decoder's
    :class:`~vmckpt.stream.decoder.RamSink`)."""

    def __init__(self, receiver: ColoReceiver) -> None:
        self.receiver = receiver
        self.ram = RamBlocks.of(receiver.blocks, receiver.last_block)
        self.records: dict[str, _BlockRecords] = {}

    @property
    def block(self) -> str | None:
        """The block the last page record named: the next checkpoint may CONTINUE in it."""
        return self.ram.current

    def sections(self) -> dict[str, _BlockRecords]:
        """The sections up to EOF: the ram section's parts (and commands, skipped)."""
        rx = self.receiver
        assert rx.envelope is not None
        rx.decoder.ram_sections(
            self.ram, self, rx.envelope.ram_section_id, until=fmt.SECTION_EOF,
            where="in a COLO checkpoint's RAM part",
        )  # fmt: skip
        return self.records

    def _of(self, block: str) -> _BlockRecords:
        records = self.records.get(block)
        if records is None:
            records = self.records[block] = _BlockRecords()
        return records

    # -- RamSink: page data stays in the buffer; -1 marks a ZERO page -----------------

    def mem_size(self, blocks: list[RamBlock], at: int) -> None:
        raise StreamError(f"MEM_SIZE record at byte offset {at} in a COLO checkpoint", step=STEP)

    def page(self, block: str, number: int, position: int) -> None:
        self._of(block).add_one(number, position)

    def pages(self, block: str, numbers: PageNumbers, first: int, stride: int) -> None:
        self._of(block).add(numbers, first + stride * np.arange(numbers.size, dtype=np.int64))

    def zero(self, block: str, number: int) -> None:
        self._of(block).add_one(number, -1)

    def zeros(self, block: str, numbers: PageNumbers) -> None:
        self._of(block).add(numbers, np.full(numbers.size, -1, dtype=np.int64))

    def command(self, command: Command) -> None:
        """Commands carry nothing a checkpoint keeps: skipped."""
