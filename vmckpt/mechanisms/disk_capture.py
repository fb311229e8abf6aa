"""Writable disks at a checkpoint: captured at the very instant memory is.

A writable disk (raw or qcow2; virtio-blk in a vmckpt guest, any bus in a libvirt
domain) is captured with QEMU's block dirty bitmaps and an incremental backup job,
so a layer holds only the disk clusters written since its parent. A libvirt domain's
QEMU runs as another user: its tracker (``by_fd``) hands it the scratch images as
file descriptors (``add-fd``, ``/dev/fdset/N``), never paths it would have to open.
Read-only disks are referenced by path and sha256 in the spec (vmckpt/machine/spec.py),
never copied.

:class:`DiskTracker` is independent of how memory is captured; a checkpoint
calls, in order:

- :meth:`DiskTracker.prepare` (guest running): scratch backup targets are
  created and attached to QEMU as block nodes (they are not visible to the guest);
- :meth:`DiskTracker.mark_instant` (guest stopped, at the memory instant;
  fast): one QMP ``transaction`` adds a fresh dirty bitmap per disk and
  starts a point-in-time backup job per disk (copy-before-write): clusters
  dirty since the parent (bitmap ``bitmap-mode: never``, so the parent's
  bitmap is left as it was), or the whole disk when there is no usable bitmap.
  After a migration completed, QEMU has inactivated the block nodes; they
  are activated again first (``blockdev-set-active``, QEMU 10+);
- :meth:`DiskTracker.collect` (guest running again): waits for the jobs,
  detaches the targets and reads the clusters they hold into :class:`DiskDelta` s;
- :meth:`DiskTracker.commit` once the layer is written (drops the parent's
  bitmap: the new one now tracks writes since the new layer), or
  :meth:`DiskTracker.abort` on any failure (cancels jobs, detaches targets,
  removes the new bitmaps; the parent's bitmap still holds every write since
  the parent, so the next checkpoint loses nothing).

The new bitmap's name is recorded in the layer (``bitmap`` of its disk
record); the next checkpoint uses it if the guest still has it, else takes
the disk in full. A restore recreates that bitmap (vmckpt/mechanisms/disk_restore.py).

A COLO session (vmckpt/mechanisms/colo.py) makes one tracker per checkpoint: ``since``
names the bitmaps the previous checkpoint of the session started (its layer
may not be written yet), ``activate`` is off (COLO keeps the block nodes
active), and ``fleecing`` is on, since the instant lies inside the guest's
pause and must cost it as little as possible:

- :meth:`DiskTracker.prepare` also attaches a *fleece* image per disk;
- :meth:`DiskTracker.arm`, just before the checkpoint is asked for (guest
  running), adds the new dirty bitmap: it tracks writes from a few
  milliseconds before the instant, so the next layer may hold a cluster twice,
  never too few;
- the instant (:meth:`DiskTracker.begin_instant`, sent as soon as QEMU has
  stopped the guest, and :meth:`DiskTracker.end_instant`, before vmckpt
  acknowledges) is one ``blockdev-backup`` with ``sync: none`` per disk into
  its fleece image: it only inserts a copy-before-write filter (named), which
  from then on copies a cluster's old content into the fleece image before
  the guest overwrites it — no copying, no bitmap work in the pause;
- :meth:`DiskTracker.collect` (guest running) opens a ``snapshot-access``
  node on that filter (the disk as it was at the instant), copies the
  clusters dirty since the parent from it into the scratch target with a
  second backup job, then ends the fleecing job and detaches it all.

Measured on QEMU 11.1 (TCG, 2 shared cores, ~170 pages per checkpoint, pause
medians of 60): 2.9 ms without disk capture, 5.5 ms with the bitmap and a
``sync: bitmap`` backup in one transaction in the pause, 4.5 ms with the
bitmap added before the pause, 3.3 ms so (README, *Writable disks under COLO*).

What a checkpoint that died left in QEMU (jobs, target nodes, bitmaps other
than the head layer's) and in the scratch directory is removed by
:func:`clear_leftovers`: by the next checkpoint's :meth:`DiskTracker.prepare`,
by a COLO session as it ends, and by the guard (vmckpt/guard.py) of a vmckpt
that was killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vmckpt import log
from vmckpt.errors import CheckpointError, QMPError, VmckptError
from vmckpt.images import DiskDelta, LayerManifest, Store
from vmckpt.machine.binary import qemu_img
from vmckpt.machine.spec import DiskSpec
from vmckpt.qmp import Monitor, Pending

JOB_POLL_S = 0.05
JOB_CANCEL_TIMEOUT_S = 10.0
JOB_EVENT = "JOB_STATUS_CHANGE"
BACKUP_PREFIX = "vmckpt-backup-"  # the backup jobs and target nodes of a checkpoint
BITMAP_PREFIX = "vmckpt-"  # the dirty bitmaps vmckpt adds
TARGET_GLOB = "backup-*"  # a checkpoint's scratch files (targets and the data read from them)
_log = log.get(__name__)


@dataclass
class _Capture:
    """One writable disk's state during one checkpoint."""

    disk: DiskSpec
    target: Path
    target_node: str
    job: str
    old_bitmap: str | None  # tracks writes since the parent layer; None: take it in full
    new_bitmap: str
    attached: bool = False
    started: bool = False
    fleece: Path | None = None  # fleecing: the copy-before-write target, attached if set
    armed: bool = False  # fleecing: the new bitmap was added (before the pause)
    fdsets: list[int] = field(default_factory=list)  # by_fd: the fd sets QEMU opens them by

    @property
    def fleece_node(self) -> str:
        return f"{BACKUP_PREFIX}fleece-{self.disk.id}"

    @property
    def fleece_job(self) -> str:
        return f"{BACKUP_PREFIX}fleece-{self.disk.id}"

    @property
    def filter_node(self) -> str:
        return f"{BACKUP_PREFIX}cbw-{self.disk.id}"

    @property
    def access_node(self) -> str:
        return f"{BACKUP_PREFIX}access-{self.disk.id}"


