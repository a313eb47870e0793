"""A local cache of a remote repository's pack indexes: unchanged data costs no request.

(The same directory holds every repository's table file, ``knowntable.py``.)

Why it is always valid: ``index/<pack-id>`` is immutable and named by its pack (whose name
is the SHA-256 of its bytes), so a cached copy under the same name is the same object. A
damaged cached file fails its decode (authenticated when encrypted, length-checked when
not) and is fetched again. Opening a repository on S3 then costs one LIST of ``index/`` and
one GET per index this host has not seen, instead of one GET per pack ever written.

Where: ``$BB_CACHE_DIR``, else ``$XDG_CACHE_HOME/blockbackup`` (``~/.cache/blockbackup``),
then ``<repository id>/index/<pack-id>``. Deleting it is always safe. Only remote backends
get one (a directory repository is already local).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path

from blockbackup.repository.backend import Backend


def cache_root() -> Path:
    explicit = os.environ.get("BB_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "blockbackup"


class IndexCache:
    """Pack indexes by pack id, in one directory; every failure just means "not cached"."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.hits = 0
        self.misses = 0

    def get(self, pack: str) -> bytes | None:
        try:
            data = (self.directory / pack).read_bytes()
        except OSError:
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, pack: str, data: bytes) -> None:
        """Atomic (temp file + rename) so a killed writer leaves no torn file; not fsynced:
        a file lost in a crash is fetched again."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = self.directory / f".tmp-{secrets.token_hex(6)}"
            tmp.write_bytes(data)
            os.replace(tmp, self.directory / pack)
        except OSError:
            pass

    def forget(self, pack: str) -> None:
        (self.directory / pack).unlink(missing_ok=True)

    def keep_only(self, packs: Iterable[str]) -> None:
        """Drop cached indexes whose object is gone (gc removed the pack)."""
        wanted = set(packs)
        try:
            names = os.listdir(self.directory)
        except OSError:
            return
        for name in names:
            if name not in wanted:
                try:
                    (self.directory / name).unlink()
                except OSError:
                    pass


def table_path(repo_id: str) -> Path | None:
    """Where the known-address table of a repository (local or remote) keeps what does
    not fit in memory (``knowntable.py``); None for a repository without a usable id."""
    return cache_root() / repo_id / "table" if repo_id.isalnum() else None


def index_cache(backend: Backend, repo_id: str) -> IndexCache | None:
    """The cache for a remote backend's repository, None for a local one (or no id)."""
    if not getattr(backend, "remote", False) or not repo_id.isalnum():
        return None
    return IndexCache(cache_root() / repo_id / "index")
