"""Guests on other hosts: copy layers and media there, restore there, and keep a record here.

A guest vmckpt runs on another host is recorded in the local store as
``guests/<name>/remote.json`` (host, the store there, how to reach it), so
``list``, ``console``, ``checkpoint`` and ``stop`` run the same command on that
host and relay its output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from vmckpt.atomic import write_json_atomic
from vmckpt.errors import RemoteError, UsageError, VmckptError
from vmckpt.images import LayerManifest, Store
from vmckpt.images.format import MANIFEST
from vmckpt.machine import GuestSpec
from vmckpt.remote.endpoint import DEFAULT_REMOTE_PYTHON, Endpoint
from vmckpt.remote.media import MEDIA_DIR
from vmckpt.remote.ssh import HostAddress, SshHost, SshOptions

REMOTE_RECORD = "remote.json"
DEFAULT_REMOTE_STORE = ".vmckpt/store"  # relative to the remote user's home


@dataclass(frozen=True)
class RemoteTarget:
    """Where and how to reach another host's store."""

    address: HostAddress
    store: str = DEFAULT_REMOTE_STORE
    python: str = DEFAULT_REMOTE_PYTHON
    ssh: SshOptions = field(default_factory=SshOptions)

    def connect(self) -> tuple[SshHost, Endpoint]:
        host = SshHost(self.address, self.ssh).connect()
        return host, Endpoint(self.store, host, self.python)


@dataclass(frozen=True)
class RemoteRecord:
    """The local store's note that guest ``name`` runs on another host."""

    name: str
    target: RemoteTarget

    def save(self, store: Store) -> None:
        path = store.guest_dir(self.name) / REMOTE_RECORD
        data = {
            "name": self.name,
            "host": str(self.target.address),
            "store": self.target.store,
            "python": self.target.python,
            "ssh": self.target.ssh.to_dict(),
        }
        write_json_atomic(path, data)

    @classmethod
    def load(cls, store: Store, name: str) -> RemoteRecord | None:
        path = store.path / "guests" / name / REMOTE_RECORD
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            target = RemoteTarget(
                address=HostAddress.parse(str(data["host"])),
                store=str(data["store"]),
                python=str(data.get("python") or DEFAULT_REMOTE_PYTHON),
                ssh=SshOptions.from_dict(dict(data.get("ssh") or {})),
            )
        except (OSError, ValueError, KeyError, TypeError, UsageError) as exc:
            raise RemoteError(f"cannot read {path}: {exc}", vm=name, step="load") from exc
        return cls(name, target)

    @staticmethod
    def forget(store: Store, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (store.path / "guests" / name / REMOTE_RECORD).unlink()


def remote_names(store: Store) -> list[str]:
    root = store.path / "guests"
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / REMOTE_RECORD).is_file())


# -- layers and media -----------------------------------------------------------


@dataclass(frozen=True)
class ShipResult:
    copied: list[str]
    reused: list[str]
    bytes_sent: int
    seconds: float


def _manifest_sha256(store: Store, layer_id: str) -> str:
    return hashlib.sha256((store.layers_path / layer_id / MANIFEST).read_bytes()).hexdigest()


