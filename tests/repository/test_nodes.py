"""The repository through the engine: backups into a bb-repo-target node with the backup
job, restores from a bb-repo-snapshot node with the same job, on real files."""

from __future__ import annotations

import asyncio
import errno
import os
import time
from pathlib import Path
from typing import Any

import pytest

from blockbackup.api import BackupFailed, BlockBackup
from blockbackup.block.dirty_bitmap import bitmaps_of
from blockbackup.block.driver import Status
from blockbackup.block.node import BlockNode
from blockbackup.errors import BlockBackupError
from blockbackup.jobs.status import JobStatus
from blockbackup.repository import drivers
from blockbackup.repository.errors import CorruptData
from blockbackup.repository.repo import Repository

pytestmark = pytest.mark.asyncio
MiB = 1 << 20
CHUNK = 64 * 1024
PASS = b"node test passphrase"


def raw(name: str, path: Path, **extra: Any) -> dict[str, Any]:
    return {
        "driver": "raw",
        "node-name": name,
        "file": {"driver": "file", "filename": str(path)},
        **extra,
    }


async def backup_image(repo: Path, image: Path, disk: str, **target: Any) -> drivers.TargetResult:
    result = (await backup_image_driver(repo, image, disk, **target)).result
    assert result is not None
    return result


async def backup_image_driver(
    repo: Path, image: Path, disk: str, **target: Any
) -> drivers.RepoTargetDriver:
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        src = await bb.blockdev_add(raw("src", image, **{"read-only": True}))
        node = await bb.blockdev_add(target_node(repo, disk, src.size, **target))
        await bb.wait(await bb.backup("src", "tgt", sync="full"))
        driver = node.driver
        assert isinstance(driver, drivers.RepoTargetDriver)
        assert driver.result is not None
        return driver


def target_node(repo: Path, disk: str, size: int, **extra: Any) -> dict[str, Any]:
    """The options of a ``tgt`` target node of ``repo`` (key ``k``) for ``disk``."""
    return {
        "driver": "bb-repo-target",
        "node-name": "tgt",
        "repository": str(repo),
        "disk": disk,
        "size": size,
        "key-secret": "k",
        **extra,
    }


def snapshot_node(repo: Path, **extra: Any) -> dict[str, Any]:
    """The options of a read-only ``snap`` node of ``repo`` (key ``k``)."""
    return {
        "driver": "bb-repo-snapshot",
        "node-name": "snap",
        "repository": str(repo),
        "key-secret": "k",
        "read-only": True,
        **extra,
    }


async def target_nodes(bb: BlockBackup, repo: Path, images: list[Path]) -> list[BlockNode]:
    """A ``src{n}`` node per image and a ``t{n}`` target node (disk ``vd{n}``) for it."""
    nodes = []
    for n, image in enumerate(images):
        src = await bb.blockdev_add(raw(f"src{n}", image, **{"read-only": True}))
        node = await bb.blockdev_add(
            {
                "driver": "bb-repo-target",
                "node-name": f"t{n}",
                "repository": str(repo),
                "disk": f"vd{n}",
                "size": src.size,
                "key-secret": "k",
            }
        )
        assert isinstance(node.driver, drivers.RepoTargetDriver)
        nodes.append(node)
    return nodes


async def restore(repo: Path, spec: str, out: Path, size: int) -> None:
    with open(out, "wb") as f:  # a new raw image of the disk's size
        f.truncate(size)
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        await bb.blockdev_add(snapshot_node(repo, snapshot=spec))
        await bb.blockdev_add(raw("out", out))
        await bb.wait(await bb.backup("snap", "out", sync="full"))


def make_image(path: Path) -> bytes:
    data = bytearray(os.urandom(8 * MiB))
    data[2 * MiB : 5 * MiB] = bytes(3 * MiB)  # zero run
    path.write_bytes(bytes(data))
    with open(path, "r+b") as f:  # and a hole at the end
        f.truncate(10 * MiB)
    return bytes(data) + bytes(2 * MiB)


async def committed_image(tmp_path: Path) -> tuple[Path, bytes]:
    """A repository holding one snapshot of :func:`make_image`'s image; its content."""
    repo_path = tmp_path / "repo"
    repo = Repository.init(str(repo_path), PASS)
    image = tmp_path / "disk.img"
    content = make_image(image)
    result = await backup_image(repo_path, image, "d")
    repo.commit([result.record], packs=result.packs)
    return repo_path, content


