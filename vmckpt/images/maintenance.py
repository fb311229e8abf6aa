"""Chain maintenance: prune, squash and delete layers, and collect garbage.

Removing a layer is qcow2's ``block-commit``: every kept layer whose parent
goes absorbs, under its own id, the pages (and disk extents) of the removed
layers between it and its nearest kept ancestor that it does not override
itself, and that ancestor becomes its parent. So every kept layer composes to
exactly the guest state it composed to before, and nothing that names it (a
child, a guest's head, another host's copy of its children) changes. A layer
with several children (a chain that forked) gives its pages to each of them.
``squash LAYER`` absorbs the whole chain below LAYER (a new base layer); the
layers below stay, others may build on them.

One maintenance at a time (the maintenance lock). Each commits like a
checkpoint does — new files first, one atomic switch, old files removed last:

1. plan, from a snapshot of the store's layers and heads taken under the
   store lock (a head is never removed);
2. build the new version of each layer that absorbs others as a complete
   layer directory ``layers/.tmp-<id>-<random>/`` (files, manifest, fsync);
   meanwhile checkpoints go on (a new layer builds on a head, which stays);
3. under the chain lock (no reader reads a chain meanwhile) and the store lock
   (no layer is published, no head moves): check that the plan still holds
   (no new layer builds on a layer that goes, no head moved onto one), swap
   each new version with the old one (``renameat2(RENAME_EXCHANGE)``: the id
   holds the old or the new version, never neither), fsync ``layers/``, then
   rename each removed layer, children before parents, to a ``.tmp-`` name
   (invisible to readers at once), fsync ``layers/``;
4. delete the old versions and the removed layers.

A crash (kill -9) anywhere leaves a store that verifies and in which every
kept layer composes as before: before step 3 only ``.tmp-`` directories
exist; during it, some layers hold their new version, some their old one,
both complete and equivalent, and the layers still to be removed are intact
(children go before their parents, so no layer ever points to a missing
parent); after it, only ``.tmp-`` leftovers, which ``gc`` deletes. A prune run
again finishes the job.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import time
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

from vmckpt import faults, locks
from vmckpt.errors import CorruptLayerError, StoreError, UsageError, VmckptError
from vmckpt.fsutil import Dir
from vmckpt.hostdirs import SCRATCH_DIR
from vmckpt.images import disks, keys
from vmckpt.images import format as fmt
from vmckpt.images.compose import Coverage, gather
from vmckpt.images.crypt import LayerFile
from vmckpt.images.format import (
    DEVICE,
    MANIFEST,
    PAGE_DIGEST_SIZE,
    PRELUDE,
    DiskIndex,
    DiskRecord,
    LayerContent,
    LayerManifest,
)
from vmckpt.images.layerio import (
    LAYERS_DIR,
    TMP_PREFIX,
    DiskWrite,
    LayerIndex,
    TempLayer,
    check_content,
    check_digest,
)
from vmckpt.images.retention import KeepRules, parse_created, select
from vmckpt.images.store import MEDIA_DIR, STORE_LOCK_WAIT_S, Store
from vmckpt.lazy_numpy import np
from vmckpt.progress import NO_PROGRESS, Progress
from vmckpt.ram import PAGE_SIZE, RamBlock, RamImage

STALE_TEMP_S = 3600.0  # a temporary file (not a layer) untouched this long is a leftover
SWITCH_WAIT_MIN_S = 10.0  # a prune waits at least this long for readers before its switch
_READ = 1 << 20


# --- values ---------------------------------------------------------------------


@dataclass(frozen=True)
class Rewrite:
    """A kept layer that absorbs others: its new version, under the same id."""

    layer: str
    absorb: tuple[str, ...]  # the layers whose pages it takes in, newest first
    parent: str | None  # its parent afterwards
    bytes_before: int  # its files now
    bytes_after: int  # its files afterwards


@dataclass(frozen=True)
class Plan:
    """What a maintenance does: layers to remove (children before parents) and to rewrite."""

    remove: tuple[str, ...]
    rewrites: tuple[Rewrite, ...]
    bytes_removed: int  # files and manifests of the removed layers

    @property
    def bytes_freed(self) -> int:
        """Net: what the removed layers held, minus what the rewritten ones grow by."""
        return self.bytes_removed - sum(r.bytes_after - r.bytes_before for r in self.rewrites)

    def empty(self) -> bool:
        return not self.remove and not self.rewrites


@dataclass(frozen=True)
class Result:
    """What a prune, squash or delete did (or, with ``dry_run``, would do)."""

    action: str
    removed: tuple[str, ...]
    rewritten: tuple[str, ...]  # layers replaced by an equivalent version, same id
    bytes_freed: int
    dry_run: bool
    kept: dict[str, str] = field(default_factory=dict)  # prune: layer -> why it stays

    def to_dict(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "removed": list(self.removed),
            "rewritten": list(self.rewritten),
            "kept": dict(self.kept),
            "bytes_freed": self.bytes_freed,
            "dry_run": self.dry_run,
        }


@dataclass(frozen=True)
class _Snapshot:
    """The store's layers and heads at one moment (taken under the store lock)."""

    manifests: dict[str, LayerManifest]
    heads: dict[str, list[str]]
    manifest_sha256: dict[str, str]
    children: dict[str, list[str]] = field(default_factory=dict)
    depth: dict[str, int] = field(default_factory=dict)  # layers from the base, base = 1

    def __post_init__(self) -> None:
        for layer_id, manifest in sorted(self.manifests.items()):
            if manifest.parent is not None:
                self.children.setdefault(manifest.parent, []).append(layer_id)
        for layer_id in self.manifests:
            path: list[str] = []
            current: str | None = layer_id
            while current is not None and current not in self.depth:
                if current in path:
                    raise CorruptLayerError("parent chain loops", layer=current, step="plan")
                path.append(current)
                current = self.manifests[current].parent
            known = 0 if current is None else self.depth[current]
            for number, each in enumerate(reversed(path), 1):
                self.depth[each] = known + number

    @classmethod
    def take(cls, store: Store, step: str) -> _Snapshot:
        """The layers and heads at one instant of the store lock; the layers' manifests are
        read after it (only a maintenance, and this one holds the maintenance lock, changes
        a layer once it exists; one published meanwhile is checked for at the switch)."""
        with store.lock(f"{step}: list the layers"):
            store.tidy_catalog(step)
            names = store.layer_names()
            heads = store.heads()
            catalog = store.catalog(step)
        if catalog is None:
            raise store.no_key_error(step)
        manifests: dict[str, LayerManifest] = {}
        digests: dict[str, str] = {}
        for layer_id in names:
            try:
                manifests[layer_id], digests[layer_id] = store.manifest_with_digest(layer_id, step)
                if not catalog.accepts(layer_id, digests[layer_id]):
                    raise StoreError("it changed while it was read", layer=layer_id, step=step)
            except (VmckptError, OSError) as exc:
                why = exc.one_line() if isinstance(exc, VmckptError) else str(exc)
                raise StoreError(
                    f"the store has a damaged layer ({why}); {step} changes only stores whose "
                    "layers all read (run vmckpt verify)",
                    step=step,
                ) from exc
        for manifest in manifests.values():
            if manifest.parent is not None and manifest.parent not in manifests:
                raise StoreError(
                    f"layer {manifest.id}'s parent {manifest.parent} is missing; {step} changes "
                    "only stores whose chains are whole (run vmckpt verify)",
                    step=step,
                )
        return cls(manifests, heads, digests)

    def chain_ids(self, layer_id: str) -> list[str]:
        """``layer_id`` and its ancestors, newest first."""
        ids: list[str] = []
        current: str | None = layer_id
        while current is not None:
            ids.append(current)
            current = self.manifests[current].parent
        return ids


