"""Which QEMU vmckpt uses: VMCKPT_QEMU if set, else the newest installed (the system's on
PATH, or one scripts/install-deps.sh put in /var/cache/vmckpt), never one others may replace;
`vmckpt check` names it and why. Fake QEMUs that only print a version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.framework.guest import REPO
from vmckpt.errors import MachineError
from vmckpt.machine import binary as qemu_binaries
from vmckpt.machine.binary import QEMU_ENV, choose_qemu
from vmckpt.mechanisms.choice import LIBVIRT_REFUSAL


def fake_qemu(directory: Path, version: str, name: str = "qemu-system-x86_64") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o755)
    binary = directory / name
    binary.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version} (fake)'\n")
    binary.chmod(0o755)
    return binary


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A host whose PATH holds a system QEMU 10 and whose install directory (the glob
    vmckpt looks at) is under ``tmp_path``; VMCKPT_QEMU unset."""
    os.chmod(tmp_path, 0o755)
    system = fake_qemu(tmp_path / "usr-bin", "10.0.2")
    monkeypatch.setenv("PATH", f"{system.parent}:/usr/bin:/bin")
    monkeypatch.delenv(QEMU_ENV, raising=False)
    monkeypatch.setattr(
        qemu_binaries, "INSTALLED_QEMUS", str(tmp_path / "cache" / "qemu-*/bin/qemu-system-x86_64")
    )
    return tmp_path


def test_the_newest_installed_qemu_is_chosen_and_the_reason_names_the_others(host: Path) -> None:
    assert choose_qemu().version == "10.0.2"  # only the system's so far
    eleven = fake_qemu(host / "cache" / "qemu-11" / "bin", "11.1.3")
    choice = choose_qemu()
    assert (choice.binary, choice.version) == (str(eleven), "11.1.3")
    assert "the newest QEMU installed" in choice.why
    assert f"10.0.2 at {host / 'usr-bin' / 'qemu-system-x86_64'}" in choice.why
    assert QEMU_ENV in choice.why


def test_vmckpt_qemu_overrides_the_newest(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_qemu(host / "cache" / "qemu-11" / "bin", "11.1.3")
    system = host / "usr-bin" / "qemu-system-x86_64"
    monkeypatch.setenv(QEMU_ENV, str(system))
    choice = choose_qemu()
    assert (choice.binary, choice.version) == (str(system), "10.0.2")
    assert choice.why == f"{QEMU_ENV} names it"
    monkeypatch.setenv(QEMU_ENV, str(host / "nowhere"))
    with pytest.raises(MachineError, match="not found"):
        choose_qemu()


def test_an_installed_qemu_others_may_replace_is_never_taken(host: Path) -> None:
    eleven = fake_qemu(host / "cache" / "qemu-11" / "bin", "11.1.3")
    os.chmod(eleven.parent, 0o777)  # anyone could put another binary there
    assert choose_qemu().version == "10.0.2"
    os.chmod(eleven.parent, 0o755)
    os.chmod(eleven, 0o775)  # group-writable
    assert choose_qemu().version == "10.0.2"
    os.chmod(eleven, 0o755)
    assert choose_qemu().version == "11.1.3"


def test_no_qemu_at_all_says_what_to_install(host: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(host / "empty"))
    with pytest.raises(MachineError, match=r"no QEMU found.*install-deps\.sh"):
        choose_qemu()


@pytest.mark.qemu
def test_check_names_the_qemu_and_why() -> None:
    """`vmckpt check --json` names the (real) QEMU it uses and why."""
    env = {k: v for k, v in os.environ.items() if k != QEMU_ENV}
    env[QEMU_ENV] = "qemu-system-x86_64"
    env["PATH"] = "/usr/bin:/bin"
    out = subprocess.run(
        [sys.executable, "-m", "vmckpt", "check", "--json"],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=120, check=False,
    )  # fmt: skip
    caps = json.loads(out.stdout)
    assert caps["binary"] == "/usr/bin/qemu-system-x86_64"
    assert caps["why"] == f"{QEMU_ENV} names it"
    assert caps["version"].startswith("10.")
    assert "QEMU 11 or later makes it possible" in caps["mechanisms"]["colo"]
    assert caps["mechanisms"]["colo (libvirt domains)"] == f"no: {LIBVIRT_REFUSAL}"
