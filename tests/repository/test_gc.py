"""gc: each race of docs/repository.md ("Concurrency without locks") driven in-process at
the exact interleaving, through gc's hooks, with real writers on a real directory."""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blockbackup.repository import condemned, writers
from blockbackup.repository.catalog import DiskRecord, Manifest
from blockbackup.repository.chunkstore import index_key, pack_key
from blockbackup.repository.diskindex import DiskIndex
from blockbackup.repository.errors import RepositoryError
from blockbackup.repository.gc import GcReport, collect
from blockbackup.repository.marks import MarkSet
from blockbackup.repository.repo import Repository
from blockbackup.repository.verify import verify

CHUNK = 64 * 1024
PASS = b"gc test passphrase"


def chunk(tag: int) -> bytes:
    return tag.to_bytes(4, "little") * (CHUNK // 4)


class Writer:
    """A backup in progress: announced, index loaded, chunks stored, not committed."""

    def __init__(self, location: Path, base: Manifest | None = None) -> None:
        self.repo = Repository.open(str(location), PASS)
        self.repo.announce_writer()
        store = self.repo.store  # loads the index after the marker
        segments = None if base is None else base.disks[0].segments
        size = base.disks[0].size if base is not None else 4 * CHUNK
        self.index = DiskIndex(store, size, CHUNK, segments)

    def write(self, i: int, tag: int) -> None:
        data = chunk(tag)
        address = self.repo.keys.address(data)
        self.repo.store.add(address, data)
        self.index.set(i, address)

    def commit(self) -> Manifest:
        segments = self.index.save()
        self.repo.store.flush()
        try:
            return self.repo.commit([DiskRecord("disk", self.index.size, CHUNK, segments)])
        finally:
            self.repo.retire_writer()


def backup(location: Path, tags: list[int]) -> Manifest:
    writer = Writer(location)
    for i, tag in enumerate(tags):
        writer.write(i, tag)
    return writer.commit()


def restores(location: Path, manifest: Manifest, tags: list[int]) -> None:
    repo = Repository.open(str(location), PASS)
    disk = manifest.disks[0]
    index = DiskIndex(repo.store, disk.size, CHUNK, disk.segments)
    for i, tag in enumerate(tags):
        assert repo.store.read(index.get(i)) == chunk(tag)


def pack_of(location: Path, tag: int) -> str:
    repo = Repository.open(str(location), PASS)
    return repo.store.locate(repo.keys.address(chunk(tag))).pack


def gc(location: Path, hook: Callable[[str], None] | None = None, **kw: object) -> GcReport:
    repo = Repository.open(str(location), PASS)
    if hook is None:
        return collect(repo, **kw)  # type: ignore[arg-type]
    return collect(repo, hook=hook, **kw)  # type: ignore[arg-type]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    location = tmp_path / "repo"
    Repository.init(str(location), PASS, pack_size=1)  # one blob per pack: exact tests
    return location


def exists(location: Path, pack: str) -> bool:
    return (location / pack_key(pack)).exists()


def test_frees_what_no_snapshot_uses_and_is_idempotent(repo: Path) -> None:
    a = backup(repo, [1, 2, 3, 4])
    b = backup(repo, [2, 3, 4, 5])
    only_a = pack_of(repo, 1)
    Repository.open(str(repo), PASS).forget(a.id)
    report = gc(repo)
    assert report.condemned == 2  # chunk 1 and a's disk index segment
    assert report.deleted == 2
    assert not exists(repo, only_a)
    assert not (repo / index_key(only_a)).exists()
    assert not any((repo / "gc" / "condemned").glob("*"))
    restores(repo, b, [2, 3, 4, 5])
    again = gc(repo)
    assert (again.condemned, again.deleted, again.kept) == (0, 0, report.kept)
    assert not list((repo / "writers").glob("*"))


def test_dry_run_changes_nothing(repo: Path) -> None:
    a = backup(repo, [1, 2])
    backup(repo, [3, 4])
    Repository.open(str(repo), PASS).forget(a.id)
    before = sorted(p.relative_to(repo) for p in repo.rglob("*") if p.is_file())
    report = gc(repo, dry_run=True)
    assert report.condemned == 3
    assert sorted(p.relative_to(repo) for p in repo.rglob("*") if p.is_file()) == before


def test_a_writer_that_loaded_the_index_before_condemn_is_protected(repo: Path) -> None:
    a = backup(repo, [1, 2])
    Repository.open(str(repo), PASS).forget(a.id)
    writer = Writer(repo)  # knows pack(1) from its index
    p1 = pack_of(repo, 1)
    report = gc(repo)
    assert report.condemned >= 1
    assert report.deleted == 0
    assert report.waiting == report.condemned
    assert exists(repo, p1)  # it may rely on it: not deleted while it runs
    writer.write(0, 1)  # deduplicated against the condemned pack
    with pytest.raises(RepositoryError, match="condemned by a concurrent gc"):
        writer.commit()
    assert not list((repo / "writers").glob("*"))
    assert gc(repo).deleted >= 1
    assert not exists(repo, p1)
    rerun = backup(repo, [1, 2])  # the next run stores it anew
    restores(repo, rerun, [1, 2])


def test_a_snapshot_committed_after_the_mark_restores_the_pack(repo: Path) -> None:
    a = backup(repo, [1, 2])
    Repository.open(str(repo), PASS).forget(a.id)
    writer = Writer(repo)
    writer.write(0, 1)
    committed: list[Manifest] = []

    def hook(step: str) -> None:
        if step == "marked":  # after gc's mark, before it condemns
            committed.append(writer.commit())

    report = gc(repo, hook)
    assert report.restored >= 1
    restores(repo, committed[0], [1])
    p1 = pack_of(repo, 1)  # the index is back
    assert exists(repo, p1)
    assert not (repo / condemned.marker_key(p1)).exists()


def test_a_snapshot_whose_pack_is_condemned_is_readable_until_the_sweep(repo: Path) -> None:
    """Committed after gc's mark and before its condemn, a snapshot names a pack whose
    index gc then deletes; until the sweep puts it back, readers (restore, verify) still
    find its chunks in the condemned pack, and writers do not deduplicate against it."""
    a = backup(repo, [1, 2])
    Repository.open(str(repo), PASS).forget(a.id)
    writer = Writer(repo)
    writer.write(0, 1)
    committed: list[Manifest] = []
    seen: list[bool] = []

    def hook(step: str) -> None:
        if step == "marked":
            committed.append(writer.commit())
        if step == "condemned":
            p1 = pack_of(repo, 1)
            assert not (repo / index_key(p1)).exists()  # condemned: no index
            restores(repo, committed[0], [1])
            reader = Repository.open(str(repo), PASS)
            seen.append(verify(reader, [committed[0]]).ok)
            late = Writer(repo)
            late.write(0, 1)
            seen.append(late.repo.store.stored_blobs == 1)  # stored anew, not deduplicated
            late.repo.retire_writer()

    report = gc(repo, hook)
    assert seen == [True, True]
    assert report.restored >= 1
    restores(repo, committed[0], [1])


def test_a_writer_committing_between_listing_and_deleting(repo: Path) -> None:
    a = backup(repo, [1, 2])
    Repository.open(str(repo), PASS).forget(a.id)
    late: list[Writer] = []
    committed: list[Manifest] = []

    def hook(step: str) -> None:
        if step == "condemned":  # a backup starts after the condemn: the index is gone
            late.append(Writer(repo))
            late[0].write(0, 1)
            late[0].write(1, 9)
        if step == "before-delete":  # and commits after gc listed writers and snapshots
            committed.append(late[0].commit())

    report = gc(repo, hook)
    assert report.deleted >= 1  # the condemned packs went: the late writer stored anew
    restores(repo, committed[0], [1, 9])


def test_an_incremental_of_a_pruned_base_cannot_name_a_deleted_pack(repo: Path) -> None:
    """The design's flaw: an incremental inherits chunks it never writes. Its base B is
    committed just after gc marked (so gc condemns B's pack), the incremental starts after
    the condemn (so gc does not wait for it), B is pruned before gc's sweep lists the
    snapshots. Without re-checking every pack the new manifest names, it would commit a
    snapshot naming the pack gc deletes."""
    a = backup(repo, [1, 2])
    p1 = pack_of(repo, 1)
    Repository.open(str(repo), PASS).forget(a.id)
    z = Writer(repo)
    z.write(0, 1)
    z.write(1, 2)
    z.write(2, 3)  # a new disk index segment, in z's own (too new to condemn) pack
    base: list[Manifest] = []
    inc: list[Writer] = []

    def hook(step: str) -> None:
        if step == "marked":
            base.append(z.commit())
        if step == "condemned":
            inc.append(Writer(repo, base=base[0]))
            inc[0].write(1, 7)  # chunk 0 (tag 1) is inherited from the base
            Repository.open(str(repo), PASS).forget(base[0].id)  # prune meanwhile

    report = gc(repo, hook)
    assert report.deleted >= 1
    assert not exists(repo, p1)
    with pytest.raises(RepositoryError, match="run the backup again"):
        inc[0].commit()


@pytest.mark.parametrize("step", ["marked", "condemned", "markers-listed", "before-delete"])
def test_killed_anywhere_the_next_run_finishes(repo: Path, step: str) -> None:
    a = backup(repo, [1, 2, 3])
    b = backup(repo, [3, 4])
    gone = [pack_of(repo, 1), pack_of(repo, 2)]
    Repository.open(str(repo), PASS).forget(a.id)

    class Killed(Exception):
        pass

    def kill(at: str) -> None:
        if at == step:
            raise Killed

    with pytest.raises(Killed):
        gc(repo, kill)
    gc(repo)
    assert gc(repo).condemned == 0
    assert not any(exists(repo, pack) for pack in gone)
    assert not any((repo / "gc" / "condemned").glob("*"))
    assert {p.name for p in repo.glob("data/*/*")} == {p.name for p in repo.glob("index/*")}
    restores(repo, b, [3, 4])


def test_half_condemned_and_half_deleted_states_are_finished(repo: Path) -> None:
    a = backup(repo, [1])
    b = backup(repo, [2])
    p1, p2 = pack_of(repo, 1), pack_of(repo, 2)
    store = Repository.open(str(repo), PASS)
    store.forget(a.id)
    store.forget(b.id)
    backend = store.backend
    # killed between the first marker and the index delete
    backend.put(condemned.marker_key(p1), json.dumps({"pack": p1, "phase": 1}).encode())
    # killed after deleting the pack, before deleting its marker
    backend.put(condemned.marker_key(p2), json.dumps({"pack": p2, "phase": 2}).encode())
    backend.delete(index_key(p2))
    backend.delete(pack_key(p2))
    report = gc(repo)
    assert not backend.exists(condemned.marker_key(p2))
    assert report.waiting >= 1
    assert exists(repo, p1)
    assert not backend.exists(index_key(p1))
    gc(repo)
    assert not exists(repo, p1)
    assert not backend.exists(condemned.marker_key(p1))


def test_two_gcs_at_once(repo: Path) -> None:
    a = backup(repo, [1, 2, 3])
    b = backup(repo, [3, 4])
    Repository.open(str(repo), PASS).forget(a.id)
    for step in ("marked", "condemned", "writers-listed", "before-delete"):
        c = backup(repo, [5, 6, step.__len__()])
        Repository.open(str(repo), PASS).forget(c.id)
        inner = []

        def hook(at: str, step: str = step, inner: list[GcReport] = inner) -> None:
            if at == step and not inner:
                inner.append(gc(repo))

        gc(repo, hook)
        assert inner
    gc(repo)
    assert not any((repo / "gc" / "condemned").glob("*"))
    restores(repo, b, [3, 4])
    packs = {p.name for p in repo.glob("data/*/*")}
    indexes = {p.name for p in repo.glob("index/*")}
    assert packs == indexes  # no dangling index, no pack without one
    assert len(packs) == 3  # chunks 3 and 4, and b's segment


def test_the_loader_does_not_resurrect_a_condemned_pack(repo: Path) -> None:
    a = backup(repo, [1])
    backup(repo, [2])
    p1 = pack_of(repo, 1)
    Repository.open(str(repo), PASS).forget(a.id)
    holder = Writer(repo)  # keeps the condemned pack from being deleted
    gc(repo)
    assert exists(repo, p1)
    assert not (repo / index_key(p1)).exists()
    fresh = Repository.open(str(repo), PASS)
    assert not fresh.store.has(fresh.keys.address(chunk(1)))
    assert not (repo / index_key(p1)).exists()  # its recovery skipped it
    holder.repo.retire_writer()


def test_writer_markers_dead_stale_and_forgotten(repo: Path) -> None:
    a = backup(repo, [1])
    Repository.open(str(repo), PASS).forget(a.id)
    backend = Repository.open(str(repo), PASS).backend
    dead = writers.identity()
    dead["start"] = "1"  # this host, this boot, a process that is not running
    backend.put("writers/dead", json.dumps(dead).encode())
    backend.put("writers/stale", json.dumps({"host": "elsewhere"}).encode())
    old = time.time() - 2 * 86400
    os.utime(repo / "writers" / "stale", (old, old))
    backend.put("writers/live", json.dumps({"host": "elsewhere"}).encode())
    report = gc(repo)
    assert [w["id"] for w in report.removed_writers] == ["dead"]
    assert [w["id"] for w in report.ignored_writers] == ["stale"]
    assert [w["id"] for w in report.writers] == ["live"]
    assert report.deleted == 0  # the live one started before the condemn
    assert not backend.exists("writers/dead")
    assert backend.exists("writers/stale")
    with pytest.raises(RepositoryError, match="no writer marker 'nope'"):
        gc(repo, forget_writers=["nope"])
    report = gc(repo, forget_writers=["live"])
    assert report.forgotten_writers == ["live"]
    assert report.deleted >= 1


def test_modified_is_the_backends_time(repo: Path) -> None:
    backend = Repository.open(str(repo), PASS).backend
    assert backend.modified("nothing/here") is None
    backend.put("gc/now-x", b"")
    assert backend.modified("gc/now-x") == os.stat(repo / "gc" / "now-x").st_mtime


def test_mark_set_is_exact_on_prefixes() -> None:
    marks = MarkSet()
    addresses = [os.urandom(32) for _ in range(50_000)]
    for start in range(0, len(addresses), 1000):
        marks.add_addresses(b"".join(addresses[start : start + 1000]) * 2)  # duplicates
    marks.finish()
    assert len(marks) == len(addresses)
    assert all(a in marks for a in addresses)
    assert sum(os.urandom(32) in marks for _ in range(10_000)) == 0


def test_a_target_node_announces_its_writer_until_it_closes(repo: Path, tmp_path: Path) -> None:
    from blockbackup.api import BlockBackup  # the engine: only this test needs it
    from blockbackup.repository import drivers  # registers the repository nodes

    assert drivers.RepoTargetDriver

    image = tmp_path / "disk.img"
    image.write_bytes(chunk(1) * 4)

    async def run() -> None:
        async with BlockBackup() as bb:
            bb.object_add({"qom-type": "secret", "id": "k", "data": PASS.decode()})
            options = {
                "driver": "bb-repo-target",
                "node-name": "t",
                "repository": str(repo),
                "disk": "d",
                "size": 4 * CHUNK,
                "key-secret": "k",
            }
            node = await bb.blockdev_add(options)
            marker = [w.id for w in writers.listed(Repository.open(str(repo), PASS).backend)]
            assert len(marker) == 1
            assert node.driver.repo.writer_id == marker[0]  # type: ignore[attr-defined]
            await bb.graph.drop(node)
            assert not writers.listed(Repository.open(str(repo), PASS).backend)
            with pytest.raises(Exception, match="no snapshot"):  # a failed open retires too
                await bb.blockdev_add({**options, "node-name": "u", "base": "nope"})
            assert not writers.listed(Repository.open(str(repo), PASS).backend)

    asyncio.run(run())


def test_a_snapshot_pruned_while_listed_is_skipped(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blockbackup.repository import catalog

    a = backup(repo, [1])
    b = backup(repo, [2])
    opened = Repository.open(str(repo), PASS)
    listed = catalog.ids(opened.backend)
    opened.forget(b.id)  # a prune between the listing and the reading
    monkeypatch.setattr(catalog, "ids", lambda backend: listed)
    assert [m.id for m in opened.snapshots()] == [a.id]
    newest = catalog.latest_with_disk(opened.backend, opened.keys, "disk")
    assert newest is not None
    assert newest.id == a.id


def test_a_writer_running_for_days_stays_protected_by_its_heartbeat(
    repo: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = backup(repo, [1])
    Repository.open(str(repo), PASS).forget(a.id)
    writer = Writer(repo)
    assert writer.repo.writer_id is not None
    marker = repo / "writers" / writer.repo.writer_id
    old = time.time() - 3 * 86400
    os.utime(marker, (old, old))  # started three days ago
    report = gc(repo)
    assert [w["id"] for w in report.ignored_writers] == [marker.name]  # no heartbeat yet
    monkeypatch.setattr(writers, "HEARTBEAT", 0.0)
    writer.repo.beat_writer()
    assert (repo / "writers-alive" / marker.name).exists()
    a2 = backup(repo, [2])
    Repository.open(str(repo), PASS).forget(a2.id)
    report = gc(repo)
    assert [w["id"] for w in report.writers] == [marker.name]
    assert report.deleted == 0  # condemned after its start: it may rely on them
    writer.repo.retire_writer()
    assert not (repo / "writers-alive" / marker.name).exists()


def test_old_temporary_files_of_killed_puts_are_removed(repo: Path) -> None:
    backup(repo, [1])
    old_tmp = repo / "data" / "ab" / ".tmp-0123456789abcdef"
    old_tmp.parent.mkdir(parents=True, exist_ok=True)
    old_tmp.write_bytes(b"half a pack")
    old = time.time() - 2 * 3600
    os.utime(old_tmp, (old, old))
    new_tmp = repo / "index" / ".tmp-fedcba9876543210"
    new_tmp.write_bytes(b"being written")
    report = gc(repo)
    assert report.temporaries_removed == 1
    assert not old_tmp.exists()
    assert new_tmp.exists()
