"""vmckpt as the receiving side of QEMU's COLO checkpointing.

After an ordinary live migration with the ``x-colo`` capability, QEMU keeps
dirty logging running and, at each checkpoint, stops the guest, sends the
RAM pages written since the previous checkpoint and the device state, waits
for two acknowledgements and resumes the guest. This module speaks that
protocol on the migration socket (main stream one way, return path the other
way on the same socket) and keeps the guest's RAM image current, so each
checkpoint costs O(pages written) instead of O(RAM).

Message order per checkpoint, as the primary sends and expects them::

    primary -> CHECKPOINT_REQUEST          vmckpt -> CHECKPOINT_REPLY
    primary -> VMSTATE_SEND, ram END section (dirty pages), EOF,
               VMSTATE_SIZE be64 n, n bytes of device state
    vmckpt  -> VMSTATE_RECEIVED, VMSTATE_LOADED       (the guest resumes)
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import BinaryIO, cast

import numpy as np
import numpy.typing as npt

from vmckpt.errors import StreamError
from vmckpt.ram import PAGE_SIZE, RamImage
from vmckpt.stream import format as fmt
from vmckpt.stream.envelope import StreamEnvelope
from vmckpt.stream.reader import _Reader

STEP = "COLO checkpoint"
MAX_DEVICE_STATE = 256 << 20  # a sanity cap on VMSTATE_SIZE


@dataclass(frozen=True)
class ColoCheckpoint:
    """What one COLO checkpoint delivered: the pages it touched and the device state."""

    touched: dict[str, npt.NDArray[np.uint32]]  # page numbers per RAM block, sorted, unique
    device_state: bytes  # FULL sections + EOF: a stream epilogue as it stands
    stream_bytes: int

    @property
    def pages(self) -> int:
        return sum(len(p) for p in self.touched.values())


class ColoReceiver:
    """The secondary's end of one COLO session, on one connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.source = cast(BinaryIO, sock.makefile("rb", buffering=1 << 20))
        self.reader = _Reader(self.source, None)
        self.reader.colo = True
        self.envelope: StreamEnvelope | None = None
        self.ram: RamImage | None = None

    def read_initial(self) -> tuple[StreamEnvelope, RamImage]:
        """The first, ordinary migration: the whole RAM and the device state."""
        self.envelope, self.ram = self.reader.run()
        return self.envelope, self.ram

    # -- messages ----------------------------------------------------------------

    def send(self, message: int) -> None:
        try:
            self.sock.sendall(fmt.BE32.pack(message))
        except OSError as exc:
            raise StreamError(
                f"cannot send {fmt.COLO_MESSAGE_NAMES[message]} to QEMU: {exc}", step=STEP
            ) from exc

    def expect(self, message: int) -> None:
        at = self.reader.pos
        got = self.reader.be32(f"COLO message {fmt.COLO_MESSAGE_NAMES[message]}")
        if got != message:
            raise StreamError(
                f"expected COLO message {fmt.COLO_MESSAGE_NAMES[message]} at byte offset {at}, "
                f"got {fmt.COLO_MESSAGE_NAMES.get(got, f'unknown value {got}')}",
                step=STEP,
            )

    # -- one checkpoint ----------------------------------------------------------------

    def receive_checkpoint(self) -> ColoCheckpoint:
        """Answer a CHECKPOINT_REQUEST (already read) and take in the checkpoint.

        Updates the RAM image in place. The caller acknowledges with
        :meth:`acknowledge` as soon as it returns: the guest is stopped until then.
        """
        if self.ram is None or self.envelope is None:
            raise StreamError("no initial migration was received", step=STEP)
        start = self.reader.pos
        self.send(fmt.COLO_CHECKPOINT_REPLY)
        self.expect(fmt.COLO_VMSTATE_SEND)
        reader = self.reader
        reader.touched = {}
        section_id = self.envelope.ram_section_id
        try:
            while True:
                at = reader.pos
                section_type = reader.u8("section type")
                if section_type == fmt.SECTION_EOF:
                    break
                if section_type == fmt.COMMAND:
                    reader.command()
                    continue
                if section_type not in (fmt.SECTION_PART, fmt.SECTION_END):
                    raise reader.unexpected(section_type, at, "in a COLO checkpoint's RAM part")
                sid = reader.be32("section id")
                if sid != section_id:
                    raise StreamError(
                        f"section id {sid} at byte offset {at}: only the 'ram' section "
                        f"(id {section_id}) is handled",
                        step=STEP,
                    )
                reader.ram_chunk(sid, "END", at)
            touched_offsets = reader.touched
        finally:
            reader.touched = None
        self.expect(fmt.COLO_VMSTATE_SIZE)
        size = reader.be64("VMSTATE_SIZE value")
        if size > MAX_DEVICE_STATE:
            raise StreamError(f"device state of {size} bytes is implausibly large", step=STEP)
        device_state = reader.read(size, "COLO device state")
        touched = {
            idstr: np.unique(np.asarray(offsets, dtype=np.uint64) // PAGE_SIZE).astype(np.uint32)
            for idstr, offsets in touched_offsets.items()
        }
        return ColoCheckpoint(touched, device_state, reader.pos - start)

    def acknowledge(self) -> None:
        """Tell QEMU the checkpoint is received and loaded: it resumes the guest."""
        try:  # one write: the guest waits for the second message
            self.sock.sendall(
                fmt.BE32.pack(fmt.COLO_VMSTATE_RECEIVED) + fmt.BE32.pack(fmt.COLO_VMSTATE_LOADED)
            )
        except OSError as exc:
            raise StreamError(f"cannot acknowledge the checkpoint: {exc}", step=STEP) from exc

    def close(self) -> None:
        for closer in (self.source.close, lambda: self.sock.shutdown(socket.SHUT_RDWR)):
            with contextlib.suppress(OSError):
                closer()
        self.sock.close()
