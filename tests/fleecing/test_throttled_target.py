"""A copy-before-write target behind a ``throttle`` node: the limit holds on every path.

Why: a guest write waits for its copy, so a limit on the target (a throttle node) must
pace that copy, and ``cbw-timeout`` with ``on-cbw-error`` must then decide what the
guest sees, whether the write came in on the NBD server's inline path or on the awaited
one. A 4 MiB guest write once went through in one unpaced copy: a leaky bucket that is
not yet full admits one request of any size at once, and the copy was one request.

The graph is made from blockdev-add options, the writer is qemu-io over NBD against the
in-process server, and the outcomes checked do not depend on timing: with 1 MiB/s and a
one-second timeout, the copy of 4 MiB (four chunks, paced) cannot finish in time.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from blockbackup.block.filters.copy_before_write import CopyBeforeWriteDriver
from blockbackup.block.filters.throttle import ThrottleDriver
from fleecing.fleece_kit import CLUSTER, MiB
from nbd.nbd_kit import Env, need, run_tool, server_env
from testkit.images import make_image, raw_node

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio, pytest.mark.timeout(60)]

SIZE = 4 * MiB
_groups = itertools.count()


@asynccontextmanager
async def throttled_fleece(
    bps_write: int, cbw_opts: dict[str, object]
) -> AsyncIterator[tuple[Env, bytes, ThrottleDriver, CopyBeforeWriteDriver]]:
    """src (random data) exported as ``guest`` through cbw, whose target ``thr`` is a
    throttle node over a raw temporary image; ``acc`` exported as ``snap``."""
    name = f"thr-target{next(_groups)}"
    async with server_env(SIZE, export=False) as env:
        env.graph.objects.add("throttle-group", name, {"limits": {"bps-write": bps_write}})
        t0 = os.urandom(SIZE)  # data everywhere: no zero cluster skips the target
        env.image.write_bytes(t0)
        await env.graph.add(raw_node("tmp", make_image(env.dir / "tmp.img", SIZE)))
        thr = await env.graph.add(
            {"driver": "throttle", "node-name": "thr", "throttle-group": name, "file": "tmp"}
        )
        cbw = await env.graph.add(
            {"driver": "copy-before-write", "node-name": "cbw", "file": "src"}
            | {"target": "thr"}
            | cbw_opts
        )
        await env.graph.add({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"})
        env.exports.add("eg", "cbw", name="guest", writable=True)
        env.exports.add("es", "acc", name="snap")
        assert isinstance(thr.driver, ThrottleDriver)
        assert isinstance(cbw.driver, CopyBeforeWriteDriver)
        yield env, t0, thr.driver, cbw.driver


async def copies_settled(cbw: CopyBeforeWriteDriver) -> None:
    """Wait (bounded) until no copy of the filter is in flight (timed-out ones go on)."""
    async with asyncio.timeout(20):
        while next(iter(cbw.block_copy.reqs), None) is not None:
            await asyncio.sleep(0.01)


async def qemu_io(env: Env, export: str, command: str, *, read_only: bool = False) -> str:
    flags = ("-r",) if read_only else ()
    _rc, out, err = await run_tool("qemu-io", *flags, "-f", "raw", env.uri(export), "-c", command)
    return out + err


@need("qemu-io")
async def test_large_write_paced_break_guest_write() -> None:
    opts = {"cbw-timeout": 1, "on-cbw-error": "break-guest-write"}
    async with throttled_fleece(MiB, opts) as (env, t0, thr, cbw):
        out = await qemu_io(env, "guest", "write -P 0x55 0 4M")
        # QEMU's NBD server sends ETIMEDOUT as EINVAL; qemu-io prints that.
        assert "write failed: Invalid argument" in out, out
        assert env.image.read_bytes() == t0  # the guest write did not happen
        await copies_settled(cbw)
        # Paced: not all of the copy could pass the limit before the timeout.
        assert cbw.block_copy.bytes_done < SIZE
        # What reached the target went through the throttle node, every byte of it.
        assert thr.admitted_write == cbw.block_copy.bytes_done
        out = await qemu_io(env, "snap", "read 0 4M", read_only=True)
        assert "read 4194304/4194304" in out, out  # the snapshot is intact


@need("qemu-io")
async def test_large_write_paced_break_snapshot() -> None:
    opts = {"cbw-timeout": 1, "on-cbw-error": "break-snapshot"}
    async with throttled_fleece(MiB, opts) as (env, _t0, thr, cbw):
        out = await qemu_io(env, "guest", "write -P 0x55 0 4M")
        assert "wrote 4194304/4194304" in out, out
        assert env.image.read_bytes() == b"\x55" * SIZE
        out = await qemu_io(env, "snap", "read 0 64k", read_only=True)
        assert "read failed: Invalid argument" in out, out
        await copies_settled(cbw)
        assert cbw.block_copy.bytes_done < SIZE
        assert thr.admitted_write == cbw.block_copy.bytes_done


@need("qemu-io")
async def test_inline_writes_copy_through_the_throttle() -> None:
    """Small cached writes, which the NBD server tries to complete inline: every copy
    they need still goes through the throttle node and is counted by it."""
    async with throttled_fleece(1 << 40, {}) as (env, t0, thr, cbw):
        await run_tool("cat", str(env.image))  # the source in the page cache
        offsets = [MiB + i * 3 * CLUSTER for i in range(8)]
        command = " ".join(f"-c 'write -P 0x66 {o} 4k'" for o in offsets)
        _rc, out, err = await run_tool("sh", "-c", f"qemu-io -f raw '{env.uri('guest')}' {command}")
        assert out.count("wrote 4096/4096") == len(offsets), out + err
        await copies_settled(cbw)
        assert cbw.block_copy.bytes_done == len(offsets) * CLUSTER
        assert thr.admitted_write == len(offsets) * CLUSTER
        tmp = (env.dir / "tmp.img").read_bytes()
        for o in offsets:
            assert tmp[o : o + CLUSTER] == t0[o : o + CLUSTER]
