"""The repository commands as a user runs them: ``repo init|key``, ``backup IMAGE --repo``,
``snapshots``, ``restore``, as subprocesses, with the mistakes people make."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from testkit import repocli
from testkit.loopdev import attached_loop
from testkit.tmpfs import mounted_tmpfs

BB = repocli.BB
MiB = 1 << 20
CHUNK = 64 * 1024  # the repository's chunk size
ENV = {**os.environ, "BBP": "the passphrase", "OTHER": "another one"}


bb = functools.partial(repocli.bb, env=ENV, timeout=120)


js = repocli.js


def image(path: Path) -> bytes:
    data = bytearray(os.urandom(6 * MiB))
    data[MiB : 3 * MiB] = bytes(2 * MiB)
    path.write_bytes(bytes(data))
    return bytes(data)


def test_backup_snapshots_restore(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    disk = tmp_path / "disk.img"
    data = image(disk)
    init = js(bb("repo", "init", repo, "--passphrase-env", "BBP", "--json"))
    assert init["encryption"] == "aes-256-gcm"
    first = js(bb("backup", disk, "--repo", repo, "--passphrase-env", "BBP", "--json"))
    assert first["disk"] == "disk.img"
    # data chunks and the disk index's segment blob are counted apart
    assert first["stored_chunks"] == 4 * MiB // 65536
    assert first["stored_index_blobs"] == 1
    assert first["stored_bytes"] > 4 * MiB > first["stored_index_bytes"] > 0

    changed = bytearray(data)
    changed[5 * MiB : 5 * MiB + 4096] = os.urandom(4096)
    disk.write_bytes(bytes(changed))
    second = js(
        bb(
            "backup",
            disk,
            "--repo",
            repo,
            "--passphrase-env",
            "BBP",
            "--name",
            "disk.img",
            "--json",
        )
    )
    assert second["stored_chunks"] == 1  # the changed chunk...
    assert second["stored_index_blobs"] == 1  # ...and its segment
    assert second["base"] == first["snapshot"]

    listing = js(bb("snapshots", "--repo", repo, "--passphrase-env", "BBP", "--json"))
    assert [s["id"] for s in listing] == [first["snapshot"], second["snapshot"]]
    assert listing[0]["disks"] == [{"name": "disk.img", "size": len(data)}]

    out = tmp_path / "latest.img"
    bb("restore", "--repo", repo, "latest", out, "--passphrase-env", "BBP")
    assert out.read_bytes() == bytes(changed)
    old = tmp_path / "old.img"
    bb(
        "restore",
        "--repo",
        repo,
        f"{first['snapshot']}:disk.img",
        old,
        "--passphrase-env",
        "BBP",
    )
    assert old.read_bytes() == data
    if shutil.which("qemu-img"):
        q = tmp_path / "out.qcow2"
        bb("restore", "--repo", repo, "latest", q, "--format", "qcow2", "--passphrase-env", "BBP")
        subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", q, disk], check=True)

    err = bb("restore", "--repo", repo, "latest", out, "--passphrase-env", "BBP", ok=False)
    assert "exists" in err.stderr
    assert out.read_bytes() == bytes(changed)  # untouched


def test_mistakes_are_one_line_errors(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    disk = tmp_path / "disk.img"
    image(disk)
    assert "give --passphrase-env" in bb("repo", "init", repo, ok=False).stderr
    assert not repo.exists() or not any(repo.iterdir())
    bb("repo", "init", repo, "--passphrase-env", "BBP")
    assert "already a repository" in bb("repo", "init", repo, "--no-encryption", ok=False).stderr
    wrong = bb("snapshots", "--repo", repo, "--passphrase-env", "OTHER", ok=False)
    assert "wrong passphrase" in wrong.stderr
    assert "is encrypted" in bb("snapshots", "--repo", repo, ok=False).stderr
    assert (
        "is not set" in bb("snapshots", "--repo", repo, "--passphrase-env", "NOPE", ok=False).stderr
    )
    assert "not a blockbackup repository" in bb("snapshots", "--repo", tmp_path, ok=False).stderr
    assert (
        "no snapshots"
        in bb(
            "restore",
            "--repo",
            repo,
            "latest",
            tmp_path / "o.img",
            "--passphrase-env",
            "BBP",
            ok=False,
        ).stderr
    )
    assert not (tmp_path / "o.img").exists()
    assert (
        "no such image"
        in bb(
            "backup",
            tmp_path / "nope.img",
            "--repo",
            repo,
            "--passphrase-env",
            "BBP",
            ok=False,
        ).stderr
    )
    for not_an_image, why in ((tmp_path, "is a directory"), ("/dev/null", "not an image file")):
        err = bb("backup", not_an_image, "--repo", repo, "--passphrase-env", "BBP", ok=False)
        assert why in err.stderr
    config = json.loads((repo / "config").read_text())
    config["version"] = 9
    (repo / "config").write_text(json.dumps(config))
    newer = bb("snapshots", "--repo", repo, "--passphrase-env", "BBP", ok=False)
    assert "version 9 is newer" in newer.stderr


def test_keys_add_list_remove(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    disk = tmp_path / "disk.img"
    data = image(disk)
    keyfile = tmp_path / "key"
    keyfile.write_bytes(os.urandom(64))
    bb("repo", "init", repo, "--key-file", keyfile)
    bb("backup", disk, "--repo", repo, "--key-file", keyfile)
    added = js(
        bb(
            "repo",
            "key",
            "add",
            "--repo",
            repo,
            "--key-file",
            keyfile,
            "--new-passphrase-env",
            "BBP",
            "--comment",
            "ops",
            "--json",
        )
    )
    slots = js(bb("repo", "key", "list", "--repo", repo, "--json"))
    assert sorted(s["kind"] for s in slots) == ["key-file", "passphrase"]
    old = next(s["slot"] for s in slots if s["slot"] != added["slot"])
    bb("repo", "key", "remove", "--repo", repo, old, "--passphrase-env", "BBP")
    assert (
        "wrong passphrase"
        in bb("snapshots", "--repo", repo, "--key-file", keyfile, ok=False).stderr
    )
    out = tmp_path / "out.img"
    bb("restore", "--repo", repo, "latest", out, "--passphrase-env", "BBP")
    assert out.read_bytes() == data
    last = bb(
        "repo", "key", "remove", "--repo", repo, added["slot"], "--passphrase-env", "BBP", ok=False
    )
    assert "last key slot" in last.stderr


def test_restore_refuses_damaged_data(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    disk = tmp_path / "disk.img"
    image(disk)
    bb("repo", "init", repo, "--no-encryption")
    bb("backup", disk, "--repo", repo)
    (pack,) = [p for p in (repo / "data").rglob("*") if p.is_file()]
    raw = bytearray(pack.read_bytes())
    raw[64] ^= 0x40
    pack.write_bytes(bytes(raw))
    out = tmp_path / "out.img"
    err = bb("restore", "--repo", repo, "latest", out, ok=False)
    # the first blob of the pack: whichever chunk the parallel copy stored first
    damaged = "damaged data, nothing restored: disk disk.img at offset [0-9]+: chunk [0-9a-f]{64}"
    assert re.search(damaged, err.stderr), err.stderr
    assert f"in pack {pack.name}" in err.stderr
    assert not out.exists()  # no image with wrong bytes is left behind


def test_verify(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    disk = tmp_path / "disk.img"
    image(disk)
    bb("repo", "init", repo, "--passphrase-env", "BBP")
    snap = js(bb("backup", disk, "--repo", repo, "--passphrase-env", "BBP", "--json"))
    clean = js(bb("verify", "--repo", repo, "--passphrase-env", "BBP", "--json"))
    assert clean["ok"]
    assert clean["chunks"] == 4 * MiB // 65536
    (pack,) = [p for p in (repo / "data").rglob("*") if p.is_file()]
    raw = bytearray(pack.read_bytes())
    raw[64] ^= 0x40
    pack.write_bytes(bytes(raw))
    proc = subprocess.run(
        [*BB, "verify", "--repo", str(repo), "latest", "--passphrase-env", "BBP"],
        capture_output=True, text=True, env=ENV, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert f"damaged pack {pack.name}: content does not match its name" in proc.stdout
    # the first blob of the pack: whichever chunk the parallel copy stored first
    damaged = (
        f"damaged: snapshot {snap['snapshot']} disk disk.img offset [0-9]+: chunk [0-9a-f]{{64}}"
    )
    assert re.search(damaged, proc.stdout), proc.stdout
    assert proc.stdout.endswith("DAMAGED\n")


def test_two_backups_at_once_into_one_repository(tmp_path: Path) -> None:
    """No lock: two processes store (partly the same) chunks and commit concurrently; both
    snapshots restore byte-exact."""
    repo = tmp_path / "repo"
    bb("repo", "init", repo, "--passphrase-env", "BBP")
    common = os.urandom(2 * MiB)
    disks = {}
    for name in ("a", "b"):
        disks[name] = common + os.urandom(2 * MiB)
        (tmp_path / f"{name}.img").write_bytes(disks[name])
    procs = [
        subprocess.Popen(
            [
                *BB,
                "backup",
                str(tmp_path / f"{n}.img"),
                "--repo",
                str(repo),
                "--passphrase-env",
                "BBP",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for n in disks
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    assert len(js(bb("snapshots", "--repo", repo, "--passphrase-env", "BBP", "--json"))) == 2
    for name, data in disks.items():
        out = tmp_path / f"{name}.out"
        bb("restore", "--repo", repo, f"latest:{name}.img", out, "--passphrase-env", "BBP")
        assert out.read_bytes() == data
    assert js(bb("verify", "--repo", repo, "--passphrase-env", "BBP", "--json"))["ok"]


def test_mount_serves_a_snapshot_over_nbd(tmp_path: Path) -> None:
    if shutil.which("qemu-img") is None:
        pytest.skip("needs qemu-img")
    repo = tmp_path / "repo"
    disk = tmp_path / "disk.img"
    data = image(disk)
    bb("repo", "init", repo, "--passphrase-env", "BBP")
    snap = js(bb("backup", disk, "--repo", repo, "--passphrase-env", "BBP", "--json"))
    with subprocess.Popen(
        [*BB, "mount", "--repo", str(repo), "latest:disk.img", "--passphrase-env", "BBP",
         "--dir", str(tmp_path / "run"), "--json"],
        stdout=subprocess.PIPE, text=True, env=ENV,
    ) as proc:  # fmt: skip
        try:
            assert proc.stdout is not None
            info = json.loads(proc.stdout.readline())
            assert info["snapshot"] == snap["snapshot"]
            out = tmp_path / "out.img"
            subprocess.run(
                ["qemu-img", "convert", "-f", "raw", "-O", "raw", info["uri"], str(out)],
                check=True, timeout=60,
            )  # fmt: skip
            assert out.read_bytes() == data
            written = subprocess.run(
                ["qemu-io", "-f", "raw", "-c", "write 0 4k", info["uri"]],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert written.returncode != 0  # a read-only export refuses a writer
            assert "Permission denied" in written.stderr
        finally:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=30) == 0
    wrong = bb("mount", "--repo", repo, "nope", "--passphrase-env", "BBP", ok=False)
    assert "no snapshot 'nope'" in wrong.stderr


def test_prune(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    disk = tmp_path / "disk.img"
    data = image(disk)
    bb("repo", "init", repo, "--no-encryption")
    ids = [js(bb("backup", disk, "--repo", repo, "--json"))["snapshot"] for _ in range(3)]
    assert "at least one --keep" in bb("prune", "--repo", repo, ok=False).stderr
    zero = bb("prune", "--repo", repo, "--keep-last", "0", ok=False)
    assert "above 0" in zero.stderr  # keeps nothing: refused, not taken as "remove all"
    negative = bb("prune", "--repo", repo, "--keep-daily", "-1", ok=False)
    assert "must not be negative" in negative.stderr
    dry = js(bb("prune", "--repo", repo, "--keep-last", "1", "--dry-run", "--json"))
    assert dry["removed"] == ids[:2]
    assert len(js(bb("snapshots", "--repo", repo, "--json"))) == 3  # nothing removed
    done = js(bb("prune", "--repo", repo, "--keep-last", "1", "--json"))
    assert done["kept"] == {ids[2]: "last"}
    assert [s["id"] for s in js(bb("snapshots", "--repo", repo, "--json"))] == [ids[2]]
    out = tmp_path / "out.img"
    bb("restore", "--repo", repo, "latest", out)
    assert out.read_bytes() == data


def test_a_block_device_is_an_image_at_rest(tmp_path: Path) -> None:
    """An LVM volume or a disk is backed up as a file is (named by its base name), its
    second backup stores only what changed, and both restore byte-exact."""
    repo = tmp_path / "repo"
    data = bytearray(image(tmp_path / "backing.img"))
    with attached_loop(tmp_path / "backing.img") as dev:
        bb("repo", "init", repo, "--passphrase-env", "BBP")
        first = js(bb("backup", dev, "--repo", repo, "--passphrase-env", "BBP", "--json"))
        assert first["stored_chunks"] == 4 * MiB // CHUNK  # the 2 MiB of zeroes cost nothing
        before = bytes(data)
        change = os.urandom(CHUNK)
        with open(dev, "r+b") as f:
            f.seek(2 * MiB)
            f.write(change)
        data[2 * MiB : 2 * MiB + CHUNK] = change
        second = js(bb("backup", dev, "--repo", repo, "--passphrase-env", "BBP", "--json"))
        assert second["stored_chunks"] == 1
        name = os.path.basename(dev)
        for snapshot, expected in ((first["snapshot"], before), ("latest", bytes(data))):
            out = tmp_path / f"{snapshot}.img"
            bb("restore", "--repo", repo, f"{snapshot}:{name}", out, "--passphrase-env", "BBP")
            assert out.read_bytes() == expected


def test_a_restore_onto_a_full_disk_says_where_and_leaves_nothing(tmp_path: Path) -> None:
    """The image to restore does not fit on a 2 MiB tmpfs: one line naming the file and the
    room it needs, exit 1, no partial image; the repository is untouched."""
    repo = tmp_path / "repo"
    disk = tmp_path / "disk.img"
    data = image(disk)
    bb("repo", "init", repo, "--passphrase-env", "BBP")
    bb("backup", disk, "--repo", repo, "--passphrase-env", "BBP")
    with mounted_tmpfs(tmp_path / "fs", "2m") as fs:
        out = fs / "out.img"
        err = bb("restore", "--repo", repo, "latest", out, "--passphrase-env", "BBP", ok=False)
        assert err.returncode == 1
        line = err.stderr.strip()
        assert "\n" not in line
        assert line.startswith(f"blockbackup restore: No space left on device writing {out}")
        assert f"needs {len(data)} bytes" in line
        assert not list(fs.iterdir())
    out = tmp_path / "out.img"
    bb("restore", "--repo", repo, "latest", out, "--passphrase-env", "BBP")
    assert out.read_bytes() == data


def test_full_disk_leaves_no_snapshot_and_the_next_backup_works(tmp_path: Path) -> None:
    """The repository on a 24 MiB tmpfs: a 40 MiB random image cannot fit. The backup fails
    with one line, commits nothing, leaves the repository readable; a smaller image then
    backs up, restores and verifies."""
    big = tmp_path / "big.img"
    big.write_bytes(os.urandom(40 * MiB))
    small = tmp_path / "small.img"
    data = image(small)
    with mounted_tmpfs(tmp_path / "fs", "24m") as fs:
        repo = fs / "repo"
        bb("repo", "init", repo, "--passphrase-env", "BBP")
        err = bb("backup", big, "--repo", repo, "--passphrase-env", "BBP", ok=False)
        assert "No space left on device" in err.stderr
        assert f"blockbackup gc --repo {repo}" in err.stderr  # how to get the space back
        assert js(bb("snapshots", "--repo", repo, "--passphrase-env", "BBP", "--json")) == []
        freed = js(bb("gc", "--repo", repo, "--passphrase-env", "BBP", "--json"))
        assert freed["deleted"] >= 1, freed
        assert freed["kept"] == 0, freed
        bb("backup", small, "--repo", repo, "--passphrase-env", "BBP")
        out = tmp_path / "out.img"
        bb("restore", "--repo", repo, "latest", out, "--passphrase-env", "BBP")
        assert out.read_bytes() == data
        assert js(bb("verify", "--repo", repo, "--passphrase-env", "BBP", "--json"))["ok"]
