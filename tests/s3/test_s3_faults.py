"""Faults between blockbackup and the S3 server, injected by a proxy: transient ones are
survived by retries (the data is exact), persistent ones fail the command in one line and
commit no snapshot."""

from __future__ import annotations

import json
import os
from pathlib import Path

from testkit.faultproxy import Fault, FaultProxy
from testkit.repocli import bb

MiB = 1 << 20


def test_transient_faults_are_survived(
    tmp_path: Path, env: dict[str, str], bucket: str, proxy: FaultProxy
) -> None:
    env = {**env, "BB_S3_TIMEOUT": "3"}
    repo = f"s3://{bucket}/r"
    bb("repo", "init", repo, "--passphrase-env", "BBP", env=env)
    img = tmp_path / "d.img"
    data = os.urandom(20 * MiB)
    img.write_bytes(data)
    proxy.add(Fault("503", "PUT", "/data/", times=2))
    proxy.add(Fault("reset", "PUT", "/index/"))
    proxy.add(Fault("reset-after", "PUT", "/data/"))
    proxy.add(Fault("500", "HEAD", "/data/"))
    proxy.add(Fault("500", "GET", "/snapshots/"))
    backup = json.loads(
        bb("backup", img, "--repo", repo, "--passphrase-env", "BBP", "--json", env=env).stdout
    )
    assert all(f.times == 0 for f in proxy.faults), proxy.faults
    assert backup["requests"]["PUT"] > backup["stored_chunks"] // 256  # retries counted

    proxy.clear()
    proxy.add(Fault("truncate", "GET", "/data/", times=2))
    proxy.add(Fault("timeout", "GET", "/data/", delay=8))
    proxy.add(Fault("reset", "GET", "/index/"))
    proxy.add(Fault("503", "GET", "list-type", times=2))
    out = tmp_path / "out.img"
    env_nocache = {**env, "BB_CACHE_DIR": str(tmp_path / "fresh-cache")}
    restored = json.loads(
        bb(
            "restore",
            "--repo",
            repo,
            "--passphrase-env",
            "BBP",
            "latest",
            out,
            "--json",
            env=env_nocache,
        ).stdout
    )
    assert out.read_bytes() == data
    assert restored["requests"]["retried-body"] == 2  # the truncated bodies, asked again
    assert all(f.times == 0 for f in proxy.faults), proxy.faults
    assert sum(1 for e in proxy.entries() if e.status == 0) >= 2  # reset and timeout


def test_persistent_failure_is_one_line_and_commits_nothing(
    tmp_path: Path, env: dict[str, str], bucket: str, proxy: FaultProxy
) -> None:
    env = {**env, "BB_S3_MAX_ATTEMPTS": "3", "BB_S3_TIMEOUT": "3"}
    repo = f"s3://{bucket}/r"
    bb("repo", "init", repo, "--no-encryption", env=env)
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(4 * MiB))
    proxy.add(Fault("503", "PUT", "/data/", times=1000))
    proc = bb("backup", img, "--repo", repo, env=env, ok=False)
    assert "SlowDown" in proc.stderr or "503" in proc.stderr or "failed" in proc.stderr
    assert 3 <= proxy.count("PUT", "/data/") <= 12  # bounded: attempts, not a loop
    proxy.clear()
    assert json.loads(bb("snapshots", "--repo", repo, "--json", env=env).stdout) == []

    proxy.clear()
    proxy.down = True  # the link is gone
    proc = bb("snapshots", "--repo", repo, env=env, ok=False)
    assert proxy.count() <= 6, proc.stderr  # bounded attempts
    print(proc.stderr)

    proxy.clear()
    proxy.add(Fault("truncate", "GET", "/config", times=1000))
    proc = bb("snapshots", "--repo", repo, env=env, ok=False)
    assert proxy.count("GET", "/config") == 3, proc.stderr
    print(proc.stderr)


def test_a_restore_whose_reads_keep_failing_says_so_in_one_line(
    tmp_path: Path, env: dict[str, str], bucket: str, proxy: FaultProxy
) -> None:
    """The server fails every read of the packs (after the retries): the restore names
    the failure in one line, says nothing was restored and leaves no image, as for
    damaged data (the snapshot node turns a storage error into EIO and keeps its text)."""
    env = {**env, "BB_S3_MAX_ATTEMPTS": "2", "BB_S3_TIMEOUT": "3"}
    repo = f"s3://{bucket}/r"
    bb("repo", "init", repo, "--no-encryption", env=env)
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(4 * MiB))
    bb("backup", img, "--repo", repo, env=env)
    proxy.add(Fault("500", "GET", "/data/", times=1000))
    out = tmp_path / "out.img"
    proc = bb("restore", "--repo", repo, "latest", out, env=env, ok=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("blockbackup restore: ")
    assert "GET data/" in proc.stderr
    assert proc.stderr.endswith("nothing restored\n")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == []
