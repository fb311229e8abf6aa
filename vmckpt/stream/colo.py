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

Pages of a checkpoint are kept sparsely (:class:`~vmckpt.ram.PageSet`): the
receiver's memory is O(pages written), not O(RAM). The first page of a
checkpoint may carry CONTINUE: the current RAM block carries over from the
previous part of the stream, so one reader serves the whole session.
"""

from __future__ import annotations

import contextlib
import socket
from dataclasses import dataclass
from typing import BinaryIO, cast

from vmckpt import faults
from vmckpt.errors import StreamError
from vmckpt.ram import PageSet, RamBlock, RamImage
from vmckpt.stream import format as fmt
from vmckpt.stream.envelope import StreamEnvelope
from vmckpt.stream.reader import SparseBlock, _Reader

STEP = "COLO checkpoint"
MAX_DEVICE_STATE = 256 << 20  # a sanity cap on VMSTATE_SIZE


@dataclass(frozen=True)
class ColoCheckpoint:
    """What one COLO checkpoint delivered: the pages written since the last one and the
    device state (a stream epilogue as it stands: FULL sections and EOF)."""

    pages: PageSet
    device_state: bytes
    stream_bytes: int


def _rp_message(kind: int, value: int) -> bytes:
    return fmt.BE16.pack(kind) + fmt.BE16.pack(4) + fmt.BE32.pack(value)


class ColoReceiver:
    """The receiving end of one COLO session, on one connected socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.source = cast(BinaryIO, sock.makefile("rb", buffering=1 << 20))
        self.reader = _Reader(self.source, None)
        self.reader.colo = True
        self.envelope: StreamEnvelope | None = None
        self.blocks: list[RamBlock] = []

    def read_initial(self) -> tuple[StreamEnvelope, RamImage]:
        """The first, ordinary migration: the whole RAM and the device state. The RAM
        image is the caller's; the receiver keeps only the block layout."""
        self.envelope, image = self.reader.run()
        self.blocks = list(image.blocks)
        # From here on pages are kept sparsely: drop the reader's hold on the image.
        self.reader.image = None
        self._sparse_blocks()
        return self.envelope, image

    def _sparse_blocks(self) -> dict[str, SparseBlock]:
        sparse = {b.idstr: SparseBlock(b.idstr, b.length) for b in self.blocks}
        last = self.reader.last_block
        self.reader.blocks = dict(sparse)
        if last is not None:
            self.reader.last_block = sparse[last.idstr]
        return sparse

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
        at = self.reader.pos
        got = self.reader.be32(f"COLO message {fmt.COLO_MESSAGE_NAMES[message]}")
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

    def receive_checkpoint(self) -> ColoCheckpoint:
        """Answer a CHECKPOINT_REQUEST (already read) and take in the checkpoint.

        The caller acknowledges with :meth:`acknowledge` as soon as it returns:
        the guest is stopped until then.
        """
        if self.envelope is None:
            raise StreamError("no initial migration was received", step=STEP)
        start = self.reader.pos
        sparse = self._sparse_blocks()
        self.send(fmt.COLO_CHECKPOINT_REPLY)  # QEMU stops the guest and sends
        faults.point("colo-mid-checkpoint")
        self.expect(fmt.COLO_VMSTATE_SEND)
        reader = self.reader
        section_id = self.envelope.ram_section_id
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
        self.expect(fmt.COLO_VMSTATE_SIZE)
        size = reader.be64("VMSTATE_SIZE value")
        if size > MAX_DEVICE_STATE:
            raise StreamError(f"device state of {size} bytes is implausibly large", step=STEP)
        device_state = reader.read(size, "COLO device state")
        pages = PageSet(list(self.blocks))
        for idstr, block in sparse.items():
            stored, rows, zeroed = block.result()
            if stored.size or zeroed.size:
                pages.stored[idstr], pages.rows[idstr], pages.zeroed[idstr] = stored, rows, zeroed
        return ColoCheckpoint(pages, device_state, reader.pos - start)

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