class _Indexes:
    """Decoded, checked indexes, read once per maintenance."""

    def __init__(self, store: Store, step: str) -> None:
        self.store = store
        self.step = step
        self.pages: dict[str, LayerIndex] = {}
        self.disks: dict[tuple[str, str], DiskIndex] = {}

    def of(self, manifest: LayerManifest) -> LayerIndex:
        if manifest.id not in self.pages:
            self.pages[manifest.id] = self.store.reader.index(manifest, self.step)
        return self.pages[manifest.id]

    def disk(self, manifest: LayerManifest, record: DiskRecord) -> DiskIndex:
        key = (manifest.id, record.id)
        if key not in self.disks:
            self.disks[key] = self.store.reader.disk_index(manifest, record, self.step)
        return self.disks[key]


# --- disk extents ----------------------------------------------------------------


@dataclass(frozen=True)
class _Piece:
    """Part of a stored extent of a merged disk delta: where its bytes come from."""

    offset: int
    length: int
    source: LayerManifest
    source_offset: int  # in the source's disk-<id>.bin


@dataclass(frozen=True)
class _MergedDisk:
    record: DiskRecord  # of the absorbing layer: id, format, size, path, bitmap
    full: bool
    pieces: list[_Piece]
    stored: fmt.Extents
    zeroed: fmt.Extents
    sources: list[LayerManifest]

    @property
    def bytes_stored(self) -> int:
        return sum(length for _, length in self.stored)

    @property
    def file_bytes(self) -> int:
        """disk-<id>.idx and disk-<id>.bin of the merged delta."""
        return 16 * (1 + len(self.stored) + len(self.zeroed)) + self.bytes_stored


