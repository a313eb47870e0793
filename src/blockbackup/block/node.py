"""A node of the block graph, and the request layer every driver sits under.

Every request to a node goes through :class:`BlockNode`, which, once for all drivers:

- checks bounds and read-only state (``EINVAL``/``EPERM``);
- pads unaligned requests to the driver's ``request_alignment`` (read-modify-write for
  writes, serialised against overlapping writes) and splits them to ``max_transfer``;
- counts requests in flight, so that :meth:`BlockNode.quiesced` can wait for them;
- holds new *modifying* requests (write, write-zeroes, discard, truncate) while the node
  is quiesced. Reads and flushes are not held: a quiesced node must still serve the
  copy-before-write reads of writes already in flight, or quiescing could deadlock;
- calls the before-write hooks (copy-before-write) before every modification reaches the
  driver, and marks the node's dirty trackers (dirty bitmaps).

All of it runs on the event loop that owns the graph; the driver does the blocking work
off the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, runtime_checkable

from blockbackup._aio import inline_may_skip_yield, run_blocking
from blockbackup.block import permissions
from blockbackup.block.copy_range import (
    FileReader,
    Reader,
    copy_file_range_all,
    copy_through_buffer,
    read_ranges,
)
from blockbackup.block.driver import (
    BUFFER_TYPES,
    BlockDriver,
    Buffer,
    Extent,
    Limits,
    WriteFlags,
    io_error,
    write_each,
)
from blockbackup.block.permissions import ChildRole, Link
from blockbackup.block.reqlist import ReqList, Request
from blockbackup.errors import BlockBackupError

if TYPE_CHECKING:
    import mmap

    from blockbackup.block.graph import Graph

T = TypeVar("T")

#: A before-write hook: the admission of a modification of (offset, length), before it
#: reaches the driver. One function for both paths: it returns ``None`` when the
#: modification may go ahead at once (nothing to do for that range, or done just now),
#: else a coroutine the modification awaits first (raising ``OSError`` fails it). The
#: coroutine must hold nothing until it runs: an inline admission closes it unrun and
#: calls the hook again on the awaited path. (An ``async def`` hook always waits.)
BeforeWriteHook = Callable[[int, int], Coroutine[Any, Any, None] | None]

#: A write gate: the admission of a modification of (offset, length) once it is counted in
#: flight (a persistent bitmap making the write's granules durable first). The same shape
#: as a before-write hook: ``None`` to let it through at once, or a coroutine the
#: modification awaits first (raising ``OSError`` fails it), holding nothing until it runs
#: (the inline path closes it unrun and the awaited write calls the gate again).
WriteGate = Callable[[int, int], Coroutine[Any, Any, None] | None]


@runtime_checkable
class MovableUser(Protocol):
    """A user (an export) that can be moved onto a filter inserted above its node.

    :meth:`BlockNode.move_users` moves it and then calls ``retarget`` with its new node.
    """

    def retarget(self, node: BlockNode) -> None: ...


class DirtyTracker(Protocol):
    """Something that records which ranges of a node changed (a dirty bitmap)."""

    def mark_dirty(self, offset: int, length: int) -> None: ...


@dataclass(slots=True)
class NodeConfig:
    """Options every driver shares (QEMU's BlockdevOptions base)."""

    read_only: bool = False
    discard_unmap: bool = False
    cache_direct: bool = False
    no_flush: bool = False
    detect_zeroes: str = "off"
    #: ``force-share``: share every permission with other users (read-only nodes only).
    force_share: bool = False
    options: dict[str, object] = field(default_factory=dict)


class BlockNode:
    """A named node: a driver, its children, and the request layer in front of the driver."""

    def __init__(self, graph: Graph, name: str, config: NodeConfig, *, implicit: bool) -> None:
        self.graph = graph
        self.name = name
        self.config = config
        self.implicit = implicit
        self._driver: BlockDriver | None = None
        self.children: dict[str, BlockNode] = {}
        #: How this node uses each child (by role name), for :mod:`.permissions`.
        self.child_links: dict[str, Link] = {}
        self.parents: list[BlockNode] = []
        #: Non-node users (exports, jobs), with a short description for error texts.
        self.users: dict[object, str] = {}
        self.dirty_trackers: list[DirtyTracker] = []
        #: (parent node-name, role) of a parent that allows no other writer (a backup's
        #: copy-before-write filter on its target), for QEMU's permission-conflict errors.
        self.write_blocker: tuple[str, str] | None = None
        self._before_write: list[BeforeWriteHook] = []
        self._write_gates: list[WriteGate] = []
        self._in_flight = 0
        self._in_flight_changes = 0
        self._changes_idle = asyncio.Event()
        self._changes_idle.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._quiesce_depth = 0
        self._unquiesced = asyncio.Event()
        self._unquiesced.set()
        self._serialising = ReqList()

    def __repr__(self) -> str:
        driver = self._driver.driver_name if self._driver else "?"
        return f"<BlockNode {self.name!r} driver={driver}>"

    # -- structure ---------------------------------------------------------------------------

    @property
    def driver(self) -> BlockDriver:
        if self._driver is None:
            raise RuntimeError(f"node {self.name} is not open")
        return self._driver

    @property
    def is_open(self) -> bool:
        return self._driver is not None

    def set_driver(self, driver: BlockDriver) -> None:
        self._driver = driver

    def add_child(
        self, role: str, child: BlockNode, link: ChildRole | Link = ChildRole.FILTERED
    ) -> None:
        """Link ``child`` as ``role`` and take the permissions ``link`` implies on it.

        Raises :class:`~blockbackup.errors.BlockBackupError` when they conflict with
        another user's (QEMU's texts); the link then stays, so that the failed open of
        this node releases the child as it releases the others.
        """
        self.children[role] = child
        self.child_links[role] = link if isinstance(link, Link) else Link(link)
        child.parents.append(self)
        permissions.refresh(child)

    def detach_children(self) -> list[BlockNode]:
        """Unlink every child, dropping what this node took on it; return them."""
        children = list(self.children.values())
        for child in children:
            child.parents.remove(self)
        self.children.clear()
        self.child_links.clear()
        for child in children:
            permissions.refresh(child)
        return children

    @property
    def size(self) -> int:
        return self.driver.size

    @property
    def limits(self) -> Limits:
        return self.driver.limits

    @property
    def read_only(self) -> bool:
        return self.config.read_only

    @property
    def cluster_size(self) -> int | None:
        return self.driver.limits.cluster_size

    def backing(self) -> BlockNode | None:
        """The backing child, following filters down to the first format that has one."""
        node: BlockNode | None = self
        while node is not None:
            if "backing" in node.children:
                return node.children["backing"]
            driver = node.driver
            node = node.children.get(driver.filtered_role) if driver.is_filter else None
        return None

    def check_new_writer(self) -> None:
        """Refuse a new writing user (a writable export) while a parent forbids one."""
        if self.write_blocker is not None:
            parent, role = self.write_blocker
            raise BlockBackupError(
                f"Permission conflict on node '{self.name}': permissions 'write' are both "
                f"required by an unnamed block device (uses node '{self.name}' as 'root' "
                f"child) and unshared by node '{parent}' (uses node '{self.name}' as "
                f"'{role}' child)."
            )

    def add_user(self, user: object, description: str) -> None:
        """Add a non-node user; it takes what its ``use`` says (see :mod:`.permissions`),
        or raises QEMU's error and is not added."""
        self.users[user] = description
        try:
            permissions.refresh(self, entering=user)
        except BaseException:
            del self.users[user]
            permissions.refresh(self)  # back to the uses without it
            raise

    def move_users(self, to: BlockNode) -> None:
        """Move every :class:`MovableUser` onto ``to`` in one step (a filter inserted
        above this node, or removed again), as QEMU's bdrv_replace_node moves parents:
        no user is ever on both nodes or on neither, and permissions are checked once,
        for the end state. On a conflict they all stay here and the error propagates.
        """
        moving: dict[object, str] = {
            u: d for u, d in self.users.items() if isinstance(u, MovableUser)
        }
        if not moving:
            return
        for user in moving:
            del self.users[user]
        to.users.update(moving)
        try:
            permissions.refresh(to, self)
        except BaseException:
            for user in moving:
                del to.users[user]
            self.users.update(moving)
            permissions.refresh(to, self)
            raise
        for user in moving:
            assert isinstance(user, MovableUser)
            user.retarget(to)

    def remove_user(self, user: object) -> None:
        if self.users.pop(user, None) is not None:
            permissions.refresh(self)

    # -- interception ------------------------------------------------------------------------

    def add_before_write(self, hook: BeforeWriteHook) -> None:
        """Call ``hook`` (see :data:`BeforeWriteHook`) before every modification reaches
        the driver."""
        self._before_write.append(hook)

    def remove_before_write(self, hook: BeforeWriteHook) -> None:
        self._before_write.remove(hook)

    def _hooks_pass_now(self, offset: int, length: int) -> bool:
        """Whether every before-write hook lets a write of this range go ahead at once."""
        return _all_pass_now(self._before_write, offset, length)

    def add_write_gate(self, gate: WriteGate) -> None:
        """Call ``gate`` for every modification (see :data:`WriteGate`)."""
        self._write_gates.append(gate)

    def remove_write_gate(self, gate: WriteGate) -> None:
        self._write_gates.remove(gate)

    async def _pass_write_gates(self, offset: int, length: int) -> None:
        for gate in tuple(self._write_gates):
            waiting = gate(offset, length)
            if waiting is not None:
                await waiting

    @contextlib.asynccontextmanager
    async def quiesced(self) -> AsyncIterator[None]:
        """Hold new modifications and wait until those in flight have finished.

        Inside the block the node's content cannot change: this is how a backup defines its
        point in time. Sections nest.
        """
        self._quiesce_depth += 1
        self._unquiesced.clear()
        try:
            await self._changes_idle.wait()
            yield
        finally:
            self._quiesce_depth -= 1
            if self._quiesce_depth == 0:
                self._unquiesced.set()

    @property
    def is_quiesced(self) -> bool:
        """Whether someone holds the node quiesced now (a filter stops waiting for its
        limits then, so that the quiescer is never held up by them)."""
        return bool(self._quiesce_depth)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def wait_idle(self) -> None:
        """Wait until no request of any kind is in flight."""
        await self._idle.wait()

    # -- the request layer -------------------------------------------------------------------

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise io_error(
                errno.EINVAL, f"request {offset}+{length} outside {self.name} ({self.size})"
            )

    def _check_writable(self) -> None:
        if self.config.read_only:
            raise io_error(errno.EPERM, f"node {self.name} is read-only")

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        self._in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _pass_gate(self) -> None:
        """Wait until the node is not quiesced (modifications only)."""
        while self._quiesce_depth:
            await self._unquiesced.wait()

    @contextlib.contextmanager
    def _counted_change(self) -> Iterator[None]:
        """Count a modification in flight (what :meth:`quiesced` waits for)."""
        self._in_flight_changes += 1
        self._changes_idle.clear()
        try:
            with self._tracked():
                yield
        finally:
            self._in_flight_changes -= 1
            if self._in_flight_changes == 0:
                self._changes_idle.set()

    @contextlib.asynccontextmanager
    async def _change(self, offset: int, length: int) -> AsyncIterator[None]:
        """Admission of a modification: gate, tracking, hooks, dirty marks."""
        self._check_writable()
        self._check_range(offset, length)
        await self._pass_gate()
        self._check_range(offset, length)  # a truncate may have shrunk the node meanwhile
        with self._counted_change():
            for hook in tuple(self._before_write):
                pending = hook(offset, length)
                if pending is not None:
                    await pending
            if self._write_gates:
                await self._pass_write_gates(offset, length)
            for tracker in self.dirty_trackers:
                tracker.mark_dirty(offset, length)
            yield

    def _aligned(self, offset: int, length: int) -> tuple[int, int]:
        align = self.limits.request_alignment
        start = offset - offset % align
        end = min(-(-(offset + length) // align) * align, self.size)
        return start, end

    def _chunks(self, offset: int, length: int) -> Iterator[tuple[int, int]]:
        """Split a range to the driver's ``max_transfer``."""
        step = self.limits.max_transfer or length or 1
        end = offset + length
        for o in range(offset, end, step):
            yield o, min(step, end - o)

    # Each request kind that can complete without awaiting (read, write) has one admission
    # function, ``submit_*``: it completes the request inline when every check, hook,
    # gate and the driver can do it at once, or returns the awaitable that completes it.
    # The NBD server's inline path, the awaited ``read`` / ``write`` and copy-before-write
    # all go through it, so what a request must pass is decided in one place.
    #
    # The awaitable holds nothing until it runs (no count, no claim): it does the whole
    # admission again from the start then, so a caller may run it later (in a task) or
    # close it unawaited. The inline part is all or nothing: None / data means done; an
    # awaitable means nothing visible was done (at most dirty marks the awaitable repeats).

    def submit_read(
        self, offset: int, length: int, into: memoryview | None = None
    ) -> Buffer | Coroutine[Any, Any, Buffer]:
        """Read ``length`` bytes at ``offset``: the data now, or the awaitable giving it.

        Inline only when no split or padding is needed, the node is not quiesced (reads
        are not held there, but whoever quiesces may be changing the node underneath,
        e.g. a truncate) and the driver can read at once (a page-cache copy); ``into``,
        a writable buffer of ``length`` bytes, then receives the data. Out-of-range
        requests raise ``OSError`` here. Nothing awaits inline, so no in-flight count is
        needed: no quiesce can start meanwhile.
        """
        if offset < 0 or length <= 0 or offset + length > self.size:
            self._check_range(offset, length)
            return b""
        data = self._read_inline(offset, length, into)
        return self._read_awaited(offset, length) if data is None else data

    def _read_inline(self, offset: int, length: int, into: memoryview | None) -> Buffer | None:
        """The inline part of :meth:`submit_read` (the range is checked): data or None."""
        if self._quiesce_depth:
            return None
        limits = self.limits
        align = limits.request_alignment
        if (align != 1 and (offset % align or length % align)) or (
            limits.max_transfer and length > limits.max_transfer
        ):
            return None
        data = self.driver.submit_read(offset, length, into)
        if isinstance(data, BUFFER_TYPES):
            return data
        data.close()  # holds nothing until run: the awaited path asks the driver again
        return None

    async def read(self, offset: int, length: int) -> Buffer:
        """Read ``length`` bytes at ``offset`` (:meth:`submit_read`, awaited)."""
        data = self.submit_read(offset, length)
        if isinstance(data, BUFFER_TYPES):
            # Done inline: yield once, as a pool call would, so that a caller looping on
            # reads cannot starve the loop.
            if not inline_may_skip_yield():
                await asyncio.sleep(0)
            return data
        return await data

    def read_now(self, offset: int, length: int, into: memoryview | None = None) -> Buffer | None:
        """:meth:`submit_read` for a caller that can only take the data at once (a copy
        through a reused buffer): None when it would wait, and for a request :meth:`read`
        refuses or fails (so that the caller's ``read`` raises it)."""
        if offset < 0 or length <= 0 or offset + length > self.size:
            return None
        try:
            return self._read_inline(offset, length, into)
        except OSError:
            return None

    async def _read_awaited(self, offset: int, length: int) -> Buffer:
        # Plain attribute checks and counter updates instead of context managers: this is
        # the guest hot path (see docs/performance.md, "In-process request path").
        if offset + length > self.size:  # a truncate since the request was submitted
            self._check_range(offset, length)
        self._in_flight += 1
        self._idle.clear()
        try:
            limits = self.limits
            align = limits.request_alignment
            if align == 1 or (offset % align == 0 and (offset + length) % align == 0):
                if not limits.max_transfer or length <= limits.max_transfer:
                    return await self.driver.read(offset, length)
                return await self._read_split(offset, length)
            start, end = self._aligned(offset, length)
            if (start, end) == (offset, offset + length):
                return await self._read_split(offset, length)
            data = await self._read_split(start, end - start)
            return memoryview(data)[offset - start : offset - start + length]
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()

    async def read_many(
        self, ranges: Sequence[tuple[int, int]], into: memoryview | None = None
    ) -> list[Buffer]:
        """The data of each ``(offset, length)`` range, in order.

        In one pool call when the node is plain file data (:meth:`fd_map`), else one
        :meth:`read` each. Why: a backup from a dirty bitmap copies thousands of isolated
        clusters, and a pool round trip costs more than reading one from the page cache.
        ``into``: a buffer at least as long as all the ranges, that the data may be read
        into (a fresh buffer per call costs page faults on every call).
        """
        for offset, length in ranges:
            self._check_range(offset, length)
        places = []
        for offset, length in ranges:
            place = self.fd_map(offset) if length > 0 else None
            if place is None:
                return [await self.read(o, n) for o, n in ranges]
            places.append((place[0], place[1], length))
        total = sum(length for _offset, length in ranges)
        if into is None or len(into) < total:
            into = memoryview(bytearray(total))
        with self._tracked():
            return list(await run_blocking(read_ranges, places, into))

    async def _read_split(self, offset: int, length: int) -> Buffer:
        chunks = list(self._chunks(offset, length))
        if len(chunks) == 1:
            return await self.driver.read(offset, length)
        out = bytearray(length)
        for o, n in chunks:
            out[o - offset : o - offset + n] = await self.driver.read(o, n)
        return out

    def submit_write(
        self, offset: int, data: Buffer, flags: WriteFlags = WriteFlags.NONE
    ) -> Coroutine[Any, Any, None] | None:
        """Write ``data`` at ``offset``: None when written now, else the awaitable that writes.

        Inline when the node is not quiesced, every before-write hook and write gate lets
        the write through at once (see :meth:`add_before_write`, :meth:`add_write_gate`),
        no split or alignment is needed and the driver can write at once (a page-cache
        copy). Checks that fail (read-only, out of range) raise ``OSError`` here; so do
        errors of an inline write.
        """
        length = len(data)
        if length == 0:
            self._check_range(offset, 0)
            return None
        if self.config.read_only:
            self._check_writable()
        if offset < 0 or offset + length > self.size:
            self._check_range(offset, length)
        view = memoryview(data).cast("B")
        if self._write_inline(offset, view, flags):
            return None
        return self._write_awaited(offset, view, flags)

    def _write_inline(self, offset: int, view: memoryview, flags: WriteFlags) -> bool:
        """The inline part of :meth:`submit_write` (checks done): True when written.

        False having done nothing visible but dirty marks, which the awaited write repeats.
        """
        length = len(view)
        if self._quiesce_depth or (self._before_write and not self._hooks_pass_now(offset, length)):
            return False
        limits = self.limits
        if limits.request_alignment != 1 or (limits.max_transfer and length > limits.max_transfer):
            return False
        if self._write_gates and not _all_pass_now(self._write_gates, offset, length):
            return False
        for tracker in self.dirty_trackers:
            tracker.mark_dirty(offset, length)
        pending = self.driver.submit_write(offset, view, flags)
        if pending is None:
            return True
        pending.close()  # holds nothing until run: the awaited write asks the driver again
        return False

    async def write(self, offset: int, data: Buffer, flags: WriteFlags = WriteFlags.NONE) -> None:
        """Write ``data`` at ``offset`` (:meth:`submit_write`, awaited)."""
        pending = self.submit_write(offset, data, flags)
        if pending is not None:
            await pending
        elif not inline_may_skip_yield():
            await asyncio.sleep(0)  # done inline: yield once, as a pool call would

    async def write_many(
        self, pieces: Sequence[tuple[int, Buffer]], flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        """Write each ``(offset, data)`` piece: in one driver call
        (:meth:`~blockbackup.block.driver.BlockDriver.write_many`) when every piece can
        be admitted at once (as :meth:`_write_inline` decides), else one :meth:`write` each.
        A failure raises :class:`~blockbackup.block.driver.PartialWrite` when the pieces
        before it are known written (any other ``OSError``: none is known written).

        Why: a backup from a dirty bitmap writes thousands of isolated clusters, and a
        target whose writes cost a thread round trip (the repository) takes them in one.
        """
        views = [(offset, memoryview(data).cast("B")) for offset, data in pieces]
        for offset, view in views:
            if self.config.read_only:
                self._check_writable()
            self._check_range(offset, len(view))
        limits = self.limits
        if (
            self._quiesce_depth
            or self._write_gates
            or limits.request_alignment != 1
            or any(
                not view
                or (limits.max_transfer and len(view) > limits.max_transfer)
                or (self._before_write and not self._hooks_pass_now(offset, len(view)))
                for offset, view in views
            )
        ):
            await write_each(self.write, views, flags)
            return
        # What _write_awaited does for one write, for all of them.
        for tracker in self.dirty_trackers:
            for offset, view in views:
                tracker.mark_dirty(offset, len(view))
        with self._counted_change():
            await self.driver.write_many(views, flags)

    def write_now(self, offset: int, data: Buffer, flags: WriteFlags = WriteFlags.NONE) -> bool:
        """:meth:`submit_write` for a caller that can only write at once (a copy through
        a reused buffer): False when it would wait, having written nothing, and for a
        request :meth:`write` refuses (so that the caller's ``write`` raises it); errors
        of the inline write raise."""
        if not data or self.config.read_only or offset < 0 or offset + len(data) > self.size:
            return False
        return self._write_inline(offset, memoryview(data).cast("B"), flags)

    async def _write_changed(self, offset: int, view: memoryview, flags: WriteFlags) -> None:
        """A write whose hooks must be awaited (or that waits for a quiesce to end)."""
        async with self._change(offset, len(view)):
            await self._write_aligned(offset, view, flags)

    async def _write_awaited(self, offset: int, view: memoryview, flags: WriteFlags) -> None:
        """The awaited write, its admission done again from the start (see above)."""
        length = len(view)
        if offset + length > self.size:  # a truncate since the request was submitted
            self._check_range(offset, length)
        if self._quiesce_depth or (self._before_write and not self._hooks_pass_now(offset, length)):
            await self._write_changed(offset, view, flags)
            return
        # Not quiesced and every hook passed at once (none, nothing to do for this range,
        # or done just now: most guest writes during a backup), so admission needs no
        # await. What :meth:`_change` does, inline and in the same order: checks, hooks,
        # in-flight counts (taken before any await, so a quiesce that starts now waits
        # for this write), dirty marks. A hook added later is added inside a quiesced
        # section, which waits for this write to finish first.
        for tracker in self.dirty_trackers:
            tracker.mark_dirty(offset, length)
        self._in_flight_changes += 1
        self._changes_idle.clear()
        self._in_flight += 1
        self._idle.clear()
        try:
            if self._write_gates:
                await self._pass_write_gates(offset, length)
            limits = self.limits
            if limits.request_alignment == 1 and (
                not limits.max_transfer or length <= limits.max_transfer
            ):
                await self.driver.write(offset, view, flags)
            else:
                await self._write_aligned(offset, view, flags)
        finally:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.set()
            self._in_flight_changes -= 1
            if not self._in_flight_changes:
                self._changes_idle.set()

    async def _write_aligned(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        length = len(data)
        if self.limits.request_alignment == 1:
            await self._write_split(offset, data, flags)
            return
        start, end = self._aligned(offset, length)
        req = await self._serialise(start, end - start)
        try:
            if (start, end) != (offset, offset + length):
                padded = bytearray(await self._read_split(start, end - start))
                padded[offset - start : offset - start + length] = data
                data = memoryview(padded)
            await self._write_split(start, data, flags)
        finally:
            self._serialising.remove(req)

    async def _serialise(self, offset: int, length: int) -> Request:
        await self._serialising.wait_conflicts(offset, length)
        return self._serialising.add(offset, length)

    async def _write_split(self, offset: int, data: memoryview, flags: WriteFlags) -> None:
        for o, n in self._chunks(offset, len(data)):
            await self.driver.write(o, data[o - offset : o - offset + n], flags)

    async def write_zeroes(
        self, offset: int, length: int, flags: WriteFlags = WriteFlags.NONE
    ) -> None:
        """Make ``[offset, offset+length)`` read as zeroes."""
        if length == 0:
            self._check_range(offset, 0)
            return
        async with self._change(offset, length):
            # Unaligned head and tail become small zero-buffer writes (read-modify-write);
            # the aligned middle goes to the driver, however large, with no buffer.
            align = self.limits.request_alignment
            end = offset + length
            head_end = min(end, -(-offset // align) * align)
            tail_start = end if end == self.size else max(head_end, end // align * align)
            if head_end > offset:
                zeroes = memoryview(bytes(head_end - offset))
                await self._write_aligned(offset, zeroes, flags & WriteFlags.FUA)
            for o, n in self._chunks(head_end, tail_start - head_end):
                await self.driver.write_zeroes(o, n, flags)
            if end > tail_start:
                zeroes = memoryview(bytes(end - tail_start))
                await self._write_aligned(tail_start, zeroes, flags & WriteFlags.FUA)

    async def discard(self, offset: int, length: int) -> None:
        """Advisory deallocation of a range; copy-before-write still protects it."""
        if length == 0:
            self._check_range(offset, 0)
            return
        async with self._change(offset, length):
            # Only whole aligned blocks can be discarded; shrink inward.
            align = self.limits.request_alignment
            end = offset + length
            inner_start = -(-offset // align) * align
            inner_end = end if end == self.size else end // align * align
            if inner_end > inner_start:
                for o, n in self._chunks(inner_start, inner_end - inner_start):
                    await self.driver.discard(o, n)

    async def truncate(self, size: int) -> None:
        """Grow or shrink the node to ``size`` bytes; growth reads as zeroes.

        A modification like a write: held while the node is quiesced and counted in flight,
        so a backup's point in time never sees a resize half done. Shrinking also waits
        until no other modification is in flight, so none lands past the new end.
        Refused with ``EBUSY`` while before-write hooks (copy-before-write) or dirty
        trackers are attached: they cover the current size and cannot follow a resize
        (QEMU's copy-before-write forbids resizing its source as well).
        """
        self._check_writable()
        if size < 0:
            raise io_error(errno.EINVAL, f"cannot truncate {self.name} to {size} bytes")
        while True:
            await self._pass_gate()
            self._check_resizable()
            if size == self.size:
                return
            if size > self.size:
                with self._counted_change():
                    await self._resize(size)
                return
            async with self.quiesced():
                # Another quiescer that entered meanwhile owns the node: retry after it.
                if self._quiesce_depth == 1:
                    self._check_resizable()
                    with self._counted_change():
                        await self._resize(size)
                    return

    def _check_resizable(self) -> None:
        if self._before_write or self._write_gates or self.dirty_trackers:
            raise io_error(
                errno.EBUSY,
                f"node {self.name} cannot be resized while a backup or dirty bitmap tracks it",
            )

    async def _resize(self, size: int) -> None:
        await self.driver.truncate(size)
        if self.driver.size != size:
            raise io_error(
                errno.EIO, f"driver {self.driver.driver_name} did not resize {self.name}"
            )

    async def flush(self) -> None:
        """Make every completed write durable."""
        with self._tracked():
            await self.driver.flush()

    async def drop_cache(self, offset: int = 0, length: int | None = None) -> None:
        """Hint that nobody reads the range (default: all) again soon: the host may write
        it back and evict what it caches of it (a backup target as the copy goes).
        Advisory: errors are ignored."""
        if length is None:
            length = self.size - offset
        self._check_range(offset, length)
        with self._tracked():
            await self.driver.drop_cache(offset, length)

    def early_writeback(self) -> bool:
        """Whether writing back before the flush suits this node (see
        :meth:`~blockbackup.block.driver.BlockDriver.early_writeback`)."""
        return self.driver.early_writeback()

    async def block_status(self, offset: int, length: int) -> Extent:
        """Status of the extent at ``offset``, at most ``length`` long (never empty)."""
        self._check_range(offset, length)
        if length == 0:
            raise io_error(errno.EINVAL, "empty block-status request")
        with self._tracked():
            extent = await self.driver.block_status(offset, length)
        if extent.offset != offset or not extent.length > 0:
            raise io_error(errno.EIO, f"driver {self.driver.driver_name} returned a bad extent")
        if extent.length > length:
            extent = Extent(offset, length, extent.status)
        return extent

    async def copy_range_from(
        self,
        source: BlockNode,
        src_offset: int,
        offset: int,
        length: int,
        *,
        writeback: bool = False,
    ) -> None:
        """Copy ``length`` bytes from ``source`` with ``copy_file_range`` into this node.

        Raises ``OSError(ENOTSUP)`` when either side is not a plain local file; callers
        fall back to read + write. ``writeback``: start writing the copy back to storage.
        """
        source._check_range(src_offset, length)
        src = source.fd_map(src_offset)
        await self._copy_into_file(
            source, src_offset, offset, length, src, copy_file_range_all, writeback
        )

    async def copy_through_buffer_from(
        self,
        source: BlockNode,
        src_offset: int,
        offset: int,
        length: int,
        buffer: mmap.mmap,
        zeroes: bytes,
        *,
        writeback: bool = False,
        grain: int = 0,
        holes_read_zero: bool = False,
    ) -> list[tuple[int, int]]:
        """Copy from ``source`` through ``buffer`` (reused by the caller) in one blocking call.

        ``grain``s (0: whole buffers) that read as all zeroes are not written: they are
        returned as
        ``(offset, length)`` runs relative to ``offset`` for the caller to zero. Raises
        ``OSError(ENOTSUP)`` when this node is not a plain local file or ``source`` has no
        :meth:`reader`, and :class:`~blockbackup.block.copy_range.SourceReadError` when the
        read failed. ``writeback``: start writing the copy back to storage.
        ``holes_read_zero``: see :func:`~blockbackup.block.copy_range.copy_through_buffer`.
        """
        source._check_range(src_offset, length)
        return await self._copy_into_file(
            source,
            src_offset,
            offset,
            length,
            source.reader(src_offset),
            copy_through_buffer,
            buffer,
            zeroes,
            writeback,
            grain,
            holes_read_zero,
        )

    async def pull_from(self, source: BlockNode, src_offset: int, offset: int, length: int) -> bool:
        """Have this node's driver read ``length`` bytes of ``source`` at ``src_offset`` and
        write them at ``offset`` itself (:meth:`BlockDriver.pull`), in one thread call, both
        nodes' requests tracked as for a read of ``source`` and a write of this node. False
        when it cannot (nothing written): the caller reads and writes."""
        reader = source.reader(src_offset)
        if reader is None or not self.driver.pulls():
            return False
        source._check_range(src_offset, length)
        async with self._change(offset, length):
            with source._tracked():
                return await run_blocking(self.driver.pull, reader[0], reader[1], offset, length)

    async def _copy_into_file(
        self,
        source: BlockNode,
        src_offset: int,
        offset: int,
        length: int,
        src: tuple[object, int] | None,
        copy: Callable[..., T],
        *args: object,
    ) -> T:
        """Run ``copy(src, src_off, dst_fd, dst_off, length, *args)`` in a thread, with
        both nodes' requests tracked as for a read of ``source`` and a write of this node."""
        dst = self.fd_map(offset)
        if src is None or dst is None:
            raise io_error(errno.ENOTSUP, "copy offload needs local files on both sides")
        async with self._change(offset, length):
            with source._tracked():
                return await run_blocking(copy, src[0], src[1], dst[0], dst[1], length, *args)

    def fd_map(self, offset: int) -> tuple[int, int] | None:
        """Where byte ``offset`` lives in a local file, if this node is plain file data."""
        if self.limits.request_alignment != 1:
            return None
        return self.driver.fd_map(offset)

    def reader(self, offset: int) -> tuple[Reader, int] | None:
        """What a copy through a buffer reads from byte ``offset`` on, in its own thread
        (a local file, or what the driver offers: :meth:`BlockDriver.reader`), and the
        offset to ask it for; None: the copy must read through the node."""
        if self.limits.request_alignment != 1:
            return None
        mapped = self.driver.fd_map(offset)
        if mapped is not None:
            return FileReader(mapped[0]), mapped[1]
        return self.driver.reader(offset)


def _all_pass_now(
    admissions: list[BeforeWriteHook] | list[WriteGate], offset: int, length: int
) -> bool:
    """Whether every admission (hook or gate) lets a modification go ahead at once."""
    for admit in admissions:
        pending = admit(offset, length)
        if pending is not None:
            pending.close()  # holds nothing until run: the awaited path calls it again
            return False
    return True
