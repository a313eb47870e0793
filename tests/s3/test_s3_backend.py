"""The S3 backend's calls against the real server, the same contract as the directory's."""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import pytest

from blockbackup.repository.backend import DirectoryBackend, open_backend
from blockbackup.repository.chunkstore import ChunkStore
from blockbackup.repository.errors import AlreadyExists, NotFound, RepositoryError
from blockbackup.repository.keys import Keys
from blockbackup.repository.repo import Repository
from blockbackup.repository.s3backend import S3Backend
from testkit.faultproxy import Fault, FaultProxy


@pytest.fixture
def backend(env: dict[str, str], bucket: str, monkeypatch: pytest.MonkeyPatch) -> S3Backend:
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "BB_S3_ENDPOINT", "BB_CONFIG"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.setenv("BB_S3_MAX_ATTEMPTS", "3")
    b = open_backend(f"s3://{bucket}/some/prefix")
    assert isinstance(b, S3Backend)
    return b


def test_the_calls(backend: S3Backend) -> None:
    data = os.urandom(100_000)
    backend.put("data/ab/abc", data)
    assert backend.get("data/ab/abc") == data
    assert backend.get("data/ab/abc", 1000, 5000) == data[1000:6000]  # via read-ahead
    assert backend.get("data/ab/abc", 99_000, 5000) == data[99_000:]  # short at the end
    assert backend.get("data/ab/abc", 200_000, 10) == b""
    assert backend.size("data/ab/abc") == len(data)
    assert backend.size("nothing") is None
    with pytest.raises(NotFound):
        backend.get("nothing")
    backend.put_if_absent("snapshots/one", b"first")
    with pytest.raises(AlreadyExists):
        backend.put_if_absent("snapshots/one", b"second")
    assert backend.get("snapshots/one") == b"first"
    assert sorted(backend.list("")) == ["data/ab/abc", "snapshots/one"]
    assert list(backend.list("snapshots/")) == ["snapshots/one"]
    modified = backend.modified("snapshots/one")
    assert modified is not None
    assert abs(modified - time.time()) < 300
    assert backend.modified("nothing") is None
    backend.delete("snapshots/one")
    backend.delete("snapshots/one")  # idempotent
    assert not backend.exists("snapshots/one")
    with pytest.raises(RepositoryError):
        backend.get("../escape")
    requests = backend.requests()
    assert requests["PUT"] >= 2
    assert requests["GET"] >= 3
    assert requests["LIST"] >= 2


def test_a_pack_whose_upload_fails_gets_no_index(backend: S3Backend, proxy: FaultProxy) -> None:
    """A pack put that keeps failing fails the store's flush after its bounded attempts,
    and the pack's index is never put (an index naming a missing pack would make every
    later backup dedupe against chunks that are not there)."""
    store = ChunkStore(backend, Keys(None))
    proxy.add(Fault("503", "PUT", "/data/", times=100))
    data = os.urandom(65536)
    store.add(Keys(None).address(data), data)
    with pytest.raises(RepositoryError, match="PUT data/"):
        store.flush()
    assert 3 <= proxy.count("PUT", "/data/") <= 6  # BB_S3_MAX_ATTEMPTS=3, not a loop
    assert proxy.count("PUT", "/index/") == 0
    store.close()


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_a_put_retried_sends_the_whole_buffer_again(
    backend: S3Backend, proxy: FaultProxy, fault: str
) -> None:
    """A pack's body is read from its buffer in pieces (no copy of it whole): a retry after
    a refused or cut-off attempt starts it over, and the object is the buffer, byte for
    byte."""
    buffer = mmap.mmap(-1, 3 << 20)  # as a pack buffer is
    data = os.urandom(3 << 20)
    buffer[:] = data
    proxy.add(Fault(fault, "PUT", "/data/", times=1))
    with memoryview(buffer) as view:
        backend.put("data/ff/ffff", view[: 2 << 20])
    assert proxy.count("PUT", "/data/") == 2
    assert backend.get("data/ff/ffff") == data[: 2 << 20]
    buffer.close()


def test_concurrent_readers_share_windows(backend: S3Backend, proxy: FaultProxy) -> None:
    data = os.urandom(6 << 20)
    backend.put("data/cc/cccc", data)
    proxy.clear()
    out: dict[int, bytes] = {}

    def read(i: int) -> None:
        out[i] = backend.get("data/cc/cccc", i * 65536, 65536)

    threads = [threading.Thread(target=read, args=(i,)) for i in range(0, 90)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out[i] == data[i * 65536 : (i + 1) * 65536] for i in out)
    assert proxy.count("GET", "/data/") <= 3  # two windows of 4 MiB (+ one prefetch at most)


