"""The QEMU binary this host uses (``$VMCKPT_QEMU``, else the newest installed: the system's
``qemu-system-x86_64`` or one scripts/install-deps.sh put in /var/cache/vmckpt), what it
supports (its version, machine types, whether KVM is usable here), and qemu-img beside it.
Knows no guest, process or store: the guest spec (spec.py) and the QEMU process (qemu.py)
build on it."""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmckpt.errors import MachineError, StoreError, UsageError
from vmckpt.fsutil import read_json, write_json_atomic
from vmckpt.hostdirs import private_dir, runtime_root

DEFAULT_QEMU = "qemu-system-x86_64"
QEMU_ENV = "VMCKPT_QEMU"
# Where scripts/install-deps.sh installs a QEMU of its own (QEMU 11 in a minimal trixie root,
# run through a wrapper): taken only if root (or this user) owns it and no one else may
# write to it or to a directory above it.
INSTALLED_QEMUS = "/var/cache/vmckpt/qemu-*/bin/qemu-system-x86_64"


@dataclass(frozen=True)
class QemuChoice:
    """The QEMU binary vmckpt uses here, its version, and why this one (one line)."""

    binary: str
    version: str
    why: str


def _safe_to_run(path: Path) -> bool:
    """The file and every directory above it belong to root or this user, and no one else
    may write to them (a binary others could replace is never run)."""
    me = os.getuid()
    try:
        current = path.resolve(strict=True)
        for part in (current, *current.parents):
            info = os.stat(part)
            others_write = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
            sticky = stat.S_ISDIR(info.st_mode) and info.st_mode & stat.S_ISVTX and not info.st_uid
            if info.st_uid not in (0, me) or (others_write and not sticky):
                return False
    except OSError:
        return False
    return True


def installed_qemus() -> list[str]:
    """The QEMU binaries installed here: the system's on PATH, then install-deps.sh's."""
    found: list[str] = []
    system = shutil.which(DEFAULT_QEMU)
    if system:
        found.append(system)
    for candidate in sorted(glob.glob(INSTALLED_QEMUS)):
        if os.access(candidate, os.X_OK) and _safe_to_run(Path(candidate)):
            found.append(candidate)
    return found


def choose_qemu() -> QemuChoice:
    """The QEMU to use: ``$VMCKPT_QEMU`` if set, else the newest installed (see
    `installed_qemus`; a tie goes to the system's), with the reason."""
    chosen = os.environ.get(QEMU_ENV)
    if chosen:
        found = shutil.which(chosen)
        if not found:
            raise MachineError(
                f"QEMU binary {chosen!r} ({QEMU_ENV}) not found (install qemu-system-x86, or "
                f"unset {QEMU_ENV} to use the newest installed)",
                step="find-qemu",
            )
        return QemuChoice(found, qemu_version(found), f"{QEMU_ENV} names it")
    versions: list[tuple[tuple[int, int, int], int, str, str]] = []
    for order, binary in enumerate(installed_qemus()):
        try:
            version = qemu_version(binary)
        except (MachineError, OSError):
            continue
        versions.append((version_tuple(version), -order, binary, version))
    if not versions:
        raise MachineError(
            f"no QEMU found: neither {DEFAULT_QEMU} on PATH nor {INSTALLED_QEMUS} (install "
            f"qemu-system-x86 or run scripts/install-deps.sh, or set {QEMU_ENV})",
            step="find-qemu",
        )
    versions.sort(reverse=True)
    _, _, binary, version = versions[0]
    others = [f"{v} at {b}" for _, _, b, v in versions[1:]]
    why = "the newest QEMU installed" + (f" (also {', '.join(others)})" if others else "")
    return QemuChoice(binary, version, f"{why}; {QEMU_ENV}=PATH picks another")


def qemu_binary() -> str:
    """The QEMU binary to use (`choose_qemu`)."""
    return choose_qemu().binary


PROBE_DIR = "qemu-probes"  # in this host's runtime root: what each QEMU binary answered


def _identity(binary: str) -> dict[str, Any]:
    """What names one build of a binary: its path, inode, size and times (a package upgrade,
    or install-deps.sh rewriting its wrapper, makes a new one)."""
    info = os.stat(binary)
    return {
        "binary": os.path.realpath(binary),
        "dev": info.st_dev,
        "ino": info.st_ino,
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "ctime_ns": info.st_ctime_ns,
    }


def _probe_path(identity: dict[str, Any], question: str) -> Path:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:32]
    return runtime_root() / PROBE_DIR / f"{question}-{digest}.json"


def _remembered(identity: dict[str, Any], question: str) -> Any:
    """What this build answered before, on this host since it booted (the runtime root is
    this user's only, on tmpfs as root); None if not known. Asking QEMU costs a restore
    that is to run in milliseconds 30-60 ms per question."""
    try:
        record = read_json(_probe_path(identity, question))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("identity") != identity:
        return None
    return record.get("answer")


def _remember(identity: dict[str, Any], question: str, answer: Any) -> None:
    """Keep an answer for the next command; a host where that cannot be done asks again."""
    try:
        private_dir(runtime_root())
        path = private_dir(runtime_root() / PROBE_DIR)
        write_json_atomic(path / _probe_path(identity, question).name,
                          {"identity": identity, "answer": answer}, durable=False)  # fmt: skip
    except (OSError, StoreError):
        pass


