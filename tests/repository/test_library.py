"""The repository library on real files: round trips, dedup, zero chunks, keys, format
checks, bit rot, and the atomic commit of a writer killed with SIGKILL."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blockbackup.repository import blob
from blockbackup.repository.backend import DirectoryBackend
from blockbackup.repository.catalog import DiskRecord
from blockbackup.repository.chunkstore import check_pack_keyless, pack_key
from blockbackup.repository.diskindex import DiskIndex
from blockbackup.repository.errors import (
    AlreadyExists,
    CorruptData,
    FormatTooNew,
    NotARepository,
    RepositoryError,
    WrongKey,
)
from blockbackup.repository.keys import ZERO_ADDRESS
from blockbackup.repository.repo import CHUNK_SIZE, Repository
from blockbackup.repository.verify import verify
from testkit.repo import read_disk, store_disk
from testkit.tmpfs import mounted_tmpfs

PASS = b"correct horse battery staple"
CHUNK = CHUNK_SIZE


def packs(path: Path) -> list[Path]:
    return sorted(p for p in (path / "data").rglob("*") if p.is_file())


@pytest.mark.parametrize("secret", [PASS, None])
def test_round_trip_and_reopen(tmp_path: Path, secret: bytes | None) -> None:
    data = os.urandom(5 * CHUNK + 1234)  # a short last chunk
    repo = Repository.init(str(tmp_path / "r"), secret)
    manifest = repo.commit([store_disk(repo, "disk0", data)])
    again = Repository.open(str(tmp_path / "r"), secret)
    snap, disk = again.select("latest")
    assert snap.id == manifest.id
    assert disk.name == "disk0"
    assert read_disk(again, disk) == data
    if secret is not None:  # encrypted: the plaintext appears nowhere on storage
        for pack in packs(tmp_path / "r"):
            assert data[:64] not in pack.read_bytes()


def test_dedup_across_disks_and_snapshots(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), PASS, pack_size=1 << 20)
    data = os.urandom(32 * CHUNK)
    first = store_disk(repo, "a", data)
    stored = repo.store.stored_bytes
    store_disk(repo, "b", data)  # another disk, same content
    repo.commit([first])
    changed = bytearray(data)
    changed[5 * CHUNK + 100 : 5 * CHUNK + 104] = b"XXXX"  # a 4-byte write
    repo.store.stored_blobs = 0
    second = store_disk(repo, "a", bytes(changed), base=first)
    repo.commit([second])
    assert repo.store.stored_blobs == 2  # the changed chunk and the changed segment
    assert repo.store.stored_bytes < stored + 2 * CHUNK + 4096
    reopened = Repository.open(str(tmp_path / "r"), PASS)
    assert read_disk(reopened, reopened.select("latest:a")[1]) == bytes(changed)
    assert read_disk(reopened, reopened.select(reopened.snapshot_ids()[0])[1]) == data


def test_zero_chunks_cost_nothing(tmp_path: Path) -> None:
    repo = Repository.init(str(tmp_path / "r"), PASS)
    record = store_disk(repo, "empty", bytes(3 << 30 >> 8))  # 12 MiB of zeroes
    assert record.segments == [ZERO_ADDRESS]
    assert repo.store.stored_blobs == 0
    assert packs(tmp_path / "r") == []
    repo.commit([record])
    assert read_disk(Repository.open(str(tmp_path / "r"), PASS), record) == bytes(3 << 30 >> 8)


def test_keys_wrong_passphrase_add_remove(tmp_path: Path) -> None:
    location = str(tmp_path / "r")
    repo = Repository.init(location, PASS)
    repo.commit([store_disk(repo, "d", os.urandom(CHUNK))])
    with pytest.raises(WrongKey, match="wrong passphrase"):
        Repository.open(location, b"not it")
    with pytest.raises(RepositoryError, match="is encrypted"):
        Repository.open(location, None)
    before = {p: p.read_bytes() for p in packs(tmp_path / "r")}
    slot = repo.add_key(b"second", comment="ops")
    first = next(s for s in repo.key_slots() if s != slot)
    repo.remove_key(first)
    with pytest.raises(WrongKey):
        Repository.open(location, PASS)
    reopened = Repository.open(location, b"second")
    assert read_disk(reopened, reopened.select("latest")[1]) == read_disk(
        repo, repo.select("latest")[1]
    )
    assert {p: p.read_bytes() for p in packs(tmp_path / "r")} == before  # nothing re-encrypted
    with pytest.raises(RepositoryError, match="last key slot"):
        reopened.remove_key(slot)


def test_format_checks(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    with pytest.raises(NotARepository, match="is not a blockbackup repository"):
        Repository.open(str(tmp_path / "plain"))
    with pytest.raises(NotARepository):
        Repository.open(str(tmp_path / "missing"))
    Repository.init(str(tmp_path / "r"), None)
    config = json.loads((tmp_path / "r" / "config").read_text())
    config["version"] = 3
    (tmp_path / "r" / "config").write_text(json.dumps(config))
    with pytest.raises(FormatTooNew, match=r"version 3 is newer .* upgrade"):
        Repository.open(str(tmp_path / "r"))
    config["version"] = 2
    config["pack_hash"] = "md5"
    (tmp_path / "r" / "config").write_text(json.dumps(config))
    with pytest.raises(NotARepository, match="config is damaged or unknown"):
        Repository.open(str(tmp_path / "r"))
    with pytest.raises(RepositoryError, match="already a repository"):
        Repository.init(str(tmp_path / "r"), None)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(RepositoryError, match="not empty"):
        Repository.init(str(tmp_path / "full"), None)


def test_a_version_1_repository_keeps_naming_packs_by_sha256(tmp_path: Path) -> None:
    """Version 1 had no ``pack_hash``: its packs are SHA-256 names, and new ones too, so
    that verify, sync and a keyless check keep working on it; version 2 names by BLAKE3."""
    location = str(tmp_path / "r")
    Repository.init(location, PASS)
    config = json.loads((tmp_path / "r" / "config").read_text())
    assert (config["version"], config["pack_hash"]) == (2, "blake3")
    del config["pack_hash"]
    config["version"] = 1
    (tmp_path / "r" / "config").write_text(json.dumps(config))
    repo = Repository.open(location, PASS)
    data = os.urandom(3 * CHUNK)
    record = store_disk(repo, "d", data)
    repo.commit([record])
    (pack,) = packs(tmp_path / "r")
    assert pack.name == hashlib.sha256(pack.read_bytes()).hexdigest()
    check_pack_keyless(repo.backend, pack.name, Repository.open(location, PASS).pack_hash)
    reopened = Repository.open(location, PASS)
    assert verify(reopened, reopened.snapshots()).ok
    assert read_disk(Repository.open(location, PASS), record) == data
    config["pack_hash"] = "blake3"  # a key version 1 does not have
    (tmp_path / "r" / "config").write_text(json.dumps(config))
    with pytest.raises(NotARepository, match="config is damaged or unknown"):
        Repository.open(location, PASS)


@pytest.mark.parametrize("secret", [PASS, None])
def test_bit_rot_names_the_chunk(tmp_path: Path, secret: bytes | None) -> None:
    repo = Repository.init(str(tmp_path / "r"), secret)
    data = os.urandom(4 * CHUNK)
    record = store_disk(repo, "d", data)
    repo.commit([record])
    (pack,) = packs(tmp_path / "r")
    raw = bytearray(pack.read_bytes())
    raw[20] ^= 1  # inside the first chunk
    pack.write_bytes(bytes(raw))
    reopened = Repository.open(str(tmp_path / "r"), secret)
    first = reopened.keys.address(data[:CHUNK])
    with pytest.raises(CorruptData, match=f"chunk {first.hex()} in pack {pack.name}"):
        read_disk(reopened, record)
    with pytest.raises(CorruptData, match="does not match its name"):
        check_pack_keyless(reopened.backend, pack.name, reopened.pack_hash)  # no key needed


def test_put_if_absent_has_one_winner(tmp_path: Path) -> None:
    backend = DirectoryBackend(tmp_path)
    backend.put_if_absent("snapshots/a", b"1")
    with pytest.raises(AlreadyExists):
        backend.put_if_absent("snapshots/a", b"2")
    assert backend.get("snapshots/a") == b"1"
    assert list(backend.list("snapshots/")) == ["snapshots/a"]
    assert not any(p.name.startswith(".tmp-") for p in (tmp_path / "snapshots").iterdir())


WRITER = """
import os, sys
from testkit.repo import store_disk
from blockbackup.repository.repo import Repository
repo = Repository.open(sys.argv[1], b"pw")
data = bytes.fromhex(open(sys.argv[2]).read())
store_disk(repo, "d", data)        # packs and indexes written, no commit
print("stored", repo.store.stored_blobs, flush=True)
sys.stdin.read()                   # wait to be killed
"""


def test_killed_writer_leaves_no_snapshot_and_its_packs_are_reused(tmp_path: Path) -> None:
    location = str(tmp_path / "r")
    Repository.init(location, b"pw", pack_size=4 * CHUNK)
    data = os.urandom(20 * CHUNK)
    (tmp_path / "data.hex").write_text(data.hex())
    (tmp_path / "writer.py").write_text(WRITER)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), *sys.path]),
    }
    with subprocess.Popen(
        [sys.executable, str(tmp_path / "writer.py"), location, str(tmp_path / "data.hex")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as proc:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("stored 21"), line  # 20 chunks + 1 segment
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # a pack whose index was never written (killed between the two puts)
    index_files = sorted((tmp_path / "r" / "index").iterdir())
    index_files[0].unlink()
    repo = Repository.open(location, b"pw")
    assert repo.snapshot_ids() == []
    record = store_disk(repo, "d", data)
    assert repo.store.stored_blobs == 0  # everything the killed run stored is reused
    assert (tmp_path / "r" / "index" / index_files[0].name).exists()  # index rewritten
    repo.commit([record])
    assert read_disk(Repository.open(location, b"pw"), record) == data


def test_commit_refuses_when_a_relied_pack_vanished(tmp_path: Path) -> None:
    location = str(tmp_path / "r")
    repo = Repository.init(location, None)
    data = os.urandom(2 * CHUNK)
    repo.commit([store_disk(repo, "d", data)])
    second = Repository.open(location)
    record = store_disk(second, "d", data)  # relies on the first run's pack
    for pack in packs(tmp_path / "r"):
        pack.unlink()  # as a concurrent gc would
    with pytest.raises(RepositoryError, match="removed meanwhile"):
        second.commit([record])
    assert len(second.snapshot_ids()) == 1
    assert pack_key("ab12").startswith("data/ab/")


PARALLEL_ENCODE = """
import os, threading
from blockbackup.repository import blob
from blockbackup.repository.keys import Keys
keys = Keys(os.urandom(32))
chunks = [os.urandom(32768) + bytes(32768) for _ in range(16)]
def work():
    for _ in range(300):
        for c in chunks:
            stored = blob.encode(keys, c, b"a")
            assert blob.decode(keys, stored, b"a", "x", len(c)) == c
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
print("ok")
"""


def test_blobs_encode_in_parallel_threads() -> None:
    """The target node encodes chunks in several threads at once; a zstd (de)compressor
    shared between threads crashed the process (a segfault), so this runs in a child."""
    proc = subprocess.run(
        [sys.executable, "-c", PARALLEL_ENCODE], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "ok\n"


def test_verify_names_every_snapshot_disk_and_offset_a_damaged_chunk_affects(
    tmp_path: Path,
) -> None:
    repo = Repository.init(str(tmp_path / "r"), PASS, pack_size=4 * CHUNK)
    shared = os.urandom(CHUNK)
    a = shared + os.urandom(3 * CHUNK)
    b = bytes(CHUNK) + os.urandom(2 * CHUNK) + shared  # the shared chunk at another offset
    first = repo.commit([store_disk(repo, "a", a)])
    second = repo.commit([store_disk(repo, "b", b), store_disk(repo, "a2", a)])
    clean = verify(Repository.open(str(tmp_path / "r"), PASS), repo.snapshots())
    assert clean.ok
    assert clean.chunks == 4 + 2  # distinct data chunks (a: 4, b: 2 more, a2: none)
    location = repo.store.locate(repo.keys.address(shared))
    path = tmp_path / "r" / pack_key(location.pack)
    raw = bytearray(path.read_bytes())
    raw[location.offset + 30] ^= 1
    path.write_bytes(bytes(raw))
    report = verify(Repository.open(str(tmp_path / "r"), PASS), repo.snapshots())
    assert not report.ok
    assert report.damaged_packs == {location.pack: "content does not match its name"}
    hits = {(d.snapshot, d.disk, d.offset) for d in report.damage}
    assert hits == {(first.id, "a", 0), (second.id, "b", 3 * CHUNK), (second.id, "a2", 0)}
    assert all(repo.keys.address(shared).hex() in d.error for d in report.damage)
    path.unlink()  # a missing pack
    report = verify(Repository.open(str(tmp_path / "r"), PASS), [repo.manifest(first.id)])
    assert report.damaged_packs == {location.pack: "missing"}
    assert {d.offset for d in report.damage} >= {0}


def test_a_failed_pack_write_keeps_the_store_consistent(tmp_path: Path) -> None:
    """A full disk fails the pack's put with ENOSPC; the store keeps its pending chunks
    intact, takes more, and writes them all once there is space again. Packs are written
    behind (by writer threads), so the error comes from a later add or the flush."""
    with mounted_tmpfs(tmp_path / "fs", "6m") as fs:
        filler = fs / "filler"
        filler.write_bytes(bytes(4 << 20))
        repo = Repository.init(str(fs / "r"), None, pack_size=1 << 20)
        added: list[bytes] = []
        error = None
        for _ in range(48):  # 3 MiB: more than the space left
            added.append(os.urandom(CHUNK))
            try:
                repo.store.add(repo.keys.address(added[-1]), added[-1])
            except OSError as exc:
                error = exc
                break
        if error is None:
            try:
                repo.store.flush()
            except OSError as exc:
                error = exc
        assert error is not None
        assert error.errno == errno.ENOSPC
        filler.unlink()  # space again
        added.append(os.urandom(CHUNK))
        repo.store.add(repo.keys.address(added[-1]), added[-1])  # grows the same buffer
        repo.store.flush()
        again = Repository.open(str(fs / "r"))
        for chunk in added:
            assert again.store.read(again.keys.address(chunk)) == chunk


@pytest.mark.parametrize("secret", [PASS, None])
def test_reads_trust_the_tag_verify_checks_the_address_too(
    tmp_path: Path, secret: bytes | None
) -> None:
    """A blob whose content does not hash to its address but is otherwise intact (a
    writer that hashed wrongly): encrypted, a read trusts the GCM tag over the address and
    returns it (no second hash per chunk on restore), and verify still finds it; not
    encrypted, the hash is the only check, so a read refuses it."""
    repo = Repository.init(str(tmp_path / "r"), secret)
    good, wrong = os.urandom(CHUNK), os.urandom(CHUNK)
    address = repo.keys.address(good)
    repo.store.add_encoded(address, blob.encode(repo.keys, wrong, address), CHUNK)
    index = DiskIndex(repo.store, CHUNK, repo.chunk_size)
    index.set(0, address)
    record = DiskRecord("d", CHUNK, repo.chunk_size, index.save())
    repo.store.flush()
    repo.commit([record])
    reopened = Repository.open(str(tmp_path / "r"), secret)
    if secret is None:
        with pytest.raises(CorruptData, match="does not match its address"):
            reopened.store.read(address)
    else:
        assert reopened.store.read(address) == wrong
    report = verify(reopened, reopened.snapshots())
    assert [d.offset for d in report.damage] == [0]
    assert "does not match its address" in report.damage[0].error
