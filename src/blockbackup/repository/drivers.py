"""The repository as block nodes: a backup target and a read-only snapshot.

Why nodes: a backup into the repository is then the same backup job (point in time,
copy-before-write, bitmaps, transactions) with a repository node as its target, and a
restore is the same job from a snapshot node into a file node; an NBD export of a snapshot
node is a mount. Both are made from blockdev-add options like every node::

    {"driver": "bb-repo-target", "node-name": "t", "repository": "/srv/bb", "disk": "disk0",
     "size": 2147483648, "key-secret": "bbkey", "base": "latest"}
    {"driver": "bb-repo-snapshot", "node-name": "s", "repository": "/srv/bb",
     "snapshot": "latest", "disk": "disk0", "key-secret": "bbkey", "read-only": true}

``key-secret`` names a ``secret`` object (the passphrase or key file's bytes), so no
secret is ever in the options. Importing this module registers both drivers.

The target commits no snapshot: its ``flush`` makes its chunks and its disk index durable
and records the result (:attr:`RepoTargetDriver.result`); whoever ran the backup commits
one manifest for all the disks of the backup (the CLI after the job completed).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import threading
from collections import OrderedDict
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from typing import Any, ClassVar, NoReturn

from blockbackup._aio import run_blocking, run_undoable
from blockbackup.block.copy_range import Reader, SourceReadError
from blockbackup.block.driver import (
    BlockDriver,
    Buffer,
    Extent,
    Limits,
    Status,
    WriteFlags,
    io_error,
)
from blockbackup.block.driver import register as register_driver
from blockbackup.block.node import BlockNode
from blockbackup.block.options import Options
from blockbackup.errors import BlockBackupError
from blockbackup.repository import blob, catalog, opened
from blockbackup.repository import encoders as encoder_pools
from blockbackup.repository.catalog import DiskRecord, Manifest
from blockbackup.repository.chunkstore import Counts
from blockbackup.repository.diskindex import DiskIndex
from blockbackup.repository.encoders import Encoded, EncoderPool, default_workers
from blockbackup.repository.errors import CorruptData, RepositoryError
from blockbackup.repository.keys import ZERO_ADDRESS
from blockbackup.repository.repo import Repository
from blockbackup.repository.s3config import OPTION_NAMES as STORAGE_OPTIONS

__all__ = ["RepoSnapshotDriver", "RepoTargetDriver", "TargetResult"]

#: The most bytes of chunks a snapshot node keeps for reads of a part of a chunk (4 MiB:
#: 64 chunks of the default size).
RECENT_BYTES = 4 << 20
#: The smallest read a snapshot node's decoder processes serve (measured one at a time,
#: 64 KiB: 268 us in the thread, 386 us through a worker; 256 KiB: 689 / 762 us; 1 MiB:
#: 2,106 / 2,037 us, and a copy's parallel requests then decode in parallel).
WORKER_READ_MIN = 512 << 10


def _secret(node: BlockNode, opts: Options) -> bytes | None:
    secret_id = opts.str("key-secret", None)
    if secret_id is None:
        return None
    return node.graph.objects.secret(secret_id).data


def _storage(opts: Options) -> dict[str, str | None]:
    # where an s3:// repository is; never credentials (those stay in the environment)
    return {name: opts.str(name, None) for name in STORAGE_OPTIONS}


async def _open_repository(node: BlockNode, opts: Options, writer: bool = False) -> Repository:
    """Open and load the repository; a ``writer`` announces itself first (its marker must
    exist before it learns any pack, so gc defers deleting what it may rely on)."""
    location = opts.str("repository")
    storage = _storage(opts)
    secret = _secret(node, opts)
    try:
        repo = await asyncio.to_thread(Repository.open, location, secret, storage)
    except RepositoryError as exc:
        raise BlockBackupError(str(exc)) from None
    try:
        if writer:
            await run_undoable(repo.announce_writer, lambda _none: repo.retire_writer())
        await asyncio.to_thread(lambda: repo.store)  # loads the pack indexes
    except BaseException as exc:
        await asyncio.to_thread(_give_back, repo)
        if isinstance(exc, RepositoryError):
            raise BlockBackupError(str(exc)) from None
        raise
    return repo


def _give_back(repo: Repository) -> None:
    """Retire the writer marker (if any), then close the repository's backend."""
    try:
        repo.retire_writer()
    finally:
        repo.close()