def _uncovered(covered: list[tuple[int, int]], offset: int, length: int) -> list[tuple[int, int]]:
    """The parts of [offset, offset+length) outside ``covered`` (sorted, disjoint [a, b))."""
    pieces = []
    position, end = offset, offset + length
    index = bisect.bisect_right(covered, (position, end)) - 1
    index = max(index, 0)
    while position < end and index < len(covered):
        start, stop = covered[index]
        if stop <= position:
            index += 1
            continue
        if start >= end:
            break
        if start > position:
            pieces.append((position, start - position))
        position = max(position, stop)
        index += 1
    if position < end:
        pieces.append((position, end - position))
    return pieces


def _union(
    covered: list[tuple[int, int]], extents: Iterable[tuple[int, int]]
) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, stop in sorted([*covered, *((o, o + n) for o, n in extents)]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
        else:
            merged.append((start, stop))
    return merged


def _coalesce(extents: list[tuple[int, int]]) -> fmt.Extents:
    out: list[tuple[int, int]] = []
    for offset, length in sorted(extents):
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1] = (out[-1][0], out[-1][1] + length)
        else:
            out.append((offset, length))
    return tuple(out)


def _merge_disk(
    segment: list[LayerManifest], record: DiskRecord, indexes: _Indexes, base: bool
) -> _MergedDisk:
    """The delta of disk ``record.id`` that the newest layer of ``segment`` holds once it
    absorbs the rest (newest first): per byte, the newest layer's record wins."""
    covered: list[tuple[int, int]] = []
    pieces: list[_Piece] = []
    zeroed: list[tuple[int, int]] = []
    sources: list[LayerManifest] = []
    full = base  # nothing below a base: its delta is relative to an all-zero disk
    for manifest in segment:
        own = manifest.disk(record.id)
        if own is None or own.size != record.size:
            raise CorruptLayerError(
                f"{MANIFEST}: disk {record.id} needs layer {manifest.id}'s delta, which it "
                "lacks (or its size differs)",
                layer=segment[0].id,
                step=indexes.step,
            )
        index = indexes.disk(manifest, own)
        data_offset = 0
        used = False
        for offset, length in index.stored:
            for piece_offset, piece_length in _uncovered(covered, offset, length):
                pieces.append(
                    _Piece(piece_offset, piece_length, manifest,
                           data_offset + piece_offset - offset)
                )  # fmt: skip
                used = True
            data_offset += length
        for offset, length in index.zeroed:
            zeroed.extend(_uncovered(covered, offset, length))
        if used:
            sources.append(manifest)
        covered = _union(covered, [*index.stored, *index.zeroed])
        if own.full:
            full = True
            break
    pieces.sort(key=lambda piece: piece.offset)
    return _MergedDisk(
        record=record,
        full=full,
        pieces=pieces,
        stored=_coalesce([(p.offset, p.length) for p in pieces]),
        zeroed=() if full else _coalesce(zeroed),
        sources=sources,
    )


def _disk_chunks(store: Store, merged: _MergedDisk, step: str) -> Iterator[bytes]:
    """The merged delta's data: each source's data file checked (sha256) before any of it
    is used, then the pieces in disk order."""
    sources: dict[str, LayerFile] = {}
    try:
        for source in merged.sources:
            record = source.disk(merged.record.id)
            assert record is not None
            sources[source.id] = src = store.reader.open(source, record.data_file, step)
            check_digest(source, record.data_file, src.sha256(), step)
        for piece in merged.pieces:
            done = 0
            while done < piece.length:
                length = min(_READ, piece.length - done)
                yield sources[piece.source.id].pread(piece.source_offset + done, length)
                done += length
    finally:
        for src in sources.values():
            src.close()


# --- planning --------------------------------------------------------------------


def _coverage(segment: list[LayerManifest], indexes: _Indexes) -> Coverage:
    """Which pages the newest layer of ``segment`` records once it absorbs the rest."""
    blocks = [RamBlock(block.idstr, block.length) for block in segment[0].blocks]
    coverage = Coverage.of(blocks)
    for manifest in segment:
        if manifest.layout != segment[0].layout:
            raise CorruptLayerError(
                f"{MANIFEST}: RAM block layout differs from that of {segment[0].id}",
                layer=manifest.id,
                step=indexes.step,
            )
        for block, part in zip(manifest.blocks, indexes.of(manifest).parts, strict=True):
            if part.stored.size or part.zeroed.size:
                coverage.take(block.idstr, part)
    return coverage