@dataclass
class DiskTracker:
    """Captures a guest's writable disks at one checkpoint instant (see the module doc)."""

    vm: str
    disks: Sequence[DiskSpec]
    parent: LayerManifest | None
    scratch: Path
    job_timeout_s: float = 300.0
    # Per disk id, the bitmap that tracks writes since the parent (a COLO session: the one
    # its previous checkpoint started); None: the parent layer's record says.
    since: Mapping[str, str] | None = None
    # mark_instant activates the block nodes first (a completed migration inactivated them;
    # COLO leaves them active).
    activate: bool = True
    # The instant as a sync=none backup into a fleece image (see the module doc): the least
    # work inside the guest's pause; the new bitmaps are added before it (arm).
    fleecing: bool = False
    # Hand QEMU its scratch images as file descriptors (QMP add-fd, /dev/fdset/N), never by
    # path: a libvirt domain's QEMU runs as another user, who cannot open vmckpt's files.
    by_fd: bool = False
    _captures: list[_Capture] = field(default_factory=list)
    _started: dict[str, str] = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self._captures)

    @property
    def new_bitmaps(self) -> dict[str, str]:
        """Per disk id, the bitmap this checkpoint started at its instant (it tracks writes
        since then); kept after :meth:`commit`."""
        return dict(self._started)

    def _tracked_since(self, disk: DiskSpec) -> str | None:
        if self.since is not None:
            return self.since.get(disk.id)
        record = self.parent.disk(disk.id) if self.parent else None
        return record.bitmap if record else None

    def _keep(self) -> set[str]:
        """The bitmaps that must survive a clean-up: what this checkpoint builds on."""
        keep = {d.bitmap for d in self.parent.disks if d.bitmap} if self.parent else set()
        keep.update((self.since or {}).values())
        return keep

    def _fail(self, message: str, step: str) -> CheckpointError:
        return CheckpointError(message, vm=self.vm, step=step)

    def prepare(self, mon: Monitor, *, clear: bool = True) -> None:
        """Create and attach a backup target per writable disk; choose full or incremental.

        ``clear``: first remove what a checkpoint that died left (off within a COLO session,
        which owns every vmckpt object in QEMU and removes them itself)."""
        writable = [d for d in self.disks if not d.readonly]
        if not writable:
            return
        if clear:
            try:
                clear_leftovers(mon, vm=self.vm, keep=self._keep(), scratch=self.scratch)
            except QMPError as exc:
                raise self._fail(f"cannot clear a dead checkpoint's leftovers: {exc.message}",
                                 "disk-prepare") from exc  # fmt: skip
        nodes = {node.node_name: node for node in mon.block_nodes()}
        self.scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
        token = secrets.token_hex(4)
        try:
            for disk in writable:
                node = nodes.get(disk.node)
                if node is None:
                    raise self._fail(f"QEMU has no block node {disk.node}", "disk-prepare")
                tracked = self._tracked_since(disk)
                old = tracked if tracked in node.bitmaps else None
                capture = _Capture(
                    disk=disk,
                    target=self.scratch / f"backup-{disk.id}-{token}.qcow2",
                    target_node=f"{BACKUP_PREFIX}{disk.id}",
                    job=f"{BACKUP_PREFIX}{disk.id}",
                    old_bitmap=old,
                    new_bitmap=f"{BITMAP_PREFIX}{token}",
                )
                self._captures.append(capture)
                # The name is taken with O_EXCL (a scratch file is never reused), then
                # qemu-img writes the image into it.
                os.close(os.open(capture.target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                # A backing node makes QEMU record zeroed clusters in the target (instead
                # of leaving them unallocated), so the target tells covered from not covered.
                qemu_img(
                    "create", "-q", "-f", "qcow2", "-F", "raw", "-b", "null-co://", "-u",
                    str(capture.target), str(disk.size),
                    vm=self.vm, step="disk-prepare",
                )  # fmt: skip
                if capture.target_node in nodes:
                    raise self._fail(
                        f"block node {capture.target_node} exists: another checkpoint is running?",
                        "disk-prepare",
                    )
                mon.blockdev_add(
                    {
                        "driver": "qcow2",
                        "node-name": capture.target_node,
                        "file": {
                            "driver": "file",
                            "filename": self._filename(mon, capture, capture.target),
                            "locking": "off",
                        },
                        "backing": {"driver": "null-co", "size": disk.size, "read-zeroes": True},
                        # A scratch file: vmckpt reads it after the job, QEMU never needs it
                        # durable (no fsync when the job allocates clusters in the pause).
                        "cache": {"no-flush": True},
                    }
                )
                capture.attached = True
                if self.fleecing:
                    self._attach_fleece(mon, capture, token, nodes)
        except QMPError as exc:
            self.abort(mon)
            raise self._fail(exc.message, "disk-prepare") from exc
        except OSError as exc:  # a scratch file that cannot be made (or exists already)
            self.abort(mon)
            raise self._fail(f"scratch file: {exc}", "disk-prepare") from exc
        except BaseException:
            self.abort(mon)
            raise

    def _attach_fleece(
        self, mon: Monitor, capture: _Capture, token: str, nodes: Mapping[str, object]
    ) -> None:
        """The image the copy-before-write filter copies old clusters into (a scratch file,
        never flushed), attached to QEMU."""
        if capture.fleece_node in nodes:
            raise self._fail(f"block node {capture.fleece_node} exists: another checkpoint is "
                             "running?", "disk-prepare")  # fmt: skip
        fleece = self.scratch / f"backup-{capture.disk.id}-{token}.fleece.qcow2"
        os.close(os.open(fleece, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        capture.fleece = fleece
        qemu_img("create", "-q", "-f", "qcow2", str(fleece), str(capture.disk.size),
                 vm=self.vm, step="disk-prepare")  # fmt: skip
        mon.blockdev_add(
            {
                "driver": "qcow2",
                "node-name": capture.fleece_node,
                "file": {
                    "driver": "file",
                    "filename": self._filename(mon, capture, fleece),
                    "locking": "off",
                },
                "cache": {"no-flush": True},
            }
        )

    def _filename(self, mon: Monitor, capture: _Capture, path: Path) -> str:
        """What QEMU opens ``path`` as: the path, or (``by_fd``) an fd set holding it."""
        if not self.by_fd:
            return str(path)
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            fdset = mon.add_fd(fd, f"{BACKUP_PREFIX}{capture.disk.id}")
        finally:
            os.close(fd)  # QEMU holds its own copy
        capture.fdsets.append(fdset)
        return f"/dev/fdset/{fdset}"

    def _remove_fdsets(self, mon: Monitor, capture: _Capture) -> None:
        while capture.fdsets:
            with contextlib.suppress(QMPError):
                mon.remove_fdset(capture.fdsets[-1])
            capture.fdsets.pop()

    def arm(self, mon: Monitor) -> None:
        """Fleecing: add the new bitmaps now, just before the checkpoint is asked for (the
        guest runs: a few writes before the instant are tracked twice, none lost)."""
        if not self.fleecing:
            return
        try:
            for capture in self._captures:
                if not capture.armed:
                    mon.bitmap_add(capture.disk.node, capture.new_bitmap)
                    capture.armed = True
        except QMPError as exc:
            raise self._fail(exc.message, "disk-arm") from exc

    def mark_instant(self, mon: Monitor) -> None:
        """The disk point, while the guest is stopped: new bitmaps and backup jobs, atomically."""
        self.end_instant(mon, self.begin_instant(mon))

    def begin_instant(self, mon: Monitor) -> Pending | None:
        """Send the instant's ``transaction`` (the guest is stopped); :meth:`end_instant`
        takes QEMU's answer, which must come before the guest runs again. Nothing else may
        use ``mon`` in between. None: no writable disk."""
        if not self._captures:
            return None
        if self.fleecing:
            return self._begin_fleecing(mon)
        try:
            if self.activate:
                with contextlib.suppress(QMPError):  # QEMU < 10 lacks it; nodes are active there
                    mon.blockdev_set_active(True)
            actions: list[tuple[str, dict[str, object]]] = []
            for capture in self._captures:
                actions.append(
                    (
                        "block-dirty-bitmap-add",
                        {"node": capture.disk.node, "name": capture.new_bitmap},
                    )
                )
                backup: dict[str, object] = {
                    "device": capture.disk.node,
                    "target": capture.target_node,
                    "job-id": capture.job,
                    "auto-finalize": True,
                    "auto-dismiss": False,
                }
                if capture.old_bitmap is None:
                    backup["sync"] = "full"
                else:
                    backup.update(
                        sync="bitmap", bitmap=capture.old_bitmap, **{"bitmap-mode": "never"}
                    )
                actions.append(("blockdev-backup", backup))
            return mon.submit_transaction(actions)
        except QMPError as exc:
            raise self._fail(exc.message, "disk-instant") from exc

    def _begin_fleecing(self, mon: Monitor) -> Pending:
        """One sync=none backup per disk into its fleece image, through a named filter."""
        if not all(c.armed and c.fleece for c in self._captures):
            raise self._fail("the disks were not armed before the instant", "disk-instant")
        actions: list[tuple[str, dict[str, object]]] = [
            (
                "blockdev-backup",
                {
                    "device": c.disk.node,
                    "target": c.fleece_node,
                    "job-id": c.fleece_job,
                    "sync": "none",
                    "filter-node-name": c.filter_node,
                    "auto-dismiss": False,
                },
            )
            for c in self._captures
        ]
        try:
            if len(actions) == 1:  # one command costs less than a transaction of one
                return mon.submit(*actions[0])
            return mon.submit_transaction(actions)
        except QMPError as exc:
            raise self._fail(exc.message, "disk-instant") from exc

    def _copy_from_snapshots(self, mon: Monitor) -> None:
        """Fleecing, the guest running: per disk, the disk as it was at the instant
        (snapshot-access on the filter), and a backup job of its clusters dirty since the
        parent (a copy of the parent's bitmap on that node) into the scratch target."""
        for c in self._captures:
            mon.blockdev_add(
                {"driver": "snapshot-access", "node-name": c.access_node, "file": c.filter_node}
            )
            backup: dict[str, object] = {
                "device": c.access_node,
                "target": c.target_node,
                "job-id": c.job,
                "auto-finalize": True,
                "auto-dismiss": False,
            }
            if c.old_bitmap is None:
                backup["sync"] = "full"
            else:
                copy = f"{BITMAP_PREFIX}copy"
                mon.bitmap_add(c.access_node, copy)
                mon.execute(
                    "block-dirty-bitmap-merge",
                    {
                        "node": c.access_node,
                        "target": copy,
                        "bitmaps": [{"node": c.disk.node, "name": c.old_bitmap}],
                    },
                )
                backup.update(sync="bitmap", bitmap=copy, **{"bitmap-mode": "never"})
            mon.execute("blockdev-backup", backup)

    def _end_fleecing(self, mon: Monitor) -> None:
        """Fleecing, once the copies are done: the snapshot nodes, jobs and images go."""
        for c in self._captures:
            mon.blockdev_del(c.access_node)
            mon.job_cancel(c.fleece_job)
            _wait_job_gone(mon, c.fleece_job)
            mon.job_dismiss(c.fleece_job)
            mon.blockdev_del(c.fleece_node)

    def end_instant(
        self, mon: Monitor, pending: Pending | None, *, timeout: float | None = None
    ) -> None:
        """QEMU's answer to :meth:`begin_instant`'s command: the jobs run from here.
        ``timeout``: how long the guest may stay stopped for it (default: the monitor's)."""
        if pending is None:
            return
        try:
            mon.reply(pending, timeout=timeout)
        except QMPError as exc:
            raise self._fail(exc.message, "disk-instant") from exc
        for capture in self._captures:
            capture.started = True
            self._started[capture.disk.id] = capture.new_bitmap

    def collect(self, mon: Monitor) -> list[DiskDelta]:
        """Wait for the backup jobs, detach the targets, return each disk's delta."""
        if not self._captures:
            return []
        try:
            if self.fleecing:
                self._copy_from_snapshots(mon)
            deadline = time.monotonic() + self.job_timeout_s
            pending = {c.job for c in self._captures}
            while pending:
                mark = mon.mark()  # before asking: a job that concludes after is an event
                jobs = mon.jobs()
                for job_id in list(pending):
                    info = jobs.get(job_id)
                    if info is None:
                        raise self._fail(f"backup job {job_id} vanished", "disk-collect")
                    if info.status == "concluded":
                        if info.error:
                            raise self._fail(f"backup job {job_id}: {info.error}", "disk-collect")
                        mon.job_dismiss(job_id)
                        pending.discard(job_id)
                if pending and time.monotonic() > deadline:
                    raise self._fail(
                        f"backup jobs {sorted(pending)} did not finish in {self.job_timeout_s} s",
                        "disk-collect",
                    )
                if pending:
                    with contextlib.suppress(QMPError):  # none came: ask again
                        mon.wait_event(
                            {JOB_EVENT},
                            min(1.0, max(0.01, deadline - time.monotonic())),
                            lambda e: e.data.get("id") in pending,
                            since=mark,
                        )
            for capture in self._captures:
                mon.blockdev_del(capture.target_node)
                capture.attached = False
            if self.fleecing:
                self._end_fleecing(mon)
            for capture in self._captures:
                capture.started = False
                self._remove_fdsets(mon, capture)
        except QMPError as exc:
            raise self._fail(exc.message, "disk-collect") from exc
        return [self._read_target(capture) for capture in self._captures]

    def _read_target(self, capture: _Capture) -> DiskDelta:
        """The clusters a backup target holds: data extents copied out, zero extents listed."""
        entries = json.loads(
            qemu_img(
                "map", "--output=json", "-f", "qcow2", str(capture.target),
                vm=self.vm, step="disk-collect",
            )
        )  # fmt: skip
        stored: list[tuple[int, int]] = []
        zeroed: list[tuple[int, int]] = []
        data_path = capture.target.with_suffix(".bin")  # opened "xb": O_EXCL
        with capture.target.open("rb") as src, data_path.open("xb") as out:
            for entry in entries:
                if entry.get("depth") != 0 or not entry.get("present", True):
                    continue  # not covered by this delta: the backing node
                start, length = int(entry["start"]), int(entry["length"])
                if entry.get("data"):
                    if entry.get("compressed") or "offset" not in entry:
                        raise self._fail("backup target holds unreadable clusters", "disk-collect")
                    src.seek(int(entry["offset"]))
                    remaining = length
                    while remaining:
                        chunk = src.read(min(1 << 20, remaining))
                        if not chunk:
                            raise self._fail("backup target is truncated", "disk-collect")
                        out.write(chunk)
                        remaining -= len(chunk)
                    _append(stored, start, length)
                elif entry.get("zero"):
                    _append(zeroed, start, length)
        return DiskDelta(
            id=capture.disk.id,
            format=capture.disk.format,
            size=capture.disk.size,
            path=capture.disk.path,
            full=capture.old_bitmap is None,
            stored=tuple(stored),
            zeroed=tuple(zeroed),
            data_path=data_path,
            bitmap=capture.new_bitmap,
        )

    def commit(self, mon: Monitor) -> None:
        """The layer is written: the parent's bitmaps are no longer needed."""
        for capture in self._captures:
            if capture.old_bitmap is not None:
                with contextlib.suppress(QMPError):
                    mon.bitmap_remove(capture.disk.node, capture.old_bitmap)
        self._cleanup_files()
        self._captures = []

    def abort(self, mon: Monitor) -> None:
        """Undo everything this checkpoint added to QEMU: jobs, nodes, new bitmaps.

        Never raises; the guest's disk and the parent's bitmap are left as they were.
        """
        for capture in self._captures:
            with contextlib.suppress(QMPError):
                jobs = mon.jobs()
                for job in (capture.job, capture.fleece_job):
                    if job in jobs:
                        if jobs[job].status not in {"concluded", "null"}:
                            mon.job_cancel(job)
                            _wait_job_gone(mon, job)
                        mon.job_dismiss(job)
            with contextlib.suppress(QMPError):
                present = {n.node_name for n in mon.block_nodes()}
                ours = [capture.access_node, capture.target_node, capture.fleece_node]
                _delete_nodes(mon, [n for n in ours if n in present])
            self._remove_fdsets(mon, capture)
            with contextlib.suppress(QMPError):
                nodes = {n.node_name: n for n in mon.block_nodes()}
                node = nodes.get(capture.disk.node)
                if node is not None and capture.new_bitmap in node.bitmaps:
                    mon.bitmap_remove(capture.disk.node, capture.new_bitmap)
        self._cleanup_files()
        self._captures = []

    def _cleanup_files(self) -> None:
        for capture in self._captures:
            capture.target.unlink(missing_ok=True)
            capture.target.with_suffix(".bin").unlink(missing_ok=True)
            if capture.fleece is not None:
                capture.fleece.unlink(missing_ok=True)


def clear_leftovers(mon: Monitor, *, vm: str, keep: Collection[str], scratch: Path) -> bool:
    """Remove what checkpoints left in QEMU and in ``scratch``: their backup jobs and target
    nodes, and every vmckpt dirty bitmap not in ``keep`` (the bitmaps that track writes
    since the guest's head layer). Returns whether anything was found.

    The caller holds the guest's checkpoint lock, so no running checkpoint owns them.
    QMPError if QEMU refused a step (what came before it is done).
    """
    found = False
    for job_id, job in mon.jobs().items():
        if job_id.startswith(BACKUP_PREFIX):
            found = True
            if job.status not in {"concluded", "null"}:
                mon.job_cancel(job_id)
                _wait_job_gone(mon, job_id)
            with contextlib.suppress(QMPError):
                mon.job_dismiss(job_id)
    nodes = mon.block_nodes()
    ours = [node.node_name for node in nodes if node.node_name.startswith(BACKUP_PREFIX)]
    found = found or bool(ours)
    _delete_nodes(mon, ours)
    with contextlib.suppress(QMPError):  # QEMUs without fd sets have none of ours
        for fdset, opaques in mon.fdsets().items():
            if any(o.startswith(BACKUP_PREFIX) for o in opaques):
                found = True
                mon.remove_fdset(fdset)
    for node in nodes:
        if node.node_name.startswith(BACKUP_PREFIX):
            continue
        for bitmap in node.bitmaps:
            if bitmap.startswith(BITMAP_PREFIX) and bitmap not in keep:
                found = True
                mon.bitmap_remove(node.node_name, bitmap)
    for stale in scratch.glob(TARGET_GLOB) if scratch.is_dir() else ():
        found = True
        stale.unlink(missing_ok=True)
    if found:
        _log.info("%s: removed what an earlier checkpoint left (kept bitmaps %s)", vm,
                  ", ".join(sorted(keep)) or "none")  # fmt: skip
    return found


def _delete_nodes(mon: Monitor, names: Sequence[str]) -> None:
    """blockdev-del each node; a node still used by another of them (a snapshot-access node
    on a filter, a fleece image behind it) is retried once its user went. QMPError if some
    cannot go at all."""
    pending = sorted(names, key=lambda name: "-access-" not in name)  # the users first
    while pending:
        failed: list[str] = []
        last: QMPError | None = None
        for name in pending:
            try:
                mon.blockdev_del(name)
            except QMPError as exc:
                failed.append(name)
                last = exc
        if last is not None and len(failed) == len(pending):
            raise last
        pending = failed


def _wait_job_gone(mon: Monitor, job_id: str) -> None:
    deadline = time.monotonic() + JOB_CANCEL_TIMEOUT_S
    while time.monotonic() < deadline:
        info = mon.jobs().get(job_id)
        if info is None or info.status in {"concluded", "null"}:
            return
        time.sleep(JOB_POLL_S)


def head_bitmaps(store: Store, name: str, kind: str = "guest") -> set[str]:
    """The bitmaps the guest's head layer records: they track writes since that layer."""
    try:
        head = store.head(name, kind)
        manifest = store.manifest(head) if head else None
    except VmckptError as exc:
        _log.warning("%s: the head layer cannot be read (%s): no bitmap is kept", name,
                     exc.one_line())  # fmt: skip
        return set()
    return {d.bitmap for d in manifest.disks if d.bitmap} if manifest else set()


def has_scratch_leftovers(scratch: Path) -> bool:
    """Whether a checkpoint left scratch files (it was killed while it had disk targets)."""
    return scratch.is_dir() and any(scratch.glob(TARGET_GLOB))


def _append(extents: list[tuple[int, int]], start: int, length: int) -> None:
    """Add an extent, merging it with the previous one when they touch."""
    if extents and extents[-1][0] + extents[-1][1] == start:
        extents[-1] = (extents[-1][0], extents[-1][1] + length)
    else:
        extents.append((start, length))