def ship_layers(store: Store, chain: list[LayerManifest], endpoint: Endpoint) -> ShipResult:
    """Copy to ``endpoint`` the layers of ``chain`` it lacks; each is checked there.

    A layer is copied into ``layers/.tmp-<id>-<random>/`` over SFTP, its
    manifest last; the agent there checks every file against the manifest (and
    the manifest against ours) before renaming it into place, so a broken or
    partial copy never becomes a layer. A layer the other store has under the
    same id must have the same manifest, byte for byte.
    """
    assert endpoint.ssh is not None
    host = endpoint.host
    started = time.monotonic()
    prepared = endpoint.call("prepare", timeout=60)
    remote_store = str(prepared["store"])
    theirs: dict[str, str] = dict(prepared.get("layers") or {})
    missing = [m for m in chain if m.id not in theirs]
    for manifest in chain:
        if manifest.id in theirs and theirs[manifest.id] != _manifest_sha256(store, manifest.id):
            raise RemoteError(
                f"its store {remote_store} has a different layer under the same id",
                host=host,
                layer=manifest.id,
                step="copy-layers",
            )
    need = sum(m.bytes_total for m in missing)
    free = int(prepared.get("free_bytes") or 0)
    if need > free:
        raise RemoteError(
            f"its store {remote_store} has {free} bytes free, the layers need {need}",
            host=host,
            step="copy-layers",
        )
    sftp = endpoint.ssh.sftp()
    sent = 0
    for manifest in missing:
        sent += _copy_layer(store, manifest, endpoint, sftp, remote_store)
    return ShipResult(
        copied=[m.id for m in missing],
        reused=[m.id for m in chain if m.id in theirs],
        bytes_sent=sent,
        seconds=time.monotonic() - started,
    )


def _copy_layer(
    store: Store,
    manifest: LayerManifest,
    endpoint: Endpoint,
    sftp: paramiko.SFTPClient,
    remote_store: str,
) -> int:
    host = endpoint.host
    tmp_name = f".tmp-{manifest.id}-{secrets.token_hex(4)}"
    tmp = f"{remote_store}/layers/{tmp_name}"
    local = store.layers_path / manifest.id
    sent = 0
    try:
        sftp.mkdir(tmp, 0o700)
        for name in [*sorted(manifest.files), MANIFEST]:  # the manifest last
            remote_file = f"{tmp}/{name}"
            sftp.put(str(local / name), remote_file, confirm=True)
            sftp.chmod(remote_file, 0o600)
            sent += (local / name).stat().st_size
    except (OSError, paramiko.SSHException) as exc:
        with contextlib.suppress(VmckptError):
            endpoint.call("commit-layer", "--id", manifest.id, "--tmp", tmp_name, "--discard")
        raise RemoteError(
            f"copying to {tmp} failed: {exc} (nothing was added to its store)",
            host=host,
            layer=manifest.id,
            step="copy-layers",
        ) from exc
    endpoint.call(
        "commit-layer",
        "--id",
        manifest.id,
        "--tmp",
        tmp_name,
        "--manifest-sha256",
        _manifest_sha256(store, manifest.id),
    )
    return sent


def ship_media(spec: GuestSpec, endpoint: Endpoint, vm: str) -> int:
    """Make sure the other host has every boot medium (by sha256); copy those it lacks."""
    assert endpoint.ssh is not None
    media = [dataclasses.asdict(m) for m in spec.media]
    found = endpoint.call("media", "--media", json.dumps(media), timeout=120)["media"]
    sftp = endpoint.ssh.sftp()
    sent = 0
    prepared = endpoint.call("prepare", timeout=60)
    remote_store = str(prepared["store"])
    for medium, where in zip(spec.media, found, strict=True):
        if where["found"]:
            continue
        local = Path(medium.path)
        medium.check(vm)
        folder = f"{remote_store}/{MEDIA_DIR}/{medium.sha256}"
        target = f"{folder}/{local.name}"
        try:
            for part in (f"{remote_store}/{MEDIA_DIR}", folder):
                with contextlib.suppress(OSError):
                    sftp.mkdir(part, 0o700)
            sftp.put(str(local), target + ".part", confirm=True)
            sftp.posix_rename(target + ".part", target)
        except (OSError, paramiko.SSHException) as exc:
            raise RemoteError(
                f"copying {medium.role} {local} to {target} failed: {exc}",
                host=endpoint.host,
                vm=vm,
                step="copy-media",
            ) from exc
        sent += local.stat().st_size
    if sent:
        again = endpoint.call("media", "--media", json.dumps(media), timeout=120)["media"]
        lacking = [m["role"] for m in again if not m["found"]]
        if lacking:
            raise RemoteError(
                f"boot media {lacking} do not match their sha256 after the copy",
                host=endpoint.host,
                vm=vm,
                step="copy-media",
            )
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "layer": self.layer,
            "host": self.host,
            "remote_store": self.remote_store,
            "pid": self.pid,
            "layers_copied": self.copied,
            "layers_reused": self.reused,
            "bytes_sent": self.bytes_sent,
            "copy_s": round(self.copy_s, 3),
            "total_s": round(self.total_s, 3),
        }