def _size_after(segment: list[LayerManifest], base: bool, indexes: _Indexes) -> int:
    """The listed files' bytes of the newest layer of ``segment`` once it absorbs the rest."""
    coverage = _coverage(segment, indexes)
    stored = sum(int(np.count_nonzero(mask)) for mask in coverage.stored.values())
    zeroed = 0 if base else sum(int(np.count_nonzero(m)) for m in coverage.zeroed.values())
    top = segment[0]
    size = stored * (PAGE_SIZE + PAGE_DIGEST_SIZE) + 4 * (2 * len(top.blocks) + stored + zeroed)
    size += top.files[PRELUDE].size + top.files[DEVICE].size
    for record in top.disks:
        size += _merge_disk(segment, record, indexes, base).file_bytes
    return size


def _manifest_bytes(store: Store, layer_id: str) -> int:
    with contextlib.suppress(OSError):
        return os.lstat(store.layer_path(layer_id, MANIFEST)).st_size
    return 0


def plan_changes(
    store: Store,
    snapshot: _Snapshot,
    remove: Collection[str],
    indexes: _Indexes,
    *,
    new_bases: Collection[str] = (),
) -> Plan:
    """Remove the layers ``remove`` (their kept descendants absorb them) and make each layer
    of ``new_bases`` a base layer (it absorbs its whole chain)."""
    manifests = snapshot.manifests
    remove = set(remove)
    rewrites: list[Rewrite] = []
    # Only a kept child of a removed layer, or a new base, changes.
    targets = set(new_bases) - remove
    for layer_id in remove:
        targets.update(c for c in snapshot.children.get(layer_id, ()) if c not in remove)
    for layer_id in sorted(targets):
        manifest = manifests[layer_id]
        run: list[str] = []
        parent = manifest.parent
        if layer_id in new_bases:
            run = snapshot.chain_ids(layer_id)[1:]
            parent = None
        else:
            while parent is not None and parent in remove:
                run.append(parent)
                parent = manifests[parent].parent
        if not run:
            continue
        segment = [manifest, *(manifests[i] for i in run)]
        rewrites.append(
            Rewrite(
                layer=layer_id,
                absorb=tuple(run),
                parent=parent,
                bytes_before=manifest.bytes_total,
                bytes_after=_size_after(segment, parent is None, indexes),
            )
        )
    depth = snapshot.depth  # removed children before their parents
    order = tuple(sorted(remove, key=lambda layer_id: (-depth[layer_id], layer_id)))
    removed_bytes = sum(manifests[i].bytes_total + _manifest_bytes(store, i) for i in order)
    return Plan(order, tuple(rewrites), removed_bytes)


# --- doing -----------------------------------------------------------------------


def _build(
    store: Store, rewrite: Rewrite, snapshot: _Snapshot, indexes: _Indexes, *, new_id: bool = False
) -> tuple[TempLayer, str]:
    """The new version of ``rewrite.layer`` as a complete temporary layer directory (open,
    and locked while it is); returns it and the digest of its manifest. ``new_id``: as a new
    layer, under an id of its own (a store in a bucket, whose layers never change)."""
    step = "rewrite"
    top = snapshot.manifests[rewrite.layer]
    segment = [top, *(snapshot.manifests[i] for i in rewrite.absorb)]
    # Never launder: only authenticated layers are rewritten, and the new version keeps
    # the least trusted origin of those it merges.
    store.require_sealed(segment, step)
    origin = next((m.origin for m in segment if m.origin != keys.LOCAL), keys.LOCAL)
    base = rewrite.parent is None
    store.check_ram_size(top, step)
    blocks = [RamBlock(block.idstr, block.length) for block in top.blocks]
    image = RamImage.zeroed(blocks)
    coverage = Coverage.of(blocks)
    gather(store.reader, segment, image, coverage, step)
    content = LayerContent(
        parent=rewrite.parent,
        guest=top.guest,
        spec=top.spec,
        qemu_version=top.qemu_version,
        machine_type=top.machine_type,
        mechanism=top.mechanism,
        ram_section=top.ram_section,
        stats=top.stats,
        ram=image,
        pages={b.idstr: np.flatnonzero(coverage.stored[b.idstr]) for b in blocks},
        zeroed={} if base else {b.idstr: np.flatnonzero(coverage.zeroed[b.idstr]) for b in blocks},
        prelude=store.reader.read_small(top, PRELUDE, step),
        epilogue=store.reader.read_small(top, DEVICE, step),
    )
    parts = check_content(content)
    disks = []
    for record in top.disks:
        merged = _merge_disk(segment, record, indexes, base)
        disks.append(
            DiskWrite(
                record.id, record.format, record.size, record.path, merged.full,
                merged.stored, merged.zeroed, record.bitmap, _disk_chunks(store, merged, step),
            )
        )  # fmt: skip
    temp = store.new_version(None if new_id else top.id)
    try:
        _, digest = store.write_version(
            temp, content, parts, disks, created=top.created, origin=origin
        )
    except BaseException:
        store.files.remove(temp.name)
        temp.close()
        raise
    return temp, digest