def count_fetches(monkeypatch: pytest.MonkeyPatch, delay: float = 0.0) -> list[bytes]:
    """The addresses a snapshot node reads for parts of requests, in order (each read
    slowed by ``delay`` seconds)."""
    fetched: list[bytes] = []
    read_chunk = drivers._read_chunk

    def counted(repo: Repository, address: bytes, *args: Any) -> bytes:
        fetched.append(address)
        time.sleep(delay)
        return read_chunk(repo, address, *args)

    monkeypatch.setattr(drivers, "_read_chunk", counted)
    return fetched


async def test_backup_restore_incremental(tmp_path: Path) -> None:
    repo_path = tmp_path / "repo"
    repo = Repository.init(str(repo_path), PASS, pack_size=2 * MiB)
    image = tmp_path / "disk.img"
    data = make_image(image)

    first = await backup_image(repo_path, image, "disk0")
    repo.commit([first.record], packs=first.packs)
    out = tmp_path / "restored.img"
    await restore(repo_path, "latest", out, len(data))
    assert out.read_bytes() == data

    # change one 4 KiB block and one byte far away (the next snapshot stores 2 chunks),
    # and zero 1 MiB
    changed = bytearray(data)
    changed[100 * 4096 : 101 * 4096] = os.urandom(4096)
    changed[9 * MiB + 7] ^= 0xFF
    changed[6 * MiB : 7 * MiB] = bytes(MiB)  # data that became zeroes: zero entries
    image.write_bytes(bytes(changed))
    before = sum(p.stat().st_size for p in (repo_path / "data").rglob("*") if p.is_file())
    second = await backup_image(repo_path, image, "disk0")
    assert second.record.source["base"] == repo.snapshot_ids()[0]
    repo.commit([second.record], packs=second.packs)
    after = sum(p.stat().st_size for p in (repo_path / "data").rglob("*") if p.is_file())
    assert after - before < 3 * CHUNK + 16 * 1024  # 2 chunks + a segment + headers

    await restore(repo_path, "latest", out, len(data))
    assert out.read_bytes() == bytes(changed)
    await restore(repo_path, repo.snapshot_ids()[0], out, len(data))
    assert out.read_bytes() == data  # the first snapshot is whole, no chain walk


async def test_restore_of_repeated_chunks_scattered_zeroes_and_a_short_last_chunk(
    tmp_path: Path,
) -> None:
    """A restore reads each request's chunks into one buffer: a chunk used twice in it,
    zero chunks between data (left as holes) and a last chunk shorter than the rest all
    come back byte for byte."""
    repo_path = tmp_path / "repo"
    repo = Repository.init(str(repo_path), PASS)
    same = os.urandom(CHUNK)
    data = bytearray(os.urandom(3 * MiB + 1000))
    data[0:CHUNK] = data[2 * CHUNK : 3 * CHUNK] = data[MiB : MiB + CHUNK] = same
    data[5 * CHUNK : 6 * CHUNK] = data[MiB + 3 * CHUNK : MiB + 5 * CHUNK] = bytes(CHUNK)
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(data))
    result = await backup_image(repo_path, image, "d")
    repo.commit([result.record], packs=result.packs)
    out = tmp_path / "out.img"
    await restore(repo_path, "latest", out, len(data))
    assert out.read_bytes() == bytes(data)
    with open(out, "rb") as f:  # the zero chunk was not written
        assert os.lseek(f.fileno(), 5 * CHUNK, os.SEEK_DATA) == 6 * CHUNK


async def test_snapshot_node_reports_zeroes_and_refuses_damage(tmp_path: Path) -> None:
    repo_path, content = await committed_image(tmp_path)
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        node = await bb.blockdev_add(snapshot_node(repo_path))
        zero = await node.driver.block_status(2 * MiB, 8 * MiB)
        assert zero.status & Status.ZERO
        assert zero.length == 3 * MiB
        hole = await node.driver.block_status(8 * MiB, 2 * MiB)
        assert hole.status & Status.ZERO
        data = await node.driver.block_status(0, 8 * MiB)
        assert data.status & Status.DATA
        assert data.length == 2 * MiB
        for offset, length in ((12345, 200_000), (2 * MiB - 100, 300), (10 * MiB - 7, 7)):
            got = await node.read(offset, length)  # unaligned, across chunks and zeroes
            assert bytes(got) == content[offset : offset + length]
    (pack,) = [p for p in (repo_path / "data").rglob("*") if p.is_file()]
    damaged = bytearray(pack.read_bytes())
    damaged[100] ^= 1
    pack.write_bytes(bytes(damaged))
    with pytest.raises(BackupFailed, match="Input/output error"):
        await restore(repo_path, "latest", tmp_path / "out.img", 10 * MiB)


