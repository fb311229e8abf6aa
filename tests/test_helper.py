"""``vmckpt helper`` (vmckpt/helper.py) and the launcher that hands it commands
(vmckpt/launcher.py): a helped command answers as it would in its own process, gets the
signals its client gets, dies with it; a helper that cannot take a command leaves it to the
client; only this user reaches it. A lazy restore through it: tests/test_lazy.py."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import short_tmp
from tests.framework.guest import REPO, wait_for
from tests.framework.helper import HelperProcess, running_helper
from vmckpt import faults, launcher

WAIT_S = 60.0


@pytest.fixture
def place() -> Iterator[tuple[Path, dict[str, str]]]:
    """A working directory with a store ``st`` in it, and a runtime root of its own."""
    path = short_tmp("vk-helper-")
    env = {"VMCKPT_RUNTIME_DIR": str(path / "run")}
    try:
        cli(path, env, "init", "st")
        yield path, env
    finally:
        shutil.rmtree(path, ignore_errors=True)


def cli(cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vmckpt", *args], cwd=cwd, env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def ran(helper: HelperProcess, args: str, code: int) -> bool:
    """Whether the helper ran ``args`` in a child that exited ``code`` (its -v lines)."""
    pids = [line.split()[3].rstrip(":") for line in helper.lines if line.endswith(": " + args)]
    return any(f"pid {pid}: exit {code}" in line for pid in pids for line in helper.lines)


def test_a_helped_command_answers_as_it_would_in_its_own_process(
    place: tuple[Path, dict[str, str]],
) -> None:
    path, env = place
    commands = {  # a relative store: the client's working directory is the command's
        "restore --store st --layer nope --detach": 3,
        "restore --store st --detach --no-such-option": 2,  # argparse's own exit
    }
    with running_helper(env) as helper:
        helped = {args: cli(path, env, *args.split()) for args in commands}
        for args, code in commands.items():
            helper.wait_said(f": exit {code}")
            assert ran(helper, args, code), helper.lines
        cli(path, env, "list", "--store", "st")  # not a command that starts a guest
        assert not any("list" in line for line in helper.lines), helper.lines
    here = {args: cli(path, env, *args.split()) for args in commands}
    for args, code in commands.items():
        assert helped[args].returncode == here[args].returncode == code, (helped, here)
        assert helped[args].stderr == here[args].stderr, (helped[args], here[args])
        assert helped[args].stdout == here[args].stdout == ""
    assert f"no layer matches 'nope' in {path / 'st'}" in helped[next(iter(commands))].stderr
    assert "unrecognized arguments: --no-such-option" in here[list(commands)[1]].stderr


@pytest.mark.qemu
def test_a_helped_commands_log_goes_to_its_clients_stderr(
    place: tuple[Path, dict[str, str]],
) -> None:
    path, env = place  # a QEMU that cannot boot a text file: it exits at once
    args = ["-v", "run", "x", "--store", "st", "--kernel", "/etc/hostname", "--memory", "64M",
            "--accel", "tcg", "--detach"]  # fmt: skip
    with running_helper(env) as helper:
        helped = cli(path, env, *args)
        helper.wait_said(": exit ")
        assert len(helper.command_pids()) == 1, helper.lines
    here = cli(path, env, *args)
    for result in (helped, here):
        said = result.stderr.splitlines()
        assert result.returncode == here.returncode != 0, (helped, here)
        assert " vmckpt.machine.qemu: launching QEMU for x: " in said[0], said
        assert said[-1].startswith("vmckpt run: error: guest x, during launch: QEMU exited"), said


def held_restore(path: Path, env: dict[str, str]) -> tuple[subprocess.Popen[str], list[str]]:
    """A restore through the helper, held at its start (VMCKPT_FAULT travels with the
    environment), once it says so; its stderr lines."""
    client = subprocess.Popen(
        [sys.executable, "-m", "vmckpt", "restore", "--store", "st", "--layer", "x", "--detach"],
        cwd=path, env={**os.environ, **env, faults.ENV: f"hold-at:{faults.RESTORE_START}"},
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    lines: list[str] = []

    def collect() -> None:
        assert client.stderr is not None
        lines.extend(line.rstrip("\n") for line in client.stderr)

    threading.Thread(target=collect, daemon=True).start()
    wait_for(lambda: any("held at restore-start" in line for line in lines),
             "the restore held at its start", WAIT_S, evidence=lambda: lines)  # fmt: skip
    return client, lines


def interrupt(client: subprocess.Popen[str], lines: list[str]) -> None:
    """Ctrl-C, as a terminal sends it to the command's process: the command says so, 130."""
    client.send_signal(signal.SIGINT)
    assert client.wait(timeout=WAIT_S) == 130, lines
    wait_for(lambda: "vmckpt restore: interrupted" in lines, "the interruption said",
             WAIT_S, evidence=lambda: lines)  # fmt: skip