def _get_bytes(proxy: FaultProxy, contains: str) -> list[int]:
    return [e.received for e in proxy.entries() if e.method == "GET" and contains in e.path]


def test_reading_packs_through_streams_them(backend: S3Backend, proxy: FaultProxy) -> None:
    """A reader going through a pack costs a window and one GET for the rest of it; once
    it reads whole packs, the next pack costs one GET; nothing is fetched twice."""
    first, second = os.urandom(14 << 20), os.urandom(13 << 20)
    backend.put("data/dd/dddd", first)
    backend.put("data/ee/eeee", second)
    proxy.clear()
    piece = 1 << 20
    for name, data in (("dddd", first), ("eeee", second)):
        for offset in range(0, len(data), piece):
            assert backend.get(f"data/{name[:2]}/{name}", offset, piece) == data[offset:][:piece]
    assert _get_bytes(proxy, "/dddd") == [4 << 20, (14 - 4) << 20]
    assert _get_bytes(proxy, "/eeee") == [13 << 20]


def test_random_reads_cost_a_window_each(backend: S3Backend, proxy: FaultProxy) -> None:
    data = os.urandom(14 << 20)
    backend.put("data/ff/ffff", data)
    backend.exists("data/ff/ffff")
    proxy.clear()
    for offset in (9 << 20, 1 << 20, (9 << 20) + 5000, 13 << 20):
        assert backend.get("data/ff/ffff", offset, 65536) == data[offset : offset + 65536]
    assert _get_bytes(proxy, "/ffff") == [4 << 20, 4 << 20, 2 << 20]


def test_a_stream_cut_short_resumes_where_it_stopped(backend: S3Backend, proxy: FaultProxy) -> None:
    data = os.urandom(12 << 20)
    backend.put("data/ab/abab", data)
    backend.exists("data/ab/abab")
    proxy.clear()
    assert backend.get("data/ab/abab", 0, 65536) == data[:65536]  # the first window
    proxy.add(Fault("truncate", "GET", "/data/", times=2))
    out = [backend.get("data/ab/abab", o, 1 << 20) for o in range(4 << 20, 12 << 20, 1 << 20)]
    assert b"".join(out) == data[4 << 20 :]
    assert backend.requests()["retried-body"] == 2
    assert proxy.count("GET", "/abab") == 4  # the window, the rest, two resumptions


def test_an_exact_read_past_the_end_is_short_after_one_retry(backend: S3Backend) -> None:
    """A read that asks for more than the object holds (a damaged, short pack) is asked
    again once for the rest, then returns what there is: the caller names the damage."""
    data = os.urandom(5 << 20)
    backend.put("data/ac/acac", data)
    assert backend.get("data/ac/acac", 1 << 20, 5 << 20) == data[1 << 20 :]
    assert backend.requests()["retried-body"] == 1


def test_commit_checks_many_packs_with_one_listing(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), None)
    backend = repo.backend
    assert isinstance(backend, DirectoryBackend)
    packs = {f"{n:064x}" for n in range(100)}
    for p in sorted(packs)[:-1]:
        backend.put(f"data/{p[:2]}/{p}", b"x")
    assert repo._missing_packs(packs) == [sorted(packs)[-1]]
    assert repo._missing_packs(set(sorted(packs)[:3])) == []


def test_conditional_put_that_landed_is_ours(backend: S3Backend, proxy: FaultProxy) -> None:
    """A conditional put whose answer says "exists" although it was our own attempt that
    landed (the first answer was lost, the retry got 412) succeeds; another's object not."""
    proxy.add(Fault("412-after", "PUT", "/snapshots/"))
    backend.put_if_absent("snapshots/mine", b"manifest with a random part 1234")
    assert backend.get("snapshots/mine") == b"manifest with a random part 1234"
    assert proxy.count("PUT", "/snapshots/") == 1
    backend.put("snapshots/theirs", b"another writer's")
    proxy.add(Fault("412-after", "PUT", "/snapshots/"))
    with pytest.raises(AlreadyExists):
        backend.put_if_absent("snapshots/theirs", b"mine")
