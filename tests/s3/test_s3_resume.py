"""A backup killed at random points (SIGKILL, or its link cut) resumes on the next run:
by the proxy's count it sends only what the killed runs had not stored (plus at most the
pack each was filling), and commits the same disk index as an uninterrupted backup."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from blockbackup.repository.repo import Repository
from testkit.faultproxy import FaultProxy
from testkit.repocli import BB, bb

MiB = 1 << 20
PACK = 1 * MiB


def _init(location: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """An unencrypted repository with small packs (addresses are then plain SHA-256, so two
    repositories' disk indexes compare), made through the library."""
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BB_S3_ENDPOINT", "BB_CACHE_DIR"):
        monkeypatch.setenv(key, env[key])
    Repository.init(location, None, pack_size=PACK)


def _kill_after(
    proc: subprocess.Popen[str], proxy: FaultProxy, puts: int, how: str, rng: random.Random
) -> None:
    deadline = time.monotonic() + 240
    while proxy.count("PUT", "/data/") < puts:
        assert proc.poll() is None, "the backup finished before the kill point"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.05))
    if how == "kill":
        proc.send_signal(signal.SIGKILL)
    else:
        proxy.down = True  # the connection is lost: the run fails after its retries
    proc.communicate(timeout=240)
    proxy.down = False


@pytest.mark.parametrize("how", ["kill", "link"])
def test_resume_sends_only_the_rest(
    tmp_path: Path,
    env: dict[str, str],
    bucket: str,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    rng = random.Random(int.from_bytes(os.urandom(4), "little"))
    env = {**env, "BB_S3_MAX_ATTEMPTS": "2", "BB_S3_TIMEOUT": "5"}
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(24 * MiB))

    whole = f"s3://{bucket}/whole"
    _init(whole, env, monkeypatch)
    proxy.clear()
    bb("backup", img, "--repo", whole, "--name", "d", env=env)
    full = proxy.bytes_sent("PUT", "/data/")
    assert full > 20 * MiB

    cut = f"s3://{bucket}/cut"
    _init(cut, env, monkeypatch)
    proxy.clear()
    for _round in range(2):
        done = proxy.count("PUT", "/data/")
        proc = subprocess.Popen(
            [*BB, "backup", str(img), "--repo", cut, "--name", "d"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proxy.latency = 0.1  # a distant server: the kill lands mid-backup
        _kill_after(proc, proxy, done + rng.randint(2, 6), how, rng)
        proxy.latency = 0.0
        assert proc.returncode != 0
    sent_before = proxy.bytes_sent("PUT", "/data/")
    assert json.loads(bb("snapshots", "--repo", cut, "--json", env=env).stdout) == []
    assert sent_before >= 4 * PACK

    proxy.clear()
    result = json.loads(bb("backup", img, "--repo", cut, "--name", "d", "--json", env=env).stdout)
    sent_after = proxy.bytes_sent("PUT", "/data/")
    # the resumed run sends the rest: all but what the killed runs stored, give or take the
    # pack each killed run was filling (lost with it) and the disk index's segment
    assert sent_after <= full - sent_before + 2 * PACK + 64 * 1024, (full, sent_before, sent_after)
    assert sent_after < full - 2 * PACK
    assert result["reused_chunks"] > 0

    a = json.loads(bb("snapshots", "--repo", whole, "--json", env=env).stdout)
    b = json.loads(bb("snapshots", "--repo", cut, "--json", env=env).stdout)
    segments = []
    for location, listed in ((whole, a), (cut, b)):
        opened = Repository.open(location)
        try:
            segments.append([opened.manifest(listed[0]["id"]).disks[0].segments])
        finally:  # its pooled connection, not left to a garbage collection
            opened.close()
    seg, seg2 = segments
    assert seg == seg2  # the same disk index as the uninterrupted backup
    out = tmp_path / "out.img"
    bb("restore", "--repo", cut, "latest", out, env=env)
    assert out.read_bytes() == img.read_bytes()
