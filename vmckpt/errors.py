"""The one exception tree of vmckpt.

Every error names what it is about (the guest, the layer, the step) so the
CLI can print it as a single line; each class has its own exit code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class VmckptError(Exception):
    """Base of every error vmckpt raises on purpose."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        *,
        vm: str | None = None,
        layer: str | None = None,
        step: str | None = None,
    ) -> None:
        self.message = message
        self.vm = vm
        self.layer = layer
        self.step = step
        super().__init__(self.one_line())

    def one_line(self) -> str:
        where = []
        if self.vm:
            where.append(f"guest {self.vm}")
        if self.layer:
            where.append(f"layer {self.layer}")
        if self.step:
            where.append(f"during {self.step}")
        prefix = ", ".join(where)
        text = f"{prefix}: {self.message}" if prefix else self.message
        return " ".join(text.split())  # one line, whatever the cause's message held

    def in_context(
        self, *, vm: str | None = None, layer: str | None = None, step: str | None = None
    ) -> VmckptError:
        """The same error (same class and message) with the context it lacks filled in:
        ``raise exc.in_context(vm=name) from exc`` where the caller knows more (an error is
        never edited after it was raised)."""
        again = _make(
            type(self), self.message, vm=self.vm or vm, layer=self.layer or layer,
            step=self.step or step,
        )  # fmt: skip
        again.exit_code = self.exit_code
        return again

    def to_wire(self) -> dict[str, Any]:
        """The one shape an error crosses a process boundary in (the COLO session's control
        socket, the remote agent's output, a remote vmckpt's stderr with --json-errors):
        ``{"error": {"kind", "message", "vm", "layer", "step", "exit"}}``."""
        return {
            "error": {
                "kind": type(self).__name__,
                "message": self.message,
                "vm": self.vm,
                "layer": self.layer,
                "step": self.step,
                "exit": self.exit_code,
            }
        }


def _subclasses() -> dict[str, type[VmckptError]]:
    found: dict[str, type[VmckptError]] = {}
    pending: list[type[VmckptError]] = [VmckptError]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return found


def _make(cls: type[VmckptError], message: str, **context: str | None) -> VmckptError:
    error = VmckptError.__new__(cls)
    VmckptError.__init__(error, message, **context)
    if isinstance(error, RemoteError):
        error.host = None  # already in the message, if it was named
    return error


def from_wire(data: Mapping[str, Any], *, default: type[VmckptError] | None = None) -> VmckptError:
    """The error :meth:`VmckptError.to_wire` sent (as the class it names, if vmckpt knows it;
    else ``default``), or, for anything else that says ``error``, one of ``default`` saying
    what came."""
    body = data.get("error")
    fallback = default or VmckptError
    if not isinstance(body, Mapping):
        return fallback(f"an error without details ({body!r})" if body else "an error")
    cls = _subclasses().get(str(body.get("kind")), fallback)

    def text(key: str) -> str | None:
        value = body.get(key)
        return str(value) if value else None

    error = _make(
        cls, str(body.get("message") or "an error"), vm=text("vm"), layer=text("layer"),
        step=text("step"),
    )  # fmt: skip
    code = body.get("exit")
    if isinstance(code, int) and 0 < code < 256:
        error.exit_code = code
    return error


class UsageError(VmckptError):
    """The command line or its arguments are wrong."""

    exit_code = 2


class StoreError(VmckptError):
    """The store (a directory of layers) is missing, or a layer cannot be found."""

    exit_code = 3


class CorruptLayerError(StoreError):
    """A layer's files do not match its manifest: checksum, size, or format."""

    exit_code = 4


class FormatVersionError(CorruptLayerError):
    """A layer was written in a format version this vmckpt cannot read."""

    exit_code = 5


class StreamError(VmckptError):
    """QEMU's migration stream is malformed or uses a feature vmckpt does not handle."""

    exit_code = 6


class QMPError(VmckptError):
    """The monitor cannot be reached, is not QEMU, or a command failed."""

    exit_code = 7


class MachineError(VmckptError):
    """QEMU could not be started, died, or the guest spec does not fit."""

    exit_code = 8


class CheckpointError(VmckptError):
    """A checkpoint failed; the guest was left running as before."""

    exit_code = 9


class RestoreError(VmckptError):
    """A restore failed; the QEMU it started was ended, the store is untouched."""

    exit_code = 10


class NotAliveError(VmckptError):
    """A layer restored for a check did not come up alive (dead, panicked, reset, silent...)."""

    exit_code = 11


class RemoteError(VmckptError):
    """Another host could not be reached, refused us, or failed a step there.

    Whatever failed, a guest that was running where it started is left running.
    """

    exit_code = 12

    def __init__(
        self,
        message: str,
        *,
        host: str | None = None,
        vm: str | None = None,
        layer: str | None = None,
        step: str | None = None,
    ) -> None:
        self.host = host
        super().__init__(
            f"host {host}: {message}" if host else message, vm=vm, layer=layer, step=step
        )


class LibvirtError(VmckptError):
    """libvirt (libvirt-python, the daemon, or a domain) refused or failed a step."""

    exit_code = 13


class LockError(VmckptError):
    """Another vmckpt holds what this command needs (a guest's checkpoint, the store)."""

    exit_code = 14


class BucketError(StoreError):
    """An object store (an S3-compatible bucket holding a store) cannot be reached, answered
    with an error, throttled us or refused our credentials; no layer is lost (a layer not
    uploaded stays on this host, and `vmckpt push` uploads it later)."""

    exit_code = 15


def exit_codes() -> list[tuple[int, str]]:
    """Every exit code the ``vmckpt`` command uses, with what it means (for --help)."""
    codes = [(0, "success"), (1, "an unexpected error (a bug: please report it)")]
    seen: set[int] = set()
    pending: list[type[VmckptError]] = [VmckptError]
    while pending:
        cls = pending.pop(0)
        pending.extend(cls.__subclasses__())
        if cls is VmckptError or cls.exit_code in seen:
            continue
        seen.add(cls.exit_code)
        summary = (cls.__doc__ or cls.__name__).strip().splitlines()[0]
        codes.append((cls.exit_code, summary))
    codes.append((130, "interrupted (Ctrl-C) before anything was changed"))
    return sorted(codes)
