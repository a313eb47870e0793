"""The README's examples, run as written: the code is taken from README.md itself (only
/tmp paths and placeholders become the test's own), so an example that stops working, or
a README that stops matching the code, fails here."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from testkit.serving import MiB, pid_gone, wait_until

README = Path(__file__).resolve().parents[2] / "README.md"
VENV_BIN = Path(sys.executable).parent


def blocks(lang: str) -> list[str]:
    """The README's fenced code blocks in ``lang``."""
    return re.findall(rf"^```{lang}\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)


def block_with(lang: str, needle: str) -> str:
    found = [b for b in blocks(lang) if needle in b]
    assert len(found) == 1, f"one {lang} block with {needle!r} in README.md"
    return found[0]


def commands(block: str) -> list[str]:
    """The shell commands of a block: continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = (re.sub(r"(^|\s+)#.*$", "", line).strip() for line in joined.splitlines())
    return [line for line in lines if line]


def argv(command: str) -> list[str]:
    """A README command line as an argv: ``.venv/bin/`` and a bare ``blockbackup`` are
    this installation's."""
    words = shlex.split(command)
    name = words[0].removeprefix(".venv/bin/")
    if name == "blockbackup":
        words[0] = str(VENV_BIN / "blockbackup")
    return words


def write_image(path: Path, size: int = 8 * MiB) -> bytes:
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def wait_for_job(qmp_path: str, command: dict[str, object]) -> None:
    """Run a QMP command from the README and wait for the job it starts to conclude."""

    async def go() -> None:
        client = QMPClient("readme")
        await client.connect(qmp_path)
        try:
            with client.listener() as events:
                await client.execute(str(command["execute"]), command["arguments"])
                async for event in events:
                    if event["event"] == "BLOCK_JOB_COMPLETED":
                        assert "error" not in event["data"], event
                        return
        finally:
            await client.disconnect()

    asyncio.run(asyncio.wait_for(go(), 120))


def test_daemon_example(tmp_path: Path) -> None:
    """ "Use it as qemu-storage-daemon": the command line, then the QMP command below it."""
    block = block_with("sh", "blockbackup daemon")
    block = block.replace("/tmp/", f"{tmp_path}/")
    (command,) = commands(block)
    text = README.read_text()
    match = re.search(r'`(\{"execute": "blockdev-backup".*?\}\})`', text, re.DOTALL)
    assert match is not None, "the QMP command after the daemon example"
    qmp_command = json.loads(match.group(1).replace("\n", " "))
    disk = write_image(tmp_path / "disk.img")
    (tmp_path / "backup.img").write_bytes(bytes(len(disk)))  # the target file must exist
    daemon = subprocess.Popen(argv(command), cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    try:
        qmp_sock = tmp_path / "qmp.sock"
        wait_until(lambda: qmp_sock.exists() or daemon.poll() is not None, "the QMP socket")
        assert daemon.poll() is None, daemon.communicate()[1]
        wait_for_job(str(qmp_sock), qmp_command)
    finally:
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err
    assert (tmp_path / "backup.img").read_bytes() == disk


def test_library_example(tmp_path: Path) -> None:
    """ "Use it as a library", as a script in a directory holding disk.img and backup.img."""
    code = block_with("python", "BlockBackup")
    disk = write_image(tmp_path / "disk.img")
    (tmp_path / "backup.img").write_bytes(bytes(len(disk)))
    (tmp_path / "example.py").write_text(code)
    subprocess.run(
        [sys.executable, "example.py"], cwd=tmp_path, check=True, timeout=120, capture_output=True
    )
    assert (tmp_path / "backup.img").read_bytes() == disk


def test_simple_way_in(tmp_path: Path) -> None:
    """ "The simple way in": serve prints the QMP socket, which backup and jobs then use; then
    the same disk into a repository, twice (the second run an incremental after a write
    through NBD), and the restore of the latest snapshot, which is the disk."""
    serve, backup, jobs, export, init, repo_backup, restore = commands(
        block_with("sh", "blockbackup serve disk.img")
    )
    disk = write_image(tmp_path / "disk.img")
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    name, _, _ = export.removeprefix("export ").partition("=")
    env[name] = "a passphrase for the README"
    proc = subprocess.Popen(
        argv(serve),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    results = []
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("QMP monitor: "), first + proc.communicate()[1]
        qmp_sock = first.removeprefix("QMP monitor: ").strip()
        work_dir = str(Path(qmp_sock).parent)
        for command in (backup, jobs, init, repo_backup, repo_backup):
            command = re.sub(r"/tmp/blockbackup-XXXX", work_dir, command)
            command = command.replace("/srv/bb", str(tmp_path / "bb"))
            if "--repo" in command:  # the live backup into the repository
                results.append(
                    subprocess.run(
                        [*argv(command), "--json"], cwd=tmp_path, check=True,
                        capture_output=True, timeout=120, env=env, text=True,
                    )
                )  # fmt: skip
                uri = f"nbd+unix:///disk?socket={work_dir}/nbd.sock"
                if shutil.which("qemu-io") is not None:
                    subprocess.run(
                        ["qemu-io", "-f", "raw", "-c", "write -P 5 64k 4k", uri],
                        check=True, capture_output=True,
                    )  # fmt: skip
                continue
            subprocess.run(
                argv(command), cwd=tmp_path, check=True, capture_output=True, timeout=120, env=env
            )
        at_last_backup = (tmp_path / "disk.img").read_bytes()
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "backup.img").read_bytes() == disk
    assert not Path(work_dir).exists()
    first_run, second_run = (json.loads(r.stdout) for r in results)
    assert first_run["disks"][0]["mode"] == "full"
    assert "no snapshot of disk" in first_run["disks"][0]["fallback"]
    assert "reading the whole disk" in results[0].stderr
    assert second_run["disks"][0]["mode"] == "incremental"
    restore = restore.replace("/srv/bb", str(tmp_path / "bb"))
    subprocess.run(argv(restore), cwd=tmp_path, check=True, capture_output=True, env=env)
    # the same write again after the last backup: the disk is as it was at its T0
    assert (tmp_path / "restored.img").read_bytes() == at_last_backup


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img and qemu-io")
def test_nightly_routine_survives_a_restart_of_serve(tmp_path: Path) -> None:
    """ "A nightly routine", with serve stopped (SIGTERM) and started again after the full
    backup, as a reboot or an upgrade would: each incremental, read through its backing
    chain, is the disk as it was when that backup started."""
    block = block_with("sh", "--start-bitmap nightly")
    run_dir = tmp_path / "run"
    block = block.replace("/run/backup", str(run_dir))
    lines = commands(block)
    assert lines[0].startswith("Q=")
    qmp_sock = shlex.split(lines[0].removeprefix("Q="))[0]
    full, mon, tue = (c.replace("$Q", qmp_sock) for c in lines if " backup " in f" {c} ")
    disk = tmp_path / "disk.img"
    write_image(disk)

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            argv(f"blockbackup serve disk.img --dir {run_dir} --json"),
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline(), proc.communicate()[1]
        return proc

    def stop(proc: subprocess.Popen[str]) -> None:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        wait_until(lambda: pid_gone(proc.pid), "serve to exit")

    def guest_writes(pattern: int) -> None:
        uri = f"nbd+unix:///disk?socket={run_dir / 'nbd.sock'}"
        for offset in (pattern * 64 * 1024, 5 * MiB + pattern * 4096):
            subprocess.run(
                ["qemu-io", "-f", "raw", "-c", f"write -P {pattern} {offset} 4k", uri],
                check=True,
                capture_output=True,
            )

    def backup_and_check(command: str, name: str) -> None:
        at_t0 = disk.read_bytes()  # nothing writes during the backup
        run = subprocess.run(argv(command), cwd=tmp_path, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        restored = tmp_path / f"restored-{name}.img"
        subprocess.run(
            ["qemu-img", "convert", "-O", "raw", name, str(restored)], cwd=tmp_path, check=True
        )
        assert restored.read_bytes() == at_t0

    serve = start()
    try:
        backup_and_check(full, "full.qcow2")
        guest_writes(1)
        stop(serve)
        serve = start()  # the bitmap must have survived
        guest_writes(2)
        backup_and_check(mon, "mon.qcow2")
        guest_writes(3)
        backup_and_check(tue, "tue.qcow2")
    finally:
        if serve.poll() is None:
            stop(serve)
