"""The same starting point for every measured run: no dirty pages, warm free memory."""

from __future__ import annotations

import mmap
import os

MiB = 1 << 20


def settle(size: int) -> None:
    """Write back every dirty page, let the file system finish freeing blocks, and leave
    ``2 * size`` (plus a margin) of free memory warm.

    The root file system here is mounted with ``discard``: unlinking a written-back target
    makes the next journal commit discard its blocks, which stalls whatever writes next.

    Memory: this VM hands freed memory back to its host, and touching such a page again
    costs about 10 us instead of 1.5 (measured). How much free memory is still warm depends
    on what ran before, and a copy into the page cache takes a fresh page per 4 KiB: the
    same copy ran at about 650 or about 1,900 MiB/s depending on it. Touching (then
    freeing) the memory a run may take makes every run start from warm memory, as on a
    host without that hand-back.
    """
    os.sync()
    warm = mmap.mmap(-1, 2 * size + 512 * MiB)
    try:
        for page in range(0, len(warm), mmap.PAGESIZE):
            warm[page] = 1
    finally:
        warm.close()
