"""Progress of long work (receiving RAM, composing a chain, loading it into QEMU).

On a terminal, the CLI passes a :class:`TerminalProgress`: one transient line
per step that updates in place (rich), like borg's ``--progress``; otherwise
(output not a terminal, ``--json``) :data:`NO_PROGRESS`, which prints nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # rich is imported when a terminal shows progress, not by every command
    from rich.progress import Progress as RichProgress
    from rich.progress import TaskID


class Task(Protocol):
    def advance(self, amount: int) -> None: ...


class Progress(Protocol):
    def task(
        self, description: str, total: int | None, *, unit: str = ""
    ) -> contextlib.AbstractContextManager[Task]: ...


class _NullTask:
    def advance(self, amount: int) -> None:
        pass


class NullProgress:
    """Prints nothing."""

    @contextlib.contextmanager
    def task(self, description: str, total: int | None, *, unit: str = "") -> Iterator[Task]:
        yield _NullTask()


NO_PROGRESS = NullProgress()


class _RichTask:
    def __init__(self, progress: RichProgress, task: TaskID) -> None:
        self.progress = progress
        self.id = task

    def advance(self, amount: int) -> None:
        self.progress.advance(self.id, amount)  # rich's Progress is thread safe


class TerminalProgress:
    """One updating line per step on stderr, removed when the step ends."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)

    @contextlib.contextmanager
    def task(self, description: str, total: int | None, *, unit: str = "") -> Iterator[Task]:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            TextColumn,
            TimeElapsedColumn,
            TransferSpeedColumn,
        )
        from rich.progress import Progress as RichProgress

        columns = [TextColumn("{task.description}"), BarColumn()]
        if unit == "B":
            columns += [DownloadColumn(), TransferSpeedColumn()]
        columns.append(TimeElapsedColumn())
        with RichProgress(*columns, console=self.console, transient=True) as progress:
            task = progress.add_task(description, total=total)
            yield _RichTask(progress, task)
