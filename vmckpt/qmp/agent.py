"""QEMU's guest agent (qemu-ga in the guest), spoken over the virtio-serial channel vmckpt
gives the guests it starts (machine/qemu.py: ``org.qemu.guest_agent.0``, its host end a
Unix socket bound by vmckpt in the guest's runtime directory).

The agent's protocol is QMP's JSON without a greeting or capabilities. A client that
connects may find half an answer meant for an earlier client in the channel (the guest
end is never reset), so every exchange starts with ``guest-sync-delimited``: the agent
answers with a 0xFF byte, then the id it was given, and whatever came before is dropped.

Only two things are asked: whether an agent answers, and to set the guest's clock
(``guest-set-time``), which a restore does, since a restored guest's clock otherwise goes on
from the checkpoint's instant.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from vmckpt.errors import QMPError

CHANNEL_NAME = "org.qemu.guest_agent.0"
CHARDEV_ID = "vmckpt-qga"  # the host end's chardev (query-chardev: frontend-open)
MAX_REPLY = 1 << 16  # an answer to either question is tens of bytes
SYNC_BYTE = b"\xff"


def channel_open(chardevs: Any) -> bool:
    """Whether the guest has the agent's channel open, from QEMU's ``query-chardev`` answer
    (``frontend-open`` of vmckpt's chardev; a restored guest's comes from its device state)."""
    return any(
        isinstance(c, dict) and c.get("label") == CHARDEV_ID and c.get("frontend-open")
        for c in chardevs
    )


class GuestAgent:
    """One connection to a guest's agent. ``deadline`` bounds every exchange: an agent that
    does not answer (a guest without one, a guest that hangs) costs at most that."""

    def __init__(self, path: Path, *, vm: str, timeout: float) -> None:
        self.vm = vm
        self.deadline = time.monotonic() + timeout
        self._buffer = b""
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._sock.settimeout(timeout)
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise QMPError(f"guest agent socket {path}: {exc}", vm=vm, step="guest-agent") from exc

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def sync(self) -> None:
        """Drop whatever an earlier client left in the channel; QMPError if the agent does not
        answer before the deadline."""
        token = secrets.randbelow(1 << 31)
        self._send({"execute": "guest-sync-delimited", "arguments": {"id": token}}, SYNC_BYTE)
        while True:
            marker = self._buffer.find(SYNC_BYTE)
            if marker >= 0:
                self._buffer = self._buffer[marker + 1 :]
                break
            self._buffer = b""
            self._fill()
        if self._reply().get("return") != token:
            raise QMPError("the guest agent answered another sync", vm=self.vm, step="guest-agent")

    def set_time(self, nanoseconds: int) -> None:
        """Step the guest's clock (and its RTC, as qemu-ga does) to ``nanoseconds`` since the
        epoch; QMPError with the agent's own words if it refuses."""
        self._send({"execute": "guest-set-time", "arguments": {"time": nanoseconds}})
        reply = self._reply()
        if "error" in reply:
            error = reply["error"]
            said = error.get("desc") if isinstance(error, dict) else None
            raise QMPError(f"the guest agent refused to set the clock: {said or error}",
                           vm=self.vm, step="guest-agent")  # fmt: skip

    # -- the wire -----------------------------------------------------------------------------

    def _send(self, message: dict[str, Any], prefix: bytes = b"") -> None:
        try:
            self._sock.settimeout(self._left())
            self._sock.sendall(prefix + json.dumps(message).encode() + b"\n")
        except OSError as exc:
            raise QMPError(f"guest agent: {exc}", vm=self.vm, step="guest-agent") from exc

    def _reply(self) -> dict[str, Any]:
        """The next JSON object the agent sends (lines that are empty are skipped)."""
        while True:
            line, newline, rest = self._buffer.partition(b"\n")
            if newline:
                self._buffer = rest
                if not line.strip():
                    continue
                try:
                    reply = json.loads(line)
                except (ValueError, RecursionError) as exc:
                    raise QMPError(f"the guest agent sent no JSON: {line[:80]!r}",
                                   vm=self.vm, step="guest-agent") from exc  # fmt: skip
                if not isinstance(reply, dict):
                    raise QMPError("the guest agent sent no JSON object",
                                   vm=self.vm, step="guest-agent")  # fmt: skip
                return reply
            if len(self._buffer) > MAX_REPLY:
                raise QMPError("the guest agent's answer is too long", vm=self.vm,
                               step="guest-agent")  # fmt: skip
            self._fill()

    def _fill(self) -> None:
        try:
            self._sock.settimeout(self._left())
            data = self._sock.recv(4096)
        except OSError as exc:  # a timeout too
            raise QMPError(f"the guest agent did not answer ({exc or 'timed out'})",
                           vm=self.vm, step="guest-agent") from exc  # fmt: skip
        if not data:
            raise QMPError("the guest agent's channel closed", vm=self.vm, step="guest-agent")
        self._buffer += data

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise QMPError("the guest agent did not answer in time", vm=self.vm,
                           step="guest-agent")  # fmt: skip
        return left
