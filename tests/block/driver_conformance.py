"""``check_block_driver``: one conformance suite run against every block driver.

Like trio's ``check_two_way_stream``, the contract of :class:`BlockNode` (what callers of
the request layer may rely on, whatever driver is underneath) is written down once, as
executable checks, and every driver (file, raw, null, blkdebug, and later nbd, throttle,
copy-before-write, qcow2) is run through it. A new driver gets the whole contract checked
by writing a ten-line factory.

Usage::

    async def factory(graph, *, name, directory, size, read_only):
        path = directory / "disk.img"
        if not read_only or not path.exists():
            path.write_bytes(b"")
            os.truncate(path, size)
        return await graph.add({"driver": "file", "node-name": name,
                                "filename": str(path), "read-only": read_only})

    await check_block_driver(factory, tmp_path)

Every check is deterministic (seeded ``random.Random``) and waits only on real
completions, never on time.
"""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from blockbackup.block.driver import Status, WriteFlags
from blockbackup.block.graph import Graph

if TYPE_CHECKING:
    from blockbackup.block.node import BlockNode

__all__ = ["NodeFactory", "check_block_driver"]

MiB = 1 << 20


class NodeFactory(Protocol):
    """Creates a fresh node called ``name`` of ``size`` bytes, reading as zeroes.

    ``directory`` is an empty directory the factory may use for its files; ``read_only``
    asks for a node opened with ``"read-only": true``.
    """

    async def __call__(
        self, graph: Graph, *, name: str, directory: Path, size: int, read_only: bool
    ) -> BlockNode: ...


@dataclass
class _Ctx:
    factory: NodeFactory
    tmp_path: Path
    size: int
    stores_data: bool
    rng: random.Random
    counter: int = 0

    async def node(self, graph: Graph, *, read_only: bool = False) -> BlockNode:
        self.counter += 1
        directory = self.tmp_path / f"conformance-{self.counter}"
        directory.mkdir()
        node = await self.factory(
            graph, name=f"n{self.counter}", directory=directory, size=self.size, read_only=read_only
        )
        assert node.size == self.size, f"factory made a node of {node.size} bytes, not {self.size}"
        assert node.read_only == read_only
        return node


async def check_block_driver(
    factory: NodeFactory,
    tmp_path: Path,
    *,
    size: int = 4 * MiB,
    stores_data: bool = True,
    seed: int = 0,
) -> None:
    """Check the request-layer contract on nodes made by ``factory``.

    ``stores_data=False`` is for drivers that drop writes (``null-co``): data is not
    compared, only that requests succeed, have the right lengths and fail as they must.
    """
    ctx = _Ctx(factory, tmp_path, size, stores_data, random.Random(seed))
    for check in (
        _check_read_your_writes,
        _check_write_zeroes,
        _check_discard,
        _check_flush,
        _check_block_status,
        _check_bounds,
        _check_read_only,
        _check_concurrent_writes,
        _check_concurrent_rmw,
    ):
        graph = Graph()
        try:
            await check(ctx, graph)
        except AssertionError as err:
            raise AssertionError(f"{check.__name__}: {err}") from err
        finally:
            await graph.aclose()
        assert not graph.nodes


# -- helpers -------------------------------------------------------------------------------