async def test_reads_of_parts_of_a_chunk_fetch_and_decode_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An NBD client's 4 KiB reads (a guest booting from a mount): each chunk is read from
    its pack (a GET on S3) and decoded once for all its parts, which are then answered at
    once, without a thread; the chunks kept stay within ``RECENT_BYTES``."""
    repo_path, content = await committed_image(tmp_path)
    fetched = count_fetches(monkeypatch)
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        node = await bb.blockdev_add(snapshot_node(repo_path, **{"encoder-processes": 0}))
        for offset in range(0, 2 * CHUNK, 4096):
            got = await node.read(offset, 4096)
            assert bytes(got) == content[offset : offset + 4096]
        assert len(fetched) == 2 == len(set(fetched))
        assert isinstance(node.driver, drivers.RepoSnapshotDriver)
        kept = node.driver.submit_read(CHUNK - 100, 200)  # both chunks kept: at once
        assert isinstance(kept, bytearray)
        assert bytes(kept) == content[CHUNK - 100 : CHUNK + 100]
        later = node.driver.submit_read(2 * CHUNK + 5, 10)  # not kept: in a thread
        assert not isinstance(later, (bytes, bytearray, memoryview))
        later.close()
        zeroes = node.driver.submit_read(3 * MiB, 100)  # a zero chunk: nothing to read
        assert zeroes == bytes(100)
        for offset in range(0, 8 * MiB, CHUNK):  # part of every chunk: 80 of data
            got = await node.read(offset + 100, 100)
            assert bytes(got) == content[offset + 100 : offset + 200]
        assert len(fetched) == 80  # the first two again from what was kept
        assert len(node.driver._recent) == drivers.RECENT_BYTES // CHUNK


async def test_parallel_reads_of_parts_of_one_chunk_fetch_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client's queue of 4 KiB reads of one chunk: the first fetches and decodes it,
    the others wait for it (the fetch is slowed so that they all arrive meanwhile); a
    damaged chunk fails every one of them, named once."""
    repo_path, content = await committed_image(tmp_path)
    fetched = count_fetches(monkeypatch, delay=0.2)
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        node = await bb.blockdev_add(snapshot_node(repo_path))
        offsets = range(CHUNK, 2 * CHUNK, 8192)
        got = await asyncio.gather(*(node.read(o, 4096) for o in offsets))
        assert [bytes(g) for g in got] == [content[o : o + 4096] for o in offsets]
        assert len(fetched) == 1
        assert isinstance(node.driver, drivers.RepoSnapshotDriver)
        victim = node.driver.index.get(5)
        damaged: list[str] = []

        def bad(*args: Any) -> bytes:
            time.sleep(0.2)
            drivers._damaged(CorruptData("bad"), "d", 5 * CHUNK, damaged)

        monkeypatch.setattr(drivers, "_read_chunk", bad)
        results = await asyncio.gather(
            *(node.read(5 * CHUNK + o, 4096) for o in range(0, CHUNK, 16384)),  # 4 < threads
            return_exceptions=True,
        )
        assert all(isinstance(r, OSError) and r.errno == errno.EIO for r in results), results
        assert damaged == ["disk d at offset 327680: bad"]
        assert victim not in node.driver._recent
        assert not node.driver._fetching


