"""``repo sync`` both ways between a directory and S3 (and S3 to S3): a synced copy restores
alone, a second sync copies only what is new, a damaged source pack is refused, a different
repository is refused, and the rate limit holds."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from testkit.faultproxy import FaultProxy
from testkit.repocli import bb
from testkit.s3server import S3Server

MiB = 1 << 20


def test_sync_both_ways(
    tmp_path: Path, env: dict[str, str], bucket: str, proxy: FaultProxy
) -> None:
    local = tmp_path / "local"
    pw = ("--passphrase-env", "BBP")
    bb("repo", "init", local, *pw, env=env)
    img = tmp_path / "d.img"
    first = os.urandom(6 * MiB)
    img.write_bytes(first)
    bb("backup", img, "--repo", local, *pw, env=env)

    remote = f"s3://{bucket}/copy"
    r1 = json.loads(bb("repo", "sync", local, remote, "--json", env=env).stdout)
    assert r1["created"]
    assert r1["packs"] >= 1
    assert r1["snapshots"] == 1
    assert r1["keys"] == 1
    out = tmp_path / "from-s3.img"
    bb("restore", "--repo", remote, *pw, "latest", out, env=env)  # the copy restores alone
    assert out.read_bytes() == first

    second = bytearray(first)
    second[2 * MiB : 2 * MiB + 65536] = os.urandom(65536)
    img.write_bytes(bytes(second))
    bb("backup", img, "--repo", local, *pw, env=env)
    proxy.clear()
    r2 = json.loads(bb("repo", "sync", local, remote, "--json", env=env).stdout)
    assert not r2["created"]
    assert r2["snapshots"] == 1
    assert r2["packs"] == 1
    assert proxy.count("PUT", "/data/") == 1  # only what the copy lacked
    assert r2["bytes"] < 1 * MiB

    # S3 to a new directory, and S3 to S3
    back = tmp_path / "back"
    bb("repo", "sync", remote, back, env=env)
    other = f"s3://{bucket}/third"
    bb("repo", "sync", remote, other, env=env)
    for where in (back, other):
        snaps = json.loads(bb("snapshots", "--repo", where, *pw, "--json", env=env).stdout)
        assert len(snaps) == 2
        out = tmp_path / f"out-{len(str(where))}.img"
        bb("restore", "--repo", where, *pw, "latest", out, env=env)
        assert out.read_bytes() == bytes(second)
    again = json.loads(bb("repo", "sync", remote, back, "--json", env=env).stdout)
    assert again["packs"] == again["snapshots"] == again["bytes"] == 0


def test_sync_refuses_damage_and_strangers(
    tmp_path: Path, env: dict[str, str], bucket: str
) -> None:
    local = tmp_path / "local"
    bb("repo", "init", local, "--no-encryption", env=env)
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(3 * MiB))
    bb("backup", img, "--repo", local, env=env)

    stranger = f"s3://{bucket}/stranger"
    bb("repo", "init", stranger, "--no-encryption", env=env)
    proc = bb("repo", "sync", local, stranger, env=env, ok=False)
    assert "another repository" in proc.stderr

    pack = next(p for p in (local / "data").rglob("*") if p.is_file())
    raw = bytearray(pack.read_bytes())
    raw[100] ^= 1
    pack.write_bytes(bytes(raw))
    dest = f"s3://{bucket}/dest"
    proc = bb("repo", "sync", local, dest, env=env, ok=False)
    assert "does not match its name" in proc.stderr
    assert pack.name in proc.stderr
    snaps = json.loads(bb("snapshots", "--repo", dest, "--json", env=env).stdout)
    assert snaps == []  # nothing that needs the damaged pack was copied


def test_sync_rate_limit(tmp_path: Path, env: dict[str, str], bucket: str) -> None:
    local = tmp_path / "local"
    bb("repo", "init", local, "--no-encryption", env=env)
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(3 * MiB))
    bb("backup", img, "--repo", local, env=env)
    start = time.monotonic()
    r = json.loads(
        bb(
            "repo", "sync", local, f"s3://{bucket}/slow", "--limit-rate", "1M", "--json", env=env
        ).stdout
    )
    # a lower bound only (the machine is shared): 3 MiB at 1 MiB/s cannot take under 2 s
    assert r["bytes"] > 3 * MiB
    assert time.monotonic() - start >= 2.0


def test_sync_with_an_endpoint_per_side(
    tmp_path: Path, env: dict[str, str], bucket: str, proxy: FaultProxy, s3_server: S3Server
) -> None:
    """--source-endpoint and --dest-endpoint reach their own side: the source is read
    through the proxy, the copy is written to the server directly."""
    bb("repo", "init", f"s3://{bucket}/src", "--no-encryption", env=env)
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(2 * MiB))
    bb("backup", img, "--repo", f"s3://{bucket}/src", env=env)
    bare = {k: v for k, v in env.items() if k != "BB_S3_ENDPOINT"}
    proxy.clear()
    bb(
        "repo", "sync", f"s3://{bucket}/src", f"s3://{bucket}/dst",
        "--source-endpoint", proxy.endpoint, "--dest-endpoint", s3_server.endpoint, env=bare,
    )  # fmt: skip
    assert proxy.count("GET", "/src/data/") >= 1
    assert proxy.count("PUT") == 0  # nothing written through the source's endpoint
    out = tmp_path / "out.img"
    bb("restore", "--repo", f"s3://{bucket}/dst", "latest", out, env=env)
    assert out.read_bytes() == img.read_bytes()
