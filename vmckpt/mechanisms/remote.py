"""Guests on other hosts: copy layers and media there, restore there, and keep a record here.

A guest vmckpt runs on another host is recorded on this host, in its data
directory of the store (vmckpt/hostdirs.py; never in the store, which is
untrusted input), as the record ``remote.json`` of that guest (host, the
store there, how to reach it), so ``list``, ``console``, ``checkpoint`` and ``stop`` run the same
command on that host and relay its output (:class:`RemoteGuest`).

Layers and media travel through the agent there (vmckpt/remote/agent.py),
which writes them with that host's :class:`~vmckpt.images.Store`: nothing
here builds a path inside either store.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmckpt.errors import RemoteError
from vmckpt.guests.remote import RemoteTarget, load_remote_target, save_remote_record
from vmckpt.images import LayerManifest, Store
from vmckpt.images.transfer import layer_files
from vmckpt.machine.spec import GuestSpec
from vmckpt.progress import NO_PROGRESS, Progress
from vmckpt.remote.endpoint import (
    Endpoint,
    Session,
    agent_error,
    failure_of,
    read_until_end,
)

REMOTE_RECORD = "remote.json"
CHUNK = 1 << 20
TRANSFER_TIMEOUT_S = 3600.0


# -- layers and media -----------------------------------------------------------


@dataclass(frozen=True)
class ShipResult:
    copied: list[str]
    reused: list[str]
    bytes_sent: int
    seconds: float


def _finish(session: Session, endpoint: Endpoint, step: str) -> list[dict[str, Any]]:
    session.end_input()
    try:
        lines = read_until_end(session, TRANSFER_TIMEOUT_S, endpoint.host, step)
    finally:
        session.close()
    if not lines or "error" in lines[-1]:
        raise agent_error(lines[-1] if lines else {}, session, endpoint.host, step)
    return lines


def ship_layers(
    store: Store, chain: list[LayerManifest], endpoint: Endpoint, progress: Progress = NO_PROGRESS
) -> ShipResult:
    """Copy to ``endpoint`` the layers of ``chain`` it lacks; each is checked there.

    The agent there takes each layer's files from its stdin and publishes the
    layer only once every file matches the manifest and the manifest the one
    we have (its hash), so a broken or partial copy never becomes a layer. A
    layer the other store has under the same id must have the same manifest.
    """
    started = time.monotonic()
    prepared = endpoint.call("prepare", timeout=60)
    remote_store = str(prepared["store"])
    theirs: dict[str, str] = dict(prepared.get("layers") or {})
    ours = {m.id: store.manifest_sha256(m.id) for m in chain}
    for manifest in chain:
        if manifest.id in theirs and theirs[manifest.id] != ours[manifest.id]:
            raise RemoteError(
                f"its store {remote_store} has a different layer under the same id",
                host=endpoint.host,
                layer=manifest.id,
                step="copy-layers",
            )
    missing = [m for m in chain if m.id not in theirs]
    need = sum(m.bytes_total for m in missing)
    free = int(prepared.get("free_bytes") or 0)
    if need > free:
        raise RemoteError(
            f"its store {remote_store} has {free} bytes free, the layers need {need}",
            host=endpoint.host,
            step="copy-layers",
        )
    sent = 0
    if missing:
        session = endpoint.open("receive-layers", "--sender", socket.gethostname())
        with progress.task(
            f"copying {len(missing)} layer(s) to {endpoint.host}", need, unit="B"
        ) as task:
            for manifest in missing:
                files = layer_files(store, manifest.id)
                header = {
                    "layer": manifest.id,
                    "manifest_sha256": ours[manifest.id],
                    "files": [[name, size] for name, size, _content in files],
                }
                if not session.send_line(json.dumps(header)):
                    break
                # The content of each file (decrypted, if this store is encrypted: the other
                # store holds it as it holds its own).
                for _name, _size, content in files:
                    for chunk in content:
                        if not session.send_bytes(chunk):
                            break
                        sent += len(chunk)
                        task.advance(len(chunk))
            session.send_line(json.dumps({"end": True}))
        _finish(session, endpoint, "copy-layers")
    return ShipResult(
        copied=[m.id for m in missing],
        reused=[m.id for m in chain if m.id in theirs],
        bytes_sent=sent,
        seconds=time.monotonic() - started,
    )


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def ship_media(spec: GuestSpec, endpoint: Endpoint, vm: str) -> int:
    """Make sure the other host has every boot medium (by sha256); copy those it lacks."""
    media = [dataclasses.asdict(m) for m in spec.media]
    found = endpoint.call("media", "--media", json.dumps(media), timeout=120)["media"]
    sent = 0
    for medium, where in zip(spec.media, found, strict=True):
        if where["found"]:
            continue
        medium.check(vm)
        local = Path(medium.path)
        size = local.stat().st_size
        session = endpoint.open("receive-medium")
        header = {"sha256": medium.sha256, "name": local.name, "size": size}
        session.send_line(json.dumps(header))
        for chunk in _read_chunks(local):
            if not session.send_bytes(chunk):
                break
        _finish(session, endpoint, "copy-media")
        sent += size
    return sent


# -- restore on another host ----------------------------------------------------------


@dataclass(frozen=True)
class RemoteRestoreResult:
    name: str
    layer: str
    host: str
    remote_store: str
    pid: int
    copied: list[str]
    reused: list[str]
    bytes_sent: int
    copy_s: float
    total_s: float

    def summary(self) -> str:
        return (
            f"guest {self.name} restored from layer {self.layer} on {self.host} "
            f"(store {self.remote_store}), PID {self.pid} there  (copied {len(self.copied)} "
            f"layer(s), {self.bytes_sent} bytes, reused {len(self.reused)}; "
            f"total {self.total_s:.2f} s)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "host": self.host,
            "remote_store": self.remote_store,
            "pid": self.pid,
            "layers_copied": self.copied,
            "layers_reused": self.reused,
            "bytes": self.bytes_sent,
            "copy_s": round(self.copy_s, 3),
            "total_s": round(self.total_s, 3),
        }


def restore_remote(
    store: Store,
    layer_ref: str | None,
    name: str | None,
    target: RemoteTarget,
    *,
    qemu_args: tuple[str, ...] | None = None,
    options: tuple[str, ...] = (),
    progress: Progress = NO_PROGRESS,
) -> RemoteRestoreResult:
    """Restore a layer on another host: copy what it lacks, restore there, record it here.

    The other host seals the layers as come from this one, so it never uses their free-form
    QEMU arguments; ``qemu_args`` (the user's own, on this command line) are passed on, and
    so are the restore's ``options`` (``--lazy``/``--no-lazy``, ``--same-identity``,
    ``--watch S``): the vmckpt there restores lazily where its host allows it, its own page
    server serving the pages from its own store."""
    started = time.monotonic()
    layer_id = store.resolve(layer_ref) if layer_ref else store.newest()
    store.verify(layer_id)  # never ship a damaged chain
    chain = store.chain(layer_id)
    name = name or chain[-1].guest
    existing = load_remote_target(store, name)
    if existing is not None:
        raise RemoteError(
            f"a guest of this name is recorded on {existing.address} already; "
            "stop it or restore with --name",
            vm=name,
            step="restore",
        )
    spec = GuestSpec.from_dict(chain[-1].spec)
    ssh, endpoint = target.connect()
    with ssh:
        shipped = ship_layers(store, chain, endpoint, progress)
        ship_media(spec, endpoint, name)
        copied = time.monotonic()
        code, out, err = endpoint.vmckpt(
            "restore", "--store", target.store, "--layer", layer_id, "--name", name,
            "--detach", "--json", *options, *[f"--qemu-arg={arg}" for arg in qemu_args or ()],
        )  # fmt: skip
        if code != 0:
            raise failure_of(err, ssh.name, "restore")
        result = json.loads(out)
    save_remote_record(store, name, target)
    return RemoteRestoreResult(
        name=name,
        layer=layer_id,
        host=str(target.address),
        remote_store=target.store,
        pid=int(result["pid"]),
        copied=shipped.copied,
        reused=shipped.reused,
        bytes_sent=shipped.bytes_sent,
        copy_s=copied - started,
        total_s=time.monotonic() - started,
    )
