"""The chunk store's grouped reads and written-behind packs, on a real directory repository.

A restore reads a request's chunks with ``read_many``: one ranged read per run of
neighbouring blobs of a pack (one GET on an object store), every blob still checked on its
own, so one damaged chunk is named and its neighbours are returned intact.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockbackup.repository import blob, directio
from blockbackup.repository.backend import DirectoryBackend
from blockbackup.repository.chunkstore import ChunkStore, pack_key
from blockbackup.repository.encoders import EncoderPool
from blockbackup.repository.errors import CorruptData
from blockbackup.repository.repo import CHUNK_SIZE, Repository

PASS = b"grouped reads passphrase"


class CountingBackend(DirectoryBackend):
    """The directory backend, counting the ranged reads of packs (real files)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        super().__init__(root)
        self.pack_reads = 0

    def get(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if key.startswith("data/"):
            self.pack_reads += 1
        return super().get(key, offset, length)

    def get_buffer(
        self,
        key: str,
        offset: int = 0,
        length: int | None = None,
        into: directio.ReadBuffer | None = None,
    ) -> bytes | memoryview:
        if key.startswith("data/"):
            self.pack_reads += 1
        return super().get_buffer(key, offset, length, into)


def flip_stored_byte(tmp_path: Path, store: ChunkStore, address: bytes, at: int) -> None:
    """Damage one byte of a chunk's stored bytes in its pack (``at`` < 0: from its end)."""
    victim = store.locate(address)
    path = tmp_path / "r" / pack_key(victim.pack)
    raw = bytearray(path.read_bytes())
    raw[victim.offset + (at if at >= 0 else victim.length + at)] ^= 1
    path.write_bytes(bytes(raw))


def stored_chunks(tmp_path: Path, count: int, pack_size: int) -> tuple[Repository, list[bytes]]:
    repo = Repository.init(str(tmp_path / "r"), PASS, pack_size=pack_size)
    chunks = [os.urandom(CHUNK_SIZE) for _ in range(count)]
    for chunk in chunks:
        repo.store.add(repo.keys.address(chunk), chunk)
    repo.store.flush()
    return repo, chunks


class NoLocalPathsBackend(CountingBackend):
    """The directory backend, showing no local paths, as an object store shows none: a
    worker then decodes runs that this process read into its memory."""

    def local_path(self, key: str) -> Path | None:
        return None


def reader(tmp_path: Path, where: str = "here") -> tuple[ChunkStore, CountingBackend]:
    repo = Repository.open(str(tmp_path / "r"), PASS)
    kind = NoLocalPathsBackend if where == STAGED else CountingBackend
    backend = kind(tmp_path / "r")
    store = ChunkStore(backend, repo.keys, int(repo.config["pack_size"]), repo.pack_hash)
    store.load()
    return store, backend


def test_neighbouring_chunks_of_a_pack_come_in_one_read(tmp_path: Path) -> None:
    repo, chunks = stored_chunks(tmp_path, 16, 16 << 20)
    store, backend = reader(tmp_path)
    addresses = [repo.keys.address(c) for c in chunks]
    got = store.read_many(addresses)
    assert [got[a] for a in addresses] == chunks
    assert backend.pack_reads == 1


def test_one_read_per_pack_when_chunks_span_packs(tmp_path: Path) -> None:
    repo, chunks = stored_chunks(tmp_path, 12, 4 * CHUNK_SIZE)  # packs of ~4 chunks
    store, backend = reader(tmp_path)
    addresses = [repo.keys.address(c) for c in chunks]
    packs = {store.locate(a).pack for a in addresses}
    assert len(packs) > 1
    got = store.read_many(addresses)
    assert [got[a] for a in addresses] == chunks
    assert backend.pack_reads == len(packs)


def test_a_damaged_chunk_is_named_and_its_neighbours_are_returned(tmp_path: Path) -> None:
    repo, chunks = stored_chunks(tmp_path, 8, 16 << 20)
    store, _backend = reader(tmp_path)
    addresses = [repo.keys.address(c) for c in chunks]
    flip_stored_byte(tmp_path, store, addresses[3], 40)
    got = store.read_many(addresses)
    damaged = got[addresses[3]]
    assert isinstance(damaged, CorruptData)
    assert addresses[3].hex() in str(damaged)
    assert [got[a] for n, a in enumerate(addresses) if n != 3] == chunks[:3] + chunks[4:]


def test_a_missing_pack_names_each_chunk_it_held(tmp_path: Path) -> None:
    repo, chunks = stored_chunks(tmp_path, 4, 16 << 20)
    store, _backend = reader(tmp_path)
    addresses = [repo.keys.address(c) for c in chunks]
    (tmp_path / "r" / pack_key(store.locate(addresses[0]).pack)).unlink()
    got = store.read_many(addresses)
    for address in addresses:
        error = got[address]
        assert isinstance(error, CorruptData)
        assert "missing" in str(error)
        assert address.hex() in str(error)


def test_chunks_added_while_packs_are_written_behind_are_known_and_durable(
    tmp_path: Path,
) -> None:
    """Packs go to writer threads as they fill: every chunk is known (deduplicated) from
    the moment it is added, and all are durable, each once, after the flush."""
    repo = Repository.init(str(tmp_path / "r"), PASS, pack_size=2 * CHUNK_SIZE)
    chunks = [os.urandom(CHUNK_SIZE) for _ in range(9)]
    for chunk in chunks:
        assert repo.store.add(repo.keys.address(chunk), chunk)
        assert repo.store.has(repo.keys.address(chunk))
    for chunk in chunks:  # again, while packs may still be in flight: nothing stored twice
        assert not repo.store.add(repo.keys.address(chunk), chunk)
    assert len(repo.store) == len(chunks)
    repo.store.flush()
    again = Repository.open(str(tmp_path / "r"), PASS)
    assert len(again.store) == len(chunks)
    for chunk in chunks:
        assert again.store.read(again.keys.address(chunk)) == chunk


@contextlib.contextmanager
def decoders_for(repo: Repository, where: str) -> Iterator[EncoderPool | None]:
    """None (this thread decodes) or a pool of one worker process with the repository's key."""
    if where == "here":
        yield None
        return
    pool = EncoderPool(repo.keys.master, 1)
    try:
        yield pool
    finally:
        pool.close()


STAGED = "in a worker, the runs read here"
DECODERS = ["here", "in a worker", STAGED]


@pytest.mark.parametrize("where", DECODERS)
def test_chunks_are_decoded_into_their_places_with_one_read(
    tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``read_into``: each chunk lands at each of its places (a chunk used twice in one
    request is read and decoded once); neighbours in a pack come in one read (by the
    worker, which reads the pack file itself, when there is one); a worker decodes,
    not this process."""
    if where != "here":
        monkeypatch.setattr(blob, "decode_into", _not_here)
    repo, chunks = stored_chunks(tmp_path, 6, 16 << 20)
    store, backend = reader(tmp_path, where)
    addresses = [repo.keys.address(c) for c in chunks]
    order = [0, 1, 2, 1, 3, 4, 5, 0]  # chunks 0 and 1 twice
    places: dict[bytes, list[tuple[int, int]]] = {}
    for n, k in enumerate(order):
        places.setdefault(addresses[k], []).append((n * CHUNK_SIZE, CHUNK_SIZE))
    out = bytearray(len(order) * CHUNK_SIZE)
    with decoders_for(repo, where) as decoders:
        assert store.read_into(memoryview(out), places, decoders) == {}
    assert bytes(out) == b"".join(chunks[k] for k in order)
    assert backend.pack_reads == (0 if where == "in a worker" else 1)


def test_a_killed_decoder_leaves_the_request_to_this_thread_and_is_replaced(
    tmp_path: Path,
) -> None:
    repo, chunks = stored_chunks(tmp_path, 3, 16 << 20)
    store, backend = reader(tmp_path)
    places = in_order([repo.keys.address(c) for c in chunks])
    with decoders_for(repo, "in a worker") as decoders:
        assert decoders is not None
        (worker,) = decoders._free
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(timeout=10)
        out = bytearray(3 * CHUNK_SIZE)
        assert store.read_into(memoryview(out), places, decoders) == {}
        assert bytes(out) == b"".join(chunks)
        assert backend.pack_reads == 1  # read here
        (replacement,) = decoders._free
        assert replacement.process.pid != worker.process.pid
        out = bytearray(3 * CHUNK_SIZE)
        assert store.read_into(memoryview(out), places, decoders) == {}
        assert bytes(out) == b"".join(chunks)
        assert backend.pack_reads == 1  # by the new worker


@pytest.mark.parametrize("where", DECODERS)
def test_a_chunk_decoded_into_place_is_named_when_damaged(tmp_path: Path, where: str) -> None:
    repo, chunks = stored_chunks(tmp_path, 4, 16 << 20)
    store, _backend = reader(tmp_path, where)
    addresses = [repo.keys.address(c) for c in chunks]
    flip_stored_byte(tmp_path, store, addresses[2], -3)  # in the GCM tag
    out = bytearray(4 * CHUNK_SIZE)
    places = in_order(addresses)
    with decoders_for(repo, where) as decoders:
        failed = store.read_into(memoryview(out), places, decoders)
    assert list(failed) == [addresses[2]]
    assert addresses[2].hex() in str(failed[addresses[2]])
    assert "authentication failed" in str(failed[addresses[2]])
    for n in (0, 1, 3):
        assert out[n * CHUNK_SIZE : (n + 1) * CHUNK_SIZE] == chunks[n]


@pytest.mark.parametrize("where", DECODERS)
def test_a_chunk_whose_length_is_not_its_place_is_refused(tmp_path: Path, where: str) -> None:
    """A place longer than the stored chunk would keep stale bytes of a reused buffer:
    the chunk is refused instead, named."""
    repo, chunks = stored_chunks(tmp_path, 2, 16 << 20)
    store, _backend = reader(tmp_path, where)
    addresses = [repo.keys.address(c) for c in chunks]
    places = {addresses[0]: [(0, CHUNK_SIZE + 512)], addresses[1]: [(2 * CHUNK_SIZE, CHUNK_SIZE)]}
    out = bytearray(3 * CHUNK_SIZE)
    with decoders_for(repo, where) as decoders:
        failed = store.read_into(memoryview(out), places, decoders)
    assert list(failed) == [addresses[0]]
    assert "does not match" in str(failed[addresses[0]])
    assert out[2 * CHUNK_SIZE :] == chunks[1]


@pytest.mark.parametrize("where", DECODERS)
def test_chunks_of_a_missing_pack_are_each_named_by_read_into(tmp_path: Path, where: str) -> None:
    repo, chunks = stored_chunks(tmp_path, 3, 16 << 20)
    store, _backend = reader(tmp_path, where)
    addresses = [repo.keys.address(c) for c in chunks]
    (tmp_path / "r" / pack_key(store.locate(addresses[0]).pack)).unlink()
    places = in_order(addresses)
    with decoders_for(repo, where) as decoders:
        failed = store.read_into(memoryview(bytearray(3 * CHUNK_SIZE)), places, decoders)
    assert set(failed) == set(addresses)
    assert all("missing" in str(e) for e in failed.values())


def in_order(addresses: list[bytes]) -> dict[bytes, list[tuple[int, int]]]:
    """Each chunk in one place, one after another."""
    return {a: [(n * CHUNK_SIZE, CHUNK_SIZE)] for n, a in enumerate(addresses)}


def write_case(
    tmp_path: Path, count: int
) -> tuple[Repository, list[bytes], ChunkStore, dict[bytes, list[tuple[int, int]]], Path]:
    """``count`` stored chunks, a store reading them, their places one after another, and
    a target file of 0xEE bytes as long."""
    repo, chunks = stored_chunks(tmp_path, count, 16 << 20)
    store, _backend = reader(tmp_path)
    places = in_order([repo.keys.address(c) for c in chunks])
    return repo, chunks, store, places, write_target(tmp_path, count * CHUNK_SIZE)


def _not_here(*args: object) -> None:
    raise AssertionError("decoded in this process")


def write_target(tmp_path: Path, size: int) -> Path:
    """A file of ``size`` bytes of 0xEE: what a write left alone still shows."""
    path = tmp_path / "target.img"
    path.write_bytes(b"\xee" * size)
    return path


@pytest.mark.parametrize("where", ["in a worker", STAGED])
def test_a_worker_writes_a_range_into_the_file_but_for_its_zero_grains(
    tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``write_in_workers``: every chunk at each of its places, the zero chunks between
    them as zeroes inside a grain that holds data, and a grain of zero chunks only left
    alone and returned as skipped; the worker reads the pack itself (from local files)
    and decodes."""
    monkeypatch.setattr(blob, "decode_into", _not_here)
    repo, chunks = stored_chunks(tmp_path, 3, 16 << 20)
    store, backend = reader(tmp_path, where)
    addresses = [repo.keys.address(c) for c in chunks]
    order = [0, None, 1, 1, None, None, 2, 0]  # None: a zero chunk (no place)
    places: dict[bytes, list[tuple[int, int]]] = {}
    for n, k in enumerate(order):
        if k is not None:
            places.setdefault(addresses[k], []).append((n * CHUNK_SIZE, CHUNK_SIZE))
    length = len(order) * CHUNK_SIZE
    offset = 3 * CHUNK_SIZE
    target = write_target(tmp_path, offset + length + CHUNK_SIZE)
    with decoders_for(repo, "in a worker") as decoders, open(target, "r+b") as f:
        assert decoders is not None
        skipped = store.write_in_workers(
            f.fileno(), offset, length, places, 2 * CHUNK_SIZE, decoders
        )
    assert skipped == [(4 * CHUNK_SIZE, 2 * CHUNK_SIZE)]
    expected = [chunks[k] if k is not None else bytes(CHUNK_SIZE) for k in order]
    expected[4:6] = [b"\xee" * CHUNK_SIZE] * 2  # skipped: not written
    data = target.read_bytes()
    assert data[:offset] == b"\xee" * offset
    assert data[offset + length :] == b"\xee" * CHUNK_SIZE
    assert data[offset : offset + length] == b"".join(expected)
    assert backend.pack_reads == (1 if where == STAGED else 0)


def test_a_worker_writes_nothing_when_a_chunk_is_damaged(tmp_path: Path) -> None:
    """None, and the file untouched: the copy then reads the range here, which names
    the damaged chunk (as ``read_into`` does), and writes no wrong byte."""
    repo, chunks, store, places, target = write_case(tmp_path, 3)
    flip_stored_byte(tmp_path, store, repo.keys.address(chunks[1]), 40)
    with decoders_for(repo, "in a worker") as decoders, open(target, "r+b") as f:
        assert decoders is not None
        assert (
            store.write_in_workers(f.fileno(), 0, 3 * CHUNK_SIZE, places, CHUNK_SIZE, decoders)
            is None
        )
    assert target.read_bytes() == b"\xee" * (3 * CHUNK_SIZE)


def test_a_worker_that_cannot_write_raises_the_write_error(tmp_path: Path) -> None:
    repo, _chunks, store, places, target = write_case(tmp_path, 2)
    with decoders_for(repo, "in a worker") as decoders, open(target, "rb") as f:
        assert decoders is not None
        with pytest.raises(OSError, match="Bad file descriptor") as caught:
            store.write_in_workers(f.fileno(), 0, 2 * CHUNK_SIZE, places, CHUNK_SIZE, decoders)
    assert caught.value.errno == errno.EBADF  # a descriptor open for reading only


def test_a_killed_worker_leaves_the_write_to_the_caller_and_is_replaced(tmp_path: Path) -> None:
    repo, chunks, store, places, target = write_case(tmp_path, 2)
    with decoders_for(repo, "in a worker") as decoders, open(target, "r+b") as f:
        assert decoders is not None
        (worker,) = decoders._free
        worker.process.send_signal(signal.SIGKILL)
        worker.process.wait(timeout=10)
        assert (
            store.write_in_workers(f.fileno(), 0, 2 * CHUNK_SIZE, places, CHUNK_SIZE, decoders)
            is None
        )
        assert target.read_bytes() == b"\xee" * (2 * CHUNK_SIZE)
        assert (
            store.write_in_workers(f.fileno(), 0, 2 * CHUNK_SIZE, places, CHUNK_SIZE, decoders)
            == []
        )
    assert target.read_bytes() == b"".join(chunks)
