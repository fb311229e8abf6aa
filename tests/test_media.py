"""Boot media other than a Linux kernel: the test guest on a GRUB 2 ISO, multiboot module lists.

The ISO test is the foundation's end-to-end test on ``--iso``: boot, three
checkpoints, restore from the middle layer, the workload carries on with
exactly the checksums of the original run; then the ISO changes and restore
refuses it. The multiboot tests check how ``--kernel``/``--initrd`` become
boot media and QEMU arguments, on real files.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from tests.framework.guest import GUEST_BUILD, REPO, Taken, Vmckpt, assert_continues, take
from vmckpt.errors import MachineError, UsageError
from vmckpt.machine.bootmedia import kernel_media, split_module_list
from vmckpt.machine.qemu import Launch, command_line
from vmckpt.machine.spec import GuestSpec

ISO = GUEST_BUILD / "vmckpt-guest.iso"


@pytest.fixture(scope="session")
def guest_iso(guest_images: Path) -> Path:
    """The test guest as a GRUB 2 ISO, built by `make -C guest iso`."""
    subprocess.run(["make", "-s", "-C", str(REPO / "guest"), "iso"], check=True)
    assert ISO.is_file(), "guest/build/vmckpt-guest.iso was not built"
    return ISO


def test_iso_guest_chain_restore_from_middle(
    vmckpt: Vmckpt, guest_iso: Path, tmp_path: Path
) -> None:
    iso = tmp_path / "guest.iso"
    shutil.copy(guest_iso, iso)
    vmckpt.started.add("iso")
    vmckpt(
        "run", "iso", "--store", str(vmckpt.store), "--create", "--iso", str(iso),
        "--memory", "256M", "--accel", "tcg", "--detach",
    )  # fmt: skip
    vmckpt.wait_states("iso", 5)
    assert "Booting `vmckpt test guest'" in vmckpt.serial("iso"), "GRUB did not boot the ISO"
    taken: list[Taken] = []
    for _ in range(3):
        taken.append(take(vmckpt, "iso"))
        vmckpt.wait_states("iso", len(vmckpt.states("iso")) + 5)
    original = vmckpt.states("iso")
    assert "BAD" not in vmckpt.serial("iso")
    vmckpt("stop", "iso", "--store", str(vmckpt.store))

    # The layer's spec references the ISO by path and content hash.
    layer = json.loads(
        vmckpt("inspect", "--store", str(vmckpt.store), taken[1].layer, "--json").stdout
    )
    media = layer["spec"]["media"]
    assert [(m["role"], m["path"]) for m in media] == [("iso", str(iso))]
    assert media[0]["sha256"] == hashlib.sha256(iso.read_bytes()).hexdigest()

    vmckpt.restore("--layer", taken[1].layer, "--name", "iso")
    restored = vmckpt.wait_states("iso", 15)
    assert_continues(restored, original, taken[1])
    assert "BAD" not in vmckpt.serial("iso")
    assert "Booting" not in vmckpt.serial("iso"), "the restored guest booted again"
    vmckpt("stop", "iso", "--store", str(vmckpt.store))

    # A changed ISO is refused, in one line naming the medium, and nothing is started.
    with iso.open("r+b") as handle:
        handle.seek(0x8000 + 40)  # inside the ISO 9660 volume descriptor: the volume id
        handle.write(b"CHANGED")
    result = vmckpt("restore", "--store", str(vmckpt.store), "--layer", taken[1].layer, check=False)
    assert result.returncode != 0
    error = result.stderr.strip()
    assert len(error.splitlines()) == 1, error
    assert "iso" in error and str(iso) in error and "changed since the checkpoint" in error


# -- multiboot kernels and their modules ------------------------------------------------


def _multiboot_kernel(path: Path, *, elf64: bool = False) -> Path:
    """A file QEMU would treat as a multiboot kernel: a valid header in its first 8 KiB."""
    flags = 0x00000003  # page-align modules, memory info; no a.out kludge
    header = struct.pack("<III", 0x1BADB002, flags, (-(0x1BADB002 + flags)) & 0xFFFFFFFF)
    prefix = bytearray(64)
    if elf64:
        prefix[:5] = b"\x7fELF\x02"
    path.write_bytes(bytes(prefix) + header + bytes(4096))
    return path


def test_split_module_list_follows_qemu_escaping() -> None:
    assert split_module_list("a") == ["a"]
    assert split_module_list("a x=1,b") == ["a x=1", "b"]
    assert split_module_list("dir,,with,,commas/m arg,b") == ["dir,with,commas/m arg", "b"]
    assert split_module_list("a,") == ["a", ""]


def test_multiboot_modules_become_media_and_qemu_arguments(tmp_path: Path) -> None:
    kernel = _multiboot_kernel(tmp_path / "kernel")
    odd = tmp_path / "a,b"
    odd.mkdir()
    first = odd / "first"
    first.write_bytes(b"module one")
    second = tmp_path / "second"
    second.write_bytes(b"module two")
    media = kernel_media(str(kernel), [f"{str(first).replace(',', ',,')} x=1 y,{second}"])
    assert [m.role for m in media] == ["kernel", "module", "module"]
    assert media[1].path == str(first) and media[1].args == "x=1 y"
    assert media[1].sha256 == hashlib.sha256(b"module one").hexdigest()
    assert media[2].path == str(second) and media[2].args == ""

    spec = GuestSpec(media=tuple(media), append="console=com0")
    again = GuestSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    line = command_line(
        again,
        Launch(name="mb", accel="tcg", serial_log=tmp_path / "s"),
        binary="qemu",
        qemu_major=10,
        qmp_fds=(3,),
    )
    initrd = line[line.index("-initrd") + 1]
    assert initrd == f"{str(first).replace(',', ',,')} x=1 y,{second}"
    assert line[line.index("-kernel") + 1] == str(kernel)

    # Restore checks every module on its own.
    again.check_media("mb")
    second.write_bytes(b"module 2")
    with pytest.raises(MachineError, match=r"module .*second changed since the checkpoint"):
        again.check_media("mb")


def test_linux_kernel_takes_one_initrd_literally(tmp_path: Path) -> None:
    kernel = GUEST_BUILD / "vmlinuz"
    if not kernel.is_file():
        pytest.fail("guest/build/vmlinuz missing: run `make -C guest`")
    initrd = tmp_path / "with,comma.img"
    initrd.write_bytes(b"initrd")
    media = kernel_media(str(kernel), [str(initrd)])
    assert [(m.role, m.path) for m in media] == [("kernel", str(kernel)), ("initrd", str(initrd))]
    line = command_line(
        GuestSpec(media=tuple(media)),
        Launch(name="l", accel="tcg", serial_log=tmp_path / "s"),
        binary="qemu",
        qemu_major=10,
        qmp_fds=(3,),
    )
    assert line[line.index("-initrd") + 1] == str(initrd)  # no ',,' for a Linux kernel
    with pytest.raises(UsageError, match="not a multiboot kernel"):
        kernel_media(str(kernel), [str(initrd), str(initrd)])


def test_64bit_elf_multiboot_kernel_is_refused_with_a_hint(tmp_path: Path) -> None:
    kernel = _multiboot_kernel(tmp_path / "kernel64", elf64=True)
    with pytest.raises(UsageError, match="objcopy -I elf64-x86-64 -O elf32-i386"):
        kernel_media(str(kernel), [])


def test_run_refuses_bad_media_in_one_line(vmckpt: Vmckpt, tmp_path: Path) -> None:
    kernel = _multiboot_kernel(tmp_path / "kernel")
    cases = [
        (["--kernel", str(kernel), "--initrd", f"{tmp_path}/missing"], "module"),
        (["--kernel", str(kernel), "--initrd", f"{kernel},"], "empty module entry"),
        (["--iso", str(tmp_path / "none.iso")], "iso"),
        (["--iso", str(kernel), "--initrd", str(kernel)], "--initrd needs --kernel"),
    ]
    for args, needle in cases:
        result = vmckpt("run", "bad", "--store", str(vmckpt.store), "--create", *args, check=False)
        assert result.returncode == UsageError.exit_code, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert needle in result.stderr, (args, result.stderr)


def test_a_medium_is_read_once_until_it_changes_and_a_bad_record_is_not_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Boot media are checked on every restore; their digests are remembered on this host
    (vmckpt.hostdirs.file_sha256) under the file's identity, in the runtime root only."""
    from vmckpt import hostdirs

    monkeypatch.setenv("VMCKPT_RUNTIME_DIR", str(tmp_path / "run"))
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"A" * 4096)
    records = tmp_path / "run" / hostdirs.DIGEST_DIR
    # Just written: its times may not change on the next write (their granularity), so it
    # is read each time and nothing is remembered.
    assert hostdirs.file_sha256(kernel) == hashlib.sha256(b"A" * 4096).hexdigest()
    assert not records.exists()

    monkeypatch.setattr(hostdirs, "DIGEST_SETTLE_NS", 0)  # as if written long ago
    assert hostdirs.file_sha256(kernel) == hashlib.sha256(b"A" * 4096).hexdigest()
    (record,) = records.iterdir()
    real_digest = hashlib.file_digest

    def unread(*args: object, **kwargs: object) -> object:
        raise AssertionError("read again")

    monkeypatch.setattr(hashlib, "file_digest", unread)
    assert hostdirs.file_sha256(kernel) == hashlib.sha256(b"A" * 4096).hexdigest()
    monkeypatch.setattr(hashlib, "file_digest", real_digest)

    kernel.write_bytes(b"B" * 8192)  # changed: read again
    assert hostdirs.file_sha256(kernel) == hashlib.sha256(b"B" * 8192).hexdigest()

    # A record that is not a digest, or one in a directory others may write, is not taken.
    newest = max(records.iterdir(), key=lambda p: p.stat().st_mtime_ns)
    forged = json.loads(newest.read_text())
    forged["sha256"] = hashlib.sha256(b"C").hexdigest()
    newest.write_text(json.dumps(forged))
    records.chmod(0o755)
    assert hostdirs.file_sha256(kernel) == hashlib.sha256(b"B" * 8192).hexdigest()
    records.chmod(0o700)  # this user's own again: its records are this user's word (as
    assert hostdirs.file_sha256(kernel) == hashlib.sha256(b"C").hexdigest()  # QEMU's probes)
    forged["sha256"] = "not a digest"
    newest.write_text(json.dumps(forged))
    assert hostdirs.file_sha256(kernel) == hashlib.sha256(b"B" * 8192).hexdigest()
    assert record.exists()