def _is_zero(data: bytes | bytearray | memoryview) -> bool:
    view = memoryview(data)
    return view.nbytes == 0 or (view[0] == 0 and bytes(view).count(0) == view.nbytes)


class _RepoDisk(BlockDriver):
    """One disk of the repository seen as a node: reads through its disk index."""

    limits = Limits(request_alignment=1, cluster_size=64 * 1024)

    def __init__(self, node: BlockNode, repo: Repository, index: DiskIndex, name: str) -> None:
        super().__init__(node)
        self.repo = repo
        self.index = index
        self.disk = name
        self.chunk = index.chunk_size
        self._zeroes = memoryview(bytes(self.chunk))  # sliced without copies
        #: One request at a time touches the index and the store (they are not thread-safe).
        #: A thread lock, taken by the thread that does the work: a write then costs one
        #: hop to a thread (hash and encode in parallel, then enter under the lock), not
        #: one hop per step with an event-loop lock between them.
        self._lock = threading.Lock()
        #: What damaged data reads met, each naming the chunk, pack and disk offset (a job
        #: reports only the errno; the command that ran it reports these).
        self.damaged: list[str] = []
        #: The last storage error (e.g. S3 after its retries, a damaged local table), for
        #: the command's message.
        self.storage_error: str | None = None

    def _wrap(self, exc: OSError | RepositoryError) -> OSError:
        """A storage error as EIO, as a disk fails; its text kept for the command (a job
        reports only "Input/output error")."""
        if isinstance(exc, OSError):
            return exc
        self.storage_error = str(exc)
        return io_error(errno.EIO, str(exc))

    @contextlib.contextmanager
    def _storage(self) -> Iterator[None]:
        """Inside, a repository error becomes EIO (:meth:`_wrap`): the copy engine and the
        NBD server handle I/O errors, not the repository's own."""
        try:
            yield
        except RepositoryError as exc:
            raise self._wrap(exc) from None

    @property
    def size(self) -> int:
        return self.index.size

    def _read_sync(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        end = offset + length
        pos = offset
        while pos < end:
            i = pos // self.chunk
            start = i * self.chunk
            stop = min(start + self.index.chunk_length(i), end)
            address = self.index.get(i)
            if address != ZERO_ADDRESS:
                data = _read_chunk(self.repo, address, self.disk, start, self.damaged)
                out[pos - offset : stop - offset] = data[pos - start : stop - start]
            pos = stop
        return out

    def _locked_read(self, offset: int, length: int) -> bytearray:
        with self._lock, self._storage():
            return self._read_sync(offset, length)

    async def read(self, offset: int, length: int) -> bytearray:
        return await asyncio.to_thread(self._locked_read, offset, length)

    def _status_sync(self, offset: int, length: int) -> Extent:
        with self._lock, self._storage():  # a lookup may load (read) a segment of the index
            return self._status(offset, length, self.size)

    def _status(self, offset: int, length: int, limit: int) -> Extent:
        i = offset // self.chunk
        zero = self.index.get(i) == ZERO_ADDRESS
        end = min(offset + length, limit)
        pos = (i + 1) * self.chunk
        while pos < end and (self.index.get(pos // self.chunk) == ZERO_ADDRESS) == zero:
            pos += self.chunk
        status = Status.ALLOCATED | (Status.ZERO if zero else Status.DATA)
        return Extent(offset, min(pos, end) - offset, status)

    async def block_status(self, offset: int, length: int) -> Extent:
        """Zero entries are zero; stored chunks are data. One run of either kind.

        Answered on the loop when the lock is free and the index segment is in memory
        (up to that segment's end: nothing to read), else in a thread."""
        if self._lock.acquire(blocking=False):
            try:
                segment = self.index.loaded_segment(offset // self.chunk)
                if segment is not None:
                    return self._status(offset, length, min(self.size, segment[1] * self.chunk))
            finally:
                self._lock.release()
        return await asyncio.to_thread(self._status_sync, offset, length)


class TargetResult:
    """What a flushed target gives the committer: its disk and the packs it relies on."""

    def __init__(self, record: DiskRecord, packs: set[str]) -> None:
        self.record = record
        self.packs = packs


@register_driver
class RepoTargetDriver(_RepoDisk):
    """A writable disk that stores what is written into it as chunks of the repository.

    It starts as the base snapshot's disk of the same name (``base``: ``latest`` (the
    default), an id, or ``none``), so an incremental that writes only changed clusters still
    ends with a complete disk index.
    """

    driver_name: ClassVar[str] = "bb-repo-target"

    def __init__(
        self,
        node: BlockNode,
        shared: opened.Shared,
        index: DiskIndex,
        name: str,
        source: dict[str, str],
        encoders: EncoderPool | None = None,
    ) -> None:
        super().__init__(node, shared.repo, index, name)
        #: The repository, shared with the graph's other target nodes that write into it
        #: (``repository/opened.py``): so is the lock, which is the store's.
        self.shared = shared
        self._lock = shared.lock
        self.source = source
        #: What this node stored and reused (the store's counters are every node's).
        self.counts = Counts()
        #: The processes that hash and encode whole chunks (None: this process does).
        self.encoders = encoders
        #: Set by each successful flush: the disk as stored so far.
        self.result: TargetResult | None = None

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> RepoTargetDriver:
        workers = opts.int("encoder-processes", default_workers())
        if workers < 0:
            raise BlockBackupError("encoder-processes must be non-negative")
        key = opened.key_of(opts.str("repository"), _storage(opts), _secret(node, opts))
        shared = await opened.acquire(
            node.graph, key, lambda: _open_repository(node, opts, writer=True)
        )
        encoders = None
        try:
            if workers:
                master = shared.repo.keys.master
                encoders = await run_undoable(
                    lambda: encoder_pools.shared(master, workers), encoder_pools.release
                )
            return await cls._open_target(node, opts, shared, encoders)
        except BaseException:
            if encoders is not None:
                await asyncio.to_thread(encoder_pools.release, encoders)
            await cls._release(node, shared)
            raise

    @staticmethod
    async def _release(node: BlockNode, shared: opened.Shared) -> None:
        """One user of the shared repository less; the last retires its writer marker and
        closes the repository."""
        if opened.release(node.graph, shared):
            await asyncio.to_thread(_give_back, shared.repo)

    @classmethod
    async def _open_target(
        cls,
        node: BlockNode,
        opts: Options,
        shared: opened.Shared,
        encoders: EncoderPool | None,
    ) -> RepoTargetDriver:
        repo = shared.repo
        name = opts.str("disk")
        size = opts.int("size")
        base_spec = opts.str("base", "latest")
        if size < 0:
            raise BlockBackupError("size must be non-negative")
        try:
            base = await asyncio.to_thread(cls._base, repo, name, base_spec)
        except RepositoryError as exc:
            raise BlockBackupError(str(exc)) from None
        source = {"base": "none"}
        segments = None
        if base is not None and base[1].size == size and base[1].chunk_size == repo.chunk_size:
            segments = base[1].segments
            source = {"base": base[0]}
        index = DiskIndex(repo.store, size, repo.chunk_size, segments)
        return cls(node, shared, index, name, source, encoders)

    @staticmethod
    def _base(repo: Repository, name: str, spec: str) -> tuple[str, DiskRecord] | None:
        if spec == "none":
            return None
        if spec == "latest":
            manifest = catalog.latest_with_disk(repo.backend, repo.keys, name)
            return None if manifest is None else (manifest.id, manifest.disk(name))
        manifest = repo.manifest(catalog.resolve(repo.backend, spec))
        return manifest.id, manifest.disk(name)

    def _put_chunk(self, i: int, data: bytes | bytearray | memoryview) -> None:
        if _is_zero(data):
            self.index.set(i, ZERO_ADDRESS)
            return
        address = self.repo.keys.address(data)
        self.repo.store.add(address, data)
        self.index.set(i, address)

    def _write_sync(self, offset: int, data: memoryview | None, length: int) -> None:
        """Write ``data`` (None: zeroes) chunk by chunk; a partly covered chunk is merged
        with its current content first."""
        end = offset + length
        pos = offset
        while pos < end:
            i = pos // self.chunk
            start = i * self.chunk
            chunk_len = self.index.chunk_length(i)
            stop = min(start + chunk_len, end)
            if pos == start and stop == start + chunk_len:
                if data is None:  # a whole chunk of zeroes: no buffer, no scan
                    self.index.set(i, ZERO_ADDRESS)
                else:
                    self._put_chunk(i, data[pos - offset : stop - offset])
            else:
                merged = self._read_sync(start, chunk_len)
                merged[pos - start : stop - start] = (
                    bytes(stop - pos) if data is None else data[pos - offset : stop - offset]
                )
                self._put_chunk(i, merged)
            pos = stop

    def _whole_chunks(self, offset: int, data: memoryview) -> list[tuple[int, memoryview]]:
        """(index, bytes) of each chunk ``data`` covers whole: the ones a write stores as
        they are (the others are merged with their current content first)."""
        out = []
        end = offset + len(data)
        i = -(-offset // self.chunk)
        while i * self.chunk < end:
            start = i * self.chunk
            length = self.index.chunk_length(i)
            if start + length > end:
                break
            out.append((i, data[start - offset : start - offset + length]))
            i += 1
        return out

    def _encode_here(self, piece: memoryview) -> tuple[bytes, bytes | bytearray]:
        """Address and encoded blob of a whole chunk, in this process (empty blob: a zero
        chunk, or one already stored)."""
        if _is_zero(piece):
            return ZERO_ADDRESS, b""
        address = self.repo.keys.address(piece)
        known = self.repo.store.has(address)  # a race only costs a needless encode
        return address, b"" if known else blob.encode(self.repo.keys, piece, address)

    def _enter(self, prepared: dict[int, Encoded]) -> None:
        """Enter prepared chunks (index: address and blob) into the store and index."""
        self.repo.beat_writer()
        store = self.repo.store
        for i, (address, stored) in prepared.items():
            if address != ZERO_ADDRESS:
                store.add_encoded(address, stored, self.index.chunk_length(i))
            self.index.set(i, address)

    def _apply(self, offset: int, data: memoryview, prepared: dict[int, Encoded]) -> None:
        """Enter prepared chunks into the store and index; merge the partial ones."""
        self._enter(prepared)
        if not prepared:
            self._write_sync(offset, data, len(data))
            return
        first, last = min(prepared), max(prepared) + 1
        head_end = first * self.chunk
        if offset < head_end:
            self._write_sync(offset, data[: head_end - offset], head_end - offset)
        tail = min(last * self.chunk, self.size)
        if tail < offset + len(data):
            self._write_sync(tail, data[tail - offset :], offset + len(data) - tail)

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, flags: WriteFlags
    ) -> None:
        await self.write_many([(offset, memoryview(data))], flags)

    async def write_many(self, pieces: list[tuple[int, memoryview]], flags: WriteFlags) -> None:
        """Every piece in one pool call (a backup from a dirty bitmap writes thousands of
        isolated clusters: a round trip each cost more than encoding them)."""
        try:
            await run_blocking(self._write_blocking, pieces, flags)
        except RepositoryError as exc:
            raise self._wrap(exc) from None

    def _write_blocking(self, pieces: list[tuple[int, memoryview]], flags: WriteFlags) -> None:
        """Hash and encode the whole chunks (in the encoder processes, or here), in
        parallel with other requests; then enter everything under the lock."""
        whole = [self._whole_chunks(offset, view) for offset, view in pieces]
        chunks = [piece for request in whole for _i, piece in request]
        with contextlib.ExitStack() as stack:
            encoded: list[Encoded] | None = None
            if self.encoders is not None and chunks:
                encoded = stack.enter_context(self.encoders.encoded(chunks, self.repo.store.has))
            if encoded is None:
                encoded = [self._encode_here(piece) for piece in chunks]
            results = iter(encoded)
            prepared = [{i: next(results) for i, _piece in request} for request in whole]
            with self._storing():
                for (offset, view), done in zip(pieces, prepared, strict=True):
                    self._apply(offset, view, done)
                if flags & WriteFlags.FUA:
                    self._flush_sync()

    def pulls(self) -> bool:
        return self.encoders is not None

    def pull(self, reader: Reader, src_off: int, offset: int, length: int) -> bool:
        """Read whole chunks straight into an encoder process's memory, which hashes and
        encodes them (chunks in holes of the source are zeroes there, not read); False for
        a range that is not whole chunks (the copy then writes it as usual)."""
        if self.encoders is None or offset % self.chunk:
            return False
        first = offset // self.chunk
        lengths: list[int] = []
        covered = 0
        while covered < length:
            lengths.append(self.index.chunk_length(first + len(lengths)))
            covered += lengths[-1]
        if covered != length:
            return False

        def fill(into: memoryview) -> None:
            all_data = reader.data_before(src_off, length) == length
            pos = 0
            try:
                for n in lengths:
                    if all_data or reader.hole_before(src_off + pos, n) < n:
                        reader.read_into(into[pos : pos + n], src_off + pos)
                    else:
                        into[pos : pos + n] = bytes(n)
                    pos += n
            except OSError as err:
                raise SourceReadError(err.errno, err.strerror) from err

        try:
            with self.encoders.encoded_from(fill, lengths, self.repo.store.has) as encoded:
                if encoded is None:
                    return False
                with self._storing():
                    self._enter(dict(enumerate(encoded, first)))
        except RepositoryError as exc:
            raise self._wrap(exc) from None
        return True

    def _write_zeroes_sync(self, offset: int, length: int) -> None:
        with self._storing():
            self._write_sync(offset, None, length)

    async def write_zeroes(self, offset: int, length: int, flags: WriteFlags) -> None:
        try:
            await run_blocking(self._write_zeroes_sync, offset, length)
        except RepositoryError as exc:
            raise self._wrap(exc) from None

    def commit(
        self,
        disks: list[DiskRecord],
        tags: dict[str, str] | None = None,
        packs: set[str] | frozenset[str] = frozenset(),
    ) -> Manifest:
        """:meth:`Repository.commit` (blocking: run it in a thread) under the store's lock:
        the store may be shared with nodes that are still writing (the commit flushes it)."""
        with self._lock:
            return self.repo.commit(disks, tags, packs)

    def _locked_flush(self) -> None:
        with self._storing():
            self._flush_sync()

    @contextlib.contextmanager
    def _storing(self) -> Iterator[None]:
        """The store's lock, with what this node adds to the store meanwhile counted as
        its own (another node that shares the store counts its own the same way)."""
        with self._lock:
            before = self.repo.store.tally()
            try:
                yield
            finally:
                self.counts += self.repo.store.tally() - before

    def _flush_sync(self) -> None:
        self.repo.beat_writer()
        segments = self.index.save()
        self.repo.store.flush()
        record = DiskRecord(self.disk, self.size, self.chunk, segments, dict(self.source))
        self.result = TargetResult(record, self.repo.store.relied | self.repo.store.written)

    async def flush(self) -> None:
        """Make every chunk written so far and the disk index durable (no snapshot yet)."""
        try:
            await asyncio.to_thread(self._locked_flush)
        except RepositoryError as exc:
            raise self._wrap(exc) from None

    async def close(self) -> None:
        """Give back the shared repository (the last node retires the writer marker: the
        commit, if any, happened before the nodes close) and the encoder processes."""
        if self.encoders is not None:
            await asyncio.to_thread(encoder_pools.release, self.encoders)
        await self._release(self.node, self.shared)


@register_driver
class RepoSnapshotDriver(_RepoDisk):
    """One disk of a committed snapshot, read-only."""

    driver_name: ClassVar[str] = "bb-repo-snapshot"
    #: The id of the snapshot this node serves.
    snapshot_id: str = ""
    #: The processes that read and decode a request's chunks (None: this thread does).
    decoders: EncoderPool | None = None
    #: A copy through a buffer asks for this much at once (:meth:`reader`): a whole
    #: request of the copy engine, so its chunks come in one pack read per run.
    piece: int = 1 << 20

    def __init__(self, node: BlockNode, repo: Repository, index: DiskIndex, name: str) -> None:
        super().__init__(node, repo, index, name)
        #: Chunks read for a part of a request, the most recent last (:meth:`_partial_chunk`).
        self._recent: OrderedDict[bytes, bytes] = OrderedDict()
        #: Chunks being read for that, by address: parallel readers wait for the first.
        self._fetching: dict[bytes, Future[bytes]] = {}
        self._recent_lock = threading.Lock()

    @classmethod
    async def open(cls, node: BlockNode, opts: Options) -> RepoSnapshotDriver:
        workers = opts.int("encoder-processes", default_workers())
        if workers < 0:
            raise BlockBackupError("encoder-processes must be non-negative")
        if not node.read_only:
            raise BlockBackupError("bb-repo-snapshot is read-only: set 'read-only': true")
        repo = await _open_repository(node, opts)
        try:
            return await cls._open_snapshot(node, opts, repo, workers)
        except BaseException:
            await asyncio.to_thread(repo.close)
            raise

    @classmethod
    async def _open_snapshot(
        cls, node: BlockNode, opts: Options, repo: Repository, workers: int
    ) -> RepoSnapshotDriver:
        spec = opts.str("snapshot", "latest")
        disk = opts.str("disk", None)
        try:
            manifest, record = await asyncio.to_thread(
                repo.select, spec if disk is None else f"{spec}:{disk}"
            )
        except RepositoryError as exc:
            raise BlockBackupError(str(exc)) from None
        index = DiskIndex(repo.store, record.size, record.chunk_size, record.segments)
        driver = cls(node, repo, index, record.name)
        driver.snapshot_id = manifest.id
        if workers:  # worker processes decode (and write) a restore's runs
            master = repo.keys.master
            driver.decoders = await run_undoable(
                lambda: encoder_pools.shared(master, workers), encoder_pools.release
            )
        return driver

    async def close(self) -> None:
        if self.decoders is not None:
            await asyncio.to_thread(encoder_pools.release, self.decoders)
            self.decoders = None
        await asyncio.to_thread(self.repo.close)

    def _addresses(self, offset: int, length: int) -> list[bytes]:
        first = offset // self.chunk
        last = (offset + length - 1) // self.chunk
        with self._lock:
            return [self.index.get(i) for i in range(first, last + 1)]

    def read_into(self, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the disk's bytes from ``offset``: blocking, for a thread.

        Zero chunks are zero-filled; the others are decoded straight into their place, the
        neighbouring ones of a pack in one read (``ChunkStore.read_into``). Damaged data
        raises EIO naming the chunk (and is kept in :attr:`damaged`). Only the index
        lookup takes the lock: parallel calls decode in parallel (nothing is pending in
        the store of a snapshot)."""
        if len(view):
            with self._storage():
                self._read_into(view, offset)

    def _read_into(self, view: memoryview, offset: int) -> None:
        length = len(view)
        places, zeroes, partial = self._plan(offset, length)
        for lo, hi in zeroes:
            view[lo:hi] = self._zeroes[: hi - lo]
        # A worker costs a round trip (~0.1 ms): worth it for a copy's large requests,
        # which it decodes in parallel, not for an NBD client's small ones.
        decoders = self.decoders if length >= WORKER_READ_MIN else None
        failed = self.repo.store.read_into(view, places, decoders)
        for address, exc in failed.items():
            _damaged(exc, self.disk, offset + places[address][0][0], self.damaged)
        for start, address in partial:  # a request that starts or ends inside a chunk
            data = self._partial_chunk(address, start)
            lo, hi = max(start, offset), min(start + self.chunk, offset + length)
            view[lo - offset : hi - offset] = memoryview(data)[lo - start : hi - start]

    def _partial_chunk(self, address: bytes, start: int) -> bytes:
        """The chunk at disk offset ``start``, of which a request needs only a part: kept
        for the next such reads, which an NBD client sends in a row (a guest booting from
        a mount reads 4 KiB at a time: each chunk was read and decoded 16 times).
        Parallel reads of one chunk wait for the first (a client's queue of 4 KiB reads)."""
        with self._recent_lock:
            data = self._recent.get(address)
            if data is not None:
                self._recent.move_to_end(address)
                return data
            fetching = self._fetching.get(address)
            if fetching is None:
                self._fetching[address] = Future()
        if fetching is not None:
            return fetching.result()  # the first reader's chunk, or its error
        try:
            data = _read_chunk(self.repo, address, self.disk, start, self.damaged)
        except BaseException as exc:
            with self._recent_lock:
                self._fetching.pop(address).set_exception(exc)
            raise
        with self._recent_lock:
            self._recent[address] = data
            while len(self._recent) > max(1, RECENT_BYTES // self.chunk):
                self._recent.popitem(last=False)
            self._fetching.pop(address).set_result(data)
        return data

    def write_to(
        self, dst_fd: int, dst_off: int, offset: int, length: int, grain: int
    ) -> list[tuple[int, int]] | None:
        """Have a decoder process write the disk's bytes from ``offset`` into ``dst_fd``
        (a restore into a local file): the pack runs go from the files to the image
        without passing through this process. None (the copy reads into its buffer
        instead) without decoders, for a range that starts or ends inside a chunk, and
        whenever the worker cannot (see ``ChunkStore.write_in_workers``)."""
        if self.decoders is None or length == 0:
            return None
        with self._storage():
            places, _zeroes, partial = self._plan(offset, length)
            if partial:
                return None
            return self.repo.store.write_in_workers(
                dst_fd, dst_off, length, places, grain, self.decoders
            )

    def _plan(
        self, offset: int, length: int
    ) -> tuple[dict[bytes, list[tuple[int, int]]], list[tuple[int, int]], list[tuple[int, bytes]]]:
        """Where the disk's bytes from ``offset`` come from: each stored chunk's places
        (offset in the range, length), the zero chunks' spans (start, end) in the range,
        and the chunks the range holds only part of (disk offset, address)."""
        first = offset // self.chunk
        places: dict[bytes, list[tuple[int, int]]] = {}
        zeroes: list[tuple[int, int]] = []
        partial: list[tuple[int, bytes]] = []
        for n, address in enumerate(self._addresses(offset, length)):
            start = (first + n) * self.chunk
            lo, hi = max(start, offset), min(start + self.chunk, offset + length, self.size)
            if address == ZERO_ADDRESS:
                zeroes.append((lo - offset, hi - offset))
            elif lo == start and hi == start + self.index.chunk_length(first + n):
                places.setdefault(address, []).append((lo - offset, hi - lo))
            else:
                partial.append((start, address))
        return places, zeroes, partial

    def reader(self, offset: int) -> tuple[RepoSnapshotDriver, int]:
        """This node reads into a copy's buffer by itself (:meth:`read_into`), so a restore
        into a local file is one thread call per request: decode, then write."""
        return self, offset

    def data_before(self, offset: int, length: int) -> int:
        extent = self._status_sync(offset, length)
        return 0 if extent.is_zero else extent.length

    def hole_before(self, offset: int, length: int) -> int:
        extent = self._status_sync(offset, length)
        return extent.length if extent.is_zero else 0

    def _read_blocking(self, offset: int, length: int) -> bytearray:
        out = bytearray(length)
        with memoryview(out) as view:
            self.read_into(view, offset)
        return out

    def submit_read(
        self, offset: int, length: int, into: memoryview | None = None
    ) -> Buffer | Coroutine[Any, Any, Buffer]:
        """At once from the chunks kept for reads of parts of them (an NBD client's
        4 KiB reads after the first of each chunk: no thread hop), else in a thread."""
        if 0 < length <= self.chunk:
            data = self._read_kept(offset, length, into)
            if data is not None:
                return data
        return self.read(offset, length)

    async def read(self, offset: int, length: int) -> bytearray:
        """In a thread (also the node's awaited path). The index lookup (which may load a
        segment) holds the lock; reading, checking and decrypting the chunks does not, so a
        copy's parallel reads run in parallel."""
        if length == 0:
            return bytearray()
        return await asyncio.to_thread(self._read_blocking, offset, length)

    def _read_kept(self, offset: int, length: int, into: memoryview | None) -> Buffer | None:
        """The bytes from ``offset`` if every chunk they touch is zero or kept (and the
        index has their entries in memory), else None: nothing here waits."""
        first, last = offset // self.chunk, (offset + length - 1) // self.chunk
        if not self._lock.acquire(blocking=False):
            return None
        try:
            if any(self.index.loaded_segment(i) is None for i in (first, last)):
                return None
            addresses = [self.index.get(i) for i in range(first, last + 1)]
        finally:
            self._lock.release()
        buf = into if into is not None else bytearray(length)
        out = memoryview(buf)
        with self._recent_lock:
            for n, address in enumerate(addresses):
                start = (first + n) * self.chunk
                lo, hi = max(start, offset), min(start + self.chunk, offset + length)
                if address == ZERO_ADDRESS:
                    out[lo - offset : hi - offset] = self._zeroes[: hi - lo]
                    continue
                data = self._recent.get(address)
                if data is None:
                    return None
                self._recent.move_to_end(address)
                out[lo - offset : hi - offset] = memoryview(data)[lo - start : hi - start]
        return buf

    async def write(
        self, offset: int, data: bytes | bytearray | memoryview, flags: WriteFlags
    ) -> None:
        raise io_error(errno.EROFS)


def _read_chunk(
    repo: Repository, address: bytes, disk: str, start: int, damaged: list[str]
) -> bytes:
    """The stored chunk at ``address`` (disk offset ``start``); damaged data is recorded in
    ``damaged`` (naming chunk, pack and offset) and raised as EIO, as a disk would."""
    try:
        return repo.store.read(address)
    except CorruptData as exc:
        _damaged(exc, disk, start, damaged)


def _damaged(exc: CorruptData, disk: str, start: int, damaged: list[str]) -> NoReturn:
    detail = f"disk {disk} at offset {start}: {exc}"
    damaged.append(detail)
    raise io_error(errno.EIO, detail) from None
