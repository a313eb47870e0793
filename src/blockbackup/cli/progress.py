"""What a backup shows: its progress bar, then its summary (or JSON) and its problems.

Why two numbers: a job's progress counts the holes and zeroes it skips, so on a sparse disk
it races through hundreds of GiB while writing a few MiB. The bar shows how far the job is
(binary sizes) and the rate at which data reaches the target file (MiB/s), the same figure
the summary prints.
"""

from __future__ import annotations

import json
import sys
import time
from types import TracebackType
from typing import Any

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

from blockbackup.cli.sizes import format_rate, format_size


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


class Output:
    """Where results go: a summary (or JSON) on stdout, problems as lines on stderr."""

    def __init__(self, *, as_json: bool) -> None:
        self.as_json = as_json
        self.console = Console(stderr=as_json)

    def note(self, message: str) -> None:
        print(f"blockbackup backup: {message}", file=sys.stderr, flush=True)

    def emit_json(self, result: dict[str, Any]) -> None:
        print(json.dumps(result), flush=True)

    def result(self, result: dict[str, Any], node: str, target: str) -> None:
        if self.as_json:
            self.emit_json(result)
        status = result["status"]
        if status == "completed":
            if not self.as_json:
                seconds = max(result["seconds"], 1e-9)
                print(
                    f"backup of {node} done: {target}: {format_size(result['disk-size'])} disk, "
                    f"{format_size(result['written'])} written in {result['seconds']:.1f} s "
                    f"({format_rate(result['written'] / seconds)})",
                    flush=True,
                )
        elif status == "cancelled":
            self.note(f"cancelled ({result['error']}): no backup was written to {target}")
        else:
            self.note(f"backup failed: {result['error']}")
