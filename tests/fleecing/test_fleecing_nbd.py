"""Image fleecing with real NBD clients: both recipes, discard, broken snapshots, cbw-timeout.

Why: fleecing is for NBD clients (a backup tool pulling the frozen image while the guest
keeps writing), so the recipes are checked the way users run them: qemu-io rewrites the
disk through one export while qemu-img compares the snapshot export with a copy of the
disk taken before, all against the in-process server.
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from blockbackup.api import BlockBackup
from fleecing.fleece_kit import CLUSTER, MiB, t0_data
from nbd.nbd_kit import Env, check_tool, need, run_tool, server_env
from testkit.images import allocated_bytes, make_image, raw_node

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio, pytest.mark.timeout(60)]

SIZE = 4 * MiB


@asynccontextmanager
async def fleece_env(
    *, cbw_opts: dict[str, object] | None = None, tmp: str | None = None
) -> AsyncIterator[tuple[Env, Path]]:
    """Server with ``src`` (random data, exported as ``guest`` via cbw), ``acc`` exported
    read-only as ``snap``; yields the env and a copy of the T0 image."""
    async with server_env(SIZE, export=False) as env:
        t0 = t0_data(SIZE)
        env.image.write_bytes(t0)
        copy = env.dir / "t0.raw"
        shutil.copyfile(env.image, copy)
        tmp_path = make_image(env.dir / "tmp.img", SIZE)
        g = env.graph
        await g.add(raw_node("tmp-raw" if tmp else "tmp", tmp_path, discard="unmap"))
        cbw: dict[str, object] = {
            "driver": "copy-before-write",
            "node-name": "cbw",
            "file": "src",
            "target": tmp or "tmp",
        }
        await g.add(cbw | (cbw_opts or {}))
        await g.add({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"})
        env.exports.add("eg", "cbw", name="guest", writable=True)
        env.exports.add("es", "acc", name="snap")
        yield env, copy


@need("qemu-io", "qemu-img")
async def test_modern_recipe() -> None:
    async with fleece_env() as (env, t0):
        await check_tool("qemu-io", "-f", "raw", env.uri("guest"), "-c", "write -P 0x55 0 4M")
        out = await check_tool(
            "qemu-img", "compare", "-f", "raw", "-F", "raw", env.uri("snap"), str(t0)
        )
        assert "Images are identical" in out
        assert env.image.read_bytes() == b"\x55" * SIZE
        await check_tool("qemu-io", "-r", "-f", "raw", env.uri("guest"), "-c", "read -P 0x55 0 4M")


@need("qemu-io", "qemu-img")
async def test_classic_recipe() -> None:
    async with server_env(SIZE) as env:  # "src" exported writable before the backup
        data = bytearray(t0_data(SIZE))
        env.image.write_bytes(data)
        with open(env.image, "r+b") as f:  # a real hole in the middle: block status "zero"
            f.truncate(SIZE // 2)
            f.truncate(SIZE)
            f.seek(SIZE // 2 + MiB)
            f.write(data[SIZE // 2 + MiB :])
        data[SIZE // 2 : SIZE // 2 + MiB] = bytes(MiB)
        copy = env.dir / "t0.raw"
        copy.write_bytes(bytes(data))
        ovl = env.dir / "ovl.qcow2"
        await check_tool(
            "qemu-img", "create", "-q", "-f", "qcow2", "-b", str(env.image), "-F", "raw", str(ovl)
        )
        await env.graph.add(
            {
                "driver": "qcow2",
                "node-name": "ovl",
                "file": {"driver": "file", "filename": str(ovl)},
                "backing": "src",
            }
        )
        bb = BlockBackup(env.graph, env.events)
        job = await bb.backup("src", "ovl", sync="none", job_id="fleece")
        env.exports.add("ef", "ovl", name="fleece")
        await check_tool("qemu-io", "-f", "raw", env.uri(), "-c", "write -P 0x66 0 4M")
        out = await check_tool(
            "qemu-img", "compare", "-f", "raw", "-F", "raw", env.uri("fleece"), str(copy)
        )
        assert "Images are identical" in out
        await job.cancel()
        await bb.jobs.wait_concluded(job)
        await bb.jobs.aclose()


@need("qemu-io", "nbdinfo")
async def test_discard_through_snapshot_export() -> None:
    async with fleece_env() as (env, t0):
        env.exports.add("ew", "acc", name="snapw", writable=True)
        await check_tool("qemu-io", "-f", "raw", env.uri("guest"), "-c", "write -P 0x55 0 1M")
        tmp = env.dir / "tmp.img"
        before = allocated_bytes(tmp)
        assert before >= MiB
        await check_tool("qemu-io", "-f", "raw", env.uri("snapw"), "-c", "discard 0 1M")
        assert allocated_bytes(tmp) <= before - MiB
        _rc, out, err = await run_tool(
            "qemu-io", "-r", "-f", "raw", env.uri("snap"), "-c", "read 0 64k"
        )
        assert "read failed: Invalid argument" in out + err
        # the rest of the snapshot still reads as T0
        expected = t0.read_bytes()[MiB : MiB + CLUSTER]
        node = env.graph.get("acc")
        assert bytes(await node.read(MiB, CLUSTER)) == expected


@need("qemu-io")
async def test_break_snapshot_over_nbd() -> None:
    async with server_env(SIZE, export=False) as env:
        env.image.write_bytes(t0_data(SIZE))
        tmp = make_image(env.dir / "tmp.img", SIZE)
        await env.graph.add(
            {"driver": "blkdebug", "node-name": "tmp", "image": raw_node("tmp-raw", tmp)}
        )
        await env.graph.add(
            {
                "driver": "copy-before-write",
                "node-name": "cbw",
                "file": "src",
                "target": "tmp",
                "on-cbw-error": "break-snapshot",
            }
        )
        await env.graph.add({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"})
        env.exports.add("eg", "cbw", name="guest", writable=True)
        env.exports.add("es", "acc", name="snap")
        env.graph.get("tmp").driver.add_rule("write")  # type: ignore[attr-defined]
        out = await check_tool("qemu-io", "-f", "raw", env.uri("guest"), "-c", "write 0 64k")
        assert "wrote 65536/65536" in out
        _rc, out, err = await run_tool(
            "qemu-io", "-r", "-f", "raw", env.uri("snap"), "-c", "read 1M 4k"
        )
        assert "read failed: Invalid argument" in out + err


@asynccontextmanager
async def throttled_tmp(env: Env) -> AsyncIterator[str]:
    """``tmp``: a throttle node (64 KiB/s of writes, bucket already full for ~1.9 s)."""
    env.graph.objects.add("throttle-group", "tg", {"limits": {"bps-write": 64 * 1024}})
    tmp_path = make_image(env.dir / "tmp.img", SIZE)
    await env.graph.add(raw_node("tmp-raw", tmp_path))
    node = await env.graph.add(
        {"driver": "throttle", "node-name": "tmp", "throttle-group": "tg", "file": "tmp-raw"}
    )
    await node.write(SIZE - 128 * 1024, bytes(128 * 1024))  # fills the bucket
    yield "tmp"


@need("qemu-io")
@pytest.mark.parametrize("mode", ["break-guest-write", "break-snapshot"])
async def test_cbw_timeout_with_throttled_target(mode: str) -> None:
    async with server_env(SIZE, export=False) as env:
        env.image.write_bytes(t0_data(SIZE))
        async with throttled_tmp(env) as tmp:
            await env.graph.add(
                {
                    "driver": "copy-before-write",
                    "node-name": "cbw",
                    "file": "src",
                    "target": tmp,
                    "on-cbw-error": mode,
                    "cbw-timeout": 1,
                }
            )
            await env.graph.add({"driver": "snapshot-access", "node-name": "acc", "file": "cbw"})
            env.exports.add("eg", "cbw", name="guest", writable=True)
            env.exports.add("es", "acc", name="snap")
            _rc, out, err = await run_tool(
                "qemu-io", "-f", "raw", env.uri("guest"), "-c", "write -P 0x11 0 4k"
            )
            _rc2, out2, err2 = await run_tool(
                "qemu-io", "-r", "-f", "raw", env.uri("snap"), "-c", "read 2M 4k"
            )
            if mode == "break-guest-write":
                assert "write failed: Invalid argument" in out + err
                assert "read 4096/4096" in out2, out2 + err2
                assert env.image.read_bytes()[:4096] != b"\x11" * 4096
            else:
                assert "wrote 4096/4096" in out, out + err
                assert "read failed: Invalid argument" in out2 + err2
                assert env.image.read_bytes()[:4096] == b"\x11" * 4096