def restore_remote(
    store: Store, layer_ref: str | None, name: str | None, target: RemoteTarget
) -> RemoteRestoreResult:
    """Restore a layer on another host: copy what it lacks, restore there, record it here."""
    started = time.monotonic()
    ids = store.layer_ids()
    if not ids:
        raise RemoteError(f"store {store.path} holds no layers", step="resolve")
    layer_id = store.resolve(layer_ref) if layer_ref else ids[-1]
    store.verify(layer_id)  # never ship a damaged chain
    chain = store.chain(layer_id)
    name = name or chain[-1].guest
    existing = RemoteRecord.load(store, name)
    if existing is not None:
        raise RemoteError(
            f"a guest of this name is recorded on {existing.target.address} already; "
            "stop it or restore with --name",
            vm=name,
            step="restore",
        )
    spec = GuestSpec.from_dict(chain[-1].spec)
    ssh, endpoint = target.connect()
    with ssh:
        shipped = ship_layers(store, chain, endpoint)
        ship_media(spec, endpoint, name)
        copied = time.monotonic()
        code, out, err = endpoint.vmckpt(
            "restore", "--store", target.store, "--layer", layer_id, "--name", name,
            "--detach", "--json",
        )  # fmt: skip
        if code != 0:
            raise RemoteError(
                f"restore there failed: {_last_line(err)}", host=ssh.name, vm=name, layer=layer_id,
                step="restore",
            )  # fmt: skip
        result = json.loads(out)
    RemoteRecord(name, target).save(store)
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


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no output)"


# -- relayed commands -------------------------------------------------------------


def relay(store: Store, record: RemoteRecord, command: str, *args: str) -> int:
    """Run ``vmckpt COMMAND NAME --store REMOTE ARGS`` there; copy its output here."""
    ssh, endpoint = record.target.connect()
    with ssh:
        channel = ssh.open(
            [
                *endpoint._argv("vmckpt", []),
                command, record.name, "--store", record.target.store, *args,
            ],
            step=command,
        )  # fmt: skip
        try:
            while True:
                try:
                    line = channel.read_line(3600)
                except TimeoutError:
                    continue
                if line is None:
                    break
                sys.stdout.write(line + "\n")
                sys.stdout.flush()
        except KeyboardInterrupt:
            pass
        finally:
            err = channel.stderr()
            code = channel.exit_status(10)
            channel.close()
    if err.strip():
        sys.stderr.write(f"{err.rstrip()} [on {record.target.address}]\n")
    if command == "stop" and code == 0:
        RemoteRecord.forget(store, record.name)
    return code if code >= 0 else 1


def remote_status(record: RemoteRecord) -> dict[str, Any]:
    """The guest's row from ``vmckpt list --json`` there, with its host; 'unreachable' if not."""
    row: dict[str, Any] = {
        "name": record.name,
        "host": str(record.target.address),
        "running": False,
        "pid": None,
        "head": None,
        "state": "unreachable",
    }
    try:
        ssh, endpoint = record.target.connect()
        with ssh:
            code, out, _ = endpoint.vmckpt("list", "--store", record.target.store, "--json")
    except VmckptError:
        return row
    if code != 0:
        return row
    for guest in json.loads(out).get("guests", []):
        if guest.get("name") == record.name:
            row.update(guest)
            row["host"] = str(record.target.address)
            return row
    row["state"] = "gone"
    return row
