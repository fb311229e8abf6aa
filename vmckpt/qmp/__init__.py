"""The only code in vmckpt that speaks QMP.

:class:`Monitor` offers the commands and events vmckpt uses, typed, over a
:class:`Transport`: QEMU's QMP socket through qemu.qmp
(:class:`~vmckpt.qmp.asyncqmp.SocketTransport`, imported when first used), QEMU's QMP
socket spoken directly (:class:`LineTransport`, for a checkpoint session's monitor and a
lazy restore's), or a passthrough channel someone else owns (:class:`PassthroughTransport`,
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
    Pending,
)
from vmckpt.qmp.transport import (
    CommandRefused,
    LineTransport,
    Passthrough,
    PassthroughTransport,
    RawEvent,
    Transport,
)

__all__ = [
    "CONT_RETRY_S",
    "BlockNode",
    "CommandRefused",
    "Event",
    "JobInfo",
    "LineTransport",
    "MigrationInfo",
    "Monitor",
    "Passthrough",
    "PassthroughTransport",
    "Pending",
    "RawEvent",
    "Transport",
]