def cannot_run(binary: str, exc: OSError, *, vm: str | None = None, step: str) -> MachineError:
    """A program vmckpt starts could not be executed (not executable, gone, busy being
    written): one line naming it, not a traceback."""
    return MachineError(f"cannot run {binary}: {exc.strerror or exc}", vm=vm, step=step)


def _ask(binary: str, *question: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([binary, *question], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise cannot_run(binary, exc, step="find-qemu") from exc


@functools.cache
def _version_of(binary: str, identity_json: str) -> str:
    identity = json.loads(identity_json)
    known = _remembered(identity, "version")
    if isinstance(known, str) and re.fullmatch(r"\d+\.\d+\.\d+", known):
        return known
    out = _ask(binary, "--version")
    match = re.search(r"version (\d+\.\d+\.\d+)", out.stdout)
    if not match:
        lines = (out.stdout or out.stderr).strip().splitlines()
        said = repr(lines[0]) if lines else "nothing"
        raise MachineError(
            f"QEMU binary {binary}: `--version` printed no QEMU version ({said})",
            step="find-qemu",
        )
    _remember(identity, "version", match.group(1))
    return match.group(1)


def qemu_version(binary: str) -> str:
    """``major.minor.micro`` of a QEMU binary (asked once per build of it on this host)."""
    return _version_of(binary, json.dumps(_identity(binary), sort_keys=True))


@functools.cache
def _machines_of(binary: str, identity_json: str) -> frozenset[str]:
    identity = json.loads(identity_json)
    known = _remembered(identity, "machines")
    if isinstance(known, list) and known and all(isinstance(m, str) for m in known):
        return frozenset(known)
    out = _ask(binary, "-machine", "help").stdout
    lines = out.splitlines()
    if not lines or not lines[0].startswith("Supported machines"):
        raise MachineError(
            f"QEMU binary {binary}: `-machine help` printed no machine list", step="find-qemu"
        )
    machines = frozenset(line.split()[0] for line in lines[1:] if line.strip())
    _remember(identity, "machines", sorted(machines))
    return machines


def machine_types(binary: str) -> frozenset[str]:
    """The machine types (and aliases such as ``pc``, ``q35``) a QEMU binary offers (asked
    once per build of it on this host)."""
    return _machines_of(binary, json.dumps(_identity(binary), sort_keys=True))


def version_tuple(version: str) -> tuple[int, int, int]:
    parts = [int(p) for p in re.findall(r"\d+", version)[:3]]
    parts += [0] * (3 - len(parts))
    return (parts[0], parts[1], parts[2])


def kvm_usable() -> tuple[bool, str]:
    """Whether KVM can really run guests here, and why not.

    A /dev/kvm that opens is not enough: paravirtual hosts expose one whose
    guests never boot. The CPU must also advertise hardware virtualisation.
    """
    if not os.path.exists("/dev/kvm"):
        return False, "/dev/kvm does not exist"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm is not accessible to this user"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False, "cannot read /proc/cpuinfo"
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    if not flags & {"vmx", "svm"}:
        return False, "the CPU shows no vmx/svm flag (a paravirtual /dev/kvm cannot run guests)"
    return True, "ok"


def resolve_accel(requested: str) -> str:
    """The accelerator QEMU will use for ``requested`` (auto: KVM only where it really works)."""
    if requested == "auto":
        return "kvm" if kvm_usable()[0] else "tcg"
    if requested == "kvm":
        usable, why = kvm_usable()
        if not usable:
            raise UsageError(f"--accel kvm is not usable here: {why}")
    elif requested != "tcg":
        raise UsageError(f"unknown accelerator {requested!r} (auto, kvm or tcg)")
    return requested


def qemu_img(*args: str, vm: str | None = None, step: str = "qemu-img") -> str:
    """Run qemu-img (the one beside the QEMU in use, else PATH's); failure is a MachineError."""
    beside = Path(qemu_binary()).with_name("qemu-img")
    binary = str(beside) if beside.is_file() else shutil.which("qemu-img")
    if binary is None:
        raise MachineError("qemu-img not found (install qemu-utils)", vm=vm, step=step)
    try:
        result = subprocess.run([binary, *args], capture_output=True, text=True, check=False)
    except OSError as exc:
        raise cannot_run(binary, exc, vm=vm, step=step) from exc
    if result.returncode != 0:
        raise MachineError(
            f"qemu-img {args[0]} failed: {result.stderr.strip() or result.stdout.strip()}",
            vm=vm,
            step=step,
        )
    return result.stdout


def parse_memory(text: str) -> int:
    """'512M', '1G', '1024' (MiB) -> MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([MmGg]?)(i?[Bb])?\s*", text)
    if not match:
        raise UsageError(f"cannot read memory size {text!r} (use e.g. 512M or 1G)")
    value = int(match.group(1))
    mib = value * 1024 if match.group(2).lower() == "g" else value
    if mib < 16:
        raise UsageError(f"memory size {text!r} is too small (at least 16M)")
    return mib


# -- the command line --------------------------------------------------------------------
