"""A repository command stopped by a signal, as ``timeout``, ``systemctl stop``, a closed
terminal or Ctrl-C stop it: SIGTERM and SIGHUP undo the work as Ctrl-C does (one line, exit
128 + the signal), and a restore never leaves a file under the name it was given that is not the
whole image, even when SIGKILLed (a partial file, which the next restore removes).

Each command is frozen (SIGSTOP) once it has begun, then signalled and thawed: the signal
then arrives while it works, however fast this machine is."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from testkit import repocli

MiB = 1 << 20
ENV = {**os.environ, "BBP": "the passphrase"}
bb = functools.partial(repocli.bb, env=ENV, timeout=120)


@pytest.fixture
def repo_with_image(tmp_path: Path) -> tuple[Path, Path]:
    """A repository holding one snapshot of a 256 MiB image (half of it data)."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        for n in range(256):
            f.write(os.urandom(MiB) if n % 2 else b"text " * (MiB // 5) + b"t")
    repo = tmp_path / "repo"
    bb("repo", "init", repo, "--passphrase-env", "BBP")
    bb("backup", image, "--repo", repo, "--passphrase-env", "BBP")
    return repo, image


def signalled(
    args: list[object], begun: Callable[[], bool], signum: int
) -> tuple[int, str, list[int]]:
    """Run the command, freeze it as soon as ``begun()``, send ``signum``, thaw it: its
    exit code and stderr, and the processes it had started (its encoder processes)."""
    proc = subprocess.Popen(
        [*repocli.BB, *map(str, args)],
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a test run started in the background passes on an ignored
        # SIGINT, which the command rightly keeps ignoring.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 60
        while not begun():
            assert proc.poll() is None, "the command ended before it was signalled"
            assert time.monotonic() < deadline
            time.sleep(0.002)
        proc.send_signal(signal.SIGSTOP)
        children = [
            int(pid)
            for task in Path(f"/proc/{proc.pid}/task").iterdir()
            for pid in (task / "children").read_text().split()
        ]
        proc.send_signal(signum)
        proc.send_signal(signal.SIGCONT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err, children


def partials(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".partial-" in p.name)


def all_gone(pids: list[int]) -> bool:
    """Whether these processes ended (encoder processes exit with their parent)."""
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{pid}").exists() for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def copying(directory: Path) -> Callable[[], bool]:
    """Whether a restore into ``directory`` has begun writing its partial file."""

    def begun() -> bool:
        found = [p for p in directory.iterdir() if ".partial-" in p.name]
        try:
            return bool(found) and found[0].stat().st_blocks > 0
        except FileNotFoundError:
            return False

    return begun


@pytest.mark.parametrize("when", ["starting", "copying"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_stopped_restore_leaves_nothing(
    tmp_path: Path, repo_with_image: tuple[Path, Path], signum: int, when: str
) -> None:
    """Stopped as soon as it made its partial file (before it even asked for the secret),
    or while it copies: no file, no process left."""
    repo, _image = repo_with_image
    out = tmp_path / "out.img"
    begun = copying(tmp_path) if when == "copying" else lambda: bool(partials(tmp_path))
    code, err, workers = signalled(
        ["restore", "--repo", repo, "latest", out, "--passphrase-env", "BBP"], begun, signum
    )
    name = signal.Signals(signum).name
    assert (code, err) == (128 + signum, f"blockbackup restore: interrupted ({name})\n")
    assert not out.exists()
    assert partials(tmp_path) == []
    assert bool(workers) == (when == "copying")  # the restore's decoders had started
    assert all_gone(workers)


def test_a_killed_restore_leaves_only_a_partial_file_the_next_one_removes(
    tmp_path: Path, repo_with_image: tuple[Path, Path]
) -> None:
    repo, image = repo_with_image
    out = tmp_path / "out.img"
    code, _, workers = signalled(
        ["restore", "--repo", repo, "latest", out, "--passphrase-env", "BBP"],
        copying(tmp_path),
        signal.SIGKILL,
    )
    assert code == -signal.SIGKILL
    (left,) = partials(tmp_path)
    assert not out.exists()  # never a half image under the name asked for
    assert workers
    assert all_gone(workers)
    run = bb("restore", "--repo", repo, "latest", out, "--passphrase-env", "BBP")
    assert run.stderr == f"removed the partial file of a run that died: {tmp_path / left}\n"
    assert partials(tmp_path) == []
    assert out.read_bytes() == image.read_bytes()


def test_a_stopped_backup_commits_nothing_and_the_next_one_works(
    tmp_path: Path, repo_with_image: tuple[Path, Path]
) -> None:
    repo, image = repo_with_image
    writers = repo / "writers"
    snapshots = bb("snapshots", "--repo", repo, "--passphrase-env", "BBP").stdout
    code, err, workers = signalled(
        ["backup", image, "--repo", repo, "--passphrase-env", "BBP", "--base", "none"],
        lambda: writers.is_dir() and any(writers.iterdir()),
        signal.SIGTERM,
    )
    assert (code, err) == (143, "blockbackup backup: interrupted (SIGTERM)\n")
    assert bb("snapshots", "--repo", repo, "--passphrase-env", "BBP").stdout == snapshots
    assert not any(writers.iterdir())  # its writer marker retired: gc is not held back
    assert all_gone(workers)
    bb("backup", image, "--repo", repo, "--passphrase-env", "BBP")
    out = tmp_path / "out.img"
    bb("restore", "--repo", repo, "latest", out, "--passphrase-env", "BBP")
    assert out.read_bytes() == image.read_bytes()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_stopped_verify_says_so_and_the_next_one_passes(
    repo_with_image: tuple[Path, Path], signum: int
) -> None:
    """A verify stopped once it recorded a checked pack: one line, 128 + the signal (it
    used to die without a word); nothing it leaves makes the next verify fail."""
    repo, _image = repo_with_image
    verified = repo / "verified"
    code, err, _ = signalled(
        ["verify", "--repo", repo, "--passphrase-env", "BBP"],
        lambda: verified.is_dir() and any(verified.iterdir()),
        signum,
    )
    name = signal.Signals(signum).name
    assert (code, err) == (128 + signum, f"blockbackup verify: interrupted ({name})\n")
    assert bb("verify", "--repo", repo, "--passphrase-env", "BBP").stdout.endswith("ok\n")


def test_a_stopped_sync_says_so_and_the_next_one_finishes(
    tmp_path: Path, repo_with_image: tuple[Path, Path]
) -> None:
    repo, image = repo_with_image
    copy = tmp_path / "copy"
    code, err, _ = signalled(
        ["repo", "sync", repo, copy],
        lambda: (copy / "data").is_dir() and any((copy / "data").rglob("*")),
        signal.SIGTERM,
    )
    assert (code, err) == (143, "blockbackup repo: interrupted (SIGTERM)\n")
    bb("repo", "sync", repo, copy)
    out = tmp_path / "out.img"
    bb("restore", "--repo", copy, "latest", out, "--passphrase-env", "BBP")
    assert out.read_bytes() == image.read_bytes()
