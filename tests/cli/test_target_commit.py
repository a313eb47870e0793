"""The last step of a backup or restore, naming the complete image, never replaces a file
that took the name meanwhile (another backup or restore to the same name, started at the
same time: the fsync of a big image leaves seconds between the start's check and the
rename), unless the user asked for that with ``--force``."""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from blockbackup.cli import targets
from blockbackup.cli.qmpclient import CliError


def _images(tmp_path: Path) -> tuple[Path, Path]:
    partial, final = tmp_path / ".out.img.partial-x", tmp_path / "out.img"
    partial.write_bytes(b"new image")
    final.write_bytes(b"the other restore's image")
    return partial, final


class _NoRenameat2:
    """A C library without renameat2 (glibc before 2.28, other libcs)."""


def _without_renameat2(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes, "CDLL", lambda *_a, **_k: _NoRenameat2())


@pytest.mark.parametrize("fallback", ["renameat2", "link", "check"])
def test_a_file_that_took_the_name_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fallback: str
) -> None:
    if fallback != "renameat2":
        _without_renameat2(monkeypatch)
    if fallback == "check":  # a filesystem without hard links either

        def no_links(*_args: object) -> None:
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

        monkeypatch.setattr(os, "link", no_links)
    partial, final = _images(tmp_path)
    with pytest.raises(CliError, match=r"out\.img appeared meanwhile: nothing overwritten"):
        targets.commit(partial, final)
    assert final.read_bytes() == b"the other restore's image"
    assert partial.read_bytes() == b"new image"  # for the caller's clean-up to remove
    final.unlink()
    targets.commit(partial, final)  # the name free: the image takes it, and only it
    assert final.read_bytes() == b"new image"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.img"]


def test_force_replaces(tmp_path: Path) -> None:
    partial, final = _images(tmp_path)
    targets.commit(partial, final, replace=True)
    assert final.read_bytes() == b"new image"
    assert not partial.exists()
