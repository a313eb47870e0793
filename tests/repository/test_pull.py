"""A repository target reads a backup's source itself (``RepoTargetDriver.pull``): the
chunks go from the source file straight into an encoder process's memory, in one thread
call per chunk of the copy. The same disk is stored as through reads and writes; holes
are not read; a failed read is the job's read error; a fill that fails gives the worker
back."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from blockbackup.api import BackupFailed, BlockBackup
from blockbackup.block.copy_range import FileReader
from blockbackup.block.node import BlockNode
from blockbackup.repository import drivers
from blockbackup.repository.encoders import EncoderPool
from blockbackup.repository.keys import ZERO_ADDRESS, Keys, new_master_key
from blockbackup.repository.repo import Repository
from repository.test_encoders import CHUNK, sample_image
from repository.test_nodes import PASS, backup_image_driver, raw, snapshot_node, target_node

MiB = 1 << 20


@pytest.mark.asyncio
async def test_no_data_passes_through_this_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With encoder processes the source is never read through its node, nor written
    through the target's write path; without them it is. Both store the same disk."""
    through: list[str] = []
    node_read = BlockNode.read
    write_blocking = drivers.RepoTargetDriver._write_blocking

    async def read(node: BlockNode, offset: int, length: int) -> object:
        through.append("read")
        return await node_read(node, offset, length)

    def write(driver: drivers.RepoTargetDriver, *args: object) -> None:
        through.append("write")
        write_blocking(driver, *args)

    monkeypatch.setattr(BlockNode, "read", read)
    monkeypatch.setattr(drivers.RepoTargetDriver, "_write_blocking", write)
    image = sample_image(tmp_path)  # data, a zero MiB, text, a short last chunk
    repo = tmp_path / "repo"
    Repository.init(str(repo), PASS)
    pulled = await backup_image_driver(repo, image, "d")
    assert pulled.encoders is not None
    assert "read" not in through
    assert "write" not in through
    written = await backup_image_driver(repo, image, "d", base="none", **{"encoder-processes": 0})
    assert "read" in through
    assert "write" in through
    assert pulled.result is not None
    assert written.result is not None
    assert written.repo.store.stored_blobs == 0  # the same chunks: all found
    assert written.result.record.segments == pulled.result.record.segments


@pytest.mark.asyncio
async def test_chunks_in_holes_are_zero_chunks_and_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk-sized hole between data in one copy request (the request spans both: the
    target takes mixed chunks) is stored as a zero chunk without being read."""
    image = tmp_path / "disk.img"
    start, length = 3 * CHUNK, 2 * CHUNK  # chunks 3 and 4: a hole
    data = bytearray(os.urandom(MiB))
    data[start : start + length] = bytes(length)
    with open(image, "wb") as f:
        f.write(data[:start])
        f.seek(start + length)  # never written: a hole
        f.write(data[start + length :])
    fd = os.open(image, os.O_RDONLY)
    try:
        if FileReader(fd).hole_before(start, length) != length:
            pytest.skip("this file system shows no holes")
    finally:
        os.close(fd)
    reads: list[tuple[int, int]] = []
    read_into = FileReader.read_into

    def counted(reader: FileReader, view: memoryview, offset: int) -> None:
        reads.append((offset, len(view)))
        read_into(reader, view, offset)

    monkeypatch.setattr(FileReader, "read_into", counted)
    repo = tmp_path / "repo"
    Repository.init(str(repo), PASS)
    driver = await backup_image_driver(repo, image, "d")
    assert reads
    assert not any(o < start + length and start < o + n for o, n in reads)
    index = driver.index
    assert [index.get(i) == ZERO_ADDRESS for i in range(16)] == [i in (3, 4) for i in range(16)]
    assert driver.result is not None
    Repository.open(str(repo), PASS).commit([driver.result.record], packs=driver.result.packs)
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        snap = await bb.blockdev_add(snapshot_node(repo))
        assert bytes(await snap.read(0, MiB)) == data


@pytest.mark.asyncio
async def test_a_failed_read_is_the_jobs_read_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source's EIO in the target's thread: the job fails on a read (so the source's
    error policy applies), and no encoder process is lost to it."""
    read_into = FileReader.read_into

    def failing(reader: FileReader, view: memoryview, offset: int) -> None:
        if offset <= 2 * MiB < offset + len(view):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        read_into(reader, view, offset)

    monkeypatch.setattr(FileReader, "read_into", failing)
    image = sample_image(tmp_path)
    repo = tmp_path / "repo"
    Repository.init(str(repo), PASS)
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        src = await bb.blockdev_add(raw("src", image, **{"read-only": True}))
        tgt = await bb.blockdev_add(target_node(repo, "d", src.size))
        assert isinstance(tgt.driver, drivers.RepoTargetDriver)
        pool = tgt.driver.encoders
        assert pool is not None
        with bb.events.subscribe() as sub:
            job = await bb.backup("src", "tgt", sync="full", job_id="j")
            with pytest.raises(BackupFailed, match="Input/output error"):
                await bb.wait(job)
            events = sub.drain()
        error = next(e for e in events if e["event"] == "BLOCK_JOB_ERROR")
        assert error["data"]["operation"] == "read"
        assert len(pool._free) == pool._live == 3


@pytest.mark.asyncio
async def test_a_range_of_partial_chunks_is_left_to_the_copy(tmp_path: Path) -> None:
    """``pull`` declines (False, nothing read) a range that does not start on a chunk or
    does not end on one: the copy then reads and writes it, merging the partial chunks."""

    class Refusing:
        piece = 0

        def read_into(self, view: memoryview, offset: int) -> None:
            raise AssertionError("read for a range it declines")

    repo = tmp_path / "repo"
    Repository.init(str(repo), PASS)
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        tgt = await bb.blockdev_add(target_node(repo, "d", MiB))
        driver = tgt.driver
        assert isinstance(driver, drivers.RepoTargetDriver)
        assert driver.pulls()
        for offset, length in ((CHUNK // 2, CHUNK), (0, CHUNK + 4096), (CHUNK, CHUNK - 512)):
            assert driver.pull(Refusing(), offset, offset, length) is False  # type: ignore[arg-type]


def test_a_fill_that_fails_gives_the_worker_back() -> None:
    master = new_master_key()
    keys = Keys(master)
    pool = EncoderPool(master, 1)

    def failing(into: memoryview) -> None:
        raise OSError(errno.EIO, "the source failed")

    try:
        with (
            pytest.raises(OSError, match="the source failed"),
            pool.encoded_from(failing, [CHUNK, CHUNK], lambda _a: False),
        ):
            pass
        piece = os.urandom(CHUNK)

        def fill(into: memoryview) -> None:
            into[:] = piece

        with pool.encoded_from(fill, [CHUNK], lambda _a: False) as encoded:
            assert encoded is not None
            assert encoded[0][0] == keys.address(piece)
    finally:
        pool.close()