def _random_range(
    rng: random.Random, size: int, align: int, max_len: int = 300_000
) -> tuple[int, int]:
    """A random non-empty range: a third aligned, a third unaligned, a third tiny."""
    kind = rng.randrange(3)
    if kind == 0 and size >= align:
        blocks = size // align
        start = rng.randrange(blocks)
        n = rng.randint(1, max(1, min(blocks - start, max_len // align)))
        return start * align, n * align
    if kind == 1:
        offset = rng.randrange(size)
        return offset, rng.randint(1, min(size - offset, max_len))
    offset = rng.randrange(size)
    return offset, rng.randint(1, min(size - offset, 17))


def _pattern(rng: random.Random, length: int) -> bytes:
    return rng.randbytes(length)


async def _assert_reads(
    node: BlockNode, model: bytearray | None, offset: int, length: int
) -> bytes:
    data = bytes(await node.read(offset, length))
    assert len(data) == length, f"read {offset}+{length} returned {len(data)} bytes"
    if model is not None:
        expected = bytes(model[offset : offset + length])
        if data != expected:
            first = next(i for i in range(length) if data[i] != expected[i])
            raise AssertionError(
                f"read {offset}+{length}: byte {offset + first} is {data[first]:#x}, "
                f"expected {expected[first]:#x}"
            )
    return data


async def _assert_errno(code: int, aw: Awaitable[object]) -> None:
    failure: OSError | None = None
    try:
        await aw
    except OSError as err:
        failure = err
    name = errno.errorcode[code]
    if failure is None:
        raise AssertionError(f"expected OSError({name}), the request succeeded")
    assert failure.errno == code, f"expected OSError({name}), got {failure!r}"


async def _assert_idle(node: BlockNode) -> None:
    assert node.in_flight == 0, f"{node.in_flight} requests still counted in flight"


# -- the checks ----------------------------------------------------------------------------


async def _check_read_your_writes(ctx: _Ctx, graph: Graph) -> None:
    node = await ctx.node(graph)
    rng = ctx.rng
    model = bytearray(ctx.size) if ctx.stores_data else None
    align = node.limits.request_alignment
    await _assert_reads(node, model, 0, ctx.size)  # a fresh node reads as zeroes
    for i in range(60):
        offset, length = _random_range(rng, ctx.size, align)
        data = _pattern(rng, length)
        flags = WriteFlags.FUA if i % 7 == 0 else WriteFlags.NONE
        # Pass every buffer type a caller may use.
        buf: bytes | bytearray | memoryview = (data, bytearray(data), memoryview(data))[i % 3]
        await node.write(offset, buf, flags)
        if model is not None:
            model[offset : offset + length] = data
        # The written range, a random range, and the first and last bytes of the disk.
        await _assert_reads(node, model, offset, length)
        await _assert_reads(node, model, *_random_range(rng, ctx.size, align))
        await _assert_reads(node, model, 0, 1)
        await _assert_reads(node, model, ctx.size - 1, 1)
    # Zero-length requests are valid no-ops, even at the very end.
    assert len(await node.read(ctx.size, 0)) == 0
    await node.write(ctx.size, b"")
    await _assert_reads(node, model, 0, ctx.size)
    await _assert_idle(node)


async def _check_write_zeroes(ctx: _Ctx, graph: Graph) -> None:
    node = await ctx.node(graph)
    rng = ctx.rng
    model = bytearray(ctx.size) if ctx.stores_data else None
    align = node.limits.request_alignment
    data = _pattern(rng, ctx.size)
    await node.write(0, data)
    if model is not None:
        model[:] = data
    cases = [
        (WriteFlags.NONE, *_random_range(rng, ctx.size, align)),
        (WriteFlags.MAY_UNMAP, *_random_range(rng, ctx.size, align)),
        (WriteFlags.MAY_UNMAP, 64 * 1024, 256 * 1024),  # aligned, large enough to punch
        (WriteFlags.NONE, 3, 5000),  # unaligned both ends
        (WriteFlags.MAY_UNMAP, ctx.size - 777, 777),  # up to the end
        (WriteFlags.FUA, 1 * MiB + 1, 1),
    ]
    for flags, offset, length in cases:
        await node.write_zeroes(offset, length, flags)
        if model is not None:
            model[offset : offset + length] = bytes(length)
        await _assert_reads(
            node,
            model,
            max(0, offset - 4096),
            min(ctx.size, offset + length + 4096) - max(0, offset - 4096),
        )
    # NO_FALLBACK: either fast zeroing or ENOTSUP, never slow writes that fail halfway.
    offset, length = 2 * MiB, 128 * 1024
    failure: OSError | None = None
    try:
        await node.write_zeroes(offset, length, WriteFlags.NO_FALLBACK | WriteFlags.MAY_UNMAP)
    except OSError as err:
        failure = err
    if failure is not None:
        assert failure.errno == errno.ENOTSUP, f"NO_FALLBACK failed with {failure!r}"
    elif model is not None:
        model[offset : offset + length] = bytes(length)
    await _assert_reads(node, model, 0, ctx.size)
    await _assert_idle(node)


async def _check_discard(ctx: _Ctx, graph: Graph) -> None:
    node = await ctx.node(graph)
    rng = ctx.rng
    align = node.limits.request_alignment
    data = _pattern(rng, ctx.size)
    await node.write(0, data)
    model = bytearray(data) if ctx.stores_data else None
    for offset, length in [
        (4096, 65536),
        (1000, 70000),
        (5, 3),
        *(_random_range(rng, ctx.size, align) for _ in range(8)),
    ]:
        await node.discard(offset, length)
        got = bytes(await node.read(0, ctx.size))
        if model is None:
            continue
        # Outside the range nothing changed; inside, each byte is the old data or zero
        # (discard is advisory).
        assert got[:offset] == model[:offset], f"discard {offset}+{length} changed bytes before it"
        end = offset + length
        assert got[end:] == model[end:], f"discard {offset}+{length} changed bytes after it"
        for i in range(offset, end):
            if got[i] != model[i] and got[i] != 0:
                raise AssertionError(f"discard {offset}+{length}: byte {i} became {got[i]:#x}")
        model[offset:end] = got[offset:end]
    await node.discard(ctx.size, 0)
    await _assert_idle(node)


async def _check_flush(ctx: _Ctx, graph: Graph) -> None:
    node = await ctx.node(graph)
    await node.flush()
    await node.write(12345, b"flush me")
    await node.flush()
    await node.flush()
    model = bytearray(ctx.size) if ctx.stores_data else None
    if model is not None:
        model[12345 : 12345 + 8] = b"flush me"
    await _assert_reads(node, model, 12000, 1000)
    await _assert_idle(node)


async def _walk_status(node: BlockNode, offset: int, length: int) -> list[tuple[int, int, Status]]:
    """Walk ``[offset, offset+length)`` with block_status, checking the tiling."""
    out: list[tuple[int, int, Status]] = []
    pos, end = offset, offset + length
    while pos < end:
        ext = await node.block_status(pos, end - pos)
        assert ext.offset == pos, f"extent at {ext.offset}, asked for {pos}"
        assert ext.length > 0, f"empty extent at {pos}"
        assert ext.end <= end, f"extent {ext.offset}+{ext.length} goes past {end}"
        out.append((ext.offset, ext.length, ext.status))
        pos = ext.end
    return out


async def _check_block_status(ctx: _Ctx, graph: Graph) -> None:
    node = await ctx.node(graph)
    rng = ctx.rng
    align = node.limits.request_alignment
    # Some data, some zeroes, some untouched space.
    await node.write(1 * MiB, _pattern(rng, 64 * 1024))
    await node.write(3, b"\xff" * 10)
    await node.write_zeroes(2 * MiB, 512 * 1024, WriteFlags.MAY_UNMAP)
    ranges = [
        (0, ctx.size),
        (1 * MiB - 1, 65538),
        *(_random_range(rng, ctx.size, align) for _ in range(20)),
    ]
    for offset, length in ranges:
        extents = await _walk_status(node, offset, length)
        for ext_offset, ext_length, status in extents:
            if status & Status.ZERO:
                data = bytes(await node.read(ext_offset, ext_length))
                assert data == bytes(ext_length), f"ZERO extent {ext_offset}+{ext_length} has data"
    # The data written above is never reported as zero.
    for ext_offset, ext_length, status in await _walk_status(node, 1 * MiB, 64 * 1024):
        if ctx.stores_data:
            assert not status & Status.ZERO, (
                f"written data at {ext_offset}+{ext_length} reported ZERO"
            )
    await _assert_idle(node)


async def _check_bounds(ctx: _Ctx, graph: Graph) -> None:
    node = await ctx.node(graph)
    size = ctx.size
    einval = errno.EINVAL
    for offset, length in [(size, 1), (size - 1, 2), (-1, 1), (0, size + 1), (size + 4096, 4096)]:
        await _assert_errno(einval, node.read(offset, length))
        await _assert_errno(einval, node.write(offset, b"x" * max(length, 1)))
        await _assert_errno(einval, node.write_zeroes(offset, length))
        await _assert_errno(einval, node.discard(offset, length))
        await _assert_errno(einval, node.block_status(offset, length))
    await _assert_errno(einval, node.block_status(0, 0))
    # Nothing was written by the refused requests.
    if ctx.stores_data:
        await _assert_reads(node, bytearray(size), 0, size)
    await _assert_idle(node)


async def _check_read_only(ctx: _Ctx, graph: Graph) -> None:
    node = await ctx.node(graph, read_only=True)
    eperm = errno.EPERM
    await _assert_errno(eperm, node.write(0, b"x"))
    await _assert_errno(eperm, node.write(0, b"x" * 8192))
    await _assert_errno(eperm, node.write_zeroes(0, 4096))
    await _assert_errno(eperm, node.discard(0, 4096))
    # Reads, block status and flush still work.
    await _assert_reads(node, bytearray(ctx.size) if ctx.stores_data else None, 0, 65536)
    await _walk_status(node, 0, ctx.size)
    await node.flush()
    await _assert_idle(node)


async def _check_concurrent_writes(ctx: _Ctx, graph: Graph) -> None:
    """Overlapping writes in parallel: each byte ends up with one writer's value, and with
    alignment > 1 every aligned block is wholly one writer's (no torn block)."""
    node = await ctx.node(graph)
    rng = ctx.rng
    align = node.limits.request_alignment
    writers = 8
    base = 512 * 1024
    ranges = []
    for w in range(writers):
        start = base + rng.randrange(0, 64 * 1024)
        ranges.append((start, rng.randint(64 * 1024, 192 * 1024), w + 1))
    await asyncio.gather(*(node.write(o, bytes([v]) * n) for o, n, v in ranges))
    lo = min(o for o, _, _ in ranges)
    hi = max(o + n for o, n, _ in ranges)
    got = bytes(await node.read(lo, hi - lo))
    if not ctx.stores_data:
        return
    for i, b in enumerate(got):
        pos = lo + i
        covering = {v for o, n, v in ranges if o <= pos < o + n}
        allowed = covering or {0}
        if b not in allowed:
            raise AssertionError(f"byte {pos} is {b}, none of the values written there {allowed}")
    if align > 1:
        # Blocks that every writer covers entirely must not mix values.
        for block in range(lo - lo % align, hi, align):
            if all(o <= block and block + align <= o + n for o, n, _ in ranges):
                chunk = got[block - lo : block - lo + align]
                assert len(set(chunk)) == 1, f"block {block} mixes values {sorted(set(chunk))}"
    await _assert_idle(node)


async def _check_concurrent_rmw(ctx: _Ctx, graph: Graph) -> None:
    """Parallel writes to disjoint bytes of the same aligned blocks all survive (the
    request layer's read-modify-write is serialised)."""
    node = await ctx.node(graph)
    align = max(node.limits.request_alignment, 512)
    block = 3 * align
    pieces = [(block + i * 7, bytes([i + 1]) * 5) for i in range(16)]
    pieces.append((block + align - 2, b"\xee" * 4))  # straddles two blocks
    await asyncio.gather(*(node.write(o, d) for o, d in pieces))
    if not ctx.stores_data:
        return
    model = bytearray(ctx.size)
    for o, d in pieces:
        model[o : o + len(d)] = d
    await _assert_reads(node, model, block - align, 4 * align)
    await _assert_idle(node)
