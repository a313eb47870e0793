"""Chunks hashed and encoded in worker processes: the same addresses and blobs as this
process makes, only what is not stored yet encoded, and every way a worker or its parent
can end (a killed worker fails the write that used it; a killed parent leaves no worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from blockbackup.api import BlockBackup
from blockbackup.errors import BlockBackupError
from blockbackup.repository import blob, encoders
from blockbackup.repository.drivers import RepoSnapshotDriver
from blockbackup.repository.encoders import HALF, EncoderPool
from blockbackup.repository.errors import RepositoryError
from blockbackup.repository.keys import ZERO_ADDRESS, Keys, new_master_key
from blockbackup.repository.repo import Repository
from repository.test_nodes import PASS, backup_image_driver, raw, snapshot_node

CHUNK = 64 * 1024
MASTERS = {"encrypted": new_master_key(), "not encrypted": None}


def chunks() -> list[memoryview]:
    text = b"some text that compresses well " * (CHUNK // 31 + 1)
    return [
        memoryview(os.urandom(CHUNK)),
        memoryview(bytes(CHUNK)),  # zero: no address, no blob
        memoryview(text[:CHUNK]),
        memoryview(os.urandom(CHUNK - 1000)),  # a disk's short last chunk
    ]


@pytest.mark.parametrize("kind", MASTERS)
def test_workers_give_the_addresses_and_blobs_this_process_gives(kind: str) -> None:
    master = MASTERS[kind]
    keys = Keys(master)
    pieces = chunks()
    pool = EncoderPool(master, 2)
    try:
        with pool.encoded(pieces, lambda _address: False) as encoded:
            assert encoded is not None
            for piece, (address, stored) in zip(pieces, encoded, strict=True):
                if not any(piece):
                    assert address == ZERO_ADDRESS
                    assert not stored
                    continue
                assert address == keys.address(piece)
                plain = blob.decode(keys, bytes(stored), address, "test", len(piece))
                assert plain == piece
            stored_sizes = [len(s) for _a, s in encoded]
        assert stored_sizes[2] < CHUNK // 4  # the text was compressed
    finally:
        pool.close()


def test_only_chunks_not_stored_yet_are_encoded() -> None:
    master = new_master_key()
    keys = Keys(master)
    pieces = chunks()
    stored_already = {keys.address(pieces[0])}
    pool = EncoderPool(master, 1)
    try:
        with pool.encoded(pieces, stored_already.__contains__) as encoded:
            assert encoded is not None
            assert encoded[0] == (keys.address(pieces[0]), b"")  # known: hashed only
            assert len(encoded[2][1]) > 0
            assert len(encoded[3][1]) > 0
    finally:
        pool.close()


def test_a_request_larger_than_a_worker_takes_is_left_to_this_process() -> None:
    pool = EncoderPool(None, 1)
    try:
        too_many = [memoryview(bytes(CHUNK))] * (HALF // CHUNK + 1)
        with pool.encoded(too_many, lambda _a: False) as encoded:
            assert encoded is None
        # exactly a half of random chunks: their blobs would not fit the output half
        full = [memoryview(os.urandom(CHUNK)) for _ in range(HALF // CHUNK)]
        with pool.encoded(full, lambda _a: False) as encoded:
            assert encoded is None
        fits = full[:-1]
        with pool.encoded(fits, lambda _a: False) as encoded:
            assert encoded is not None
            assert all(len(stored) == 1 + CHUNK for _a, stored in encoded)  # flags, data
    finally:
        pool.close()


def test_parallel_requests_each_get_their_own_worker() -> None:
    master = new_master_key()
    keys = Keys(master)
    pool = EncoderPool(master, 2)

    def one(_n: int) -> bool:
        pieces = [memoryview(os.urandom(CHUNK)) for _ in range(8)]
        with pool.encoded(pieces, lambda _a: False) as encoded:
            assert encoded is not None
            return all(
                blob.decode(keys, bytes(s), a, "t", CHUNK) == p
                for p, (a, s) in zip(pieces, encoded, strict=True)
            )

    try:
        with ThreadPoolExecutor(6) as threads:
            assert all(threads.map(one, range(24)))
    finally:
        pool.close()


def test_a_killed_worker_fails_the_write_that_uses_it_and_is_replaced() -> None:
    master = new_master_key()
    keys = Keys(master)
    pool = EncoderPool(master, 1)
    try:
        (worker,) = pool._free
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(timeout=10)
        with (
            pytest.raises(RepositoryError, match="an encoder process"),
            pool.encoded(chunks(), lambda _a: False),
        ):
            pass
        (replacement,) = pool._free
        assert replacement.process.pid != worker.process.pid
        piece = memoryview(os.urandom(CHUNK))
        with pool.encoded([piece], lambda _a: False) as encoded:
            assert encoded is not None
            assert encoded[0][0] == keys.address(piece)
    finally:
        pool.close()


def test_close_stops_every_worker() -> None:
    pool = EncoderPool(new_master_key(), 3)
    processes = [w.process for w in pool._free]
    assert all(p.poll() is None for p in processes)
    pool.close()
    assert all(p.returncode == 0 for p in processes)


def test_one_pool_per_key_serves_every_user_until_the_last_leaves() -> None:
    key, other = new_master_key(), new_master_key()
    first = encoders.shared(key, 2)
    second = encoders.shared(key, 3)  # the first user decided how many
    third = encoders.shared(other, 1)
    try:
        assert second is first
        assert third is not first
        processes = [w.process for w in first._free]
        assert len(processes) == 2
        encoders.release(first)
        assert all(p.poll() is None for p in processes)  # still used by the second
        encoders.release(second)
        assert all(p.returncode == 0 for p in processes)
        fresh = encoders.shared(key, 1)
        assert fresh is not first  # a new one for the next user
        encoders.release(fresh)
    finally:
        encoders.release(third)
    assert not encoders._pools


PARENT = """
import sys, time
from blockbackup.repository.encoders import EncoderPool
pool = EncoderPool(None, 2)
print(" ".join(str(w.process.pid) for w in pool._free), flush=True)
time.sleep(60)
"""


def test_workers_of_a_killed_parent_exit(tmp_path: Path) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    ) as parent:
        assert parent.stdout is not None
        pids = [int(p) for p in parent.stdout.readline().split()]
        parent.send_signal(signal.SIGKILL)
    assert len(pids) == 2
    deadline = time.monotonic() + 20
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        time.sleep(0.05)
    assert not alive


def _running(pid: int) -> bool:
    """Whether ``pid`` runs (an exited worker of a killed parent is reaped by init)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def sample_image(tmp_path: Path) -> Path:
    """3 MiB: random data, a zero MiB, a chunk of text, and a short last chunk."""
    image = tmp_path / "disk.img"
    data = bytearray(os.urandom(3 << 20))
    data[1 << 20 : 2 << 20] = bytes(1 << 20)
    data[2 << 20 : (2 << 20) + CHUNK] = b"text " * (CHUNK // 5) + b"t"
    image.write_bytes(bytes(data) + os.urandom(1000))
    return image


async def committed(repo: Path, image: Path) -> None:
    """A new repository at ``repo`` holding one snapshot of ``image`` (disk ``d``)."""
    Repository.init(str(repo), PASS)
    result = (await backup_image_driver(repo, image, "d")).result
    assert result is not None
    Repository.open(str(repo), PASS).commit([result.record], packs=result.packs)


@pytest.mark.asyncio
async def test_a_backup_stores_the_same_disk_with_workers_or_without(tmp_path: Path) -> None:
    """Through the engine: the target node with its encoder processes (the default) and
    with none (``encoder-processes`` 0) make the same chunks: a backup of the same image
    the other way stores nothing new and ends with the same disk index."""
    image = sample_image(tmp_path)
    repo = tmp_path / "repo"
    Repository.init(str(repo), PASS)
    first = await backup_image_driver(repo, image, "d")
    assert first.encoders is not None
    assert first.result is not None
    assert first.repo.store.stored_blobs == 2 * 16 + 1 + 1  # data, the short one, the index
    for options in ({"encoder-processes": 0}, {}):
        again = await backup_image_driver(repo, image, "d", base="none", **options)
        assert (again.encoders is None) == bool(options)
        assert again.result is not None
        assert again.repo.store.stored_blobs == 0  # every chunk found: the same addresses
        assert again.result.record.segments == first.result.record.segments


@pytest.mark.asyncio
async def test_a_negative_number_of_workers_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(CHUNK))
    Repository.init(str(tmp_path / "repo"), PASS)
    with pytest.raises(BlockBackupError, match="encoder-processes must be non-negative"):
        await backup_image_driver(tmp_path / "repo", image, "d", **{"encoder-processes": -1})
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        with pytest.raises(BlockBackupError, match="encoder-processes must be non-negative"):
            await bb.blockdev_add(snapshot_node(tmp_path / "repo", **{"encoder-processes": -1}))


