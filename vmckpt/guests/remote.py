"""A guest vmckpt runs on another host: every command runs there, with that host's vmckpt,
over SSH, and is relayed here (errors in vmckpt.errors' one shape, ``--json-errors``).

This host remembers such a guest in its data directory of the store (vmckpt/hostdirs.py;
never in the store, which is untrusted input: what the record says is run and connected to)
as the record ``remote.json`` (host, the store there, how to reach it).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from vmckpt.errors import RemoteError, UsageError, VmckptError
from vmckpt.guests.base import Guest, GuestStatus
from vmckpt.guests.local import REMOTE_RECORD
from vmckpt.images import Store
from vmckpt.remote import DEFAULT_REMOTE_STORE
from vmckpt.remote.endpoint import DEFAULT_REMOTE_PYTHON, Endpoint, failure_of
from vmckpt.remote.ssh import HostAddress, SshHost, SshOptions


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": str(self.address),
            "store": self.store,
            "python": self.python,
            "ssh": self.ssh.to_dict(),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RemoteTarget:
        return cls(
            address=HostAddress.parse(str(data["host"])),
            store=str(data["store"]),
            python=str(data.get("python") or DEFAULT_REMOTE_PYTHON),
            ssh=SshOptions.from_dict(dict(data.get("ssh") or {})),
        )


def save_remote_record(store: Store, name: str, target: RemoteTarget) -> None:
    """Remember on this host (its data directory of the store, never the store: what it
    says is run and connected to) that guest ``name`` runs on another host."""
    store.host.write_record(name, REMOTE_RECORD, {"name": name, **target.to_dict()}, durable=True)


def load_remote_target(store: Store, name: str) -> RemoteTarget | None:
    data = store.host.read_record(name, REMOTE_RECORD, durable=True)
    if data is None:
        return None
    try:
        return RemoteTarget.from_dict(data)
    except (ValueError, KeyError, TypeError, UsageError) as exc:
        raise RemoteError(f"its record is damaged: {exc}", vm=name, step="load") from exc


def forget_remote(store: Store, name: str) -> None:
    store.host.remove_record(name, REMOTE_RECORD, durable=True)


def remote_names(store: Store) -> list[str]:
    return store.host.names_with(REMOTE_RECORD, durable=True)


class RemoteGuest(Guest):
    """A guest vmckpt runs on another host: every command runs there and is relayed here."""

    kind = "guest"

    def __init__(self, store: Store, name: str, target: RemoteTarget) -> None:
        super().__init__(store, name)
        self.target = target

    @classmethod
    def load(cls, store: Store, name: str) -> RemoteGuest | None:
        target = load_remote_target(store, name)
        return cls(store, name, target) if target is not None else None

    def relay(self, command: str, *args: str) -> Iterator[str]:
        """Run ``vmckpt COMMAND NAME --store REMOTE ARGS`` there, yielding its output lines;
        a failure there is a RemoteError with that vmckpt's one-line error."""
        ssh, endpoint = self.target.connect()
        with ssh:
            argv = ["--json-errors", command, self.name, "--store", self.target.store, *args]
            channel = ssh.open(endpoint.argv("vmckpt", argv), step=command)
            try:
                while True:
                    try:
                        line = channel.read_line(3600)
                    except TimeoutError:
                        continue
                    if line is None:
                        break
                    yield line
            finally:
                err = channel.stderr()
                code = channel.exit_status(10)
                channel.close()
        if code != 0:
            raise failure_of(err, str(self.target.address), command)

    def rows(self, command: str, *args: str) -> Iterator[dict[str, Any]]:
        """The JSON rows ``vmckpt COMMAND NAME --json ARGS`` prints there, one per line, with
        the host named."""
        for line in self.relay(command, *args, "--json"):
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                yield {**row, "host": str(self.target.address)}

    def checkpoint_row(self, *args: str) -> dict[str, Any]:
        """``vmckpt checkpoint NAME --json ARGS`` there: its row, with the host named."""
        text = "\n".join(self.relay("checkpoint", "--json", *args))
        try:
            row = json.loads(text)
        except ValueError as exc:
            raise RemoteError(
                f"the checkpoint there printed no JSON: {text[:80]!r}", vm=self.name
            ) from exc
        return {**row, "host": str(self.target.address)}

    def console(self, follow: bool) -> Iterator[str]:
        for line in self.relay("console", *(["--follow"] if follow else [])):
            yield line + "\n"

    def stop(self) -> str:
        out = " ".join(self.relay("stop"))
        forget_remote(self.store, self.name)
        return f"{out} [on {self.target.address}]"

    def pause(self) -> None:
        for _ in self.relay("pause"):
            pass

    def resume(self) -> bool:
        for _ in self.relay("resume"):
            pass
        return False

    def status(self) -> GuestStatus:
        """The guest's row from ``vmckpt list --json`` there; 'unreachable' if it cannot be had."""
        host = str(self.target.address)
        unreachable = GuestStatus(self.name, "remote", "unreachable", None, None, host=host)
        try:
            ssh, endpoint = self.target.connect()
            with ssh:
                code, out, _ = endpoint.vmckpt("list", "--store", self.target.store, "--json")
        except VmckptError:
            return unreachable
        if code != 0:
            return unreachable
        for row in json.loads(out).get("guests", []):
            if row.get("name") == self.name:
                return GuestStatus(
                    self.name, "remote", str(row.get("state")), row.get("pid"), row.get("head"),
                    host=host, mechanism=str(row.get("mechanism", "")),
                    mechanism_reason=str(row.get("mechanism_reason", "")),
                )  # fmt: skip
        return GuestStatus(self.name, "remote", "gone", None, None, host=host)
