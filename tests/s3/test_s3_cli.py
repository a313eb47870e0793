"""Every repository command on ``s3://`` against a real S3 server (rclone), as a user runs
them (subprocess CLI), with the settings from flags, environment or the config file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from testkit.faultproxy import FaultProxy
from testkit.repocli import BB, bb

MiB = 1 << 20


def write_image(path: Path, seed: int, size: int = 6 * MiB) -> bytes:
    """Random chunks, a hole, and text: dedup, zero and compression paths all run."""
    import random

    rng = random.Random(seed)
    data = bytearray(rng.randbytes(size // 2))
    data += bytes(size // 4)
    line = b"some text %d\n" % seed
    data += line * ((size - len(data)) // len(line) + 1)
    path.write_bytes(bytes(data[:size]))
    return bytes(data[:size])


def test_every_command_on_s3(tmp_path: Path, env: dict[str, str], bucket: str) -> None:
    repo = f"s3://{bucket}/backups/host1"
    pw = ("--passphrase-env", "BBP")
    created = json.loads(bb("repo", "init", repo, *pw, "--json", env=env).stdout)
    assert created["encryption"] == "aes-256-gcm"
    bb("repo", "init", repo, *pw, env=env, ok=False)  # already a repository

    env2 = {**env, "NEWP": "second passphrase"}
    added = json.loads(
        bb(
            "repo",
            "key",
            "add",
            "--repo",
            repo,
            *pw,
            "--new-passphrase-env",
            "NEWP",
            "--json",
            env=env2,
        ).stdout
    )
    slots = json.loads(bb("repo", "key", "list", "--repo", repo, "--json", env=env).stdout)
    assert len(slots) == 2

    img = tmp_path / "disk.img"
    first = write_image(img, 1)
    b1 = json.loads(bb("backup", img, "--repo", repo, *pw, "--json", env=env).stdout)
    assert b1["stored_chunks"] > 0
    assert b1["requests"]["PUT"] >= 2  # a pack and its index at least
    data = bytearray(first)
    data[MiB : MiB + 4096] = os.urandom(4096)
    img.write_bytes(bytes(data))
    b2 = json.loads(
        bb("backup", img, "--repo", repo, "--passphrase-env", "NEWP", "--json", env=env2).stdout
    )
    assert (b2["stored_chunks"], b2["stored_index_blobs"]) == (1, 1)  # the chunk, its segment
    assert b2["base"] == b1["snapshot"]

    snaps = json.loads(bb("snapshots", "--repo", repo, *pw, "--json", env=env).stdout)
    assert [s["id"] for s in snaps] == [b1["snapshot"], b2["snapshot"]]

    out1 = tmp_path / "one.img"
    r1 = json.loads(
        bb("restore", "--repo", repo, *pw, b1["snapshot"], out1, "--json", env=env).stdout
    )
    assert out1.read_bytes() == first
    # neighbouring chunks come with one ranged GET each read-ahead window, not one per chunk
    assert r1["requests"]["GET"] < (len(first) // (64 * 1024)) // 4
    out2 = tmp_path / "two.img"
    bb("restore", "--repo", repo, *pw, "latest", out2, env=env)
    assert out2.read_bytes() == bytes(data)

    report = json.loads(bb("verify", "--repo", repo, *pw, "--json", env=env).stdout)
    assert report["ok"]
    assert report["snapshots"] == 2
    assert report["requests"]["GET"] >= 1

    _mount_reads(repo, env, bytes(data), tmp_path)

    bb("prune", "--repo", repo, *pw, "--keep-last", "1", env=env)
    snaps = json.loads(bb("snapshots", "--repo", repo, *pw, "--json", env=env).stdout)
    assert [s["id"] for s in snaps] == [b2["snapshot"]]
    bb("repo", "key", "remove", "--repo", repo, *pw, added["slot"], env=env)
    bb("snapshots", "--repo", repo, "--passphrase-env", "NEWP", env=env2, ok=False)


def _mount_reads(repo: str, env: dict[str, str], expected: bytes, tmp_path: Path) -> None:
    """``mount`` serves the snapshot over NBD; qemu-img reads it whole."""
    proc = subprocess.Popen(
        [
            *BB,
            "mount",
            "--repo",
            repo,
            "--passphrase-env",
            "BBP",
            "latest",
            "--json",
            "--dir",
            str(tmp_path / "mnt"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.stderr.read() if proc.stderr else ""
        uri = json.loads(line)["uri"]
        out = tmp_path / "mounted.raw"
        subprocess.run(
            ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)],
            check=True,
            timeout=120,
        )
        assert out.read_bytes() == expected
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


def test_settings_from_flag_and_config_file(
    tmp_path: Path, env: dict[str, str], bucket: str, proxy: FaultProxy
) -> None:
    """No endpoint in the environment: the flag gives it, then the config file does."""
    bare = {k: v for k, v in env.items() if k != "BB_S3_ENDPOINT"}
    repo = f"s3://{bucket}/r"
    bb("repo", "init", repo, "--no-encryption", "--endpoint", proxy.endpoint, env=bare)
    img = tmp_path / "d.img"
    write_image(img, 2, 2 * MiB)
    bb(
        "backup",
        img,
        "--repo",
        repo,
        "--endpoint",
        proxy.endpoint,
        "--s3-addressing-style",
        "path",
        env=bare,
    )
    config = tmp_path / "s3.toml"
    config.write_text(f'[buckets.{bucket}]\nendpoint = "{proxy.endpoint}"\n')
    with_file = {**bare, "BB_CONFIG": str(config)}
    snaps = json.loads(bb("snapshots", "--repo", repo, "--json", env=with_file).stdout)
    assert len(snaps) == 1
    config.write_text('endpoint = "http://127.0.0.1:1"\nbogus = 1\n')
    proc = bb("snapshots", "--repo", repo, env=with_file, ok=False)
    assert "unknown S3 setting" in proc.stderr


def test_errors_are_one_line(tmp_path: Path, env: dict[str, str], bucket: str) -> None:
    bb("repo", "init", f"s3://{bucket}/r", "--no-encryption", env=env)
    no_creds = {k: v for k, v in env.items() if not k.startswith("AWS_ACCESS")}
    no_creds["AWS_SECRET_ACCESS_KEY"] = ""
    no_creds["AWS_SHARED_CREDENTIALS_FILE"] = str(tmp_path / "none")
    no_creds["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    proc = bb("snapshots", "--repo", f"s3://{bucket}/r", env=no_creds, ok=False)
    assert "credentials" in proc.stderr
    proc = bb("snapshots", "--repo", "s3://no-such-bucket/r", env=env, ok=False)
    assert "does not exist" in proc.stderr
    proc = bb("snapshots", "--repo", f"s3://{bucket}/elsewhere", env=env, ok=False)
    assert "not a blockbackup repository" in proc.stderr
    wrong_key = {**env, "AWS_SECRET_ACCESS_KEY": "wrong-secret-key-0000000"}
    proc = bb("snapshots", "--repo", f"s3://{bucket}/r", env=wrong_key, ok=False)
    assert "access denied" in proc.stderr
    unreachable = {**env, "BB_S3_MAX_ATTEMPTS": "2", "BB_S3_TIMEOUT": "2"}
    proc = bb(
        "snapshots",
        "--repo",
        f"s3://{bucket}/r",
        "--endpoint",
        "http://127.0.0.1:1",
        env=unreachable,
        ok=False,
    )
    assert "127.0.0.1:1" in proc.stderr


def test_index_cache_saves_requests(
    tmp_path: Path, env: dict[str, str], bucket: str, proxy: FaultProxy
) -> None:
    """The second open of the repository fetches no index it has seen before."""
    repo = f"s3://{bucket}/r"
    bb("repo", "init", repo, "--no-encryption", env=env)
    img = tmp_path / "d.img"
    write_image(img, 3, 4 * MiB)
    bb("backup", img, "--repo", repo, env=env)
    proxy.clear()
    bb("backup", img, "--repo", repo, env=env)
    assert proxy.count("GET", "/index/") == 0
    assert proxy.count("PUT", "/data/") == 0  # unchanged data sends nothing
    cache = Path(env["BB_CACHE_DIR"])
    (cached,) = [p for p in cache.rglob("index/*")][:1] or [None]
    assert cached is not None
    cached.write_bytes(b"garbage")  # a damaged cache entry is fetched again
    proxy.clear()
    out = tmp_path / "out.img"
    bb("restore", "--repo", repo, "latest", out, env=env)
    assert proxy.count("GET", "/index/") == 1
    assert out.read_bytes() == img.read_bytes()


def test_addressing_style_is_used(env: dict[str, str], bucket: str) -> None:
    """A virtual-hosted request goes to BUCKET.host: with a loopback IP that cannot resolve,
    so the failure proves the setting reached the client (rclone serves path style)."""
    proc = bb(
        "repo",
        "init",
        f"s3://{bucket}/r",
        "--no-encryption",
        "--endpoint",
        "http://localhost.invalid:9",
        "--s3-addressing-style",
        "virtual",
        env={**env, "BB_S3_MAX_ATTEMPTS": "1", "BB_S3_TIMEOUT": "2"},
        ok=False,
    )
    assert f"{bucket}.localhost.invalid" in proc.stderr or "localhost.invalid" in proc.stderr
