"""SSH to another host with paramiko: host-key checked connections, commands, SFTP.

Host keys are checked against a known_hosts file (default ``~/.ssh/known_hosts``).
An unknown key is refused unless the caller accepts new keys explicitly (then it
is added to that file); a key that differs from the recorded one is always
refused. Authentication is by key only (``--identity``, the SSH agent, or the
default keys in ``~/.ssh``); vmckpt never asks for, stores or logs a password.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import os
import queue
import re
import shlex
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from vmckpt.errors import RemoteError, UsageError

if TYPE_CHECKING:
    import paramiko

# paramiko (and the cryptography it loads) is imported by the code that connects, not by
# this module: every vmckpt command imports this module, few of them reach another host,
# and the import costs a local command (a restore that is to run in milliseconds) ~0.1 s.

DEFAULT_KNOWN_HOSTS = "~/.ssh/known_hosts"
CONNECT_TIMEOUT = 15.0
SEND_CHUNK = 1 << 15


@dataclass(frozen=True)
class HostAddress:
    """``[USER@]HOST[:PORT]``, parsed."""

    host: str
    user: str
    port: int = 22

    @classmethod
    def parse(cls, text: str) -> HostAddress:
        match = re.fullmatch(r"(?:([^@\s]+)@)?(\[[0-9a-fA-F:.]+\]|[^:@\s\[\]]+)(?::(\d+))?", text)
        if not match:
            raise UsageError(f"cannot read host {text!r} (use [USER@]HOST[:PORT])")
        user = match.group(1) or getpass.getuser()
        host = match.group(2).strip("[]")
        port = int(match.group(3) or 22)
        if not 0 < port < 65536:
            raise UsageError(f"port {port} of host {text!r} is out of range")
        return cls(host, user, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}" + (f":{self.port}" if self.port != 22 else "")


@dataclass(frozen=True)
class SshOptions:
    """How to reach and trust a host; stored with a remote guest's record."""

    identity: str | None = None
    known_hosts: str = DEFAULT_KNOWN_HOSTS
    accept_new_host_key: bool = False

    def to_dict(self) -> dict[str, Any]:
        # accept_new_host_key is a one-time decision: never stored.
        return {"identity": self.identity, "known_hosts": self.known_hosts}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SshOptions:
        return cls(
            identity=data.get("identity"),
            known_hosts=str(data.get("known_hosts") or DEFAULT_KNOWN_HOSTS),
        )


def fingerprint(key: Any) -> str:
    """OpenSSH's way of showing a key: SHA256:base64."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _host_key_policy(address: HostAddress, known: Path, accept_new: bool) -> Any:
    """What paramiko does with a host key known_hosts does not hold: add it (the user asked
    for it) or refuse in one line."""
    import paramiko

    class AcceptNew(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: Any) -> None:
            client.get_host_keys().add(hostname, key.get_name(), key)
            known.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with open(known, "a", opener=lambda p, f: os.open(p, f, 0o600)) as handle:
                handle.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")

    class Refuse(paramiko.MissingHostKeyPolicy):  # type: ignore[misc]
        def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: Any) -> None:
            raise RemoteError(
                f"its host key ({key.get_name()} {fingerprint(key)}) is not in {known}; "
                "check it and pass --accept-new-host-key to trust it",
                host=str(address),
                step="host-key",
            )

    return AcceptNew() if accept_new else Refuse()


class SshHost:
    """One SSH connection to another host. Use as a context manager."""

    def __init__(self, address: HostAddress, options: SshOptions) -> None:
        self.address = address
        self.options = options
        import paramiko

        self.client = paramiko.SSHClient()
        self._sftp: paramiko.SFTPClient | None = None

    @property
    def name(self) -> str:
        return str(self.address)

    def connect(self) -> SshHost:
        import paramiko

        known = Path(self.options.known_hosts).expanduser()
        try:
            if known.exists():
                self.client.load_host_keys(str(known))
        except (OSError, paramiko.SSHException) as exc:
            raise RemoteError(
                f"cannot read known hosts {known}: {exc}", host=self.name, step="host-key"
            ) from exc
        self.client.set_missing_host_key_policy(
            _host_key_policy(self.address, known, self.options.accept_new_host_key)
        )
        identity = str(Path(self.options.identity).expanduser()) if self.options.identity else None
        try:
            self.client.connect(
                self.address.host,
                port=self.address.port,
                username=self.address.user,
                key_filename=identity,
                look_for_keys=identity is None,
                allow_agent=identity is None,
                timeout=CONNECT_TIMEOUT,
                banner_timeout=CONNECT_TIMEOUT,
                auth_timeout=CONNECT_TIMEOUT,
            )
        except RemoteError:
            raise
        except paramiko.BadHostKeyException as exc:
            raise RemoteError(
                f"its host key changed (got {exc.key.get_name()} {fingerprint(exc.key)}, {known} "
                "records another); "
                "refusing to connect: if the change is expected, remove the old entry "
                f"(ssh-keygen -R {self.address.host} -f {known})",
                host=self.name,
                step="host-key",
            ) from exc
        except paramiko.AuthenticationException as exc:
            raise RemoteError(
                f"authentication as {self.address.user} failed (key-based only: "
                "--identity, the SSH agent or ~/.ssh keys)",
                host=self.name,
                step="connect",
            ) from exc
        except (OSError, paramiko.SSHException, EOFError) as exc:
            raise RemoteError(f"cannot connect: {exc}", host=self.name, step="connect") from exc
        transport = self.client.get_transport()
        if transport is not None:
            transport.set_keepalive(2)
        return self

    def close(self) -> None:
        if self._sftp is not None:
            with contextlib.suppress(Exception):
                self._sftp.close()
            self._sftp = None
        self.client.close()

    def __enter__(self) -> SshHost:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def peer_address(self) -> str:
        """The other host's IP address, as this connection reaches it."""
        return str(self._sock().getpeername()[0])

    @property
    def local_address(self) -> str:
        """This host's IP address, as the other host sees this connection come from."""
        return str(self._sock().getsockname()[0])

    def _sock(self) -> socket.socket:
        transport = self.client.get_transport()
        if transport is None:
            raise RemoteError("not connected", host=self.name, step="connect")
        return transport.sock  # type: ignore[no-any-return]

    def sftp(self) -> paramiko.SFTPClient:
        import paramiko

        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except (OSError, paramiko.SSHException) as exc:
                raise RemoteError(f"cannot open SFTP: {exc}", host=self.name, step="sftp") from exc
        return self._sftp

    def run(
        self, argv: list[str], *, timeout: float = 300.0, step: str = "run"
    ) -> tuple[int, str, str]:
        """Run a command there; returns exit status, stdout and stderr."""
        channel = self.open(argv, step=step)
        try:
            out, err = channel.read_all(timeout)
            return channel.exit_status(timeout), out, err
        finally:
            channel.close()

    def open(self, argv: list[str], *, step: str = "run") -> Channel:
        """Start a command there with its stdin, stdout and stderr connected to us."""
        import paramiko

        command = " ".join(shlex.quote(a) for a in argv)
        try:
            transport = self.client.get_transport()
            if transport is None or not transport.is_active():
                raise paramiko.SSHException("connection closed")
            chan = transport.open_session(timeout=CONNECT_TIMEOUT)
            chan.exec_command(command)
        except (OSError, paramiko.SSHException) as exc:
            raise RemoteError(
                f"cannot start `{command}`: {exc}", host=self.name, step=step
            ) from exc
        return Channel(chan, self.name, step)


