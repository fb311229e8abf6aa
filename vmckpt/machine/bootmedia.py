"""Boot media given on the command line: a Linux kernel, a multiboot kernel, an ISO.

QEMU's ``-kernel`` boots a Linux bzImage (with at most one initrd) or, when
the file has no Linux setup header but a multiboot header, a multiboot
kernel, whose ``-initrd`` is then a comma-separated list of boot modules,
each ``path[ args]``, with a literal comma written ``,,``. vmckpt tells the
two apart the way QEMU does, records every module as its own
:class:`BootMedium` (so restore checks each one's hash), and refuses what
QEMU would refuse later with a less helpful message.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path

from vmckpt.errors import UsageError
from vmckpt.machine.spec import BootMedium

LINUX_SETUP_MAGIC = 0x53726448  # "HdrS" at offset 0x202 of a bzImage
MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_SEARCH = 8192  # the header lies in the first 8 KiB, 4-byte aligned
MULTIBOOT_HEADER_HAS_ADDR = 0x00010000  # the a.out kludge: load addresses in the header
ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
PT_LOAD = 1


def _header(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(MULTIBOOT_SEARCH)
    except OSError as exc:
        raise UsageError(f"kernel {path}: cannot read it: {exc.strerror}") from exc


def multiboot_flags(header: bytes) -> int | None:
    """The flags of the first valid multiboot header in ``header``, or None if there is none."""
    for offset in range(0, min(len(header), MULTIBOOT_SEARCH - 48) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", header, offset)
        if magic == MULTIBOOT_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return int(flags)
    return None


def is_linux(header: bytes) -> bool:
    return len(header) >= 0x206 and struct.unpack_from("<I", header, 0x202)[0] == LINUX_SETUP_MAGIC


def is_multiboot(path: str | Path) -> bool:
    """Whether QEMU would boot this ``-kernel`` file as a multiboot kernel."""
    header = _header(Path(path))
    return not is_linux(header) and multiboot_flags(header) is not None


def check_multiboot_loadable(path: Path) -> None:
    """Refuse a multiboot kernel that QEMU's loader rejects: a 64-bit ELF without load addresses.

    (GNU Mach's Debian image is one; ``objcopy -I elf64-x86-64 -O elf32-i386``
    turns it into an ELF32 that QEMU loads.)
    """
    header = _header(path)
    flags = multiboot_flags(header)
    if flags is None or flags & MULTIBOOT_HEADER_HAS_ADDR:
        return
    if header[:4] == ELF_MAGIC and header[4] == ELFCLASS64:
        raise UsageError(
            f"kernel {path} is a 64-bit ELF multiboot kernel, which QEMU's multiboot loader "
            "cannot load; convert it with `objcopy -I elf64-x86-64 -O elf32-i386`"
        )


def split_module_list(text: str) -> list[str]:
    """QEMU's multiboot -initrd syntax: entries separated by ',', a literal comma is ',,'."""
    entries: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == ",":
            if text[index + 1 : index + 2] == ",":
                current.append(",")
                index += 2
                continue
            entries.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    entries.append("".join(current))
    return entries


def module_media(values: Sequence[str]) -> list[BootMedium]:
    """Every ``--initrd`` value of a multiboot kernel, split into modules, in order."""
    media: list[BootMedium] = []
    for value in values:
        for entry in split_module_list(value):
            entry = entry.strip()
            if not entry:
                raise UsageError(f"--initrd {value!r} has an empty module entry")
            path, _, args = entry.partition(" ")
            media.append(BootMedium.of("module", path, args.strip()))
    return media


def kernel_media(kernel: str, initrds: Sequence[str]) -> list[BootMedium]:
    """The media of ``--kernel`` and its ``--initrd``s: Linux, one file; multiboot, modules."""
    medium = BootMedium.of("kernel", kernel)
    if is_multiboot(medium.path):
        check_multiboot_loadable(Path(medium.path))
        return [medium, *module_media(initrds)]
    if len(initrds) > 1:
        raise UsageError(
            f"kernel {kernel} is not a multiboot kernel, so it takes one --initrd, "
            f"not {len(initrds)}"
        )
    return [medium, *(BootMedium.of("initrd", path) for path in initrds)]


def multiboot_load_end(path: str | Path) -> int | None:
    """The highest physical address a multiboot kernel occupies once QEMU loaded it, or None
    if that cannot be read from the file.

    With the a.out kludge the multiboot header says it (``load_end_addr``,
    ``bss_end_addr``); otherwise QEMU loads the ELF's PT_LOAD segments at their
    physical addresses. A kernel linked above the guest's RAM loads into nothing
    and never starts (Fiasco.OC's bootstrap is linked at 256 MiB).
    """
    header = _header(Path(path))
    if is_linux(header):
        return None
    for offset in range(0, min(len(header), MULTIBOOT_SEARCH - 48) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", header, offset)
        if magic != MULTIBOOT_MAGIC or (magic + flags + checksum) & 0xFFFFFFFF:
            continue
        if flags & MULTIBOOT_HEADER_HAS_ADDR and offset + 32 <= len(header):
            _hdr, _load, load_end, bss_end, _entry = struct.unpack_from("<5I", header, offset + 12)
            return max(load_end, bss_end) or None
        return _elf_load_end(Path(path))
    return None


def _elf_load_end(path: Path) -> int | None:
    """max(p_paddr + p_memsz) over an ELF's PT_LOAD segments (ELF32 or ELF64, little endian)."""
    try:
        with path.open("rb") as handle:
            ident = handle.read(64)
            if len(ident) < 52 or ident[:4] != ELF_MAGIC or ident[5] != 1:
                return None
            elf64 = ident[4] == ELFCLASS64
            if elf64:
                (phoff,) = struct.unpack_from("<Q", ident, 32)
                phentsize, phnum = struct.unpack_from("<HH", ident, 54)
            else:
                (phoff,) = struct.unpack_from("<I", ident, 28)
                phentsize, phnum = struct.unpack_from("<HH", ident, 42)
            if phnum == 0 or phnum > 256 or phentsize < (56 if elf64 else 32):
                return None
            handle.seek(phoff)
            table = handle.read(phentsize * phnum)
    except OSError:
        return None
    end = 0
    for index in range(phnum):
        entry = table[index * phentsize : (index + 1) * phentsize]
        if len(entry) < (56 if elf64 else 32):
            return None
        if elf64:
            (kind,) = struct.unpack_from("<I", entry, 0)
            paddr, _filesz, memsz = struct.unpack_from("<QQQ", entry, 24)
        else:
            kind, _off, _vaddr, paddr, _filesz, memsz = struct.unpack_from("<6I", entry, 0)
        if kind == PT_LOAD and memsz:
            end = max(end, paddr + memsz)
    return end or None