def test_a_helped_command_gets_its_clients_signals_and_dies_with_it(
    place: tuple[Path, dict[str, str]],
) -> None:
    path, env = place
    with running_helper(env) as helper:
        interrupt(*held_restore(path, env))
        helper.wait_said(": exit 130")

        client, _lines = held_restore(path, env)
        wait_for(lambda: len(helper.command_pids()) == 2, "the helper naming its second child",
                 WAIT_S, evidence=lambda: helper.lines)  # fmt: skip
        child = helper.command_pids()[-1]
        os.kill(child, 0)  # it runs, held
        client.kill()  # SIGKILL: nothing to forward; the helper sees its client gone
        client.wait(timeout=WAIT_S)
        helper.wait_said(f"pid {child}: exit {128 + signal.SIGKILL}")
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)


def test_a_stopped_helper_takes_no_more_commands_and_lets_its_running_ones_end(
    place: tuple[Path, dict[str, str]],
) -> None:
    path, env = place
    with running_helper(env) as helper:
        client, lines = held_restore(path, env)
        helper.process.send_signal(signal.SIGTERM)
        sock = path / "run" / launcher.HELPER_SOCKET
        wait_for(lambda: not sock.exists(), "the helper's socket removed", WAIT_S)
        assert helper.process.poll() is None  # it waits for the command it runs
        after = cli(path, env, "restore", "--store", "st", "--layer", "nope", "--detach")
        assert after.returncode == 3 and "no layer matches 'nope'" in after.stderr  # here
        interrupt(client, lines)
        assert helper.process.wait(timeout=WAIT_S) == 0
        helper.wait_said("vmckpt helper: stopped")
        assert sum(": exit " in line for line in helper.lines) == 1, helper.lines


def test_a_helper_whose_code_changed_leaves_the_command_to_its_client_and_stops(
    place: tuple[Path, dict[str, str]],
) -> None:
    path, env = place
    module = REPO / "vmckpt" / "cli" / "restore_cmds.py"
    before = module.stat()
    with running_helper(env) as helper:
        try:  # as an upgrade would: the file the helper loaded is not that one any more
            os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
            result = cli(path, env, "restore", "--store", "st", "--layer", "nope", "--detach")
        finally:
            os.utime(module, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert result.returncode == 3, result
        assert result.stderr.count("\n") == 1 and "no layer matches 'nope'" in result.stderr
        helper.wait_said(f"{module} changed since it was loaded: stopping")
        assert helper.process.wait(timeout=WAIT_S) == 0
        assert not any(": exit " in line for line in helper.lines), helper.lines
    assert not (path / "run" / launcher.HELPER_SOCKET).exists()


def test_only_this_user_reaches_the_helper_and_one_helper_serves_a_host(
    place: tuple[Path, dict[str, str]],
) -> None:
    path, env = place
    sock = path / "run" / launcher.HELPER_SOCKET
    with running_helper(env):
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700
        second = cli(path, env, "helper")
        assert second.returncode != 0 and second.stderr.count("\n") == 1, second
        assert f"a vmckpt helper already serves {sock}" in second.stderr
        probe = (
            "import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n"
        )
        other = subprocess.run(["/usr/bin/python3", "-c", probe, str(sock)], cwd="/",
                               user=65534, group=65534, extra_groups=[], timeout=WAIT_S,
                               check=False)  # fmt: skip
        assert other.returncode == 13  # another user cannot even connect
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as mine:
            mine.connect(str(sock))  # this user can


def test_the_vmckpt_script_and_python_m_vmckpt_are_one_installation_to_the_helper(
    place: tuple[Path, dict[str, str]],
) -> None:
    path, env = place
    script = Path(sys.prefix) / "bin" / "vmckpt"  # the console script: `#!.../python3`
    with running_helper(env) as helper:  # started as `python -m vmckpt`
        result = subprocess.run([str(script), "restore", "--store", "st", "--layer", "nope",
                                 "--detach"], cwd=path, env={**os.environ, **env},
                                capture_output=True, text=True, timeout=WAIT_S)  # fmt: skip
        assert result.returncode == 3, result
        helper.wait_said(": exit 3")
        assert not helper.said("not taken"), helper.lines
