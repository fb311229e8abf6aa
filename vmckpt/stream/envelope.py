"""The part of a migration stream that is not RAM pages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StreamEnvelope:
    """Everything of a migration stream except RAM pages, kept opaque so QEMU can load it back.

    ``prelude`` is the bytes from the start of the stream (magic, version,
    configuration section, any command before RAM) up to, not including, the
    START section of ``ram``. ``epilogue`` is every byte after the footer of
    the ``ram`` END section (device FULL sections, EOF, the vmdesc JSON),
    preceded by the commands QEMU sent between the ram START and END
    sections (QEMU 10 sends SWITCHOVER_START just before the ram END); those
    commands carry no state, and QEMU loads them after the ram END as well.
    """

    prelude: bytes
    machine_type: str  # from the configuration section, e.g. "pc-i440fx-10.0"; "" if none
    ram_section_id: int
    ram_instance_id: int
    ram_version_id: int
    epilogue: bytes