def _check_still_valid(store: Store, plan: Plan, snapshot: _Snapshot, step: str) -> None:
    """Under the store lock, just before the switch: the plan still holds."""

    def changed(why: str) -> StoreError:
        return StoreError(
            f"the store changed meanwhile ({why}); nothing was changed, run it again", step=step
        )

    going = set(plan.remove)
    catalog = store.catalog(step)
    assert catalog is not None
    for rewrite in plan.rewrites:
        if catalog.layers.get(rewrite.layer) != (snapshot.manifest_sha256[rewrite.layer],):
            raise changed(f"layer {rewrite.layer} is not the one planned for")
    for layer_id in going:
        if not store.has_layer(layer_id):
            raise changed(f"layer {layer_id} is gone")
    for layer_id, who in store.heads().items():
        if layer_id in going:
            raise changed(f"layer {layer_id} became the head of {', '.join(who)}")
    for layer_id in store.layer_names():
        if layer_id in snapshot.manifests:
            continue
        parent = store.manifest(layer_id, step).parent
        if parent in going:
            raise changed(f"new layer {layer_id} builds on {parent}")


def _switch_error(exc: OSError, layer_id: str, switched: int, total: int) -> StoreError:
    if exc.errno in (errno.ENOSYS, errno.EINVAL) and switched == 0:
        why = (
            "the atomic exchange of two directories (Linux renameat2 with RENAME_EXCHANGE) is "
            f"not available here ({exc.strerror}); nothing was changed"
        )
    else:
        why = (
            f"cannot switch to its new version ({exc.strerror}); {switched} of {total} layers "
            "were switched (each complete and equivalent), none removed: the store is "
            "consistent, run it again"
        )
    return StoreError(why, layer=layer_id, step="switch")


def apply_plan(store: Store, plan: Plan, snapshot: _Snapshot, indexes: _Indexes,
               progress: Progress = NO_PROGRESS, switch_wait_s: float = 60.0) -> None:  # fmt: skip
    """Carry out ``plan`` (see the module doc): build, switch, remove, clean up. The switch
    waits up to ``switch_wait_s`` for readers of chains (a restore, a verify) to finish."""
    built: list[tuple[Rewrite, TempLayer, str]] = []
    removed: list[str] = []
    files = store.files
    try:
        with progress.task("writing the layers that absorb others", len(plan.rewrites)) as task:
            for rewrite in plan.rewrites:
                try:
                    temp, digest = _build(store, rewrite, snapshot, indexes)
                except OSError as exc:
                    raise StoreError(
                        f"cannot write its new version ({exc.strerror or exc}); nothing was "
                        "changed",
                        layer=rewrite.layer,
                        step="rewrite",
                    ) from exc
                built.append((rewrite, temp, digest))
                task.advance(1)
                faults.point(faults.MAINT_MID_BUILD)
        faults.point(faults.MAINT_BEFORE_SWITCH)
        with store.switching("switch layers", wait_s=switch_wait_s), store.lock("switch layers"):
            _check_still_valid(store, plan, snapshot, "switch")
            # The catalog accepts either version of each layer while they are switched (both
            # compose to the same), then only the new ones, and no longer the removed layers.
            old = snapshot.manifest_sha256
            store.update_catalog("switch", add={r.layer: [old[r.layer], d] for r, _, d in built})
            for number, (rewrite, temp, _) in enumerate(built):
                try:
                    files.exchange(temp.name, rewrite.layer)  # the temporary name: the old one
                except OSError as exc:
                    if number == 0:  # nothing switched: the catalog as it was
                        store.update_catalog(
                            "switch", add={r.layer: [old[r.layer]] for r, _, _ in built}
                        )
                    raise _switch_error(exc, rewrite.layer, number, len(built)) from exc
                faults.point(faults.MAINT_MID_SWITCH)
            files.sync_layers()
            faults.point(faults.MAINT_BEFORE_REMOVE)
            for layer_id in plan.remove:
                removed.append(files.bury(layer_id))
                faults.point(faults.MAINT_MID_REMOVE)
            files.sync_layers()
            store.update_catalog(
                "switch", add={r.layer: [d] for r, _, d in built}, drop=plan.remove
            )
        faults.point(faults.MAINT_BEFORE_CLEANUP)
    except OSError as exc:
        raise StoreError(f"{exc.strerror or exc}", step="switch") from exc
    finally:
        # Old versions (switched) or unused new ones, and the removed layers: all garbage.
        for _, temp, _ in built:
            files.remove(temp.name)
            temp.close()
        for grave in removed:
            files.remove(grave)


# --- the operations ------------------------------------------------------------------


