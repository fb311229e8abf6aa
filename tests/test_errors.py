"""The one exception tree: its one-line messages, context added where it is known, and the
one shape an error crosses a process boundary in (a COLO session, the remote agent, a
remote vmckpt)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.framework.guest import REPO
from vmckpt.errors import (
    CheckpointError,
    RemoteError,
    StoreError,
    VmckptError,
    _subclasses,
    from_wire,
)


@pytest.mark.parametrize("cls", [_subclasses()[name] for name in sorted(_subclasses())])
def test_every_error_crosses_a_process_boundary_as_itself(cls: type[VmckptError]) -> None:
    error = VmckptError.__new__(cls)
    VmckptError.__init__(error, "it broke\nbadly", vm="g", layer="0001-abcdef", step="write")
    wire = json.loads(json.dumps(error.to_wire()))  # what a pipe or socket carries
    back = from_wire(wire)
    assert type(back) is cls
    assert (back.vm, back.layer, back.step, back.exit_code) == ("g", "0001-abcdef", "write",
                                                                cls.exit_code)  # fmt: skip
    assert back.one_line() == error.one_line() and "\n" not in back.one_line()


def test_what_is_not_an_error_of_ours_becomes_the_default() -> None:
    unknown = from_wire({"error": {"kind": "OSError", "message": "m", "exit": 99}},
                        default=CheckpointError)  # fmt: skip
    assert type(unknown) is CheckpointError and unknown.exit_code == 99
    bare = from_wire({"error": "text"}, default=RemoteError)
    assert isinstance(bare, RemoteError) and "text" in bare.one_line()
    assert from_wire({"error": {"kind": "StoreError", "exit": 999}}).exit_code == 3


def test_context_is_added_by_a_new_error_never_by_editing_one() -> None:
    raised = StoreError("no space", step="write")
    with pytest.raises(StoreError) as caught:
        try:
            raise raised
        except StoreError as exc:
            raise exc.in_context(vm="web", layer="0002-aaaaaa", step="ignored") from exc
    assert caught.value.one_line() == "guest web, layer 0002-aaaaaa, during write: no space"
    assert str(caught.value) == caught.value.one_line()  # not stale
    assert caught.value.__cause__ is raised and raised.vm is None  # the original untouched


def test_the_cli_says_an_error_as_json_when_asked() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "vmckpt", "--json-errors", "list", "--store", "/nonexistent/st"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    error = from_wire(json.loads(lines[0]))
    assert isinstance(error, StoreError) and "does not exist" in error.message
