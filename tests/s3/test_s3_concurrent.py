"""Several hosts at once on one bucket: backup processes (each with its own cache) of
overlapping disks, prune, random SIGKILLs, rounds of it; afterwards every committed
snapshot restores byte-exact to the image it was taken from. No lock exists to go stale.

Prune and gc run in every round beside the backups, under the same SIGKILLs. A backup
that relied on a pack a concurrent gc condemned may fail with "run the backup again"
(never commit): that is the one failure allowed besides the victim.
"""

from __future__ import annotations

import hashlib
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
#: Repository maintenance run concurrently with the backups each round (args after BB).
MAINTENANCE: list[list[str]] = [["prune", "--keep-last", "3"], ["gc"]]
RERUN = "run the backup again"


def _image(path: Path, base: bytes, rng: random.Random) -> bytes:
    data = bytearray(base)
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(0, len(data) - 65536)
        data[at : at + rng.choice((4096, 65536))] = rng.randbytes(1) * rng.choice((4096, 65536))
    path.write_bytes(bytes(data))
    return bytes(data)


def test_hosts_back_up_prune_and_die_on_one_bucket(
    tmp_path: Path,
    env: dict[str, str],
    bucket: str,
    proxy: FaultProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    repo = f"s3://{bucket}/shared"
    bb("repo", "init", repo, "--passphrase-env", "BBP", env=env)
    bases = {d: os.urandom(3 * MiB) for d in ("a", "b")}
    expected: dict[str, str] = {}  # image path -> sha256 of its content
    killed = 0
    proxy.random_rate = 0.02  # and transient faults on 2% of requests, survived by retries
    for rnd in range(3):
        procs: list[subprocess.Popen[bytes]] = []
        for host in range(3):
            disk = "a" if host < 2 else "b"
            img = tmp_path / f"{disk}-r{rnd}-h{host}.img"
            expected[str(img)] = hashlib.sha256(_image(img, bases[disk], rng)).hexdigest()
            # each host its own cache directory, as separate machines would have
            host_env = {**env, "BB_CACHE_DIR": str(tmp_path / f"cache-{host}")}
            procs.append(
                subprocess.Popen(
                    [
                        *BB,
                        "backup",
                        str(img),
                        "--repo",
                        repo,
                        "--name",
                        disk,
                        "--passphrase-env",
                        "BBP",
                    ],
                    env=host_env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                )
            )
        procs.extend(
            subprocess.Popen(
                [*BB, *args, "--repo", repo, "--passphrase-env", "BBP"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for args in MAINTENANCE
        )
        victim = rng.randrange(len(procs))
        time.sleep(rng.uniform(0.5, 3.0))
        if procs[victim].poll() is None:
            procs[victim].send_signal(signal.SIGKILL)
            killed += 1
        for n, proc in enumerate(procs):
            _, err = proc.communicate(timeout=300)
            if n != victim and not (n < 3 and RERUN in err.decode()):
                assert proc.returncode == 0, (seed, err.decode())

    proxy.random_rate = 0.0
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BB_S3_ENDPOINT", "BB_CACHE_DIR"):
        monkeypatch.setenv(key, env[key])
    opened = Repository.open(repo, b"the passphrase")
    try:
        snapshots = opened.snapshots()
    finally:  # its pooled connection, not left to a garbage collection (a ResourceWarning)
        opened.close()
    assert len(snapshots) >= 3, seed
    for manifest in snapshots:
        (disk,) = manifest.disks
        out = tmp_path / f"restore-{manifest.id}.img"
        bb("restore", "--repo", repo, "--passphrase-env", "BBP", manifest.id, out, env=env)
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        assert digest == expected[disk.source["image"]], (seed, manifest.id)
    report = bb("verify", "--repo", repo, "--passphrase-env", "BBP", env=env)
    assert report.stdout.strip().endswith("ok")
