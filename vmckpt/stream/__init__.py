"""QEMU's migration stream: RAM pages per RAM block plus an opaque envelope.

`read_stream` turns a stream (a file or QEMU's socket) into a `StreamEnvelope`
and a `RamImage`; `write_stream` turns them back into a stream that QEMU's
``migrate-incoming`` accepts. Only format version 3 with default migration
capabilities is handled; anything else raises `StreamError`.

Modules: ``format`` (the constants), ``decoder`` (the one decoder of the stream's
records), ``reader`` (a whole migration, through the decoder), ``writer``, ``envelope``,
``colo`` (the receiving end of a COLO session: the opening through ``reader``, each
checkpoint's RAM part through the decoder), and ``postcopy`` (vmckpt as the source of a
postcopy migration: the preamble, page records and recovery commands through the writer's
encoders, the stored device state cut by the decoder, the return path it reads).
"""

from vmckpt.stream.envelope import StreamEnvelope
from vmckpt.stream.reader import read_stream
from vmckpt.stream.writer import write_stream

__all__ = ["StreamEnvelope", "read_stream", "write_stream"]