async def test_bad_options_are_clear_errors(tmp_path: Path) -> None:
    repo_path = tmp_path / "repo"
    Repository.init(str(repo_path), PASS)
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "bad", "data": "nope"})
        with pytest.raises(BlockBackupError, match="wrong passphrase"):
            await bb.blockdev_add(
                {
                    "driver": "bb-repo-snapshot",
                    "node-name": "s",
                    "repository": str(repo_path),
                    "key-secret": "bad",
                    "read-only": True,
                }
            )
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        with pytest.raises(BlockBackupError, match="no snapshots"):
            await bb.blockdev_add(
                {
                    "driver": "bb-repo-snapshot",
                    "node-name": "s",
                    "repository": str(repo_path),
                    "key-secret": "k",
                    "read-only": True,
                }
            )
        with pytest.raises(BlockBackupError, match="not a blockbackup repository"):
            await bb.blockdev_add(
                {
                    "driver": "bb-repo-target",
                    "node-name": "t",
                    "repository": str(tmp_path),
                    "disk": "d",
                    "size": MiB,
                }
            )


async def test_incremental_from_a_dirty_bitmap_stores_the_changed_clusters(
    tmp_path: Path,
) -> None:
    """The live path: a bitmap records guest writes; the incremental job writes only the
    dirty clusters into a target that starts from the last snapshot, and the result is a
    complete snapshot (restores alone)."""
    repo_path = tmp_path / "repo"
    repo = Repository.init(str(repo_path), PASS)
    image = tmp_path / "disk.img"
    original = os.urandom(16 * MiB)
    image.write_bytes(original)
    writes = [(3 * 4096, os.urandom(4096)), (5 * MiB + 512, os.urandom(4096))]
    writes += [(9 * MiB, os.urandom(MiB)), (15 * MiB + 8192, os.urandom(100))]
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        src = await bb.blockdev_add(raw("src", image))
        bitmaps_of(src).create("b0", CHUNK)

        async def target(name: str) -> drivers.RepoTargetDriver:
            node = await bb.blockdev_add(
                {
                    "driver": "bb-repo-target",
                    "node-name": name,
                    "repository": str(repo_path),
                    "disk": "vda",
                    "size": src.size,
                    "key-secret": "k",
                }
            )
            assert isinstance(node.driver, drivers.RepoTargetDriver)
            return node.driver

        full = await target("t1")
        await bb.wait(await bb.backup("src", "t1", sync="full"))
        assert full.result is not None
        repo.commit([full.result.record], packs=full.result.packs)
        for offset, data in writes:  # the guest writes between the two backups
            await src.write(offset, data)
        incremental = await target("t2")
        await bb.wait(await bb.backup("src", "t2", sync="incremental", bitmap="b0"))
        assert incremental.result is not None
        repo.commit([incremental.result.record], packs=incremental.result.packs)
        # the dirty chunks (1 + 1 + 16 + 1) and one disk index segment, of 256 chunks
        assert incremental.counts.stored_blobs == 1 + 1 + 16 + 1 + 1
    expected = bytearray(original)
    for offset, data in writes:
        expected[offset : offset + len(data)] = data
    out = tmp_path / "out.img"
    await restore(repo_path, "latest", out, len(expected))
    assert out.read_bytes() == bytes(expected)
    await restore(repo_path, repo.snapshot_ids()[0], out, len(original))
    assert out.read_bytes() == original


