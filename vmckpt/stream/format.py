"""Constants of QEMU's migration stream (format version 3), in one place.

Names follow QEMU's ``migration/savevm.h``, ``migration/savevm.c`` and
``migration/ram.c`` so they can be looked up there.
"""

from __future__ import annotations

import struct
from typing import Final

QEMU_VM_FILE_MAGIC: Final = 0x5145564D
QEMU_VM_FILE_VERSION: Final = 3

# Section types: the byte that starts every top-level item of the stream.
SECTION_EOF: Final = 0x00
SECTION_START: Final = 0x01
SECTION_PART: Final = 0x02
SECTION_END: Final = 0x03
SECTION_FULL: Final = 0x04
SUBSECTION: Final = 0x05
VMDESCRIPTION: Final = 0x06
CONFIGURATION: Final = 0x07
COMMAND: Final = 0x08
SECTION_FOOTER: Final = 0x7E

SECTION_NAMES: Final = {
    SECTION_EOF: "EOF",
    SECTION_START: "START",
    SECTION_PART: "PART",
    SECTION_END: "END",
    SECTION_FULL: "FULL",
    SUBSECTION: "SUBSECTION",
    VMDESCRIPTION: "VMDESCRIPTION",
    CONFIGURATION: "CONFIGURATION",
    COMMAND: "COMMAND",
    SECTION_FOOTER: "FOOTER",
}

# Commands (enum MigrationCommand in savevm.c).
MIG_CMD_OPEN_RETURN_PATH: Final = 1
MIG_CMD_PING: Final = 2
MIG_CMD_POSTCOPY_ADVISE: Final = 3
MIG_CMD_POSTCOPY_LISTEN: Final = 4
MIG_CMD_POSTCOPY_RUN: Final = 5
MIG_CMD_POSTCOPY_RAM_DISCARD: Final = 6
MIG_CMD_PACKAGED: Final = 7
MIG_CMD_ENABLE_COLO: Final = 8
MIG_CMD_POSTCOPY_RESUME: Final = 9
MIG_CMD_RECV_BITMAP: Final = 10
MIG_CMD_SWITCHOVER_START: Final = 11
COMMAND_NAMES: Final = {
    1: "OPEN_RETURN_PATH",
    2: "PING",
    3: "POSTCOPY_ADVISE",
    4: "POSTCOPY_LISTEN",
    5: "POSTCOPY_RUN",
    6: "POSTCOPY_RAM_DISCARD",
    7: "PACKAGED",
    8: "ENABLE_COLO",
    9: "POSTCOPY_RESUME",
    10: "RECV_BITMAP",
    11: "SWITCHOVER_START",
}
# Commands that carry no state and need no return path: kept as opaque bytes.
ACCEPTED_COMMANDS: Final = frozenset({MIG_CMD_SWITCHOVER_START})
# Commands of a COLO session's stream (QEMU 11 sends OPEN_RETURN_PATH and PING, since
# x-colo needs the return path; older QEMUs ENABLE_COLO): accepted, never stored.
COLO_SESSION_COMMANDS: Final = frozenset(
    {MIG_CMD_OPEN_RETURN_PATH, MIG_CMD_PING, MIG_CMD_ENABLE_COLO}
)

# Return-path messages (enum mig_rp_message_type in migration.c): be16 type, be16 length,
# then the data.
MIG_RP_MSG_SHUT: Final = 1  # data: be32 0 (no error); ends QEMU's return-path thread
MIG_RP_MSG_PONG: Final = 2  # data: be32, the PING's value
MIG_RP_MSG_REQ_PAGES_ID: Final = 3  # be64 offset, be32 length, RAM block name (u8 + bytes)
MIG_RP_MSG_REQ_PAGES: Final = 4  # be64 offset, be32 length (the last named RAM block)
MIG_RP_MSG_RECV_BITMAP: Final = 5  # RAM block name; then, unframed: be64 size, bitmap, ending
MIG_RP_MSG_RESUME_ACK: Final = 6  # be32 RESUME_ACK_VALUE
MIG_RP_MSG_SWITCHOVER_ACK: Final = 7
RP_MESSAGE_NAMES: Final = {
    1: "SHUT",
    2: "PONG",
    3: "REQ_PAGES_ID",
    4: "REQ_PAGES",
    5: "RECV_BITMAP",
    6: "RESUME_ACK",
    7: "SWITCHOVER_ACK",
}
RECV_BITMAP_ENDING: Final = 0x0123456789ABCDEF  # after a received bitmap (ram.c)
RESUME_ACK_VALUE: Final = 1
POSTCOPY_DISCARD_VERSION: Final = 0
# The largest PACKAGED blob QEMU 10 accepts (MAX_VM_CMD_PACKAGED_SIZE in savevm.c).
MAX_PACKAGED_BYTES: Final = 1 << 24

