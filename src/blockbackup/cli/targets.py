"""The backup's target file: what it may be, where it is written, when it gets its name.

A backup tool is trusted for what it refuses, so the target is checked before anything is
made: an existing file is replaced only with ``--force`` (and then whole: a new file takes
its name, nothing of the old one can leak through), and a file the daemon has open (the
source itself, under any name or link) is never a target.

The backup is written to a *partial* file next to the target (``.NAME.partial-TAG``, see
:mod:`blockbackup.cli.runs`) and renamed only once it is complete and on disk: whatever
happens before (Ctrl-C, a full disk, a killed daemon or client), no file under the final
name looks like a backup that is not one.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from blockbackup.block.qcow2.create import build_image
from blockbackup.cli.qmpclient import CliError, UsageError
from blockbackup.cli.runs import RunTag

QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class OpenImage:
    """A file a daemon node has open, as ``query-named-block-nodes`` names it."""

    node: str
    file: str


def check_target(
    target: str, *, force: bool, open_images: Iterable[OpenImage], source: str
) -> Path:
    """The absolute final path, after refusing what must not become a backup target."""
    final = Path(os.path.abspath(target))
    try:
        if not stat.S_ISDIR(os.stat(final.parent).st_mode):
            raise CliError(f"not a directory: {final.parent}")
    except FileNotFoundError:
        raise CliError(f"no such directory: {final.parent}") from None
    except OSError as err:
        raise _file_error(f"cannot use the directory {final.parent}", err) from None
    try:
        st = os.stat(final)
    except FileNotFoundError:
        return final
    except OSError as err:
        raise CliError(f"cannot check {target}: {err.strerror}") from None
    for image in open_images:
        if _same_file(st, image.file):
            if image.node == source:
                raise UsageError(f"{target} is the source image itself ({image.file})")
            raise UsageError(
                f"{target} is {image.file}, an image the daemon has open (node {image.node})"
            )
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{target} exists and is not a regular file")
    if not force:
        raise UsageError(f"{target} exists; choose a new name, or --force to replace it whole")
    return final


def check_backing(backing: str, final: Path) -> tuple[Path, str]:
    """The backing file's absolute path and format (qcow2 by its magic, else raw)."""
    path = Path(os.path.abspath(backing))
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        st = os.stat(path)
    except FileNotFoundError:
        raise UsageError(f"no such backing file: {backing}") from None
    except OSError as err:
        raise CliError(f"cannot read the backing file {backing}: {err.strerror}") from None
    if final.exists() and _same_file(st, str(final)):
        raise UsageError(f"{backing} is the target itself: the target cannot back itself")
    return path, "qcow2" if magic == QCOW2_MAGIC else "raw"


def _same_file(st: os.stat_result, other: str) -> bool:
    """Whether ``other`` is the file ``st`` describes (device and inode, not name)."""
    if not other.startswith("/"):
        return False  # "nbd://...", "null-co://": not a local file
    try:
        o = os.stat(other)
    except OSError:
        return False
    return (o.st_dev, o.st_ino) == (st.st_dev, st.st_ino)


def create_partial(
    final: Path,
    tag: RunTag,
    *,
    size: int,
    fmt: str,
    backing: tuple[Path, str] | None = None,
) -> Path:
    """Create the empty image the daemon will write (exclusively: it is new, and ours)."""
    partial = tag.partial_path(final)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    except OSError as err:
        raise _file_error(f"cannot create a file in {final.parent}", err) from None
    try:
        with os.fdopen(fd, "wb") as f:
            if fmt == "qcow2":
                image = build_image(
                    size,
                    backing_file=str(backing[0]) if backing else None,
                    backing_fmt=backing[1] if backing else None,
                )
                f.write(image)
            else:
                f.truncate(size)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise _file_error(f"cannot write {partial}", err) from None
    return partial


def commit(partial: Path, final: Path, *, replace: bool = False) -> None:
    """Give a complete backup its final name, durably: the data, then the name.

    Unless ``replace`` (``--force``), a file that took the name meanwhile is kept and this
    fails: two backups or restores into one name at once must not end with one of them
    silently replaced by the other (the name was checked when they started, but the
    fsync of a big image leaves seconds between that check and the rename).
    """
    try:
        _fsync(partial, os.O_RDONLY)
    except OSError as err:
        raise _file_error(f"cannot write {partial} to disk", err) from None
    try:
        if replace:
            os.rename(partial, final)
        else:
            _rename_no_replace(partial, final)
    except FileExistsError:
        raise CliError(f"{final} appeared meanwhile: nothing overwritten") from None
    except OSError as err:
        raise _file_error(f"cannot rename {partial} to {final.name}", err) from None
    try:
        _fsync(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as err:
        raise _file_error(f"cannot write the directory {final.parent} to disk", err) from None


def _rename_no_replace(src: Path, dst: Path) -> None:
    """``rename`` that raises FileExistsError rather than replace ``dst``: renameat2's
    RENAME_NOREPLACE, or, where the filesystem lacks it, a link and an unlink (both atomic
    refusals); where it has neither, a check just before the rename."""
    import ctypes  # lazy: only a backup's or restore's last step needs it

    libc = ctypes.CDLL(None, use_errno=True)
    if hasattr(libc, "renameat2"):
        at_fdcwd, rename_noreplace = -100, 1
        if (
            libc.renameat2(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace)
            == 0
        ):
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(dst))
    try:
        os.link(src, dst)
    except OSError as err:
        if isinstance(err, FileExistsError) or err.errno not in (errno.EPERM, errno.EOPNOTSUPP):
            raise
        if os.path.lexists(dst):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst)) from None
        os.rename(src, dst)
        return
    os.unlink(src)


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def allocated(path: Path) -> int:
    """Bytes a file takes on disk (the data a sparse backup actually wrote)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def _file_error(what: str, err: OSError) -> CliError:
    reasons = {
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
    }
    return CliError(f"{what}: {reasons.get(err.errno or 0, err.strerror or str(err))}")