def _refuse_heads(snapshot: _Snapshot, going: Iterable[str], what: str) -> None:
    for layer_id in going:
        if layer_id in snapshot.heads:
            raise StoreError(
                f"it is the head of {', '.join(snapshot.heads[layer_id])} (the next checkpoint "
                f"builds on it), so {what} keeps it",
                layer=layer_id,
                step=what,
            )


def _run(
    store: Store,
    action: str,
    snapshot: _Snapshot,
    remove: Collection[str],
    *,
    dry_run: bool,
    new_bases: Collection[str] = (),
    kept: dict[str, str] | None = None,
    progress: Progress = NO_PROGRESS,
    switch_wait_s: float = 60.0,
) -> Result:
    indexes = _Indexes(store, action)
    plan = plan_changes(store, snapshot, remove, indexes, new_bases=new_bases)
    if not dry_run and not plan.empty():
        apply_plan(store, plan, snapshot, indexes, progress, switch_wait_s)
    return Result(
        action=action,
        removed=plan.remove,
        rewritten=tuple(r.layer for r in plan.rewrites),
        bytes_freed=plan.bytes_freed,
        dry_run=dry_run,
        kept=kept or {},
    )


Snapshot = _Snapshot  # what bucketmaint plans on


def build_squashed(
    store: Store, snapshot: _Snapshot, top: str, absorb: list[str], parent: str | None
) -> tuple[TempLayer, str]:
    """A new layer (a new id) that composes to what ``top`` composes to, absorbing the
    layers ``absorb`` (newest first; ``top``'s chain down to, not including, ``parent``):
    complete in a temporary directory (open and locked; publish or remove it, then close
    it), and the digest of its manifest. Every layer read must be in ``store``."""
    manifests = snapshot.manifests
    segment = [manifests[top], *(manifests[i] for i in absorb)]
    indexes = _Indexes(store, "squash")
    rewrite = Rewrite(
        layer=top,
        absorb=tuple(absorb),
        parent=parent,
        bytes_before=manifests[top].bytes_total,
        bytes_after=_size_after(segment, parent is None, indexes),
    )
    return _build(store, rewrite, snapshot, indexes, new_id=True)


def snapshot_of(
    manifests: dict[str, LayerManifest], heads: dict[str, list[str]], digests: dict[str, str]
) -> _Snapshot:
    """A snapshot of layers read elsewhere (a store in a bucket: its catalog's layers)."""
    return _Snapshot(manifests, heads, digests)


def refuse_heads(snapshot: _Snapshot, going: Iterable[str], what: str) -> None:
    """StoreError if a layer of ``going`` is a guest's head."""
    _refuse_heads(snapshot, going, what)


def without_children(snapshot: _Snapshot, remove: Collection[str]) -> tuple[set[str], set[str]]:
    """Of ``remove``, the layers that can go without any other layer changing (no layer
    that stays builds on them), and the rest."""
    going = set(remove)
    depth = snapshot.depth
    for layer_id in sorted(remove, key=lambda i: (-depth[i], i)):  # children first
        if any(c not in going for c in snapshot.children.get(layer_id, ())):
            going.discard(layer_id)
    return going, set(remove) - going


def prune_selection(
    snapshot: _Snapshot,
    rules: KeepRules,
    *,
    guest: str | None = None,
    now: datetime | None = None,
    tz: tzinfo | None = None,
    scope_ids: Collection[str] | None = None,
) -> tuple[set[str], dict[str, str]]:
    """What a prune removes of ``snapshot`` (the layers of ``scope_ids``, default all; of
    guest ``guest`` or of every guest, each guest's layers ruled on their own), and what it
    keeps and why. A guest's head is always kept."""
    now = now or datetime.now(UTC)
    scope = [
        m
        for m in snapshot.manifests.values()
        if (guest is None or m.guest == guest) and (scope_ids is None or m.id in scope_ids)
    ]
    groups: dict[str, list[tuple[str, datetime]]] = {}
    for manifest in scope:
        try:
            created = parse_created(manifest.created)
        except ValueError as exc:
            raise CorruptLayerError(
                f"{MANIFEST}: created {manifest.created!r} is not a time",
                layer=manifest.id,
                step="prune",
            ) from exc
        groups.setdefault(manifest.guest, []).append((manifest.id, created))
    kept: dict[str, str] = {}
    for layers in groups.values():
        kept.update(select(layers, rules, now, tz))
    for manifest in scope:
        holders = snapshot.heads.get(manifest.id)
        if holders:
            why = f"head of {', '.join(holders)}"
            kept[manifest.id] = f"{kept[manifest.id]}, {why}" if manifest.id in kept else why
    return {m.id for m in scope} - set(kept), kept


