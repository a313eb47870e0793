"""A BlockBackup with a random-data source and a fault-injecting target, for backup tests."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest_asyncio

from blockbackup.api import BlockBackup
from blockbackup.block.drivers.blkdebug import BlkdebugDriver
from blockbackup.block.node import BlockNode
from testkit.images import make_image, raw_node

SIZE = 4 << 20


@dataclass
class Env:
    bb: BlockBackup
    src: BlockNode
    tgt: BlockNode
    src_path: Path
    tgt_path: Path
    t0: bytes
    src_debug: BlkdebugDriver
    tgt_debug: BlkdebugDriver

    def event_names(self, events: list[dict[str, object]]) -> list[str]:
        out = []
        for e in events:
            data = e.get("data")
            if e["event"] == "JOB_STATUS_CHANGE" and isinstance(data, dict):
                out.append(str(data["status"]))
            else:
                out.append(str(e["event"]))
        return out


@pytest_asyncio.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    data = os.urandom(SIZE)
    src_path = make_image(tmp_path / "src.img", SIZE, [(0, data)])
    tgt_path = make_image(tmp_path / "tgt.img", SIZE)
    async with BlockBackup() as bb:
        src = await bb.blockdev_add(
            {"driver": "blkdebug", "node-name": "src", "image": raw_node("src-raw", src_path)}
        )
        tgt = await bb.blockdev_add(
            {"driver": "blkdebug", "node-name": "tgt", "image": raw_node("tgt-raw", tgt_path)}
        )
        assert isinstance(src.driver, BlkdebugDriver)
        assert isinstance(tgt.driver, BlkdebugDriver)
        yield Env(bb, src, tgt, src_path, tgt_path, data, src.driver, tgt.driver)