@pytest.mark.asyncio
async def test_a_restore_reads_the_same_disk_with_decoders_or_without(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the engine: a snapshot node of a local repository has decoder processes
    by default (``encoder-processes`` 0: none); both restore the disk byte-exact. With
    them, no request's data passes through this process: the decoders write it."""
    here: list[int] = []
    read_into = RepoSnapshotDriver.read_into

    def counted(driver: RepoSnapshotDriver, view: memoryview, offset: int) -> None:
        here.append(offset)
        read_into(driver, view, offset)

    monkeypatch.setattr(RepoSnapshotDriver, "read_into", counted)
    image = sample_image(tmp_path)
    repo = tmp_path / "repo"
    await committed(repo, image)
    for options in ({}, {"encoder-processes": 0}):
        here.clear()
        out = tmp_path / "out.img"
        out.write_bytes(b"")
        os.truncate(out, image.stat().st_size)
        async with BlockBackup() as bb:
            bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
            snap = await bb.blockdev_add(snapshot_node(repo, **options))
            assert isinstance(snap.driver, RepoSnapshotDriver)
            assert (snap.driver.decoders is None) == bool(options)
            await bb.blockdev_add(raw("out", out))
            await bb.wait(await bb.backup("snap", "out", sync="full"))
        assert out.read_bytes() == image.read_bytes()
        assert bool(here) == bool(options)


@pytest.mark.asyncio
async def test_reads_inside_a_chunk_are_served_at_once_by_a_node_with_decoders(
    tmp_path: Path,
) -> None:
    """What an NBD client of a mount sends: 4 KiB reads inside 64 KiB chunks, and reads of
    zero chunks only. Their requests hold no whole stored chunk, so the decoders get no
    work; no request may wait for a worker's answer to nothing (one used to take the
    5 s an answer is waited for, and cost the worker)."""
    image = tmp_path / "disk.img"
    data = os.urandom(4 * CHUNK) + bytes(2 * CHUNK) + os.urandom(2 * CHUNK)
    image.write_bytes(data)
    repo = tmp_path / "repo"
    await committed(repo, image)
    async with BlockBackup() as bb:
        bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
        snap = await bb.blockdev_add(snapshot_node(repo))
        assert isinstance(snap.driver, RepoSnapshotDriver)
        assert snap.driver.decoders is not None
        workers = {w.process.pid for w in snap.driver.decoders._free}
        for offset, length in ((4096, 4096), (CHUNK + 512, 8192), (4 * CHUNK, 2 * CHUNK)):
            got = await snap.read(offset, length)
            assert bytes(got) == data[offset : offset + length]
        assert {w.process.pid for w in snap.driver.decoders._free} == workers  # none replaced


def test_requests_get_a_worker_in_the_order_they_asked() -> None:
    """First come, first served: a backup's requests, asked in disk order, store their
    chunks about in disk order (the order a restore reads packs in; measured on S3:
    GETs per GiB restored 54-90 with any waiter taking the worker, 41-42 in order)."""
    pool = EncoderPool(None, 1)
    served: list[int] = []
    try:
        first = pool._acquire()
        threads = []
        for n in range(6):

            def wait(n: int = n) -> None:
                worker = pool._acquire()
                served.append(n)
                pool._release(worker)

            threads.append(threading.Thread(target=wait))
            threads[-1].start()
            deadline = time.monotonic() + 10
            while len(pool._waiting) != n + 1:  # it waits: the next one asks after it
                assert time.monotonic() < deadline
                time.sleep(0.001)
        pool._release(first)
        for thread in threads:
            thread.join(timeout=10)
        assert served == list(range(6))
    finally:
        pool.close()


def test_waiters_fail_when_no_worker_can_be_started_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last worker failed and no new one starts: every request waiting for a worker
    fails with a message instead of waiting for ever, and so does every later one."""
    pool = EncoderPool(None, 1)
    errors: list[str] = []
    try:
        worker = pool._acquire()

        def wait() -> None:
            try:
                pool._acquire()
            except RepositoryError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=wait) for _ in range(3)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while len(pool._waiting) != 3:
            assert time.monotonic() < deadline
            time.sleep(0.001)

        def cannot_start(_master: bytes | None) -> encoders._Worker:
            raise OSError("no more processes")

        monkeypatch.setattr(encoders, "_start", cannot_start)
        worker.failed = True
        pool._release(worker)
        for thread in threads:
            thread.join(timeout=10)
        assert errors == ["no encoder process is left to hash and encode"] * 3
        with pytest.raises(RepositoryError, match="no encoder process is left"):
            pool._acquire()
    finally:
        pool.close()


def test_a_request_interrupted_while_it_waits_leaves_its_turn() -> None:
    """Ctrl-C while the main thread waits for a worker: the turn it left is not handed
    the next free worker (which would be lost, and every later request would wait)."""
    pool = EncoderPool(None, 1)
    try:
        worker = pool._acquire()
        main = threading.get_ident()

        def interrupt_when_waiting() -> None:
            deadline = time.monotonic() + 10
            while not pool._waiting and time.monotonic() < deadline:
                time.sleep(0.001)
            signal.pthread_kill(main, signal.SIGINT)  # as Ctrl-C: wakes the wait

        thread = threading.Thread(target=interrupt_when_waiting)
        thread.start()
        with pytest.raises(KeyboardInterrupt):
            pool._acquire()
        thread.join(timeout=10)
        assert not pool._waiting
        pool._release(worker)
        assert pool._free == [worker]
    finally:
        pool.close()
