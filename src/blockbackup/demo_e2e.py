"""The end-to-end demo: the user commands, a real NBD writer, and a proof of the point in time.

1. ``blockbackup serve`` exports a sample image (random data with holes) over NBD, and
   ``blockbackup repo init`` makes a temporary repository, encrypted with a passphrase
   from an environment variable (``BB_PASSPHRASE``; a random one when it is not set).
2. Sixteen NBD writers rewrite 4 KiB blocks without pause. Each block belongs to one writer,
   so its versions are ordered; every payload names its block and version, and the demo
   logs when each write was issued and when it completed.
3. ``blockbackup backup --connect ... --repo`` backs the live image up into the repository
   while the writers go on; ``blockbackup restore`` then writes the snapshot to a file.
4. The proof, on the restored file: each block must hold one exact version, and there must
   be one moment T0 consistent with all of them: for the version ``v`` found in a block, T0
   comes after ``v`` was issued and before version ``v + 1`` completed (write ``v + 1`` was
   held at T0 or issued after it). An empty intersection, or any byte that is not an exact
   version, fails the demo.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import shutil
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from blockbackup._aio import run_blocking
from blockbackup.nbd.client import NbdClient

MiB = 1 << 20
BLOCK = 4096
WRITERS = 16
_HEADER = struct.Struct("<QQ8s")  # block, version, magic
MAGIC = b"bbdemo\x00\x01"


def payload(block: int, version: int) -> bytes:
    head = _HEADER.pack(block, version, MAGIC)
    return head + random.Random(block * 1_000_003 + version).randbytes(BLOCK - len(head))


@dataclass
class BlockLog:
    """The versions written to one block: (issued, completed) times, version 1 first."""

    writes: list[tuple[float, float]] = field(default_factory=list)


def make_sample(path: Path, size: int) -> None:
    rng = random.Random(7)
    with open(path, "wb") as f:
        f.truncate(size)
        for offset in range(0, size, MiB):
            if rng.random() < 0.6:
                f.seek(offset)
                f.write(os.urandom(min(MiB, size - offset)))


async def writer(
    client: NbdClient, index: int, blocks: int, logs: dict[int, BlockLog], stop: asyncio.Event
) -> None:
    rng = random.Random(index)
    mine = list(range(index, blocks, WRITERS))
    while not stop.is_set():
        block = rng.choice(mine)
        log = logs.setdefault(block, BlockLog())
        version = len(log.writes) + 1
        issued = time.monotonic()
        log.writes.append((issued, float("inf")))
        await client.write(block * BLOCK, payload(block, version))
        log.writes[-1] = (issued, time.monotonic())


def verify(original: bytes, backup: bytes, logs: dict[int, BlockLog]) -> tuple[float, float]:
    """The window in which T0 must lie; raises AssertionError with the first inconsistency."""
    low, high = float("-inf"), float("inf")
    for block in range(len(original) // BLOCK):
        got = backup[block * BLOCK : (block + 1) * BLOCK]
        log = logs.get(block)
        if got == original[block * BLOCK : (block + 1) * BLOCK]:
            version = 0
        else:
            number, version, magic = _HEADER.unpack_from(got)
            if magic != MAGIC or number != block or got != payload(block, version):
                raise AssertionError(f"block {block}: neither the original nor an exact version")
        writes = log.writes if log else []
        if version:
            low = max(low, writes[version - 1][0])
        if version < len(writes):
            high = min(high, writes[version][1])
        if low >= high:
            raise AssertionError(f"block {block}: no single point in time explains the backup")
    return low, high


#: Where the demo's repository passphrase comes from (never the command line).
PASSPHRASE_ENV = "BB_PASSPHRASE"


async def _bb(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    """Run ``blockbackup ARGS --json``: (exit status, the JSON result, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blockbackup", *args, "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    out, err = await proc.communicate()
    lines = out.decode().strip().splitlines()
    result = json.loads(lines[-1]) if lines else {}
    return proc.returncode or 0, result, err.decode().strip()


def _rate(size: float, seconds: float) -> str:
    return f"{size / MiB / max(seconds, 1e-9):.0f} MiB/s"


async def run(size: int, speed: int, keep: bool, directory: str | None) -> int:
    work = Path(directory or tempfile.mkdtemp(prefix="blockbackup-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    image, restored, repo = work / "disk.img", work / "restored.img", work / "repo"
    restored.unlink(missing_ok=True)
    shutil.rmtree(repo, ignore_errors=True)
    env = dict(os.environ)
    env.setdefault(PASSPHRASE_ENV, secrets.token_urlsafe(24))
    secret = ("--passphrase-env", PASSPHRASE_ENV)
    await run_blocking(make_sample, image, size)
    original = await run_blocking(image.read_bytes)
    code, _, err = await _bb(env, "repo", "init", str(repo), *secret)
    if code != 0:
        print(f"FAILED: {err}")
        return 1
    me = [sys.executable, "-m", "blockbackup"]
    server = await asyncio.create_subprocess_exec(
        *me,
        "serve",
        str(image),
        "--dir",
        str(work / "run"),
        "--json",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert server.stdout is not None
        info = json.loads(await server.stdout.readline())
        export, qmp = info["exports"][0], info["qmp"]
        print(f"serving {image} ({size // MiB} MiB) as {export['uri']}")
        sock = export["uri"].split("socket=", 1)[1]
        client = await NbdClient.connect({"type": "unix", "path": sock}, export["node"])
        logs: dict[int, BlockLog] = {}
        stop = asyncio.Event()
        async with asyncio.TaskGroup() as tg:
            for i in range(WRITERS):
                tg.create_task(writer(client, i, size // BLOCK, logs, stop))
            await asyncio.sleep(1.0)
            writes_before = sum(len(log.writes) for log in logs.values())
            t_start = time.monotonic()
            code, result, err = await _bb(
                env, "backup", "--connect", qmp, export["node"], "--repo", str(repo), *secret,
                "--speed", str(speed),
            )  # fmt: skip
            t_end = time.monotonic()
            writes_during = sum(len(log.writes) for log in logs.values()) - writes_before
            await asyncio.sleep(0.3)
            stop.set()
        await client.close()
        if code != 0 or result.get("error"):
            print(f"FAILED: the backup failed: {result.get('error') or err}")
            return 1
        (disk,) = result["disks"]
        print(
            f"backup into an encrypted repository: {disk['read'] // MiB} MiB in "
            f"{result['seconds']:.2f} s ({_rate(disk['read'], result['seconds'])}) while "
            f"{writes_during:,} writes went in over NBD "
            f"({writes_during / (t_end - t_start):,.0f}/s); snapshot {result['snapshot']}, "
            f"{disk['stored-bytes'] / MiB:.1f} MiB stored"
        )
        t_restore = time.monotonic()
        spec = f"{result['snapshot']}:{disk['disk']}"
        code, _, err = await _bb(env, "restore", "--repo", str(repo), spec, str(restored), *secret)
        seconds = time.monotonic() - t_restore
        if code != 0:
            print(f"FAILED: the restore failed: {err}")
            return 1
        print(f"restore into a file: {size // MiB} MiB in {seconds:.2f} s ({_rate(size, seconds)})")
        backup_bytes = await run_blocking(restored.read_bytes)
        try:
            low, high = verify(original, backup_bytes, logs)
        except AssertionError as err_:
            print(f"FAILED: {err_}")
            return 1
        changed = sum(1 for b in range(size // BLOCK) if backup_bytes[b * BLOCK : (b + 1) * BLOCK]
                      != original[b * BLOCK : (b + 1) * BLOCK])  # fmt: skip
        print(
            f"verified: every block of the restored snapshot is one exact version ({changed:,} "
            f"blocks rewritten before T0), and one point in time explains them all: T0 lies "
            f"{max(low, t_start) - t_start:.3f}-{min(high, t_end) - t_start:.3f} s after the "
            "backup command"
        )
        print("OK: the backup equals the image at the moment the backup started")
        return 0
    finally:
        if server.returncode is None:
            server.send_signal(2)
            await server.wait()
        if not keep and directory is None:
            shutil.rmtree(work, ignore_errors=True)
