"""Interop: real NBD clients (qemu-io, qemu-img, nbdinfo, nbdcopy, fio) against our server.

Why: our client and server agreeing with each other proves little; these tools are what
users point at an export. The server runs in-process; tools run as subprocesses through
``asyncio.create_subprocess_exec`` so the loop keeps serving them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blockbackup.block.bitmap import Bitmap
from blockbackup.block.node import BlockNode
from blockbackup.nbd.exports import ExportBitmap
from blockbackup.nbd.tls import TlsCredentials
from nbd.nbd_kit import MiB, check_tool, need, run_tool, server_env
from testkit.tls import make_certs

pytestmark = [pytest.mark.qemu, pytest.mark.asyncio, pytest.mark.timeout(60)]


@need("qemu-io")
async def test_qemu_io_patterns() -> None:
    async with server_env() as env:
        out = await check_tool(
            "qemu-io", "-f", "raw", env.uri(),
            "-c", "write -P 0x55 0 1M",
            "-c", "write -P 0xaa 1M 64k",
            "-c", "write -z 2M 512k",
            "-c", "read -P 0x55 0 1M",
            "-c", "read -P 0xaa 1M 64k",
            "-c", "read -P 0 2M 512k",
            "-c", "discard 3M 64k",
            "-c", "flush",
        )  # fmt: skip
        assert "Pattern verification failed" not in out
        data = env.image.read_bytes()
        assert data[:MiB] == b"\x55" * MiB
        assert data[MiB : MiB + 65536] == b"\xaa" * 65536


@need("qemu-io")
async def test_read_only_export_refuses_writes() -> None:
    async with server_env(writable=False) as env:
        rc, out, err = await run_tool(
            "qemu-io", "-r", "-f", "raw", env.uri(), "-c", "read -P 0 0 64k"
        )
        assert rc == 0, err
        rc, out, err = await run_tool("qemu-io", "-f", "raw", env.uri(), "-c", "write -P 0x11 0 4k")
        assert "write failed" in out + err or rc != 0
        assert env.image.read_bytes()[:4096] == bytes(4096)


@need("qemu-img", "qemu-io")
async def test_qemu_img_compare_convert_map() -> None:
    async with server_env() as env:
        await check_tool("qemu-io", "-f", "raw", env.uri(), "-c", "write -P 0x33 1M 128k")
        copy = env.dir / "copy.raw"
        await check_tool("qemu-img", "convert", "-f", "raw", "-O", "raw", env.uri(), str(copy))
        await check_tool("qemu-img", "compare", "-f", "raw", "-F", "raw", env.uri(), str(copy))
        back = env.dir / "back.qcow2"
        await check_tool("qemu-img", "convert", "-f", "raw", "-O", "qcow2", env.uri(), str(back))
        await check_tool("qemu-img", "compare", "-F", "qcow2", env.uri(), str(back))
        out = await check_tool("qemu-img", "map", "--output=json", "-f", "raw", env.uri())
        extents = json.loads(out)
        data = [(e["start"], e["length"]) for e in extents if e["data"]]
        assert data == [(MiB, 128 * 1024)]


@need("nbdinfo")
async def test_nbdinfo_list_and_map() -> None:
    async with server_env() as env:
        env.exports.add("e2", "src", name="second", description="the second one")
        out = await check_tool("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={env.sock}")
        names = {e["export-name"] for e in json.loads(out)["exports"]}
        assert names == {"src", "second"}
        await env.node.write(512 * 1024, b"x" * 4096)
        out = await check_tool("nbdinfo", "--map", "--json", env.uri())
        got = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
        assert got[0] == (0, 512 * 1024, 3)
        assert (512 * 1024, 4096, 0) in got


@need("nbdinfo")
async def test_nbdinfo_dirty_bitmap_context() -> None:
    bitmap = Bitmap(4 * MiB, 64 * 1024)
    bitmap.set(MiB, 128 * 1024)

    def lookup(node: BlockNode, name: str) -> ExportBitmap | None:
        return bitmap if name == "b0" else None

    async with server_env(bitmap_lookup=lookup, export=False) as env:
        env.exports.add("e", "src", name="src", bitmaps=["b0"])
        out = await check_tool("nbdinfo", "--map=qemu:dirty-bitmap:b0", "--json", env.uri())
        got = [(e["offset"], e["length"], e["type"]) for e in json.loads(out)]
        assert got == [
            (0, MiB, 0),
            (MiB, 128 * 1024, 1),
            (MiB + 128 * 1024, 3 * MiB - 128 * 1024, 0),
        ]


@need("nbdcopy", "qemu-io")
async def test_nbdcopy_both_directions() -> None:
    async with server_env() as env:
        src = env.dir / "in.raw"
        src.write_bytes(os.urandom(2 * MiB) + bytes(2 * MiB))
        await check_tool("nbdcopy", str(src), env.uri())
        assert env.image.read_bytes() == src.read_bytes()
        out = env.dir / "out.raw"
        await check_tool("nbdcopy", env.uri(), str(out))
        assert out.read_bytes() == src.read_bytes()


@need("fio")
async def test_fio_nbd_engine_verify() -> None:
    async with server_env(8 * MiB) as env:
        out = await check_tool(
            "fio", "--name=v", "--ioengine=nbd", f"--uri={env.uri()}",
            "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=8M",
            "--verify=crc32c", "--do_verify=1", "--verify_state_save=0", "--output-format=json",
            timeout=60,
        )  # fmt: skip
        result = json.loads(out[out.index("{") :])
        job = result["jobs"][0]
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == 8 * MiB


@need("qemu-img", "qemu-io", "openssl")
async def test_tls_with_qemu_img(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    certs.mkdir()
    assert make_certs(certs)
    creds = TlsCredentials(certs, endpoint="server", verify_peer=True)
    async with server_env(tls_creds=creds) as env:
        obj = f"tls-creds-x509,id=tls0,dir={certs},endpoint=client"
        opts = (
            f"driver=nbd,server.type=unix,server.path={env.sock},export=src,"
            "tls-creds=tls0,tls-hostname=localhost"
        )
        await check_tool(
            "qemu-io", "--object", obj, "--image-opts", opts,
            "-c", "write -P 0x77 0 64k", "-c", "read -P 0x77 0 64k",
        )  # fmt: skip
        out = await check_tool("qemu-img", "info", "--object", obj, "--image-opts", opts)
        assert "virtual size: 4 MiB" in out
        # Without TLS the export is refused (NBD_REP_ERR_TLS_REQD).
        rc, out, err = await run_tool("qemu-io", "-f", "raw", env.uri(), "-c", "read 0 4k")
        assert rc != 0
        assert "TLS" in out + err
        assert env.image.read_bytes()[:65536] == b"\x77" * 65536
