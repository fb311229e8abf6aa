"""Bring a guest back to life from a layer: lazily where the host allows it
(lazy_restore.py), else in full.

:func:`load_layer_image` is the one "resolve → compose → envelope" step every
restore uses (here, as a libvirt domain, on another host through its own
vmckpt): the chain is verified and composed first, so nothing is started for
a broken chain. :func:`restore_guest` then starts a QEMU from the stored spec
with the layer's exact machine type, waiting for an incoming migration (a
:class:`~vmckpt.session.MigrationSession`), writes the composed stream into
it, resumes the guest, and watches it for a moment (vmckpt/machine/liveness.py): a
guest that panics, resets or whose QEMU exits right away is a failed
restore. A restore that fails ends the QEMU it started; the store is only
ever read.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, cast

from vmckpt import log
from vmckpt.errors import RestoreError, VmckptError
from vmckpt.guests.local import LocalGuest
from vmckpt.images import LayerManifest, Store
from vmckpt.machine.binary import (
    qemu_binary,
    qemu_version,
    resolve_accel,
    version_tuple,
)
from vmckpt.machine.liveness import FATAL_EVENTS, Observation, observe
from vmckpt.machine.qemu import Launch, QemuProcess, command_line, rotate_serial_log
from vmckpt.machine.spec import GuestSpec, check_name
from vmckpt.mechanisms.disk_restore import (
    DiskRestoreStats,
    discard_restored,
    materialize,
    track_restored,
)
from vmckpt.mechanisms.lazy_restore import restore_lazily
from vmckpt.mechanisms.restore_prep import (
    RestoreResult,
    check_machine_type,
    qemu_args_for,
    relocate_media,
    step_clock,
)
from vmckpt.progress import NO_PROGRESS, Progress
from vmckpt.ram import RamImage
from vmckpt.session import MigrationSession
from vmckpt.stream import StreamEnvelope, write_stream

LOAD_TIMEOUT_S = 120.0
DEFAULT_CHECK_S = 1.0  # how long a restored guest is watched before the restore counts
_log = log.get(__name__)


@dataclass(frozen=True)
class LayerImage:
    """A layer composed with its chain: everything needed to load it into a QEMU."""

    manifest: LayerManifest
    ram: RamImage
    envelope: StreamEnvelope

    @property
    def spec(self) -> GuestSpec:
        return GuestSpec.from_dict(self.manifest.spec)


def load_layer_image(
    store: Store, layer_ref: str | None, *, progress: Progress = NO_PROGRESS
) -> LayerImage:
    """Resolve ``layer_ref`` (default: the newest layer), verify and compose its chain."""
    layer_id = store.resolve(layer_ref) if layer_ref else store.newest()
    manifest = store.manifest(layer_id)
    with progress.task(f"composing layer {layer_id}", None):
        ram, prelude, epilogue = store.compose(layer_id)
    envelope = StreamEnvelope(
        prelude=prelude,
        machine_type=manifest.machine_type,
        ram_section_id=manifest.ram_section[0],
        ram_instance_id=manifest.ram_section[1],
        ram_version_id=manifest.ram_section[2],
        epilogue=epilogue,
    )
    return LayerImage(manifest, ram, envelope)


def restore_command(
    store: Store, manifest: LayerManifest, extra_args: tuple[str, ...] | None = None
) -> list[str]:
    """The QEMU command line a restore of ``manifest`` on this host would run, for inspect:
    built by the same code from the same validated fields (VmckptError where the restore
    would refuse them). The monitor sockets and rebuilt disks are placeholders."""
    name = check_name(manifest.guest)
    spec = relocate_media(GuestSpec.from_dict(manifest.spec), store)
    if spec.generation_id:  # a restore gives the guest a new one
        spec = replace(spec, generation_id="auto")
    args = qemu_args_for(manifest, spec, extra_args, name, warn=False)
    disks = tuple(
        disk if disk.readonly
        else replace(disk, path=f"REBUILT-{disk.id}.qcow2", format="qcow2", backing="")
        for disk in spec.disks
    )  # fmt: skip
    try:
        accel = resolve_accel(spec.accel)
    except VmckptError:
        accel = spec.accel
    binary = qemu_binary()
    launch = Launch(
        name=name, accel=accel, serial_log=store.host.runtime_path(name) / "serial.log",
        machine_type=manifest.machine_type or None, incoming=True, extra_args=args,
    )  # fmt: skip
    major = version_tuple(qemu_version(binary))[0]
    return command_line(
        replace(spec, disks=disks),
        launch,
        binary=binary,
        qemu_major=major,
        qmp_fds=(3, 4),
        agent_fd=5 if spec.guest_agent else None,
    )


def restore_guest(
    store: Store,
    layer_ref: str | None,
    name: str | None,
    *,
    extra_args: tuple[str, ...] | None = None,
    check_s: float | None = None,
    progress: Progress = NO_PROGRESS,
    lazy: str = "auto",
    same_identity: bool = False,
) -> RestoreResult:
    """Restore a layer into a new QEMU on this host, named ``name`` (default: the layer's
    guest). ``extra_args`` are the free-form QEMU arguments to use (None: the layer's own).
    ``lazy``: ``auto`` (lazily where the host allows it, lazy_restore.py, else in full with
    the reason in the result's notes), ``always`` (RestoreError where it cannot) or
    ``never``. ``check_s``: how long the guest is watched before the restore counts
    (default: a second in full, none when lazy: the command returns once the guest runs).
    The guest gets a new VM generation ID unless ``same_identity``."""
    started = time.monotonic()
    notes: tuple[str, ...] = ()
    if lazy != "never":
        outcome = restore_lazily(
            store, layer_ref, [name], extra_args=extra_args, watch_s=check_s or 0.0,
            started=started, same_identity=same_identity, progress=progress,
        )  # fmt: skip
        if not isinstance(outcome, str):
            return outcome[0]
        if lazy == "always":
            raise RestoreError(f"cannot restore lazily: {outcome}", step="lazy")
        notes = (f"full restore: {outcome}",)
    check_s = DEFAULT_CHECK_S if check_s is None else check_s
    image = load_layer_image(store, layer_ref, progress=progress)
    manifest = image.manifest
    name = check_name(name or manifest.guest)
    guest = LocalGuest(store, name)
    guest.refuse_if_running()
    check_machine_type(manifest, name)
    spec = relocate_media(image.spec, store)
    spec.check_media(vm=name)
    args = qemu_args_for(manifest, spec, extra_args, name)
    if not same_identity:
        spec = spec.with_new_identity()
    # Writable disks are rebuilt as new images in a fresh directory of this host's data
    # directory of the store (never in the store, which others may write).
    disk_dir = store.host.fresh(store.host.data_dir(name), f"disks-{manifest.id}-")
    disk_stats = DiskRestoreStats()
    try:
        disks = materialize(store, manifest, spec.disks, disk_dir, vm=name, stats=disk_stats)
    except BaseException:
        disk_dir.rmdir()
        raise
    spec = replace(spec, disks=disks)
    composed = time.monotonic()
    try:
        guest = LocalGuest.start(
            store, name, spec, extra_args=args, machine_type=manifest.machine_type or None,
            incoming=True,
        )  # fmt: skip
    except BaseException:
        discard_restored(spec.disks, disk_dir)
        raise
    process = guest.process()
    try:
        with progress.task("loading into QEMU", None):
            written, loaded, observation, resume_ms = _load_into(
                process, image, spec, name=name, watch_s=check_s, until=_fatal
            )
        _check_alive(process, observation)
        store.set_head(name, manifest.id)
    except BaseException as exc:
        process.kill()
        discard_restored(spec.disks, disk_dir)
        if isinstance(exc, RestoreError):
            raise exc.in_context(vm=name, layer=manifest.id) from exc
        if isinstance(exc, VmckptError):
            raise RestoreError(exc.message, vm=name, layer=manifest.id, step=exc.step) from exc
        raise
    _log.info("%s: restored from layer %s", name, manifest.id)
    notes += (step_clock(spec, process),)
    return RestoreResult(
        name=name,
        layer=manifest.id,
        pid=process.pid,
        compose_s=composed - started,
        load_s=loaded - composed,
        total_s=time.monotonic() - started,
        stream_bytes=written,
        notes=notes,
        resume_ms=resume_ms,
        disk_bytes=disk_stats.base_bytes + disk_stats.delta_bytes,
    )


def restore_clones(
    store: Store,
    layer_ref: str | None,
    name: str | None,
    count: int,
    *,
    extra_args: tuple[str, ...] | None,
    lazy: str = "auto",
    check_s: float | None = None,
    progress: Progress = NO_PROGRESS,
) -> list[RestoreResult]:
    """``vmckpt restore --clones N``: N guests NAME-1 .. NAME-N (NAME: ``name``, else the
    layer's guest) from one layer, each with a new VM generation ID; lazily, one page server
    feeds them all from one read of the store; in full, one restore after the other."""
    started = time.monotonic()
    layer_id = store.resolve(layer_ref) if layer_ref else store.newest()
    base = check_name(name or store.manifest(layer_id).guest)
    names = [check_name(f"{base}-{number}") for number in range(1, count + 1)]
    notes: tuple[str, ...] = ()
    if lazy != "never":
        outcome = restore_lazily(
            store, layer_id, list(names), extra_args=extra_args, watch_s=check_s or 0.0,
            started=started, progress=progress,
        )  # fmt: skip
        if not isinstance(outcome, str):
            return outcome
        if lazy == "always":
            raise RestoreError(f"cannot restore lazily: {outcome}", step="lazy")
        notes = (f"full restore: {outcome}",)
    results = []
    for clone in names:
        result = restore_guest(
            store, layer_id, clone, extra_args=extra_args, check_s=check_s, progress=progress,
            lazy="never",
        )  # fmt: skip
        results.append(replace(result, notes=notes + result.notes))
    return results


def _fatal(observation: Observation) -> bool:
    return observation.fatal


class _StreamSender(threading.Thread):
    def __init__(self, sock: socket.socket, envelope: StreamEnvelope, ram: RamImage) -> None:
        super().__init__(name="vmckpt-sender", daemon=True)
        self.sock = sock
        self.envelope = envelope
        self.ram = ram
        self.written = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.sock.makefile("wb", buffering=1 << 20) as sink:
                self.written = write_stream(cast(BinaryIO, sink), self.envelope, self.ram)
        except BaseException as exc:
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)


def _load_into(
    process: QemuProcess,
    image: LayerImage,
    spec: GuestSpec,
    *,
    name: str,
    watch_s: float,
    until: Callable[[Observation], bool] | None,
) -> tuple[int, float, Observation, float | None]:
    """Load the composed stream, resume, and watch the guest from the moment it resumes
    (vmckpt/machine/liveness.py); the bytes written, the moment the guest ran, what was seen,
    and QEMU's RESUME event after migrate-incoming (ms)."""
    with process.monitor() as mon:
        session = MigrationSession(
            mon, vm=name, error=RestoreError, capabilities={"events": True}, incoming=True,
            timeout_s=LOAD_TIMEOUT_S,
        )  # fmt: skip
        with session:
            sender = _StreamSender(session.socket(), image.envelope, image.ram)
            sender.start()
            try:
                incoming = time.time()
                session.start()
                try:
                    session.wait()
                except RestoreError as exc:
                    raise RestoreError(
                        f"QEMU rejected the checkpoint stream: {process.log_tail()}",
                        vm=name,
                        step="load",
                    ) from exc
            finally:
                sender.join(timeout=30)
            if sender.error is not None:
                raise RestoreError(f"writing the stream failed: {sender.error}", step="load")
            track_restored(mon, spec.disks, image.manifest)
            mark = mon.mark()
            console_from = _size(process.serial_log)
            session.resume()
        running = time.monotonic()
        resumes = [e.timestamp for e in mon.events_since(mark) if e.name == "RESUME"]
        resume_ms = round((resumes[0] - incoming) * 1000, 3) if resumes else None
        observation = observe(
            process, mon, since=mark, seconds=watch_s, console_from=console_from, until=until
        )
        return sender.written, running, observation, resume_ms


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _check_alive(process: QemuProcess, observation: Observation) -> None:
    """Fail the restore if the guest died, panicked, shut down or reset while watched."""
    if observation.exited:
        raise RestoreError(
            f"QEMU exited right after the restore: {observation.qemu_said}", step="check-alive"
        )
    fatal = observation.first(FATAL_EVENTS)
    if fatal is not None:
        name, detail, _at = fatal
        what = f"{name}: {detail}" if detail else name
        raise RestoreError(
            f"the restored guest failed at once ({what}); QEMU says: {process.log_tail()}",
            step="check-alive",
        )
    if observation.status != "running":
        raise RestoreError(
            f"the guest did not start: {observation.status or 'QMP did not answer'}",
            step="resume",
        )


# -- a liveness check: the layer restored in a throw-away QEMU ------------------------------

DEFAULT_BOOT_CHECK_S = 5.0


@dataclass(frozen=True)
class BootCheck:
    """A layer restored in a throw-away QEMU and watched: the verdict and its evidence."""

    layer: str
    pid: int
    qemu_version: str
    load_s: float
    observation: Observation

    @property
    def alive(self) -> bool:
        return self.observation.verdict == "alive"

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "pid": self.pid,
            "qemu_version": self.qemu_version,
            "load_s": round(self.load_s, 3),
            **self.observation.to_dict(),
        }


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """A SIGTERM ends the check through its clean-up (the throw-away QEMU is killed)."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def boot_check(
    store: Store,
    layer_ref: str | None,
    *,
    seconds: float = DEFAULT_BOOT_CHECK_S,
    extra_args: tuple[str, ...] | None = None,
    progress: Progress = NO_PROGRESS,
) -> BootCheck:
    """Restore a layer (default: the newest) in a QEMU of its own, watch it for ``seconds``
    from the moment it resumes, kill that QEMU by PID and remove its scratch directory.

    The throw-away QEMU is no guest of the store: its record, sockets, console and any
    rebuilt disks live in a temporary directory, so no guest's name, head or console is
    touched. The store is only read. ``extra_args`` replace the layer's free-form QEMU
    arguments, as for a restore.
    """
    image = load_layer_image(store, layer_ref, progress=progress)
    manifest = image.manifest
    label = f"verify-{manifest.id}"
    check_machine_type(manifest, label)
    spec = relocate_media(image.spec, store)
    spec.check_media(vm=label)
    args = qemu_args_for(manifest, spec, extra_args, label)
    binary = qemu_binary()
    # This host's scratch of the store, private: the throw-away QEMU's sockets and console,
    # and its rebuilt disks (guest data, so never under a shared /tmp).
    scratch = store.host.scratch("b-", data=False)  # short: QEMU's sockets live in it
    disk_scratch = store.host.scratch(f"boot-{manifest.id}-", data=True)
    try:
        with _sigterm_unwinds():
            spec = replace(
                spec, disks=materialize(store, manifest, spec.disks, disk_scratch, vm=label)
            )
            launch = Launch(
                name=label, accel=resolve_accel(spec.accel), serial_log=rotate_serial_log(scratch),
                machine_type=manifest.machine_type or None, incoming=True, extra_args=args,
            )  # fmt: skip
            started = time.monotonic()
            process = QemuProcess.launch(spec, launch, runtime_dir=scratch)
            try:
                with progress.task("loading into a throw-away QEMU", None):
                    _written, loaded, observation, _resume = _load_into(
                        process, image, spec, name=label, watch_s=seconds, until=_exited
                    )
            except RestoreError as exc:
                raise exc.in_context(vm=label, layer=manifest.id) from exc
            except VmckptError as exc:
                raise RestoreError(exc.message, vm=label, layer=manifest.id, step=exc.step) from exc
            finally:
                process.kill()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(disk_scratch, ignore_errors=True)
    _log.info("%s: %s %s", label, observation.verdict, observation.evidence())
    return BootCheck(
        layer=manifest.id,
        pid=process.pid,
        qemu_version=qemu_version(binary),
        load_s=loaded - started,
        observation=observation,
    )


def _exited(observation: Observation) -> bool:
    return observation.exited
