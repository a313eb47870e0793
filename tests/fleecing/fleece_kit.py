"""Set-ups shared by the fleecing tests: a source, a temporary image, cbw and snapshot-access.

Why: every fleecing test starts from the same graph (QEMU's "modern recipe"): ``src`` with
random data and a zero hole, ``tmp`` a sparse raw file with ``discard=unmap`` (so freed
snapshot areas really punch holes), ``cbw`` (copy-before-write from src to tmp) and ``acc``
(snapshot-access on cbw). The point-in-time content ``t0`` is kept for comparisons.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockbackup.api import BlockBackup
from blockbackup.block.filters.copy_before_write import CopyBeforeWriteDriver
from blockbackup.block.node import BlockNode
from testkit.images import make_image, raw_node

MiB = 1 << 20
KiB = 1 << 10
CLUSTER = 64 * KiB
SIZE = 4 * MiB


def t0_data(size: int = SIZE) -> bytes:
    data = bytearray(os.urandom(size))
    data[size // 2 : size // 2 + MiB] = bytes(MiB)  # a zero region
    return bytes(data)


@dataclass
class Fleece:
    bb: BlockBackup
    dir: Path
    src_path: Path
    tmp_path: Path
    t0: bytes
    src: BlockNode
    tmp: BlockNode
    cbw: BlockNode
    acc: BlockNode

    @property
    def filter(self) -> CopyBeforeWriteDriver:
        driver = self.cbw.driver
        assert isinstance(driver, CopyBeforeWriteDriver)
        return driver


@asynccontextmanager
async def fleece(
    directory: Path,
    *,
    cbw_opts: dict[str, Any] | None = None,
    tmp_node: dict[str, Any] | None = None,
    size: int = SIZE,
    prepare_source: Callable[[BlockNode], None] | None = None,
) -> AsyncIterator[Fleece]:
    """The modern recipe, in-process; ``prepare_source(src)`` runs before the filter is
    added (to give the source a dirty bitmap, say)."""
    t0 = t0_data(size)
    src_path = make_image(directory / "src.img", size, [(0, t0)])
    tmp_path = make_image(directory / "tmp.img", size)
    async with BlockBackup() as bb:
        src = await bb.blockdev_add(raw_node("src", src_path))
        tmp = await bb.blockdev_add(tmp_node or raw_node("tmp", tmp_path, discard="unmap"))
        if prepare_source is not None:
            prepare_source(src)
        cbw = await bb.blockdev_add(
            {"driver": "copy-before-write", "node-name": "cbw", "file": "src", "target": tmp.name}
            | (cbw_opts or {})
        )
        acc = await bb.blockdev_add(
            {"driver": "snapshot-access", "node-name": "acc", "file": "cbw"}
        )
        yield Fleece(bb, directory, src_path, tmp_path, t0, src, tmp, cbw, acc)
