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


def counting_qemu(directory: Path, version: str, machines: tuple[str, ...]) -> tuple[Path, Path]:
    """A fake QEMU that answers --version and -machine help and counts how often it ran."""
    directory.mkdir(parents=True, exist_ok=True)
    binary, runs = directory / "qemu-system-x86_64", directory / "runs"
    listing = "\\n".join(f"{m}  machine {m}" for m in machines)
    binary.write_text(
        "#!/bin/sh\n"
        f"echo run >> {runs}\n"
        f'if [ "$1" = --version ]; then echo "QEMU emulator version {version}"; exit 0; fi\n'
        f'printf "Supported machines are:\\n{listing}\\n"\n'
    )
    binary.chmod(0o755)
    return binary, runs


def ask_in_a_new_process(binary: Path) -> list[str]:
    """What a new vmckpt command learns of the binary: its version and machine types."""
    code = (
        "import sys; from vmckpt.machine.binary import qemu_version, machine_types;"
        "print(qemu_version(sys.argv[1])); print(' '.join(sorted(machine_types(sys.argv[1]))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(binary)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.split("\n")[:2]


def test_a_qemu_binary_is_asked_once_per_build_and_a_forged_answer_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restore that is to run in milliseconds cannot ask QEMU its version and machines
    each time: the answers are kept in this host's runtime root, for that build of the
    binary only (a new build is asked again), and a kept answer for another build, or one
    that is not an answer, is not taken."""
    monkeypatch.setenv("VMCKPT_RUNTIME_DIR", str(tmp_path / "run"))
    binary, runs = counting_qemu(tmp_path / "bin", "10.0.2", ("pc-q35-10.0", "q35"))
    assert ask_in_a_new_process(binary) == ["10.0.2", "pc-q35-10.0 q35"]
    assert runs.read_text().count("run") == 2
    assert ask_in_a_new_process(binary) == ["10.0.2", "pc-q35-10.0 q35"]
    assert runs.read_text().count("run") == 2  # the second command asked no QEMU
    kept = sorted((tmp_path / "run" / qemu_binaries.PROBE_DIR).iterdir())
    assert [p.name.split("-")[0] for p in kept] == ["machines", "version"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in kept)

    binary, _ = counting_qemu(tmp_path / "bin", "11.1.3", ("pc-q35-11.1",))  # a new build
    assert ask_in_a_new_process(binary) == ["11.1.3", "pc-q35-11.1"]
    assert runs.read_text().count("run") == 4

    for path in sorted((tmp_path / "run" / qemu_binaries.PROBE_DIR).iterdir()):
        record = json.loads(path.read_text())
        if record["answer"] == "11.1.3":  # an answer of another build (another inode)
            other = {**record["identity"], "ino": record["identity"]["ino"] + 1}
            path.write_text(json.dumps({"identity": other, "answer": "9.9.9"}))
        elif record["answer"] == ["pc-q35-11.1"]:
            path.write_text("[" * 100000)  # not JSON a record could hold
    assert ask_in_a_new_process(binary) == ["11.1.3", "pc-q35-11.1"]
    assert runs.read_text().count("run") == 6  # asked again, not taken from the files