# The "ram" section: a sequence of be64 words, page offset | flags.
RAM_IDSTR: Final = "ram"
RAM_FLAG_FULL: Final = 0x01  # obsolete
RAM_FLAG_ZERO: Final = 0x02
RAM_FLAG_MEM_SIZE: Final = 0x04
RAM_FLAG_PAGE: Final = 0x08
RAM_FLAG_EOS: Final = 0x10
RAM_FLAG_CONTINUE: Final = 0x20
RAM_FLAG_XBZRLE: Final = 0x40
RAM_FLAG_HOOK: Final = 0x80
RAM_FLAG_COMPRESS_PAGE: Final = 0x100
RAM_FLAG_MULTIFD_FLUSH: Final = 0x200

RAM_FLAG_NAMES: Final = {
    RAM_FLAG_FULL: "FULL (obsolete)",
    RAM_FLAG_ZERO: "ZERO",
    RAM_FLAG_MEM_SIZE: "MEM_SIZE",
    RAM_FLAG_PAGE: "PAGE",
    RAM_FLAG_EOS: "EOS",
    RAM_FLAG_CONTINUE: "CONTINUE",
    RAM_FLAG_XBZRLE: "XBZRLE",
    RAM_FLAG_HOOK: "HOOK (RDMA)",
    RAM_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE",
    RAM_FLAG_MULTIFD_FLUSH: "MULTIFD_FLUSH",
}

# x86 target pages: the low 12 bits of a RAM word are flags.
TARGET_PAGE_BITS: Final = 12
RAM_FLAGS_MASK: Final = (1 << TARGET_PAGE_BITS) - 1

# Capabilities listed in the configuration section that change the RAM
# section's layout (extra MEM_SIZE fields, pages outside the stream).
UNSUPPORTED_CAPABILITIES: Final = frozenset({"x-ignore-shared", "mapped-ram"})

BE16: Final = struct.Struct(">H")
BE32: Final = struct.Struct(">I")
BE64: Final = struct.Struct(">Q")


def ram_flag_names(flags: int) -> str:
    """The flags of a RAM word as text, e.g. ``XBZRLE|CONTINUE`` or ``0x400``."""
    names = []
    for bit in range(TARGET_PAGE_BITS):
        mask = 1 << bit
        if flags & mask:
            names.append(RAM_FLAG_NAMES.get(mask, f"{mask:#x}"))
    return "|".join(names) or "none"


# COLO checkpoint messages (enum COLOMessage in qapi/migration.json): be32 values,
# primary -> secondary on the main stream, secondary -> primary on the return path.
COLO_CHECKPOINT_READY: Final = 0
COLO_CHECKPOINT_REQUEST: Final = 1
COLO_CHECKPOINT_REPLY: Final = 2
COLO_VMSTATE_SEND: Final = 3
COLO_VMSTATE_SIZE: Final = 4
COLO_VMSTATE_RECEIVED: Final = 5
COLO_VMSTATE_LOADED: Final = 6
COLO_MESSAGE_NAMES: Final = {
    0: "CHECKPOINT_READY",
    1: "CHECKPOINT_REQUEST",
    2: "CHECKPOINT_REPLY",
    3: "VMSTATE_SEND",
    4: "VMSTATE_SIZE",
    5: "VMSTATE_RECEIVED",
    6: "VMSTATE_LOADED",
}