def prune(
    store: Store,
    rules: KeepRules,
    *,
    guest: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    tz: tzinfo | None = None,
    wait_s: float = 60.0,
    progress: Progress = NO_PROGRESS,
) -> Result:
    """Remove the layers ``rules`` do not keep: of guest ``guest`` (by the name each layer
    records), or of every guest, each guest's layers ruled on their own. A guest's head is
    always kept. Kept layers whose parent goes absorb it (they compose as before).
    ``wait_s``: how long to wait for another maintenance, and (at least 10 s) for readers
    of chains before the switch; LockError after that, with nothing changed."""
    if not rules.any():
        raise UsageError(
            "give at least one --keep-* rule (a prune without one would remove every layer "
            "but the heads)"
        )
    with store.maintenance_lock("prune", wait_s=wait_s):
        snapshot = _Snapshot.take(store, "prune")
        remove, kept = prune_selection(snapshot, rules, guest=guest, now=now, tz=tz)
        return _run(
            store, "prune", snapshot, remove, dry_run=dry_run, kept=kept, progress=progress,
            switch_wait_s=max(wait_s, SWITCH_WAIT_MIN_S),
        )  # fmt: skip


def delete(store: Store, layer_ref: str, *, dry_run: bool = False) -> Result:
    """Remove one layer (not a guest's head); its children, if any, absorb it."""
    with store.maintenance_lock("delete"):
        layer_id = store.resolve(layer_ref)
        snapshot = _Snapshot.take(store, "delete")
        _refuse_heads(snapshot, [layer_id], "delete")
        return _run(store, "delete", snapshot, {layer_id}, dry_run=dry_run)


def squash(store: Store, first_ref: str | None, last_ref: str, *, dry_run: bool = False) -> Result:
    """``first_ref`` None: rewrite ``last_ref`` as a base layer (it absorbs its whole chain;
    the layers below stay). Else merge the run ``first_ref``..``last_ref`` of one chain into
    one layer, ``last_ref``'s id: the layers of the run below it go (their other children
    absorb them too), it takes the parent ``first_ref`` had."""
    with store.maintenance_lock("squash"):
        last = store.resolve(last_ref)
        snapshot = _Snapshot.take(store, "squash")
        if first_ref is None:
            if snapshot.manifests[last].parent is None:
                return _run(store, "squash", snapshot, (), dry_run=dry_run)
            return _run(store, "squash", snapshot, (), dry_run=dry_run, new_bases={last})
        first = store.resolve(first_ref)
        chain = snapshot.chain_ids(last)
        if first not in chain or first == last:
            raise UsageError(
                f"{first} is not an older layer of {last}'s chain (squash FROM..TO takes a run "
                "of one chain, oldest first)"
            )
        run = chain[1 : chain.index(first) + 1]
        _refuse_heads(snapshot, run, "squash")
        return _run(store, "squash", snapshot, run, dry_run=dry_run)


def exclusive_bytes(store: Store) -> dict[str, int]:
    """Per layer, the bytes deleting it alone would free: its files and manifest, less what
    its children would grow by absorbing it."""
    with store.reading("sizes"):
        snapshot = _Snapshot.take(store, "sizes")
        indexes = _Indexes(store, "sizes")
        return {
            layer_id: plan_changes(store, snapshot, {layer_id}, indexes).bytes_freed
            for layer_id in snapshot.manifests
        }


# --- garbage ---------------------------------------------------------------------


@dataclass(frozen=True)
class Garbage:
    path: str  # relative to the store, or absolute for this host's files of the store
    bytes: int
    why: str
    removed: bool = True  # False: reported, left as it is (not this store's to delete)


def _stale(directory: Dir, name: str, now: float) -> bool:
    with contextlib.suppress(OSError):
        return now - directory.lstat(name).st_mtime > STALE_TEMP_S
    return False


