"""What every restore on this host takes from a layer, whichever way it loads it (the full
restore of restore.py, the lazy one of lazy_restore.py): the free-form QEMU arguments it may
pass, the boot media found by their content, the machine type checked against this QEMU,
and the result a restore hands back."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

from vmckpt import log
from vmckpt.errors import QMPError, RestoreError
from vmckpt.images import LayerManifest, Store, keys
from vmckpt.images.media import find_medium
from vmckpt.machine.binary import machine_types, qemu_binary, qemu_version
from vmckpt.machine.qemu import QemuProcess
from vmckpt.machine.spec import GuestSpec
from vmckpt.qmp import Monitor
from vmckpt.qmp.agent import GuestAgent, channel_open

AGENT_TIMEOUT_S = 5.0  # a guest agent that answers does so in milliseconds, even lazily
NOT_STEPPED = "clock not stepped: {why}, so its clock goes on from the checkpoint's time"
_log = log.get("vmckpt.mechanisms.restore")


def qemu_args_for(
    manifest: LayerManifest,
    spec: GuestSpec,
    given: tuple[str, ...] | None,
    vm: str,
    *,
    warn: bool = True,
) -> tuple[str, ...]:
    """The free-form QEMU arguments a restore passes: those given on its command line
    (``given``, even empty), else the layer's own, but only from a layer this store wrote
    (origin ``local``): a layer from another host, or adopted, cannot make vmckpt pass
    options of its choosing to QEMU (docs/SECURITY.md)."""
    if given is not None:
        return given
    if not spec.qemu_args or manifest.origin == keys.LOCAL:
        return spec.qemu_args
    if warn:
        _log.warning(
            "guest %s: layer %s has origin %s, so its QEMU arguments %s are not used; "
            "repeat them with --qemu-arg to use them",
            vm, manifest.id, manifest.origin, " ".join(spec.qemu_args),
        )  # fmt: skip
    return ()


@dataclass(frozen=True)
class RestoreResult:
    """One guest restored on this host, in full or lazily."""

    name: str
    layer: str
    pid: int
    compose_s: float  # lazy: opening the chain as a page source
    load_s: float  # until the guest ran
    total_s: float
    stream_bytes: int  # lazy: the preamble (the pages follow from the page server)
    lazy: bool = False
    notes: tuple[str, ...] = ()  # one line each: why not lazy, the guest's clock, ...
    resume_ms: float | None = None  # QEMU's RESUME event after migrate-incoming
    page_server: int | None = None  # lazy: the page server's PID
    disk_bytes: int = 0  # written to rebuild its disks: bases made now, deltas applied

    def summary(self) -> str:
        if self.lazy:
            resume = "?" if self.resume_ms is None else f"{self.resume_ms:.1f} ms"
            head = (
                f"guest {self.name} restored lazily from layer {self.layer}, PID {self.pid}: "
                f"running after {self.total_s:.3f} s (RESUME {resume} after migrate-incoming); "
                f"page server PID {self.page_server} brings in the rest"
            )
        else:
            head = (
                f"guest {self.name} restored from layer {self.layer}, PID {self.pid}  "
                f"(compose {self.compose_s:.2f} s, load {self.load_s:.2f} s, "
                f"total {self.total_s:.2f} s)"
            )
        return "\n".join([head, *(f"note: {note}" for note in self.notes)])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "pid": self.pid,
            "host": "local",
            "compose_s": round(self.compose_s, 3),
            "load_s": round(self.load_s, 3),
            "total_s": round(self.total_s, 3),
            "bytes": self.stream_bytes,
            "lazy": self.lazy,
            "notes": list(self.notes),
            "resume_ms": self.resume_ms,
            "page_server": self.page_server,
            "disk_bytes": self.disk_bytes,
        }


def relocate_media(spec: GuestSpec, store: Store) -> GuestSpec:
    """The spec with each boot medium found by its content: at its own path, else in the
    store's copy (restore on another host, see vmckpt/remote)."""
    media = []
    for medium in spec.media:
        found = find_medium(store, medium.sha256, medium.path)
        media.append(replace(medium, path=str(found)) if found else medium)
    return replace(spec, media=tuple(media))


def check_machine_type(manifest: LayerManifest, vm: str) -> None:
    """Refuse, before anything starts, a layer whose exact machine type the QEMU in use lacks
    (a layer of a newer QEMU: machine types are versioned, older ones stay in newer QEMUs)."""
    binary = qemu_binary()
    wanted = manifest.machine_type
    if wanted and wanted not in machine_types(binary):
        raise RestoreError(
            f"it was taken by QEMU {manifest.qemu_version} on machine type {wanted}, which "
            f"QEMU {qemu_version(binary)} ({binary}) does not have: restore it with QEMU "
            f"{manifest.qemu_version} or later (VMCKPT_QEMU=PATH)",
            vm=vm,
            layer=manifest.id,
            step="check-machine",
        )


def step_clock(spec: GuestSpec, process: QemuProcess, mon: Monitor | None = None) -> str:
    """Step a restored guest's clock to now through QEMU's guest agent, once it runs (its
    clock would go on from the checkpoint's instant: under TCG no kvmclock carries it); what
    was done, or why not, in one line for the user. Costs nothing where no agent runs: QEMU
    knows whether the guest opened the agent's channel (the device state holds it). Never
    raises: the guest runs whatever its clock says. ``mon``: a monitor already open on the
    guest's QEMU (else one is opened)."""
    if not spec.guest_agent or process.agent_socket is None:
        return NOT_STEPPED.format(
            why="the guest has no channel for QEMU's guest agent (vmckpt gives one to the "
            "guests it starts, unless --no-guest-agent; a layer of an older vmckpt has none)"
        )
    try:
        if mon is None:
            with process.monitor() as own:
                chardevs = own.execute("query-chardev")
        else:
            chardevs = mon.execute("query-chardev")
        if not channel_open(chardevs):
            return NOT_STEPPED.format(
                why="no guest agent runs in the guest (install qemu-guest-agent in it)"
            )
        with GuestAgent(process.agent_socket, vm=process.name, timeout=AGENT_TIMEOUT_S) as qga:
            qga.sync()
            qga.set_time(time.time_ns())
    except QMPError as exc:
        return NOT_STEPPED.format(why=exc.message)
    _log.info("%s: clock stepped to now by the guest agent", process.name)
    return "clock stepped to now by the guest agent"
