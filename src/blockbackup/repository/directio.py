"""Writing a large object to a file, and reading a large range of one, without passing
the bytes through the page cache.

Why: every pack is synced as soon as it is written, so a buffered write only adds work.
Measured here (32 packs of 16 MiB, written and fsynced): buffered 520-890 MiB/s for
0.30-0.49 s of CPU (the kernel copying into fresh page-cache pages), ``O_DIRECT``
1,000-1,300 MiB/s for 0.12 s. A backup also stops evicting the page cache that the host's
VMs use with data nobody reads soon, and a verify reads what is on the disk, not a cached
copy.

``O_DIRECT`` needs aligned buffers, offsets and lengths: a pack's whole blocks go straight
from its buffer (an anonymous mapping, so page-aligned); other data goes through a reused,
page-aligned bounce buffer (a copy into memory that stays hot); the last block is padded
and the file then cut to its length. A file system that refuses
``O_DIRECT`` (tmpfs, some FUSE ones) gets a plain buffered write.

Reads of a large range (a restore's run of neighbouring chunks, a verify's whole pack)
go to the disk directly too: the page cache would copy every byte once more and be filled
with packs that nobody reads again soon (a restore of 2 GiB: 0.3-0.4 s less system time,
measured). The range is widened to whole blocks and read into an aligned part of a fresh
buffer; the caller gets a view of the bytes it asked for.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import threading

#: Objects at least this large are written directly (packs); smaller ones (indexes,
#: manifests) are not worth it.
DIRECT_MIN = 1 << 20
#: Ranges at least this long are read directly (a restore's runs of chunks, whole packs);
#: shorter ones (headers, one chunk) from the page cache.
DIRECT_READ_MIN = 128 << 10
#: Alignment that satisfies every logical block size in use (512 or 4096 bytes).
ALIGN = 4096
BOUNCE_SIZE = 1 << 20

_local = threading.local()


def _bounce() -> mmap.mmap:
    buffer: mmap.mmap | None = getattr(_local, "bounce", None)
    if buffer is None:
        buffer = _local.bounce = mmap.mmap(-1, BOUNCE_SIZE)  # page-aligned
    return buffer


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` at the start of the new, empty file ``fd``: directly when the file
    is open with ``O_DIRECT`` and the file system takes it, buffered otherwise."""
    view = memoryview(data).cast("B")
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
        try:
            _write_direct(fd, view)
            return
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            # Refused only at the first write: start again, buffered.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
    while view:
        view = view[os.write(fd, view) :]


def _aligned_prefix(view: memoryview) -> int:
    """How many bytes at the start of ``view`` can go to the disk straight from it: all
    whole blocks when its memory is block-aligned (a pack buffer is an anonymous mapping,
    so it is), else none. Read-only memory cannot be asked for its address."""
    if view.readonly or len(view) < ALIGN:
        return 0
    anchor = ctypes.c_char.from_buffer(view)
    try:
        aligned = ctypes.addressof(anchor) % ALIGN == 0
    finally:
        del anchor  # the buffer stays exported while it lives
    return len(view) - len(view) % ALIGN if aligned else 0


def _write_direct(fd: int, view: memoryview) -> None:
    pos = _aligned_prefix(view)
    done = 0
    while done < pos:  # no copy at all (a short write still ends on a block boundary)
        done += os.write(fd, view[done:pos])
    bounce = _bounce()
    with memoryview(bounce) as space:
        while pos < len(view):
            piece = min(BOUNCE_SIZE, len(view) - pos)
            space[:piece] = view[pos : pos + piece]
            padded = -(-piece // ALIGN) * ALIGN
            space[piece:padded] = bytes(padded - piece)
            done = 0
            while done < padded:  # a short write still ends on a block boundary
                done += os.write(fd, space[done:padded])
            pos += piece
    if len(view) % ALIGN:
        os.ftruncate(fd, len(view))


def open_new(path: str | os.PathLike[str], length: int) -> int:
    """Create ``path`` (it must not exist) for writing ``length`` bytes with
    :func:`write_all`; ``O_DIRECT`` when worth it and the file system accepts it."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    if length >= DIRECT_MIN:
        try:
            return os.open(path, flags | os.O_DIRECT, 0o644)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
    return os.open(path, flags, 0o644)


class ReadBuffer:
    """Memory that one thread's direct reads reuse, for a caller that is done with each
    read's bytes before its next read (a verify's pack checks).

    Why: a fresh buffer per read is zero-filled while holding the GIL, and its pages, once
    freed, go back to the kernel and come back as fresh ones. A 2 GiB verify reads 16 MiB
    packs in three threads: 0.1-0.2 s of its ~2.2 s went to that (measured). An anonymous
    mapping, so page-aligned; it grows to the largest read and is kept until dropped.
    """

    def __init__(self) -> None:
        self._memory: mmap.mmap | None = None

    def view(self, size: int) -> memoryview:
        """``size`` bytes of page-aligned memory; what they hold is undefined."""
        if self._memory is None or len(self._memory) < size:
            # A view of the old mapping the caller still holds keeps it alive.
            self._memory = mmap.mmap(-1, -(-size // ALIGN) * ALIGN)
        return memoryview(self._memory)[:size]


def read(
    path: str | os.PathLike[str],
    offset: int,
    length: int | None,
    into: ReadBuffer | None = None,
) -> memoryview | None:
    """``length`` bytes of the file at ``path`` from ``offset`` (None: to its end; fewer
    at its end), read past the page cache; None when not worth it (a short range) or the
    file system refuses ``O_DIRECT``: then read it buffered. ``FileNotFoundError`` if
    the file is absent. ``into``: read into its memory (the result is then a view of it,
    valid until its next use) instead of a fresh buffer."""
    if length is not None and length < DIRECT_READ_MIN:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return None
        raise
    try:
        if length is None:
            length = max(os.fstat(fd).st_size - offset, 0)
            if length < DIRECT_READ_MIN:
                return None
        return _read_direct(fd, offset, length, into)
    except OSError as exc:
        if exc.errno == errno.EINVAL:  # refused at the first read
            return None
        raise
    finally:
        os.close(fd)


def _read_direct(fd: int, offset: int, length: int, into: ReadBuffer | None) -> memoryview:
    start = offset - offset % ALIGN
    end = -(-(offset + length) // ALIGN) * ALIGN
    if into is not None:
        whole, pad = into.view(end - start), 0
    else:
        # A heap buffer (its memory is reused from freed ones: fresh pages cost more on a
        # VM than the copy saved), an aligned part of it read into.
        whole = memoryview(bytearray(end - start + ALIGN))
        anchor = ctypes.c_char.from_buffer(whole)
        pad = -ctypes.addressof(anchor) % ALIGN
        del anchor
    got = 0
    while start + got < end:
        n = os.preadv(fd, [whole[pad + got : pad + end - start]], start + got)
        if n == 0:  # end of file (a block read past it returns what there is)
            break
        got += n
        if n % ALIGN:  # only the file's last block is short
            break
    first = pad + offset - start
    return whole[first : first + max(min(length, got - (offset - start)), 0)]