def gc(
    store: Store, gone_guests: Collection[tuple[str, str]], *, dry_run: bool = False
) -> list[Garbage]:
    """Remove what no committed layer or live guest needs: temporary layer directories no
    live writer holds (crashes, interrupted maintenance), layer directories the catalog does
    not name whose seal is this store's (a crash between a layer's rename and the catalog's
    write; a version replaced or a layer deleted, put back), stale temporary files, and, on
    this host, the files and heads of the guests ``gone_guests`` ((kind, name); the caller
    decides who is gone) and checkpoint scratch no checkpoint under way uses.

    Nothing is followed out of the store: every directory is opened without following a
    link and everything is removed relative to it (a link is removed as a link). A layer
    directory that does not authenticate is reported, not removed (`init --adopt` may want
    it). Returns what it removed (or would, with ``dry_run``)."""
    found: list[Garbage] = []
    now = time.time()

    def note(directory: Dir, name: str, why: str, *, where: str = "", remove: bool = True) -> None:
        shown = f"{where}{name}" if where else str(directory.path / name)
        found.append(Garbage(shown, directory.tree_bytes(name), why, remove))
        if remove and not dry_run:
            directory.remove(name)

    with store.maintenance_lock("gc"), store.lock("gc"), Dir.open(store.path, follow=True) as root:
        if not dry_run:
            store.tidy_catalog("gc")
        _gc_layers(store, root, note)
        for name in root.names():
            if name.startswith(TMP_PREFIX) and _stale(root, name, now):
                note(root, name, "a stale temporary file", where="")
        if root.is_dir(MEDIA_DIR):
            with root.sub(MEDIA_DIR) as media:
                for sha in media.names():
                    if not media.is_dir(sha):
                        continue
                    with media.sub(sha) as copies:
                        for name in copies.names():
                            if name.startswith(TMP_PREFIX) and _stale(copies, name, now):
                                where = f"{MEDIA_DIR}/{sha}/"
                                note(copies, name, "a partial copy of a boot medium", where=where)
        _gc_host(store, gone_guests, note, found, now, dry_run)
    # Disk bases of this host no layer and no restored disk needs; the chain lock excludes
    # a restore building an overlay on one meanwhile (lock order: maintenance, chain).
    with store.maintenance_lock("gc"), store.switching("gc"):
        bases = disks.bases_dir(store) if (store.host.data / disks.BASES_DIR).is_dir() else None
        if bases is not None:
            held = locks.hold(bases / disks.BASES_LOCK, what="gc", wait_s=STORE_LOCK_WAIT_S,
                              busy="a restore writes a disk base")  # fmt: skip
            with held, Dir.open(bases) as directory:
                for path in disks.unused_bases(store):
                    why = "a disk base no layer of the store holds and no restored disk uses"
                    note(directory, path.name, why)
    return found


def _gc_layers(store: Store, root: Dir, note: Any) -> None:
    try:
        layers = root.sub(LAYERS_DIR)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise StoreError(
            f"{store.path / LAYERS_DIR} is not a directory (a link?): refused", step="gc"
        ) from exc
    catalog = store.catalog("gc")
    with layers:
        for name in layers.names():
            where = f"{LAYERS_DIR}/"
            if name.startswith(TMP_PREFIX):
                if not layers.is_dir(name) or not locks.directory_in_use(layers.path / name):
                    note(layers, name, "left by an interrupted write or maintenance", where=where)
            elif catalog is not None and fmt.LAYER_ID_RE.match(name):
                if not layers.is_dir(name):
                    note(layers, name, "not a layer directory (a link?)", where=where)
                elif name not in catalog.layers:
                    ours = store.authenticates(name)
                    note(
                        layers, name,
                        "a layer the catalog does not name (a crash between its rename and the "
                        "catalog's write, or a removed version put back)" if ours else
                        "a layer directory the catalog does not name and that does not "
                        "authenticate: left as it is (`vmckpt init --adopt` checks and adopts "
                        "it; else remove it by hand)",
                        where=where, remove=ours,
                    )  # fmt: skip


def _gc_host(
    store: Store,
    gone: Collection[tuple[str, str]],
    note: Any,
    found: list[Garbage],
    now: float,
    dry_run: bool,
) -> None:
    """This host's files of the store's guests: those of gone guests (and their heads), and
    stale scratch."""
    heads = store.head_records()
    drop: list[tuple[str, str]] = []
    for kind, name in sorted(gone):
        if store.host.guest_locked(name, kind):
            continue
        for path in (store.host.runtime_path(name, kind), store.host.data_path(name, kind)):
            if path.exists() or path.is_symlink():
                with Dir.open(path.parent) as parent:
                    note(parent, path.name, "a guest that is gone (not running, idle)")
        if (kind, name) in heads:
            why = "its head: its layers are no longer kept for it (a guest that is gone)"
            found.append(Garbage(f"head of {kind} {name} ({heads[kind, name].layer})", 0, why))
            drop.append((kind, name))
    if drop and not dry_run:
        store.forget_heads(drop)
    for kind in ("guest", "libvirt"):
        for name in store.host.names(kind, data=True):
            if (kind, name) in gone or store.host.guest_locked(name, kind):
                continue
            scratch = store.host.data_path(name, kind) / SCRATCH_DIR
            if scratch.is_dir() and not scratch.is_symlink():
                with Dir.open(scratch) as directory:
                    for leftover in directory.names():
                        note(directory, leftover, "scratch of an interrupted checkpoint")
            runtime = store.host.runtime_path(name, kind)
            if runtime.is_dir() and not runtime.is_symlink():
                with Dir.open(runtime) as directory:
                    for leftover in directory.names():
                        temporary = leftover.startswith(".") and leftover.endswith(".tmp")
                        if temporary and _stale(directory, leftover, now):
                            note(directory, leftover, "a stale temporary file")