class Channel:
    """A command running on another host: lines from its stdout, lines to its stdin."""

    def __init__(self, chan: paramiko.Channel, host: str, step: str) -> None:
        self.chan = chan
        self.host = host
        self.step = step
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._err: list[bytes] = []
        self._reader = threading.Thread(target=self._read, name="vmckpt-ssh-reader", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        import paramiko

        pending = b""
        self.chan.settimeout(0.05)
        try:
            while True:
                while self.chan.recv_stderr_ready():
                    self._err.append(self.chan.recv_stderr(65536))
                try:
                    data = self.chan.recv(65536)
                except TimeoutError:
                    continue
                if not data:  # end of output (buffered data is returned first)
                    break
                pending += data
                *done, pending = pending.split(b"\n")
                for line in done:
                    self.lines.put(line.decode(errors="replace"))
            deadline = time.monotonic() + 2.0
            while not self.chan.exit_status_ready() and time.monotonic() < deadline:
                time.sleep(0.01)
            while self.chan.recv_stderr_ready():
                self._err.append(self.chan.recv_stderr(65536))
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            if pending:
                self.lines.put(pending.decode(errors="replace"))
            self.lines.put(None)

    def send_bytes(self, data: bytes) -> bool:
        """Write to the command's stdin; False if the channel is gone.

        The channel has a short timeout (for the reader thread), so a full SSH window
        shows up here as a timeout: wait for room and go on.
        """
        import paramiko

        view = memoryview(data)
        try:
            while view:
                try:
                    sent = self.chan.send(view[:SEND_CHUNK])
                except TimeoutError:
                    if self.chan.closed:
                        return False
                    continue
                if sent <= 0:
                    return False
                view = view[sent:]
            return True
        except (OSError, EOFError, paramiko.SSHException):
            return False

    def send_line(self, line: str) -> bool:
        """Write one line to the command's stdin; False if the channel is gone."""
        return self.send_bytes((line + "\n").encode())

    def end_input(self) -> None:
        """End the command's stdin (it reads end of file)."""
        import paramiko

        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self.chan.shutdown_write()

    def read_line(self, timeout: float) -> str | None:
        """The next line, or None at end of output; raises TimeoutError if none arrives."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError from None

    def read_all(self, timeout: float) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        out: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RemoteError(
                    "the command did not finish in time", host=self.host, step=self.step
                )
            try:
                line = self.read_line(remaining)
            except TimeoutError:
                continue
            if line is None:
                break
            out.append(line)
        return "\n".join(out), self.stderr()

    def stderr(self) -> str:
        return b"".join(self._err).decode(errors="replace")

    def exit_status(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while not self.chan.exit_status_ready():
            if time.monotonic() > deadline:
                return -1
            if self.chan.closed and not self.chan.exit_status_ready():
                return -1
            time.sleep(0.01)
        return int(self.chan.recv_exit_status())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.chan.close()
