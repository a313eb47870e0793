"""The backup's progress bar: the job's progress, and the data actually written, in MiB.

Why two numbers: a job's progress counts the holes and zeroes it skips, so on a sparse disk
it races through hundreds of GiB while writing a few MiB. The bar shows how far the job is
(binary sizes) and the rate at which data reaches the target file (MiB/s), the same figure
the summary prints.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from blockbackup.cli.sizes import format_rate


class _WriteRateColumn(ProgressColumn):
    """The data written to the target per second (the task's ``rate`` field)."""

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate")
        return Text(format_rate(rate) if rate is not None else "-- MiB/s")


class BackupProgress:
    """A progress bar for one job, updated from its ``query-jobs`` entries."""

    def __init__(self, label: str, console: Console, *, show: bool) -> None:
        self._progress = Progress(
            TextColumn(label),
            BarColumn(),
            DownloadColumn(binary_units=True),
            _WriteRateColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not show,
        )
        self._task = self._progress.add_task(label, total=None, rate=None)
        self._started = time.monotonic()

    def __enter__(self) -> BackupProgress:
        self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._progress.stop()

    def update(self, current: int, total: int, written: int) -> None:
        seconds = time.monotonic() - self._started
        rate = written / seconds if seconds > 0 else None
        self._progress.update(self._task, completed=current, total=total, rate=rate)
