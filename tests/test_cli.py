"""The command as a new user meets it: stores given relative or by environment, help,
one output vocabulary, console logs of earlier lives, pause and resume, a guest run in the
foreground and ended by a signal."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.framework.guest import (
    REPO,
    Vmckpt,
    guest_append,
    one_line_error,
    qemu_pids_of,
    sigint_disposition,
    wait_for,
)
from tests.framework.mechanisms import SYSTEM_QEMU
from vmckpt.cli import FAMILIES, build_parser, families_for, forks_a_page_server
from vmckpt.errors import exit_codes
from vmckpt.images import Store


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_each_command_is_in_the_family_that_adds_it_and_its_line_builds_only_that() -> None:
    added: dict[str, list[str]] = {family: [] for family in FAMILIES}
    for family, commands in FAMILIES.items():

        def command(
            name: str, func: object, help_text: str, family: str = family
        ) -> argparse.ArgumentParser:
            added[family].append(name)
            return argparse.ArgumentParser()

        __import__(f"vmckpt.cli.{family}", fromlist=["add_parsers"]).add_parsers(command)
        assert sorted(added[family]) == sorted(commands), family
    assert families_for(["-vv", "restore", "--layer", "x"]) == ["restore_cmds"]
    assert families_for(["--json-errors", "gc"]) == ["maintenance"]
    assert families_for(["--help"]) == list(FAMILIES)
    assert families_for(["restor"]) == list(FAMILIES)  # a typo: argparse lists them all
    # A restore that may be lazy forks its page server before the rest is imported.
    assert forks_a_page_server(["-v", "restore", "--layer", "x", "--detach"])
    for not_lazy in (["--no-lazy"], ["--host", "h"], ["--host=h"], ["--libvirt-define", "d"],
                     ["--help"]):  # fmt: skip
        assert not forks_a_page_server(["restore", *not_lazy]), not_lazy
    assert not forks_a_page_server(["checkpoint", "web"])
    restore_only = _subparsers(build_parser(["restore", "--detach"]))
    assert sorted(restore_only) == ["migrate", "restore"]


def test_importing_the_cli_loads_neither_numpy_nor_asyncio_nor_the_s3_client() -> None:
    """They are loaded where used (vmckpt/lazy_numpy.py, vmckpt/qmp/asyncqmp.py): the
    command's start is part of a lazy restore's time. A module that touches numpy at its
    top level, or imports qemu.qmp there, fails this."""
    code = (
        "import sys, vmckpt.cli, vmckpt.cli.restore_cmds\n"
        "print(sorted(m for m in ('numpy', 'asyncio', 'qemu.qmp', 'obstore') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert result.stdout.strip() == "[]", result.stdout


def test_numpy_as_vmckpt_loads_it_starts_no_blas_threads() -> None:
    """vmckpt never calls BLAS; OpenBLAS's threads cost a page server CPU its QEMU needs. A
    setting made outside is kept."""
    code = (
        "import os, vmckpt.lazy_numpy as lazy\n"
        "lazy.np.zeros(1)\n"
        "print(len(os.listdir('/proc/self/task')), os.environ['OPENBLAS_NUM_THREADS'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    for given, threads, kept in ((None, "1", "1"), ("3", None, "3")):
        if given is not None:
            env["OPENBLAS_NUM_THREADS"] = given
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
            env=env,
        )  # fmt: skip
        count, setting = result.stdout.split()
        assert setting == kept and count == (threads or count), (given, result.stdout)


def test_every_option_has_help_and_the_help_lists_exit_codes_and_examples() -> None:
    parser = build_parser()
    missing = []
    for name, sub in _subparsers(parser).items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert missing == [], f"options without help text: {missing}"
    text = parser.format_help()
    for code, _meaning in exit_codes():
        assert f"  {code:>3}  " in text
    assert "examples:" in text and "VMCKPT_STORE" in text
    run_help = _subparsers(parser)["run"].format_help()
    assert "(default: 512M)" in run_help  # defaults are shown


def _run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    full = {**os.environ, **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", "vmckpt", *args], cwd=cwd, env=full, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, f"vmckpt {args}: {done.stderr}"
    return done.stdout


def test_a_relative_store_works_from_any_directory(vmckpt: Vmckpt, tmp_path: Path) -> None:
    home = vmckpt.store.parent
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    media = vmckpt.media
    _run(["init", "st"], cwd=home)
    vmckpt.store = home / "st"  # where kill_all looks
    vmckpt.started.add("rel")
    _run(
        ["run", "rel", "--store", "st", "--kernel", str(media / "vmlinuz"),
         "--initrd", str(media / "initrd.img"), "--append", guest_append(pages=4, buf_mb=16),
         "--memory", "256M", "--accel", "tcg", "--detach"],
        cwd=home,
    )  # fmt: skip
    record = json.loads((Store(home / "st").host.runtime_path("rel") / "guest.json").read_text())
    assert Path(record["process"]["qmp_socket"]).is_absolute()
    vmckpt.wait_states("rel", 2)
    # From another directory, by the environment variable: everything still works.
    env = {"VMCKPT_STORE": str(home / "st")}
    listing = json.loads(_run(["list", "--json"], cwd=elsewhere, env=env))
    assert [g["state"] for g in listing["guests"]] == ["running"]
    row = json.loads(_run(["checkpoint", "rel", "--json"], cwd=elsewhere, env=env))
    assert row["guest"] == "rel"
    stopped = _run(["stop", "rel"], cwd=elsewhere, env=env)
    assert "stopped" in stopped


def test_one_vocabulary_across_checkpoint_watch_list_and_inspect(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("voc")
    vmckpt.wait_states("voc", 3)
    store = str(vmckpt.store)
    checkpoint = vmckpt.checkpoint("voc")
    watch = json.loads(
        vmckpt("watch", "voc", "--store", store, "--count", "1", "--json").stdout.splitlines()[0]
    )
    listing = vmckpt.listing()
    layer_row = next(r for r in listing["layers"] if r["layer"] == checkpoint["layer"])
    inspect = json.loads(
        vmckpt("inspect", "--store", store, str(checkpoint["layer"]), "--json").stdout
    )
    shared = {
        "layer", "parent", "guest", "created", "mechanism", "pause_ms", "pages_stored",
        "pages_zeroed", "bytes", "origin",
    }  # fmt: skip
    for name, row in (("checkpoint", checkpoint), ("watch", watch), ("list", layer_row),
                      ("inspect", inspect)):  # fmt: skip
        assert shared <= set(row), f"{name} --json lacks {shared - set(row)}"
    for key in shared - {"pause_ms"}:
        assert checkpoint[key] == layer_row[key] == inspect[key], key
    assert inspect["accel"] == "tcg"  # the accelerator used, not "auto"
    human = vmckpt("list", "--store", store).stdout
    assert "KiB" in human or "MiB" in human


def test_console_logs_of_earlier_lives_are_kept_and_pause_resume(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("lives")
    vmckpt.wait_states("lives", 2)
    store = str(vmckpt.store)
    layer = vmckpt.checkpoint("lives")["layer"]
    vmckpt("pause", "lives", "--store", store)
    with vmckpt.monitor("lives") as mon:
        assert mon.status() == "paused"
    vmckpt("resume", "lives", "--store", store)
    with vmckpt.monitor("lives") as mon:
        assert mon.status() == "running"
    for _ in range(2):
        vmckpt("stop", "lives", "--store", store)
        vmckpt.restore("--layer", str(layer), "--name", "lives")
        vmckpt.wait_states("lives", 2)
    runtime = vmckpt.runtime("lives")
    assert (runtime / "serial.1.log").read_text().count("VMCKPT-GUEST up") == 1
    assert (runtime / "serial.2.log").stat().st_size > 0
    vmckpt("stop", "lives", "--store", store)
    missing = vmckpt("resume", "nosuch", "--store", store, check=False)
    one_line_error(missing, "nosuch")


def test_help_runs_without_a_store() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmckpt", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0 and "exit codes:" in done.stdout


@pytest.mark.parametrize(
    ("sig", "sigint_ignored"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["sigterm", "sigint-inherited-ignored"],
)
def test_foreground_run_stops_its_guest_on_a_signal(
    vmckpt: Vmckpt, sig: signal.Signals, sigint_ignored: bool
) -> None:
    """`vmckpt run` in the foreground owns its guest: SIGTERM (a service manager, `timeout`)
    and SIGINT stop the guest in order and end the run, SIGINT even where it was inherited
    ignored (a background job of a script: such a run could otherwise never be stopped but
    by SIGKILL, which leaves the guest running); and a guest that keeps printing does not
    keep the console following."""
    vmckpt("init", str(vmckpt.store))
    vmckpt.started.add("fg")
    command = [
        sys.executable, "-m", "vmckpt", "run", "fg", "--store", str(vmckpt.store),
        "--kernel", str(vmckpt.media / "vmlinuz"), "--initrd", str(vmckpt.media / "initrd.img"),
        "--append", guest_append(pages=4, buf_mb=16), "--memory", "256M", "--accel", "tcg",
        "--hint-after", "0",
    ]  # fmt: skip
    with sigint_disposition(ignored=sigint_ignored):
        run = subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    try:
        console = vmckpt.runtime("fg") / "serial.log"
        wait_for(console.exists, "the guest's console log", 60)
        vmckpt.wait_states("fg", 2)  # booted and talking on its console
        run.send_signal(sig)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    assert run.returncode == 0, (run.returncode, err)
    assert "STATE seq=" in out, "the console was not followed"
    assert "guest fg stopped" in out, out[-2000:]
    assert not qemu_pids_of(vmckpt.store), "the foreground run left its QEMU running"


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        (["--clones", "2", "--same-identity"], "clones each get their own identity"),
        (["--clones", "0"], "--clones must be between 1 and 64"),
        (["--clones", "65"], "--clones must be between 1 and 64"),
        (["--clones", "2", "--host", "user@other"], "--clones starts clones on this host"),
        (["--watch", "-1"], "--watch must be 0 or more seconds"),
        (["--libvirt-define", "d", "--no-lazy"], "they go without --libvirt-define"),
        (["--lazy", "--no-lazy"], "not allowed with argument"),
    ],
)
def test_restore_options_that_do_not_go_together_are_refused_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: list[str], needle: str
) -> None:
    from vmckpt.cli import main

    store = Store.create(tmp_path / "store")
    store.close()
    try:
        code = main(["restore", "--store", str(tmp_path / "store"), *options])
    except SystemExit as exc:  # argparse's own refusal (mutually exclusive options)
        code = int(str(exc.code))
    err = capsys.readouterr().err
    assert code != 0 and needle in err, err
    assert len(err.strip().splitlines()) <= 2, err  # one line (argparse adds its usage line)
    assert list((tmp_path / "store" / "layers").iterdir()) == []


def test_an_abbreviated_option_is_refused_not_taken_for_a_longer_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # argparse took `--qemu PATH` for `--qemu-arg PATH`: QEMU got the path as its first disk.
    from vmckpt.cli import main

    with pytest.raises(SystemExit) as refused:
        main(["run", "g", "--store", str(tmp_path / "s"), "--kernel", "k", "--qemu", "/q"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "unrecognized arguments: --qemu /q" in err, err
    assert not (tmp_path / "s").exists()


def test_a_qemu_binary_that_cannot_be_executed_is_one_line_and_starts_nothing(
    vmckpt: Vmckpt, tmp_path: Path
) -> None:
    # A binary open for writing cannot be executed (ETXTBSY): first when vmckpt asks it its
    # version, then, its answers known on this host, when vmckpt starts it for a guest.
    wrapper = tmp_path / "qemu-system-x86_64"
    wrapper.write_text(f'#!/bin/sh\nexec {SYSTEM_QEMU} "$@"\n')
    wrapper.chmod(0o755)
    env = {"VMCKPT_QEMU": str(wrapper)}
    media = vmckpt.media
    run = ["run", "g", "--store", str(vmckpt.store), "--create",
           "--kernel", str(media / "vmlinuz"), "--initrd", str(media / "initrd.img"),
           "--append", guest_append(pages=4, buf_mb=16), "--memory", "128M", "--accel", "tcg",
           "--detach"]  # fmt: skip
    with wrapper.open("r+"):
        asking = vmckpt(*run, env=env, check=False)
    one_line_error(asking, f"cannot run {wrapper}", "Text file busy", code=8)
    vmckpt("check", env=env)  # its answers, remembered
    with wrapper.open("r+"):
        starting = vmckpt(*run, env=env, check=False)
    one_line_error(starting, f"cannot run {wrapper}", "Text file busy", "launch", code=8)
    assert not qemu_pids_of(vmckpt.store)
    # The guest never ran: `list` shows none (its record was written before the launch).
    listing = json.loads(vmckpt("list", "--store", str(vmckpt.store), "--json").stdout)
    assert not listing["guests"], listing["guests"]


@pytest.mark.parametrize(
    ("raised", "needle"),
    [
        (OSError(28, "No space left on device", "/st/layers/x"), "No space left on device"),
        (KeyError("spec"), "internal error, a bug in vmckpt (KeyError: 'spec'); -v shows"),
    ],
)
def test_what_no_vmckpt_error_foresaw_is_still_one_line_and_v_shows_where(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    raised: Exception,
    needle: str,
) -> None:
    import vmckpt.cli.store_cmds
    from vmckpt.cli import main

    def failing(args: argparse.Namespace) -> int:
        raise raised

    monkeypatch.setattr(vmckpt.cli.store_cmds, "cmd_list", failing)
    store = str(tmp_path / "store")
    assert main(["list", "--store", store]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vmckpt list: error: ") and needle in err, err
    root = logging.getLogger("vmckpt")
    level, handlers = root.level, list(root.handlers)
    try:
        assert main(["-v", "list", "--store", store]) == 1
        assert "Traceback" in capsys.readouterr().err
    finally:  # -v gave the logger a handler on this test's stderr
        root.handlers[:] = handlers
        root.setLevel(level)


def test_a_guest_that_does_not_exist_is_named_so_and_nothing_is_made_for_it(
    vmckpt: Vmckpt,
) -> None:
    # stop, pause and resume made the unknown guest's runtime directory on their way to
    # the error (a session's record looked for, the checkpoint lock taken); console said
    # it had no output yet.
    vmckpt("init", str(vmckpt.store))
    runtime = Path(os.environ["VMCKPT_RUNTIME_DIR"])
    for command in (["stop"], ["pause"], ["resume"], ["console"], ["checkpoint"],
                    ["watch", "--count", "1"]):  # fmt: skip
        result = vmckpt(command[0], "ghost", "--store", str(vmckpt.store), *command[1:],
                        check=False)  # fmt: skip
        one_line_error(result, "guest ghost", "no such guest in this store", code=8)
    assert not [path for path in runtime.rglob("ghost")], "a directory was made for it"
