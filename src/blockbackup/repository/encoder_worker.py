"""An encoder process: hashes and encodes chunks for a repository target (see
:mod:`~blockbackup.repository.encoders`). Run as ``python -m``, with one end of a
``SOCK_SEQPACKET`` pair as the descriptor ``BB_ENCODER_FD`` names; it exits when the
other end closes.

Messages (one datagram each, little-endian):

- first, from the parent: the master key (empty: not encrypted), with the shared memory's
  file descriptor attached;
- ``H`` + (offset, length) u32 pairs: the chunks at those places of the input half; the
  reply is their addresses, 32 bytes each (all zero: a zero chunk);
- ``E`` + u32 indexes into the last ``H``: encode those chunks into the output half, one
  after another; the reply is (offset, length) u32 pairs, one per index.
- ``D`` + runs (a restore's decoding): each run is ``RUN`` (path length, offset, length,
  blob count), the pack file's path, then ``BLOB`` per blob (offset in the run, stored
  length, plaintext length, address). The worker reads each run from the file itself (a
  path length of 0: the parent put the run into the input half at that offset, as it does
  for a repository on S3) and decodes its blobs into the output half, one after another;
  the reply is one byte per
  blob, 0 when it decoded and checked, 1 when not (the parent then decodes the request
  itself, to name the damage as it always does).
- ``W`` + ``WRITE`` (destination offset, length, grain, the runs' size) + runs as for ``D``
  + each blob's places in the range (``PLACES`` count, then u32 offsets), with the
  destination file's descriptor attached (a restore's writing): the worker decodes every
  blob into its places in the output half, zeroes what no blob covers, and writes the
  range but for its all-zero grains (``sparse_write.write_data``). The reply: the status
  bytes as for ``D`` (any 1: nothing was written), an i32 errno of the write (0: written),
  then the skipped runs as (offset, length) u32 pairs.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import socket
import struct
from collections.abc import Callable

from blockbackup.block.sparse_write import write_data
from blockbackup.repository import blob, directio
from blockbackup.repository.errors import CorruptData
from blockbackup.repository.keys import ZERO_ADDRESS, Keys

_PAIR = struct.Struct("<II")
RUN = struct.Struct("<HQIH")
BLOB = struct.Struct("<III32s")
WRITE = struct.Struct("<QIII")
PLACES = struct.Struct("<H")
ERRNO = struct.Struct("<i")
MAX_MESSAGE = 1 << 16


def serve(sock: socket.socket) -> None:
    master, fds, _flags, _addr = socket.recv_fds(sock, 64, 1)
    if len(fds) != 1:
        return
    shm = mmap.mmap(fds[0], 0)
    os.close(fds[0])
    half = len(shm) // 2
    view = memoryview(shm)
    keys = Keys(master or None)
    zeroes = bytes(half)
    places: list[tuple[int, int]] = []
    addresses: list[bytes] = []
    reads = directio.ReadBuffer()
    while True:
        message, fds, _flags, _addr = socket.recv_fds(sock, MAX_MESSAGE, 1)
        if not message:
            return  # the parent closed its end (or died)
        kind, body = message[:1], memoryview(message)[1:]
        if kind == b"W" and len(fds) == 1:
            try:
                sock.send(_write(keys, body, view[:half], view[half:], reads, fds[0], zeroes))
            finally:
                os.close(fds[0])
            continue
        for fd in fds:
            os.close(fd)
        if kind == b"H":
            places = list(_PAIR.iter_unpack(body))
            addresses = []
            for start, length in places:
                piece = view[start : start + length]
                if piece[0] == 0 and zeroes.startswith(piece):
                    addresses.append(ZERO_ADDRESS)
                else:
                    addresses.append(keys.address(piece))
            sock.send(b"".join(addresses))
        elif kind == b"E":
            out = []
            pos = half
            for (n,) in struct.iter_unpack("<I", body):
                start, length = places[n]
                piece = view[start : start + length]
                if pos + blob.stored_size(keys, length) > len(shm):
                    raise RuntimeError("encoded chunks overflow the output half")
                size = blob.encode_into(keys, piece, addresses[n], view[pos:])
                out.append(_PAIR.pack(pos, size))
                pos += size
            sock.send(b"".join(out))
        elif kind == b"D":
            place = _one_after_another(view[half:])
            sock.send(_decode_runs(keys, body, view[:half], place, reads))
        else:
            raise RuntimeError(f"unknown message {kind!r}")


def _one_after_another(out: memoryview) -> Callable[[int], memoryview]:
    """The places of a ``D`` message's plaintexts: one after another in ``out``."""
    pos = 0

    def place(length: int) -> memoryview:
        nonlocal pos
        pos += length
        return out[pos - length : pos]

    return place


