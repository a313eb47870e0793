"""Chunks hashed and encoded in worker processes, so a backup uses every core.

Why processes: hashing, compressing and encrypting a chunk are three C calls that each
release the GIL, and the GIL changes hands at each of them. With threads, a first backup
kept 1.4 of 2 cores busy here and spent ~12% of its CPU in futex wake-ups; on a host with
more cores it would still use about 1.4. Workers hash and encode with GILs of their own,
while the backup's own thread does the rest (reading, the event loop, the packs).

How: each worker shares a memory area with this process (a ``memfd``: no name to leak)
and talks over a ``SOCK_SEQPACKET`` pair (:mod:`~blockbackup.repository.encoder_worker`
has the messages). A request copies its chunks into the input half, asks for their
addresses, and asks to encode only those the repository does not hold yet (a backup of an
unchanged disk hashes and stores nothing). The encoded blobs are read from the output half
until the request releases the worker.

The same workers decode for a restore: a snapshot node sends the runs of chunks a request
needs (pack file, range, blobs), and the worker reads them past the page cache (on S3 the
request reads them, into the worker's input half) and decodes them into its output half,
which the request copies out. A thread that decodes is one GIL hand-off per request
instead of one per pack read, zstd call and write (measured: a restore spent ~10% of its
CPU in those hand-offs). A restore into a local file sends the file's descriptor along,
and the worker writes the range itself (:meth:`EncoderPool.write`): the data never passes
through this process.

Lifetime: one pool per repository key and process, started by its first repository node
and stopped with the last (:func:`shared`, :func:`release`). A worker that dies fails the
write that used it (the backup fails with its message; nothing is committed) and is
replaced. A parent that dies closes its ends, and the workers exit.
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from blockbackup.repository import encoder_worker
from blockbackup.repository.errors import RepositoryError

#: Each half of a worker's shared memory: a request's chunks (at most a copy engine's
#: request: 2 MiB when the target reads the source into it, ``MAX_PULL``), and their
#: blobs (each at most its chunk plus 29 bytes). Only the pages a request uses are memory.
HALF = 4 << 20
_PAIR = struct.Struct("<II")
_ADDRESS = 32
_ZERO = bytes(_ADDRESS)  # the address a worker gives a zero chunk
#: The most a blob adds to its chunk: flags, nonce and tag (29 bytes), rounded up.
_BLOB_OVERHEAD = 64
_MAX_REPLY = 1 << 16


def default_workers() -> int:
    """One more than the cores, at most 4: measured on 2 cores, a 2 GiB first backup took
    3.71 s with 2 workers, 3.47 s with 3, 3.44 s with 4 (threads: 4.0-4.2 s). This
    process's own part (reading, the engine, the packs) takes ~2 s of it alone, so more
    workers than that keeps busy would only hold memory (~12 MiB each)."""
    return min((os.cpu_count() or 1) + 1, 4)


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    sock: socket.socket
    shm: mmap.mmap
    view: memoryview
    #: Set when a request to it failed: it is replaced, not used again.
    failed: bool = False

    def ask(self, message: bytes, fd: int | None = None) -> bytes:
        """Send ``message`` (with the descriptor ``fd`` attached, if any); the reply."""
        try:
            if fd is None:
                self.sock.send(message)
            else:
                socket.send_fds(self.sock, [message], [fd])
            reply = self.sock.recv(_MAX_REPLY)
        except OSError as exc:
            self.failed = True
            raise RepositoryError(f"an encoder process failed: {exc}") from None
        if not reply:
            self.failed = True
            try:
                code = self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                raise RepositoryError("an encoder process stopped answering") from None
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            raise RepositoryError(f"an encoder process ended ({how})")
        return reply

    def close(self) -> None:
        self.hang_up()
        self.reap()

    def hang_up(self) -> None:
        """Close this end: the worker sees it and exits."""
        self.view.release()
        self.shm.close()  # every view lent out was released with its request
        self.sock.close()

    def reap(self) -> None:
        """Wait for the worker to exit (after :meth:`hang_up`)."""
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Turn:
    """A request waiting for a worker: ``given`` is released when one is handed to it
    (``worker``), or when none is left (``worker`` stays None)."""

    __slots__ = ("given", "worker")

    def __init__(self) -> None:
        self.given = threading.Lock()
        self.given.acquire()
        self.worker: _Worker | None = None


_NO_WORKER = "no encoder process is left to hash and encode"


#: What a request gets back per chunk: its address and its encoded blob (empty when the
#: chunk is zero or already stored).
Encoded = tuple[bytes, bytes | bytearray | memoryview]
#: A run of a pack for a worker to decode: the pack file's path and the run's offset in it
#: (the worker reads it), or the run's bytes (read here: a repository on S3) and 0; the
#: run's length, its number of blobs, and their ``encoder_worker.BLOB`` entries.
WorkerRun = tuple[bytes | memoryview, int, int, int, bytes]


class EncoderPool:
    """Worker processes that hash and encode chunks with one repository's key (blocking
    methods: call them from the repository node's pool threads, any number at once).

    One pool per key serves every target node of the process (:func:`shared`): a live
    backup of eight disks runs as many workers as one of a single disk."""

    def __init__(self, master: bytes | None, workers: int) -> None:
        self._master = master
        self._lock = threading.Lock()
        self._free: list[_Worker] = []
        self._live = 0
        #: Requests get workers in the order they asked: a backup's requests, asked in
        #: disk order, then store their chunks about in disk order, which is the order a
        #: restore reads the packs in. A released worker is handed to the first waiter
        #: alone (waking every waiter to find whose turn it was cost ~9% of the GIL's
        #: time in a first backup).
        self._waiting: collections.deque[_Turn] = collections.deque()
        try:
            for _ in range(workers):
                self._free.append(_start(master))
                self._live += 1
        except BaseException:
            self.close()
            raise

    def _acquire(self) -> _Worker:
        with self._lock:
            if self._free and not self._waiting:
                return self._free.pop()
            if not self._live:
                raise RepositoryError(_NO_WORKER)
            turn = _Turn()
            self._waiting.append(turn)
        try:
            turn.given.acquire()
        except BaseException:  # interrupted while waiting: give back what came meanwhile
            with self._lock:
                if turn in self._waiting:
                    self._waiting.remove(turn)
                    raise
            if turn.worker is not None:
                self._hand_over(turn.worker)
            raise
        if turn.worker is None:
            raise RepositoryError(_NO_WORKER)
        return turn.worker

    def _release(self, worker: _Worker) -> None:
        """Back to the first waiter or the free list; a failed worker is replaced by a
        fresh one (so one that was killed fails one request, not every later backup of a
        daemon)."""
        if worker.failed:
            worker.close()
            try:
                worker = _start(self._master)
            except (OSError, RepositoryError):
                with self._lock:
                    self._live -= 1
                    if self._live:
                        return
                    waiting, self._waiting = self._waiting, collections.deque()
                for turn in waiting:  # none is left to serve them
                    turn.given.release()
                return
        self._hand_over(worker)

    def _hand_over(self, worker: _Worker) -> None:
        with self._lock:
            if not self._waiting:
                self._free.append(worker)
                return
            turn = self._waiting.popleft()
            turn.worker = worker
        turn.given.release()

    @contextlib.contextmanager
    def encoded(
        self, pieces: list[memoryview], known: Callable[[bytes], bool]
    ) -> Iterator[list[Encoded] | None]:
        """The address and blob of each piece (a whole chunk); None when they do not fit
        a worker's memory (encode them in this process). The blobs are views of the
        worker's memory: valid inside the ``with`` block only."""

        def stage(into: memoryview) -> None:
            pos = 0
            for piece in pieces:
                into[pos : pos + len(piece)] = piece
                pos += len(piece)

        with self.encoded_from(stage, [len(p) for p in pieces], known) as encoded:
            yield encoded

    @contextlib.contextmanager
    def encoded_from(
        self, fill: Callable[[memoryview], None], lengths: list[int], known: Callable[[bytes], bool]
    ) -> Iterator[list[Encoded] | None]:
        """As :meth:`encoded`, for chunks of ``lengths`` that ``fill`` puts one after
        another into the memoryview it is given: the worker's input half, so that a copy
        reads its source straight there (no buffer of its own, no copy into the worker).
        What ``fill`` raises is raised here."""
        total = sum(lengths)
        if total + _BLOB_OVERHEAD * len(lengths) > HALF:
            yield None  # their blobs might not fit the output half
            return
        worker = self._acquire()
        lent: list[memoryview] = []
        try:
            with worker.view[:total] as into:
                fill(into)
            yield self._encode(worker, lengths, known, lent)
        finally:
            for view in lent:  # a blob kept past the block would read the next request's
                view.release()
            self._release(worker)

    @staticmethod
    def _encode(
        worker: _Worker,
        lengths: list[int],
        known: Callable[[bytes], bool],
        lent: list[memoryview],
    ) -> list[Encoded]:
        """Hash the staged chunks, then encode those not ``known``."""
        if not lengths:  # an empty answer would mean "worker gone"
            return []
        view = worker.view
        places = []
        pos = 0
        for length in lengths:
            places.append(_PAIR.pack(pos, length))
            pos += length
        reply = worker.ask(b"H" + b"".join(places))
        addresses = [reply[i : i + _ADDRESS] for i in range(0, len(reply), _ADDRESS)]
        if len(addresses) != len(lengths):
            raise RepositoryError("an encoder process answered for the wrong chunks")
        wanted = [n for n, a in enumerate(addresses) if a != _ZERO and not known(a)]
        out: list[Encoded] = [(address, b"") for address in addresses]
        if wanted:
            reply = worker.ask(b"E" + struct.pack(f"<{len(wanted)}I", *wanted))
            for n, (start, length) in zip(wanted, _PAIR.iter_unpack(reply), strict=True):
                lent.append(view[start : start + length])
                out[n] = (addresses[n], lent[-1])
        return out

    @contextlib.contextmanager
    def decoded(self, runs: list[WorkerRun], plain: int) -> Iterator[memoryview | None]:
        """Have a worker read and decode ``runs`` (a ``D`` message) whose blobs hold
        ``plain`` bytes of plaintext: their plaintexts one after another, a view of the
        worker's memory valid inside the ``with`` block; None if they do not fit it, or a
        blob did not decode and check (the caller then decodes them itself, and names what
        is damaged)."""
        if plain > HALF:
            yield None
            return
        if not runs:  # no blob: its answer would be empty, which means "worker gone"
            yield memoryview(b"")
            return
        worker = self._acquire()
        try:
            message = _runs_message(worker, runs)
            status = worker.ask(b"D" + message) if message is not None else b"\1"
            if any(status):
                yield None
                return
            with worker.view[HALF : HALF + plain] as out:
                yield out
        finally:
            self._release(worker)

    def write(
        self, runs: list[WorkerRun], places: bytes, blobs: int, where: tuple[int, int, int], fd: int
    ) -> list[tuple[int, int]] | None:
        """Have a worker read and decode ``runs`` of ``blobs`` blobs, put them at their
        ``places`` (a ``W`` message) in a range of ``where`` = (offset in the file, length,
        grain), and write the range into the file ``fd``: the runs it skipped as all
        zeroes; None if the range does not fit a worker's memory or a blob did not decode
        and check (nothing was written: the caller copies the range itself, and names what
        is damaged). A failed write raises ``OSError``."""
        offset, length, grain = where
        reply_room = blobs + encoder_worker.ERRNO.size + _PAIR.size * (length // grain + 1)
        if length > HALF or reply_room > _MAX_REPLY:
            return None
        worker = self._acquire()
        try:
            message = _runs_message(worker, runs)
            if message is None:
                return None
            header = encoder_worker.WRITE.pack(offset, length, grain, len(message))
            message = header + message + places
            if len(message) + 1 > _MAX_REPLY:
                return None
            reply = worker.ask(b"W" + message, fd)
        finally:
            self._release(worker)
        if any(reply[:blobs]) or len(reply) < blobs + encoder_worker.ERRNO.size:
            return None
        (code,) = encoder_worker.ERRNO.unpack_from(reply, blobs)
        if code:
            raise OSError(code, os.strerror(code))
        return list(_PAIR.iter_unpack(reply[blobs + encoder_worker.ERRNO.size :]))

    def close(self) -> None:
        """Stop the workers (none may be in use)."""
        with self._lock:
            stopping, self._free = self._free, []
            self._live -= len(stopping)
        # All hung up first: they exit in parallel (each takes ~20 ms to shut down).
        for worker in stopping:
            worker.hang_up()
        for worker in stopping:
            worker.reap()


def _runs_message(worker: _Worker, runs: list[WorkerRun]) -> bytes | None:
    """The runs as a worker reads them (``encoder_worker.RUN``, path, ``BLOB``s), the
    bytes of those read here put into its input half; None if they do not fit it, or the
    message would not fit a datagram."""
    parts = []
    staged = 0
    for source, offset, length, count, blobs in runs:
        if isinstance(source, bytes):
            parts += [encoder_worker.RUN.pack(len(source), offset, length, count), source]
        else:
            if staged + length > HALF:
                return None
            worker.view[staged : staged + length] = source
            parts.append(encoder_worker.RUN.pack(0, staged, length, count))
            staged += length
        parts.append(blobs)
    message = b"".join(parts)
    return message if len(message) + 64 <= _MAX_REPLY else None


_pools: dict[bytes | None, tuple[EncoderPool, int]] = {}
_pools_lock = threading.Lock()


def shared(master: bytes | None, workers: int) -> EncoderPool:
    """The process's pool for the key ``master`` (None: unencrypted), started with
    ``workers`` workers by its first user; give it back with :func:`release`."""
    with _pools_lock:
        pool, users = _pools.get(master) or (None, 0)
        if pool is None:
            pool = EncoderPool(master, workers)
        _pools[master] = (pool, users + 1)
        return pool


def release(pool: EncoderPool) -> None:
    """One user less; the last one stops the workers."""
    with _pools_lock:
        for master, (known, users) in _pools.items():
            if known is pool:
                if users > 1:
                    _pools[master] = (pool, users - 1)
                    return
                del _pools[master]
                break
    pool.close()


def _start(master: bytes | None) -> _Worker:
    """A worker process, given the key and its shared memory."""
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fd = os.memfd_create("bb-encoder", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 2 * HALF)
        shm = mmap.mmap(fd, 2 * HALF)
        env = {**os.environ, "BB_ENCODER_FD": str(child.fileno())}
        process = subprocess.Popen(
            [sys.executable, "-m", "blockbackup.repository.encoder_worker"],
            pass_fds=(child.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            process_group=0,  # a terminal's Ctrl-C is the parent's to handle
        )
        worker = _Worker(process, parent, shm, memoryview(shm))
        try:
            socket.send_fds(parent, [master or b""], [fd])
        except OSError as exc:
            worker.close()
            raise RepositoryError(f"an encoder process failed: {exc}") from None
    except BaseException:
        parent.close()
        raise
    finally:
        child.close()
        os.close(fd)
    return worker