async def test_failed_backup_commits_nothing_and_its_chunks_are_reused(tmp_path: Path) -> None:
    """A source read error (blkdebug) fails the job: no snapshot; the chunks the failed run
    stored (flushed when its graph closed) are not stored again by the next run."""
    repo_path = tmp_path / "repo"
    repo = Repository.init(str(repo_path), PASS)
    image = tmp_path / "disk.img"
    data = os.urandom(8 * MiB)
    image.write_bytes(data)
    rule = {"event": "read_aio", "errno": 5, "sector": 6 * MiB // 512, "once": False}
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        src = await bb.blockdev_add(
            {
                "driver": "blkdebug",
                "node-name": "src",
                "image": raw("src-raw", image),
                "inject-error": [rule],
            }
        )
        await bb.blockdev_add(
            {
                "driver": "bb-repo-target",
                "node-name": "tgt",
                "repository": str(repo_path),
                "disk": "d",
                "size": src.size,
                "key-secret": "k",
            }
        )
        with pytest.raises(BackupFailed, match="Input/output error"):
            await bb.wait(await bb.backup("src", "tgt", sync="full"))
    assert repo.snapshot_ids() == []
    stored_before = len(Repository.open(str(repo_path), PASS).store)
    assert stored_before > 1  # chunks (and a disk index segment) reached the repository
    driver = await backup_image_driver(repo_path, image, "d")
    assert driver.repo.store.reused_blobs >= stored_before - 1  # all but the old segment
    assert driver.repo.store.stored_blobs + stored_before == len(driver.repo.store)
    assert driver.result is not None
    repo.commit([driver.result.record], packs=driver.result.packs)
    out = tmp_path / "out.img"
    await restore(repo_path, "latest", out, len(data))
    assert out.read_bytes() == data


async def test_target_nodes_of_one_graph_share_the_opened_repository(tmp_path: Path) -> None:
    """Two disks of one live backup: one opened repository (one writer marker, one table)
    for both target nodes, written in parallel; each node counts what it stored itself; the
    marker stays until the last node closes; one snapshot of both restores byte-exact. A
    node with another secret opens (and is refused) by itself."""
    repo_path = tmp_path / "repo"
    Repository.init(str(repo_path), PASS)
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    datas = [make_image(images[0]), make_image(images[1])]

    def markers() -> list[str]:
        return sorted(p.name for p in (repo_path / "writers").iterdir())

    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        bb.object_add({"qom-type": "secret", "id": "wrong", "data": "not the passphrase"})
        targets = await target_nodes(bb, repo_path, images)
        first, second = (t.driver for t in targets)
        assert isinstance(first, drivers.RepoTargetDriver)
        assert isinstance(second, drivers.RepoTargetDriver)
        assert first.repo is second.repo
        assert len(markers()) == 1
        with pytest.raises(BlockBackupError, match="wrong passphrase"):
            await bb.blockdev_add(
                {
                    "driver": "bb-repo-target",
                    "node-name": "t9",
                    "repository": str(repo_path),
                    "disk": "vd9",
                    "size": MiB,
                    "key-secret": "wrong",
                }
            )
        jobs = [await bb.backup(f"src{n}", f"t{n}", sync="full") for n in range(2)]
        for job in jobs:
            await bb.wait(job)
        assert first.result is not None
        assert second.result is not None
        manifest = first.repo.commit(
            [first.result.record, second.result.record],
            packs=first.result.packs | second.result.packs,
        )
        # 5 MiB of data in each image (8 MiB less a 3 MiB zero run), and a segment each
        for driver in (first, second):
            assert driver.counts.stored_blobs == 5 * MiB // CHUNK + 1
            assert driver.counts.stored_index_blobs == 1
        store = first.repo.store
        assert first.counts + second.counts == store.tally()
        await bb.graph.drop(targets[0])
        assert len(markers()) == 1  # the other node still writes with that table
        await bb.graph.drop(targets[1])
        assert markers() == []
    for n, data in enumerate(datas):
        out = tmp_path / f"out{n}.img"
        await restore(repo_path, f"{manifest.id}:vd{n}", out, len(data))
        assert out.read_bytes() == data


async def test_a_commit_while_another_backup_writes_into_the_shared_store(
    tmp_path: Path,
) -> None:
    """Two backups of one daemon into one repository, the second still copying (rate
    limited) when the first commits: the commit flushes the shared store under its lock,
    and both snapshots restore byte-exact."""
    repo_path = tmp_path / "repo"
    Repository.init(str(repo_path), PASS)
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    datas = [make_image(images[0]), make_image(images[1])]
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        drivers_ = [node.driver for node in await target_nodes(bb, repo_path, images)]
        slow = await bb.backup("src1", "t1", sync="full", speed=4 * MiB)  # ~1.5 s
        await bb.wait(await bb.backup("src0", "t0", sync="full"))
        first, second = drivers_
        assert isinstance(first, drivers.RepoTargetDriver)
        assert isinstance(second, drivers.RepoTargetDriver)
        assert first.result is not None
        assert slow.status is JobStatus.RUNNING  # still writing into the same store
        one = await asyncio.to_thread(first.commit, [first.result.record], None, first.result.packs)
        await bb.wait(slow)
        assert second.result is not None
        two = await asyncio.to_thread(
            second.commit, [second.result.record], None, second.result.packs
        )
    for n, (manifest, data) in enumerate(zip((one, two), datas, strict=True)):
        out = tmp_path / f"out{n}.img"
        await restore(repo_path, f"{manifest.id}:vd{n}", out, len(data))
        assert out.read_bytes() == data
