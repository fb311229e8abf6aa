"""The only code in vmckpt that speaks QMP.

:class:`Monitor` offers the commands and events vmckpt uses, typed, over a
:class:`Transport`: QEMU's QMP socket (:class:`SocketTransport`, on qemu.qmp)
or a passthrough channel someone else owns (:class:`PassthroughTransport`,
used for libvirt domains). The migration choreography built on it lives in
:mod:`vmckpt.session`.
"""

from vmckpt.qmp.monitor import (
    CONT_RETRY_S,
    BlockNode,
    Event,
    JobInfo,
    MigrationInfo,
    Monitor,
)
from vmckpt.qmp.transport import (
    CommandRefused,
    Passthrough,
    PassthroughTransport,
    RawEvent,
    SocketTransport,
    Transport,
)

__all__ = [
    "CONT_RETRY_S",
    "BlockNode",
    "CommandRefused",
    "Event",
    "JobInfo",
    "MigrationInfo",
    "Monitor",
    "Passthrough",
    "PassthroughTransport",
    "RawEvent",
    "SocketTransport",
    "Transport",
]
