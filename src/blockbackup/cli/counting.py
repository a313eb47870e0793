"""A progress bar that counts things (manifests read, snapshots removed), on a terminal only.

Why its own module: prune and snapshots read every manifest, one object each, which takes
a while on a big repository or a slow backend; the backup-style bar (bytes, rates) does not
fit a count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


class Counter:
    """``counter(done, total)``; ``step`` names the phase of a command of several (gc)."""

    def __init__(self, progress: Progress, label: str) -> None:
        self._progress = progress
        self._label = label
        self._task = progress.add_task(label, total=None)

    def __call__(self, done: int, total: int | None, step: str | None = None) -> None:
        description = self._label if step is None else f"{self._label} {step}"
        self._progress.update(self._task, description=description, completed=done, total=total)


@contextmanager
def counting(label: str, *, quiet: bool) -> Iterator[Counter]:
    """A :class:`Counter` for a bar on stderr, shown only on a terminal and not ``quiet``
    (``--json``); it disappears when the block ends."""
    console = Console(stderr=True)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=True,
    ) as progress:
        yield Counter(progress, label)
