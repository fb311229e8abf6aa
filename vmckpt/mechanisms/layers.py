"""The one layer writer every mechanism uses: what a mechanism received becomes a layer (its
pages against the parent: stored, zeroed), committed through the store with the guest's head
moved to it, and the checkpoint's result in vmckpt's JSON vocabulary."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from vmckpt import faults, log
from vmckpt.errors import CheckpointError, VmckptError
from vmckpt.guests.base import Guest
from vmckpt.images import DiskDelta, LayerContent, LayerManifest, Store
from vmckpt.lazy_numpy import np
from vmckpt.ram import PageSet, RamImage, SpilledPages
from vmckpt.stream import StreamEnvelope

_log = log.get(__name__)


@dataclass(frozen=True)
class CheckpointSettings:
    downtime_limit_ms: int = 50  # QEMU's target for the final stop
    max_bandwidth: int = 8 << 30  # bytes/s; a local socket, so don't throttle
    timeout_s: float = 300.0  # give up (cancel, guest keeps running) after this
    lock_wait_s: float = 0.0  # another checkpoint of the guest under way: wait this long


@dataclass(frozen=True)
class CheckpointResult:
    layer: LayerManifest
    pause_ms: float
    pages_stored: int
    pages_zeroed: int
    bytes_written: int
    total_s: float
    mechanism: str

    # The guest's RAM as this layer holds it: the next checkpoint's diff base.
    image: RamImage | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint in vmckpt's JSON vocabulary (the same fields as ``list --json``)."""
        return {
            "layer": self.layer.id,
            "parent": self.layer.parent,
            "guest": self.layer.guest,
            "created": self.layer.created,
            "mechanism": self.mechanism,
            "pause_ms": round(self.pause_ms, 3),
            "pages_stored": self.pages_stored,
            "pages_zeroed": self.pages_zeroed,
            "bytes": self.bytes_written,
            "total_s": round(self.total_s, 3),
            "origin": self.layer.origin,
        }


@dataclass(frozen=True)
class LayerParts:
    """What a mechanism hands over to become a layer."""

    envelope: StreamEnvelope
    ram: RamImage | PageSet | SpilledPages  # the whole RAM, the pages sent (COLO) or kept
    pages: dict[str, np.ndarray]
    zeroed: dict[str, np.ndarray]
    qemu_version: str
    disks: list[DiskDelta] = field(default_factory=list)  # from DiskTracker.collect


def diff_against_parent(
    store: Store, vm: str, parent: str | None, ram: RamImage, *, base: RamImage | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Pages to store (non-zero, changed) and pages that became zero, per RAM block.

    Without a parent every non-zero page is stored. Vectorised over whole
    blocks: no Python loop over pages.
    """
    if parent is None:
        base = None
    elif base is None:
        base, _, _ = store.compose(parent)
    if base is not None and not base.same_layout(ram):
        raise CheckpointError(
            f"the guest's RAM blocks differ from parent layer {parent}'s", vm=vm, step="diff"
        )
    pages: dict[str, np.ndarray] = {}
    zeroed: dict[str, np.ndarray] = {}
    for block in ram.blocks:
        if base is None:
            pages[block.idstr] = ram.nonzero_pages(block.idstr)
            zeroed[block.idstr] = np.zeros(0, dtype=np.uint32)
        else:
            pages[block.idstr], zeroed[block.idstr] = split_zero(
                ram, block.idstr, ram.changed_pages(block.idstr, base)
            )
    return pages, zeroed


def split_zero(ram: RamImage, idstr: str, candidates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split page numbers into those with data and those that are all zero now."""
    nonzero = ram.words_of(idstr)[candidates].any(axis=1)
    return candidates[nonzero], candidates[~nonzero]


def write_checkpoint_layer(
    target: Guest,
    parent: str | None,
    parts: LayerParts,
    *,
    mechanism: str,
    stats: dict[str, Any],
    started: float,
) -> CheckpointResult:
    """Write the layer (atomically, via images) and move the guest's head to it."""
    envelope = parts.envelope
    content = LayerContent(
        parent=parent,
        guest=target.name,
        spec=target.spec().to_dict(),
        qemu_version=parts.qemu_version,
        machine_type=envelope.machine_type,
        mechanism=mechanism,
        ram_section=(envelope.ram_section_id, envelope.ram_instance_id, envelope.ram_version_id),
        stats=stats,
        ram=parts.ram,
        pages=parts.pages,
        zeroed=parts.zeroed,
        prelude=envelope.prelude,
        epilogue=envelope.epilogue,
        disks=parts.disks,
    )
    faults.point(faults.MID_WRITE)
    try:
        manifest = target.store.commit_layer(content, head_of=(target.kind, target.name))
    except VmckptError as exc:
        raise exc.in_context(vm=target.name) from exc
    _log.info("%s: layer %s written (%s)", target.name, manifest.id, mechanism)
    return CheckpointResult(
        layer=manifest,
        pause_ms=float(stats.get("pause_ms", 0.0)),
        pages_stored=sum(len(p) for p in parts.pages.values()),
        pages_zeroed=sum(len(z) for z in parts.zeroed.values()),
        bytes_written=manifest.bytes_total,
        total_s=time.monotonic() - started,
        mechanism=mechanism,
        image=parts.ram if isinstance(parts.ram, RamImage) else None,
    )
