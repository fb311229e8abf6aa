"""Whether this host can restore a guest lazily, and if not, why (one line).

A lazy restore makes the restoring QEMU a postcopy destination, which needs userfaultfd
(QEMU opens ``/dev/userfaultfd`` first, which root may use even with
``vm.unprivileged_userfaultfd=0``, else the system call) and guest RAM that can be served in
4 KiB pages: anonymous, or file-backed on tmpfs, never hugetlbfs. QEMU checks both again
when it is made a destination; lazy_restore.py takes its refusal as a reason too.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

from vmckpt import faults

USERFAULTFD_DEVICE = "/dev/userfaultfd"
_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
NO_USERFAULTFD = "no-userfaultfd"  # VMCKPT_FAULT value: behave as a host without it
_HUGETLBFS_MAGIC = 0x958458F6
_TMPFS_MAGIC = 0x01021994


def userfaultfd_refusal() -> str | None:
    """Why this host cannot serve a postcopy destination (QEMU's incoming side needs
    userfaultfd, as /dev/userfaultfd or the system call), or None."""
    if os.environ.get(faults.ENV) == NO_USERFAULTFD:
        return "no userfaultfd on this host (VMCKPT_FAULT=no-userfaultfd)"
    try:
        os.close(os.open(USERFAULTFD_DEVICE, os.O_RDWR | os.O_CLOEXEC))
        return None
    except OSError as exc:
        device = f"{USERFAULTFD_DEVICE}: {exc.strerror}"
    number = _SYS_USERFAULTFD.get(os.uname().machine)
    if number is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK)
        if fd >= 0:
            os.close(fd)
            return None
        device += f"; the userfaultfd system call: {os.strerror(ctypes.get_errno())}"
    return f"no userfaultfd on this host ({device})"


def _fs_magic(path: str) -> int | None:
    class _StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 120)]

    buf = _StatFs()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        return None
    return int(buf.f_type) & 0xFFFFFFFF


def memory_refusal(args: Sequence[str]) -> str | None:
    """Why the guest's RAM, as its QEMU arguments back it, cannot be served page by page:
    file-backed RAM must be on tmpfs (huge pages of hugetlbfs are not what vmckpt serves)."""
    for arg in args:
        for part in arg.split(","):
            if part.startswith("mem-path="):
                path = part.split("=", 1)[1]
            elif arg == part and part.startswith("/") and "-mem-path" in args:
                path = part
            else:
                continue
            magic = _fs_magic(path)
            if magic == _HUGETLBFS_MAGIC:
                return f"guest RAM on hugetlbfs ({path}): vmckpt serves 4 KiB pages only"
            if magic != _TMPFS_MAGIC:
                return f"guest RAM backed by a file not on tmpfs ({path}) cannot be postcopied"
        if "hugetlb=on" in arg:
            return "guest RAM in huge pages (hugetlb=on): vmckpt serves 4 KiB pages only"
    return None
