"""Live backups of served disks into an ``s3://`` repository: the CLI hands the daemon's
target nodes where the repository is (``--endpoint``: node options), while the credentials
reach the daemon only through its environment. The daemon here knows no endpoint of its
own, so a backup that did not pass it on could not reach the bucket."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from testkit.faultproxy import FaultProxy
from testkit.repocli import BB, bb

MiB = 1 << 20


def test_a_live_disk_backed_up_into_s3_restores_exactly(
    tmp_path: Path, env: dict[str, str], bucket: str, proxy: FaultProxy
) -> None:
    repo = f"s3://{bucket}/live"
    endpoint = ("--endpoint", env["BB_S3_ENDPOINT"])
    cli_env = {k: v for k, v in env.items() if k != "BB_S3_ENDPOINT"}
    bb("repo", "init", repo, *endpoint, "--passphrase-env", "BBP", env=cli_env)
    image = tmp_path / "disk0.img"
    content = bytearray(os.urandom(4 * MiB))
    content[MiB : 2 * MiB] = bytes(MiB)  # a zero run: costs nothing
    image.write_bytes(bytes(content))
    serve = subprocess.Popen(
        [*BB, "serve", str(image), "--dir", str(tmp_path / "run"), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env,
    )
    try:
        assert serve.stdout is not None
        qmp = json.loads(serve.stdout.readline())["qmp"]
        secret = ("--passphrase-env", "BBP")
        args = ("--connect", qmp, "disk0", "--repo", repo, *endpoint, *secret, "--json")
        first = json.loads(bb("backup", *args, "--start-bitmap", "n", env=cli_env).stdout)
        second = json.loads(bb("backup", *args, "--incremental", "n", env=cli_env).stdout)
        assert second["snapshot"] != first["snapshot"]
        assert second["disks"][0]["fallback"] is None  # an incremental, from the checkpoint
    finally:
        serve.send_signal(signal.SIGINT)
        _, err = serve.communicate(timeout=60)
    assert serve.returncode == 0, err
    for snapshot in (first["snapshot"], second["snapshot"]):
        out = tmp_path / f"{snapshot}.img"
        bb("restore", "--repo", repo, *endpoint, *secret, snapshot, out, env=cli_env)
        assert out.read_bytes() == bytes(content)
    assert proxy.count("PUT") > 0  # the bucket was reached through the endpoint given
