"""``contrib/systemd/``: the units pass ``systemd-analyze verify`` (which needs no running
systemd, only the binaries they start), and the nightly script runs the README's routine."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from testkit.serving import MiB, serving

CONTRIB = Path(__file__).resolve().parents[2] / "contrib" / "systemd"
UNITS = ("blockbackup-serve@.service", "blockbackup-backup@.service", "blockbackup-backup@.timer")
#: The console script of this installation (the units name the usual install path).
BLOCKBACKUP = Path(sys.executable).with_name("blockbackup")


def installed_units(into: Path) -> list[Path]:
    """The units as shipped, with the paths of this checkout's installation."""
    paths = []
    for name in UNITS:
        text = (CONTRIB / name).read_text()
        text = text.replace(
            "/usr/local/bin/blockbackup-nightly", str(CONTRIB / "blockbackup-nightly")
        )
        text = text.replace("/usr/local/bin/blockbackup ", f"{BLOCKBACKUP} ")
        (into / name).write_text(text)
        paths.append(into / name)
    return paths


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="needs systemd-analyze (Debian package systemd, installed by ./dev test)",
)
def test_units_verify(tmp_path: Path) -> None:
    assert BLOCKBACKUP.exists()
    units = installed_units(tmp_path)
    assert all("/usr/local/bin" not in u.read_text().split("ExecStart=")[-1] for u in units)
    verify = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    # verify exits 0 on mere warnings (an unknown Type=, a bad key): none may appear
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


@pytest.mark.qemu
@pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img and qemu-io")
def test_nightly_script_runs_the_routine(tmp_path: Path) -> None:
    """First night a full backup that starts the bitmap, then incrementals backed by the
    previous one; `latest` restores to the disk as it was at each backup."""
    image = tmp_path / "vm1.img"
    image.write_bytes(os.urandom(8 * MiB))
    backups = tmp_path / "backups"
    with serving(str(image), "--dir", str(tmp_path / "run")) as served:
        env = {
            **os.environ,
            "NODE": "vm1",
            "BACKUP_DIR": str(backups),
            "FULL_DAY": "0",  # no day of the week: one chain
            "BLOCKBACKUP": str(BLOCKBACKUP),
        }
        script = [str(CONTRIB / "blockbackup-nightly"), served.qmp]
        for night in range(3):
            if night:
                subprocess.run(
                    [
                        "qemu-io",
                        "-f",
                        "raw",
                        "-c",
                        f"write -P {night} {night * MiB} 64k",
                        served.uri(),
                    ],
                    check=True,
                    capture_output=True,
                )
            subprocess.run(script, env=env, check=True, capture_output=True, timeout=120)
            restored = tmp_path / f"restored{night}.img"
            subprocess.run(
                ["qemu-img", "convert", "-U", "-O", "raw", str(backups / "latest"), str(restored)],
                check=True,
            )
            assert restored.read_bytes() == image.read_bytes()
    kinds = sorted(p.name.rsplit("-", 1)[1] for p in backups.glob("*.qcow2"))
    assert kinds == ["full.qcow2", "inc.qcow2", "inc.qcow2"]
