"""Writing a buffer into a file but for its all-zero grains, which the caller zeroes its
own way (a hole, or nothing where the file reads as zeroes already).

Its own module, with nothing but ``os`` to import, because the encoder processes that write
a restore's data (:mod:`~blockbackup.repository.encoder_worker`) use it as the copy engine
does (:func:`~blockbackup.block.copy_range.copy_through_buffer`), and start fast.
"""

from __future__ import annotations

import os


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Write all of ``view``.

    Callers pass a view they release in a ``with`` block: a failed write's traceback keeps
    this frame, and an unreleased view in it would pin the caller's reused buffer (which
    then cannot be closed: ``BufferError``).
    """
    written = 0
    while written < len(view):
        written += os.pwritev(fd, [view[written:]], offset + written)


def write_data(
    dst_fd: int, view: memoryview, dst_off: int, grain: int, zeroes: bytes
) -> list[tuple[int, int]]:
    """Write ``view`` at ``dst_off`` but for its ``grain``s that are all zeroes (``zeroes``
    is at least a grain long): those are returned as merged ``(offset, length)`` runs
    relative to the view, for the caller to zero its own way."""
    skipped: list[tuple[int, int]] = []
    data_from = None  # start of the run of data grains not written yet
    for at in range(0, len(view), grain):
        # A memcmp that stops at the first non-zero byte: random data costs nothing.
        if not zeroes.startswith(view[at : at + grain]):
            data_from = at if data_from is None else data_from
            continue
        if data_from is not None:
            with view[data_from:at] as part:
                pwrite_all(dst_fd, part, dst_off + data_from)
            data_from = None
        extend_runs(skipped, at, min(grain, len(view) - at))
    if data_from is not None:
        with view[data_from:] as part:
            pwrite_all(dst_fd, part, dst_off + data_from)
    return skipped


def extend_runs(runs: list[tuple[int, int]], start: int, length: int) -> None:
    """Add ``[start, start+length)`` to sorted ``runs``, merged with the last if adjacent."""
    if runs and sum(runs[-1]) == start:
        runs[-1] = (runs[-1][0], runs[-1][1] + length)
    else:
        runs.append((start, length))
