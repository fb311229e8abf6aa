"""Chain maintenance of a store in a bucket: ``prune`` and ``delete``, correct for several
hosts sharing the bucket. They plan as a directory store's do (vmckpt/images/maintenance.py:
the same retention rules, the same refusals: a guest's head stays), on the layers the
bucket's catalog names and this host's layers not yet uploaded, then:

1. commit: one compare-and-swap of the bucket's catalog drops the layers and records them
   as removed (docs/FORMAT.md, *A store in a bucket*, 1.6), checked against the catalog it
   replaces (no head moved onto a layer that goes, no layer named since builds on one);
2. delete the layers' objects (a host that stops before, or fails, leaves them to any
   host's ``gc``, which deletes the objects of every layer the catalog records as removed);
3. drop them from this host's working copy (other hosts' ``gc`` drop theirs; their ``push``
   never uploads them again).

A layer's objects in a bucket never change, so a layer is removed only if no layer that
stays builds on it: a directory store's kept children absorb a removed parent (a new
version under the same id), which in a bucket would change objects other hosts may be
reading. A prune keeps such layers (and says why); a delete of one is refused. ``squash``
writes a new layer (a new id) in the working copy that composes to what the squashed layer
did, uploads it, and names it in the same swap that removes the layers it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, tzinfo

from vmckpt import log
from vmckpt.errors import BucketError, StoreError, UsageError
from vmckpt.images.bucketstore import BucketStore
from vmckpt.images.format import LayerManifest
from vmckpt.images.maintenance import (
    Result,
    Snapshot,
    build_squashed,
    prune_selection,
    refuse_heads,
    snapshot_of,
    without_children,
)
from vmckpt.images.retention import KeepRules

_log = log.get(__name__)
KEPT_CHILDREN = "a kept layer builds on it (a store in a bucket rewrites no layer)"


def _take(bucket: BucketStore, step: str) -> tuple[Snapshot, set[str]]:
    """The snapshot to plan on: every layer the bucket's catalog names (manifests checked
    against it), this host's layers not yet uploaded whose chain is whole (they count as
    children), and the heads of the catalog and of this host's guests. Also the ids the
    catalog names."""
    catalog, _ = bucket.catalog(step)
    manifests: dict[str, LayerManifest] = {}
    digests: dict[str, str] = {}
    for layer_id, versions in sorted(catalog.layers.items()):
        manifests[layer_id] = bucket.manifest_in_bucket(layer_id, catalog, step)
        digests[layer_id] = versions[0]
    local = bucket.local
    for layer_id in bucket.pending():  # parents first
        manifest, digest = local.manifest_with_digest(layer_id, step)
        if manifest.parent is None or manifest.parent in manifests:
            manifests[layer_id], digests[layer_id] = manifest, digest
    heads = catalog.heads_of()
    for layer_id, who in local.heads().items():
        if layer_id in manifests:
            heads[layer_id] = sorted({*heads.get(layer_id, []), *who})
    return snapshot_of(manifests, heads, digests), set(catalog.layers)


def _sizes(snapshot: Snapshot) -> dict[str, int]:
    return {i: m.bytes_total for i, m in snapshot.manifests.items()}


def _finish(
    bucket: BucketStore,
    action: str,
    going: set[str],
    digests: dict[str, str],
    known: set[str],
    sizes: dict[str, int],
    *,
    dry_run: bool,
    kept: dict[str, str] | None = None,
) -> tuple[Result, bool]:
    removed = sorted(going)
    if not dry_run and going:
        removed = bucket.remove({i: digests[i] for i in going}, known, action)
        try:
            bucket.delete_objects(removed, action)
        except BucketError as exc:  # committed: any host's gc deletes them later
            _log.warning("%s; `vmckpt gc` deletes the removed layers' objects", exc.one_line())
    result = Result(
        action=action,
        removed=tuple(removed),
        rewritten=(),
        bytes_freed=sum(sizes[i] for i in removed),
        dry_run=dry_run,
        kept=kept or {},
    )
    return result, not dry_run and bool(removed)


def delete(bucket: BucketStore, layer_ref: str, *, dry_run: bool = False) -> Result:
    """Remove one layer of the bucket: not a guest's head, and not one another layer builds
    on."""
    step = "delete"
    with bucket.local.maintenance_lock(step):
        layer_id = bucket.resolve(layer_ref, step)
        snapshot, known = _take(bucket, step)
        if layer_id not in known:
            raise StoreError(
                f"it is not in bucket {bucket.name} (not uploaded yet): `vmckpt push` it first",
                layer=layer_id,
                step=step,
            )
        refuse_heads(snapshot, [layer_id], step)
        going, stays = without_children(snapshot, {layer_id})
        if stays:
            children = ", ".join(snapshot.children[layer_id])
            raise StoreError(
                f"layers build on it ({children}); on a store in a bucket only a layer no "
                "other builds on is deleted (a layer's objects there never change)",
                layer=layer_id,
                step=step,
            )
        result, changed = _finish(
            bucket, step, going, snapshot.manifest_sha256, known, _sizes(snapshot), dry_run=dry_run
        )
    if changed:
        bucket.trim(removed_only=True)
    return result


def prune(
    bucket: BucketStore,
    rules: KeepRules,
    *,
    guest: str | None = None,
    dry_run: bool = False,
    now: datetime | None = None,
    tz: tzinfo | None = None,
) -> Result:
    """Remove the layers of the bucket ``rules`` do not keep (see maintenance.prune) and no
    kept layer builds on."""
    if not rules.any():
        raise UsageError(
            "give at least one --keep-* rule (a prune without one would remove every layer "
            "but the heads)"
        )
    step = "prune"
    with bucket.local.maintenance_lock(step):
        snapshot, known = _take(bucket, step)
        remove, kept = prune_selection(
            snapshot, rules, guest=guest, now=now, tz=tz, scope_ids=known
        )
        going, stays = without_children(snapshot, remove)
        for layer_id in stays:
            kept[layer_id] = KEPT_CHILDREN
        result, changed = _finish(
            bucket, step, going, snapshot.manifest_sha256, known, _sizes(snapshot),
            dry_run=dry_run, kept=kept,
        )  # fmt: skip
    if changed:
        bucket.trim(removed_only=True)
    return result


@dataclass(frozen=True)
class Squashed:
    """What a squash on a store in a bucket did: ``layer`` (new, or None in a dry run)
    composes to what ``top`` composed to, on ``parent``; ``result.removed`` went."""

    result: Result
    top: str
    parent: str | None
    layer: str | None


def squash(
    bucket: BucketStore, first_ref: str | None, last_ref: str, *, dry_run: bool = False
) -> Squashed:
    """``first_ref`` None: replace ``last_ref``'s chain with one new base layer; else replace
    the run ``first_ref``..``last_ref`` of one chain with one new layer on ``first_ref``'s
    parent. The new layer composes to what ``last_ref`` did (and keeps its ``created``);
    it is written in the working copy, uploaded, and named by the same swap of the catalog
    that removes the layers it replaces. ``last_ref`` must be no guest's head and no other
    layer's parent (it is replaced); a layer of the run that is, or that another layer
    builds on, stays."""
    step = "squash"
    last = bucket.fetch(last_ref)[0]  # the chain, here (before the lock: a fetch takes it)
    with bucket.local.maintenance_lock(step):
        snapshot, known = _take(bucket, step)
        if last not in known:
            raise StoreError(
                f"it is not in bucket {bucket.name} (not uploaded yet): `vmckpt push` it first",
                layer=last,
                step=step,
            )
        chain = snapshot.chain_ids(last)
        parent: str | None = None
        run = chain
        if first_ref is not None:
            first = bucket.resolve(first_ref, step)
            if first not in chain or first == last:
                raise UsageError(
                    f"{first} is not an older layer of {last}'s chain (squash FROM..TO takes a "
                    "run of one chain, oldest first)"
                )
            run = chain[: chain.index(first) + 1]
            parent = snapshot.manifests[first].parent
        if len(run) == 1:
            return Squashed(Result(step, (), (), 0, dry_run), last, parent, None)
        holders = snapshot.heads.get(last)
        children = snapshot.children.get(last)
        if holders or children:
            why = f"the head of {', '.join(holders)}" if holders else "layers build on it"
            raise StoreError(
                f"it is {why}; on a store in a bucket squash replaces it with a new layer, so "
                "it must be a layer no guest's head or other layer names",
                layer=last,
                step=step,
            )
        candidates = [i for i in run if i not in snapshot.heads]
        going, _stays = without_children(snapshot, candidates)
        freed = sum(snapshot.manifests[i].bytes_total for i in going)
        if dry_run:
            return Squashed(Result(step, tuple(sorted(going)), (), freed, True), last, parent, None)
        local = bucket.local
        temp, digest = build_squashed(local, snapshot, last, run[1:], parent)
        try:
            local.publish(temp, digest, parent, None)
        except BaseException:
            local.files.remove(temp.name)
            raise
        finally:
            temp.close()
        new = temp.layer_id
        try:
            removed = bucket.remove(
                {i: snapshot.manifest_sha256[i] for i in going}, known, step, add=new
            )
        except BaseException:
            # Not named by the bucket: the new layer goes from the working copy too.
            with local.lock(step):
                local.update_catalog(step, drop=[new])
            local.files.remove(new)
            raise
        try:
            bucket.delete_objects(removed, step)
        except BucketError as exc:  # committed: any host's gc deletes them later
            _log.warning("%s; `vmckpt gc` deletes the removed layers' objects", exc.one_line())
        freed -= local.manifest(new, step).bytes_total
    bucket.trim(removed_only=True)
    return Squashed(Result(step, tuple(removed), (), freed, False), last, parent, new)
