"""A progress bar that counts things (manifests read, snapshots removed), on a terminal only.

Why its own module: prune and snapshots read every manifest, one object each, which takes
a while on a big repository or a slow backend; the backup-style bar (bytes, rates) does not
fit a count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


@contextmanager
def counting(label: str, *, quiet: bool) -> Iterator[Callable[[int, int], None]]:
    """``update(done, total)`` for a bar on stderr, shown only on a terminal and not
    ``quiet`` (``--json``); it disappears when the block ends."""
    console = Console(stderr=True)
    with Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=True,
    ) as progress:
        task = progress.add_task(label, total=None)
        yield lambda done, total: progress.update(task, completed=done, total=total)
