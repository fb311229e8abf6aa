"""Bad input and failed checkpoints: one clear line, non-zero exit, nothing lost.

Each case damages something on purpose and checks three things: the exit
code is not zero, stderr is one line naming what and where, and the store
(or the guest) is exactly as it was.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import short_tmp
from tests.framework.guest import (
    GUEST_BUILD,
    REPO,
    Vmckpt,
    assert_guest_untouched,
    guest_append,
    one_line_error,
    qemu_pids_of,
    sigint_disposition,
    snapshot,
)
from vmckpt import faults
from vmckpt.errors import QMPError
from vmckpt.images import Store
from vmckpt.images.format import manifest_bytes, manifest_checksum
from vmckpt.mechanisms.precopy import _StreamReceiver
from vmckpt.mechanisms.watch import STOP_NOTICE
from vmckpt.qmp import Monitor
from vmckpt.ram import RamDiff
from vmckpt.remote.endpoint import Endpoint

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def chain_original(guest_images: Path) -> Iterator[tuple[Path, list[str]]]:
    """A stopped guest with a chain of three layers, built once for the module."""
    path = short_tmp("vk-chain-")
    runner = Vmckpt(path / "store", media=guest_images)
    try:
        runner.run_guest("bad")
        runner.wait_states("bad", 3)
        layers = [str(runner.checkpoint("bad")["layer"]) for _ in range(3)]
        runner("stop", "bad", "--store", str(runner.store))
        yield runner.store, layers
    finally:
        runner.kill_all()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def chain(
    chain_original: tuple[Path, list[str]], store_dir: Path, guest_images: Path
) -> Iterator[tuple[Vmckpt, list[str]]]:
    """A copy of that store for one test to damage."""
    original, layers = chain_original
    shutil.copytree(original, store_dir, symlinks=True)
    runner = Vmckpt(store_dir, media=guest_images)
    try:
        yield runner, layers
    finally:
        runner.kill_all()


def _restore_fails(vmckpt: Vmckpt, layer: str, *needles: str) -> None:
    before = snapshot(vmckpt.store)
    result = vmckpt("restore", "--store", str(vmckpt.store), "--layer", layer, check=False)
    one_line_error(result, *needles)
    assert snapshot(vmckpt.store) == before, "a failed restore changed the store"
    assert qemu_pids_of(vmckpt.store) == [], "a failed restore left its QEMU running"


def test_flipped_byte_in_a_page_file(chain: tuple[Vmckpt, list[str]]) -> None:
    vmckpt, layers = chain
    pages = Store(vmckpt.store).layer_path(layers[0], "pages.bin")
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0x40
    pages.write_bytes(bytes(data))
    verify = vmckpt("verify", "--store", str(vmckpt.store), layers[2], check=False)
    one_line_error(verify, layers[0], "pages.bin", "sha256")
    _restore_fails(vmckpt, layers[2], layers[0], "pages.bin")


def test_truncated_layer(chain: tuple[Vmckpt, list[str]]) -> None:
    vmckpt, layers = chain
    pages = Store(vmckpt.store).layer_path(layers[1], "pages.bin")
    pages.write_bytes(pages.read_bytes()[:4096])
    one_line_error(
        vmckpt("verify", "--store", str(vmckpt.store), check=False), layers[1], "pages.bin"
    )
    _restore_fails(vmckpt, layers[2], layers[1], "pages.bin")


def test_missing_parent(chain: tuple[Vmckpt, list[str]]) -> None:
    vmckpt, layers = chain
    shutil.rmtree(Store(vmckpt.store).layer_path(layers[0]))
    one_line_error(
        vmckpt("verify", "--store", str(vmckpt.store), layers[1], check=False),
        layers[0],
        "missing",
    )
    _restore_fails(vmckpt, layers[1], layers[0], "missing")


def test_unknown_format_version(chain: tuple[Vmckpt, list[str]]) -> None:
    vmckpt, layers = chain
    path = Store(vmckpt.store).layer_path(layers[2], "manifest.json")
    manifest = json.loads(path.read_text())
    manifest["format_version"] = [2, 0]
    manifest.pop("manifest_sha256")
    manifest["manifest_sha256"] = manifest_checksum(manifest)
    path.write_bytes(manifest_bytes(manifest))
    one_line_error(
        vmckpt("verify", "--store", str(vmckpt.store), layers[2], check=False),
        layers[2],
        "2.0",
    )
    _restore_fails(vmckpt, layers[2], layers[2], "2.0")


def test_store_that_does_not_exist(tmp_path: Path, vmckpt: Vmckpt) -> None:
    missing = tmp_path / "nowhere"
    for command in (["list"], ["verify"], ["restore"], ["checkpoint", "x"], ["stop", "x"]):
        result = vmckpt(*command, "--store", str(missing), check=False)
        one_line_error(result, str(missing), "does not exist")
    assert not missing.exists()
    # `run` does not create a store either (a typo must not create one), unless asked to.
    run = [
        "run", "typo", "--store", str(tmp_path / "no" / "such" / "st"),
        "--kernel", str(GUEST_BUILD / "vmlinuz"), "--accel", "tcg", "--detach",
    ]  # fmt: skip
    one_line_error(vmckpt(*run, check=False), "does not exist", "vmckpt init")
    one_line_error(vmckpt(*run, "--create", check=False), "parent directory", "does not exist")
    assert not (tmp_path / "no").exists()


def test_boot_medium_changed_since_the_checkpoint(vmckpt: Vmckpt, tmp_path: Path) -> None:
    initrd = tmp_path / "initrd.img"
    shutil.copy(GUEST_BUILD / "initrd.img", initrd)
    vmckpt(
        "run", "media", "--store", str(vmckpt.store), "--create",
        "--kernel", str(GUEST_BUILD / "vmlinuz"), "--initrd", str(initrd),
        "--append", guest_append(pages=4, buf_mb=16), "--memory", "256M",
        "--accel", "tcg", "--detach",
    )  # fmt: skip
    vmckpt.wait_states("media", 2)
    layer = json.loads(
        vmckpt("checkpoint", "media", "--store", str(vmckpt.store), "--json").stdout
    )["layer"]
    vmckpt("stop", "media", "--store", str(vmckpt.store))
    with initrd.open("ab") as handle:
        handle.write(b"changed")
    _restore_fails(vmckpt, layer, "initrd", "changed since the checkpoint")


# -- a monitor that is not there, or not QEMU ----------------------------------------


def _serve_garbage(path: Path) -> socket.socket:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def answer() -> None:
        with contextlib.suppress(OSError):
            conn, _ = server.accept()
            conn.sendall(b"SSH-2.0-OpenSSH_9.2 this is not QEMU\r\n")
            conn.recv(100)
            conn.close()

    threading.Thread(target=answer, daemon=True).start()
    return server


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _nothing_left_open() -> Iterator[None]:
    """Fails if the block left an event loop, a socket or a file for the garbage collector
    to close (each one's finalizer warns; an event loop's can print a traceback), or an
    asyncio task that asyncio complains about when it is collected (destroyed pending, or
    its exception never retrieved: a traceback on stderr)."""
    complaints = _Kept()
    logging.getLogger("asyncio").addHandler(complaints)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            yield
            gc.collect()
    finally:
        logging.getLogger("asyncio").removeHandler(complaints)
    leaked = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert not leaked, leaked
    assert not complaints.messages, complaints.messages


def _listener(path: Path) -> socket.socket:
    """A socket that accepts connections (the kernel's backlog) and never answers."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    return server


def test_failed_qmp_connects_leave_nothing_open(tmp_path: Path) -> None:
    dead = tmp_path / "dead.sock"
    _listener(dead).close()  # the file stays, nobody listens
    with _nothing_left_open(), pytest.raises(QMPError, match="nobody listens"):
        Monitor.unix(dead, vm="ghost", timeout=3)
    with _nothing_left_open(), pytest.raises(QMPError, match="no QMP socket"):
        Monitor.unix(tmp_path / "nothing.sock", vm="ghost", timeout=3)
    server = _serve_garbage(tmp_path / "other.sock")
    try:
        with _nothing_left_open(), pytest.raises(QMPError, match="not QEMU"):
            Monitor.unix(tmp_path / "other.sock", vm="ghost", timeout=3)
    finally:
        server.close()
    with (
        _listener(tmp_path / "silent.sock"),
        _nothing_left_open(),
        pytest.raises(QMPError, match="did not answer"),
    ):
        Monitor.unix(tmp_path / "silent.sock", vm="ghost", timeout=1)


class _CtrlCWhileConnecting(logging.Handler):
    """Sends this process SIGINT from inside qemu.qmp's connect (as it logs the attempt):
    the KeyboardInterrupt is then raised in one of the loop's tasks, where a Ctrl-C at a
    terminal lands now and then (most often it lands in the loop's wait for the socket)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Connecting to"):
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_while_qmp_connects_is_a_keyboard_interrupt(tmp_path: Path) -> None:
    """A Ctrl-C during a QMP connect ends it at once (the monitor here never answers) as a
    KeyboardInterrupt, once the connect has unwound: nothing is left open, and no task is
    left holding the exception (asyncio would print it, with a traceback, when the task is
    collected)."""
    logger = logging.getLogger("qemu.qmp")
    level, handler = logger.level, _CtrlCWhileConnecting()
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        with (
            _listener(tmp_path / "silent.sock"),
            sigint_disposition(ignored=False),
            _nothing_left_open(),
            pytest.raises(KeyboardInterrupt),
        ):
            Monitor.unix(tmp_path / "silent.sock", vm="ghost", timeout=30)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_a_failed_stream_receiver_closes_its_socket() -> None:
    """The receiver of a checkpoint whose stream fails (here: not a migration stream)
    closes its end for real: a file object left open on the socket keeps the descriptor
    open after close(), for the garbage collector to close (and warn about), and the
    error the receiver keeps holds that file object."""
    ours, theirs = socket.socketpair()
    with theirs:
        receiver = _StreamReceiver(
            ours, lambda _count: None, lambda blocks: RamDiff(blocks, None, -1)
        )
        receiver.start()
        theirs.sendall(b"this is no migration stream")
        theirs.shutdown(socket.SHUT_WR)
        receiver.finish()
    assert receiver.error is not None
    assert ours.fileno() == -1, "the receiver's socket is still open"


def test_a_local_agent_session_closes_its_pipes(tmp_path: Path) -> None:
    """An agent command on this host (a child process, as a migration runs it) leaves no
    pipe of the child open once its session is closed."""
    store = tmp_path / "st"
    Store.create(store)
    with _nothing_left_open():
        prepared = Endpoint(str(store)).call("prepare", timeout=60)
    assert prepared["store"] == str(store)


def test_qmp_socket_nobody_listens_on_or_not_qemu(vmckpt: Vmckpt, tmp_path: Path) -> None:
    dead = tmp_path / "dead.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(dead))
    sock.close()  # the file stays, nobody listens
    with pytest.raises(Exception, match="nobody listens") as info:
        Monitor.unix(dead, vm="ghost", timeout=3)
    assert "guest ghost" in str(info.value)

    server = _serve_garbage(tmp_path / "other.sock")
    try:
        with pytest.raises(Exception, match="not QEMU") as info:
            Monitor.unix(tmp_path / "other.sock", vm="ghost", timeout=3)
    finally:
        server.close()

    # The same through the CLI: a running guest whose monitor socket was replaced.
    vmckpt.run_guest("mon")
    vmckpt.wait_states("mon", 2)
    record = vmckpt.guest("mon").record
    assert record.process is not None
    qmp = record.process.qmp_socket
    real = qmp.with_name("real.sock")
    qmp.rename(real)
    try:
        dead_again = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        dead_again.bind(str(qmp))
        dead_again.close()
        result = vmckpt("checkpoint", "mon", "--store", str(vmckpt.store), check=False)
        one_line_error(result, "guest mon", "nobody listens")
        qmp.unlink()
        server = _serve_garbage(qmp)
        try:
            result = vmckpt("checkpoint", "mon", "--store", str(vmckpt.store), check=False)
            one_line_error(result, "guest mon", "not QEMU")
        finally:
            server.close()
    finally:
        qmp.unlink(missing_ok=True)
        real.rename(qmp)
    assert snapshot(vmckpt.store) == {}


# -- checkpoints that fail midway leave the guest as it was --------------------------------


def test_checkpoint_interrupted_twice_ends_in_one_line_with_the_guest_as_it_was(
    vmckpt: Vmckpt,
) -> None:
    """A first Ctrl-C lets a checkpoint finish, a second aborts it (watch.stop_on_signals):
    the abort is an interruption (exit 130, said in one line, not a traceback of an
    uncaught exception), the guest runs on with its migration settings as they were, and
    no layer is written. The checkpoint is held, by fault injection, right after vmckpt
    changed the settings, so the second signal finds it under way."""
    vmckpt.run_guest("twice")
    vmckpt.wait_states("twice", 3)
    command = [sys.executable, "-m", "vmckpt", "checkpoint", "twice", "--store", str(vmckpt.store)]
    env = {**os.environ, **vmckpt.env, faults.ENV: f"hold-at:{faults.AFTER_SETTINGS}"}
    with sigint_disposition(ignored=False):
        checkpoint = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert checkpoint.stderr is not None
        for line in checkpoint.stderr:
            lines.put(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert lines.get(timeout=120) == f"vmckpt: fault: held at {faults.AFTER_SETTINGS}"
        checkpoint.send_signal(signal.SIGINT)
        assert lines.get(timeout=60) == STOP_NOTICE
        checkpoint.send_signal(signal.SIGINT)
        assert checkpoint.wait(timeout=60) == 130
    finally:
        if checkpoint.poll() is None:
            checkpoint.kill()
            checkpoint.wait()
    reader.join(timeout=10)
    assert checkpoint.stderr is not None
    checkpoint.stderr.close()
    rest = [lines.get_nowait() for _ in range(lines.qsize())]
    assert rest == ["vmckpt checkpoint: interrupted"], rest
    assert_guest_untouched(vmckpt, "twice")
    assert snapshot(vmckpt.store) == {}


def test_receiver_dies_midway(vmckpt: Vmckpt) -> None:
    vmckpt.run_guest("dies")
    vmckpt.wait_states("dies", 3)
    for budget in (1 << 20, 40 << 20):
        result = vmckpt(
            "checkpoint", "dies", "--store", str(vmckpt.store), check=False,
            env={"VMCKPT_FAULT": f"receiver-dies-after:{budget}"},
        )  # fmt: skip
        one_line_error(result, "guest dies")
        assert_guest_untouched(vmckpt, "dies")
        assert snapshot(vmckpt.store) == {}
    # Nothing was lost: the next checkpoint works and restores.
    vmckpt("checkpoint", "dies", "--store", str(vmckpt.store))
    vmckpt("verify", "--store", str(vmckpt.store))


def test_store_disk_full(vmckpt: Vmckpt, tmp_path: Path, root: None) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(small)], check=True)
    try:
        store = small / "store"
        full = Vmckpt(store, media=vmckpt.media)
        try:
            full.run_guest("full")
            full.wait_states("full", 3)
            result = full("checkpoint", "full", "--store", str(store), check=False)
            line = one_line_error(result, "guest full")
            assert "No space left" in line or "space" in line
            assert_guest_untouched(full, "full")
            assert list(Store(store).layers_path.iterdir()) == [], "a partial layer was left"
        finally:
            full.kill_all()
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)