def _decode_runs(
    keys: Keys,
    body: memoryview,
    staged: memoryview,
    place: Callable[[int], memoryview],
    reads: directio.ReadBuffer,
) -> bytes:
    """Read each run of ``body`` (from its pack file, or from ``staged``, the input half)
    and decode each of its blobs into ``place(its length)``; a status byte per blob."""
    status = bytearray()
    at = 0
    while at < len(body):
        path_length, offset, length, count = RUN.unpack_from(body, at)
        at += RUN.size
        path = os.fsdecode(bytes(body[at : at + path_length]))
        at += path_length
        blobs = [BLOB.unpack_from(body, at + n * BLOB.size) for n in range(count)]
        at += count * BLOB.size
        # a path of length 0: the parent put the run into the input half, at ``offset``
        data = _read(path, offset, length, reads) if path_length else staged[offset:][:length]
        for start, stored_length, plain, address in blobs:
            target = place(plain)
            stored = data[start : start + stored_length] if data is not None else b""
            status.append(0 if _decoded(keys, stored, stored_length, address, target) else 1)
    return bytes(status)


def _write(
    keys: Keys,
    body: memoryview,
    staged: memoryview,
    out: memoryview,
    reads: directio.ReadBuffer,
    fd: int,
    zeroes: bytes,
) -> bytes:
    """Decode a ``W`` message's blobs into their places in ``out`` and write the range
    into ``fd``; the reply (see the module docstring)."""
    dst_off, length, grain, runs_size = WRITE.unpack_from(body)
    runs = body[WRITE.size : WRITE.size + runs_size]
    places = _places(body[WRITE.size + runs_size :])
    out = out[:length]
    decoded: list[tuple[list[int], int]] = []  # each blob's places, and its length

    def place(plain: int) -> memoryview:
        where = places[len(decoded)]
        decoded.append((where, plain))
        return out[where[0] : where[0] + plain]

    status = _decode_runs(keys, runs, staged, place, reads)
    if any(status) or len(decoded) != len(places):
        return status
    for (first, *others), plain in decoded:  # the same chunk again in the range
        for at in others:
            out[at : at + plain] = out[first : first + plain]
    _zero_between(out, sorted((at, at + plain) for where, plain in decoded for at in where))
    try:
        skipped = write_data(fd, out, dst_off, grain, zeroes)
    except OSError as exc:
        return status + ERRNO.pack(exc.errno or errno.EIO)
    return status + ERRNO.pack(0) + b"".join(_PAIR.pack(*run) for run in skipped)


def _places(body: memoryview) -> list[list[int]]:
    """Each blob's offsets in a ``W`` message's range."""
    places = []
    at = 0
    while at < len(body):
        (count,) = PLACES.unpack_from(body, at)
        at += PLACES.size
        places.append(list(struct.unpack_from(f"<{count}I", body, at)))
        at += 4 * count
    return places


def _zero_between(out: memoryview, spans: list[tuple[int, int]]) -> None:
    """Zero what no span (sorted, not overlapping) covers: the range's zero chunks."""
    pos = 0
    for start, end in [*spans, (len(out), len(out))]:
        if start > pos:
            out[pos:start] = bytes(start - pos)
        pos = end


def _read(
    path: str, offset: int, length: int, reads: directio.ReadBuffer
) -> memoryview | bytes | None:
    """A run of a pack file (past the page cache when worth it); None if it cannot be
    read (gone, or refused: the parent reads it again and says why)."""
    try:
        direct = directio.read(path, offset, length, reads)
        if direct is not None:
            return direct
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length)
    except OSError:
        return None


def _decoded(
    keys: Keys, stored: memoryview | bytes, length: int, address: bytes, target: memoryview
) -> bool:
    """Whether the blob decoded into ``target`` and checked, as ``ChunkStore.read_into``
    checks it."""
    if len(stored) != length:
        return False
    try:
        blob.decode_into(keys, stored, address, "", target)
    except CorruptData:
        return False
    return keys.encrypted or keys.address(target) == address


def main() -> None:
    # The parent handles Ctrl-C (this process is in a group of its own, so a terminal's
    # SIGINT does not reach it) and closes its end; a lost parent closes it too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fd = int(os.environ["BB_ENCODER_FD"])
    with socket.socket(fileno=fd) as sock:
        try:
            serve(sock)
        except (ConnectionError, BrokenPipeError):
            pass


if __name__ == "__main__":
    main()
    # Nothing to flush or clean up (memory and descriptors go with the process): skip the
    # interpreter's finalisation, ~30 ms that the parent's close would wait for.
    os._exit(0)
