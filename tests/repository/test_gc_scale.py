"""gc in bounded memory: a repository of 1,000,000 chunks is collected by the installed
command in a subprocess under 256 MiB peak RSS (the chunk store's table alone would be
about 60 MiB, 210 MiB as the dict it was; gc keeps 8 bytes per used chunk)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from blockbackup.repository import blob, catalog, packhash
from blockbackup.repository.catalog import DiskRecord, Manifest
from blockbackup.repository.chunkstore import (
    _TRAILER,
    HEADER_AAD,
    PACK_END,
    PACK_MAGIC,
    _encode_header,
    index_key,
    pack_key,
)
from blockbackup.repository.diskindex import SEGMENT_ENTRIES
from blockbackup.repository.keys import Keys
from blockbackup.repository.repo import Repository

CHUNKS = 1_000_000
PER_PACK = 10_000
CHUNK = 64 * 1024
WINDOW = 12  # segments per snapshot's disk
STEP = 6  # each snapshot starts this many segments after the previous one
SNAPSHOTS = 9
PRUNED = 3  # the oldest ones


def put_pack(location: Repository, entries: list[tuple[bytes, int, int, int]], body: bytes) -> str:
    header_blob = blob.encode(location.keys, _encode_header(entries), HEADER_AAD)
    data = body + header_blob + _TRAILER.pack(len(header_blob), PACK_END)
    pack = packhash.name_of(data, location.pack_hash)
    location.backend.put(pack_key(pack), data)
    location.backend.put(index_key(pack), header_blob)
    return pack


def build(location: Path) -> tuple[list[str], list[list[int]]]:
    """Tiny unique blobs (gc reads only headers and disk indexes), real packs, indexes,
    segments and manifests. (chunk packs, the segments each snapshot uses)."""
    repo = Repository.init(str(location), None)
    addresses = os.urandom(32 * CHUNKS)
    packs = []
    for p in range(CHUNKS // PER_PACK):
        entries = [
            (addresses[i * 32 : i * 32 + 32], len(PACK_MAGIC) + 2 * (i - p * PER_PACK), 2, 1)
            for i in range(p * PER_PACK, (p + 1) * PER_PACK)
        ]
        packs.append(put_pack(repo, entries, PACK_MAGIC + b"\0x" * PER_PACK))
    segment_size = SEGMENT_ENTRIES * 32
    segments, entries, body = [], [], bytearray(PACK_MAGIC)
    for start in range(0, len(addresses), segment_size):
        data = addresses[start : start + segment_size]
        address = Keys(None).address(data)
        stored = blob.encode(repo.keys, data, address)
        entries.append((address, len(body), len(stored), len(data)))
        body += stored
        segments.append(address)
    put_pack(repo, entries, bytes(body))
    used = []
    for k in range(SNAPSHOTS):
        window = list(range(k * STEP, k * STEP + WINDOW))
        used.append(window)
        record = DiskRecord(
            f"disk{k % 2}", WINDOW * SEGMENT_ENTRIES * CHUNK, CHUNK, [segments[s] for s in window]
        )
        snapshot_id, time = catalog.new_id()
        catalog.write(repo.backend, repo.keys, Manifest(snapshot_id, time, "h", [record]))
        if k < PRUNED:
            repo.forget(snapshot_id)  # as prune does
    return packs, used[PRUNED:]


def test_a_million_chunks_in_bounded_memory(tmp_path: Path) -> None:
    location = tmp_path / "repo"
    packs, used = build(location)
    live_segments = {s for window in used for s in window}
    dead = [
        pack
        for p, pack in enumerate(packs)
        if all(
            i // SEGMENT_ENTRIES not in live_segments
            for i in range(p * PER_PACK, (p + 1) * PER_PACK, 16)
        )
    ]
    assert 10 < len(dead) < len(packs) - 10
    # A small launcher forks the command, so the peak measured is the command's own (a
    # child forked from this big test process would count the copy before its exec).
    launcher = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
        "sys.exit(code)"
    )
    gc = [sys.executable, "-m", "blockbackup", "gc", "--repo", str(location), "--json"]
    proc = subprocess.run(
        [sys.executable, "-c", launcher, *gc],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    peak = int(proc.stderr.split()[-1]) * 1024
    print(f"gc of {CHUNKS} chunks: peak RSS {peak / 2**20:.1f} MiB, {report['marked']} marked")
    assert peak < 256 << 20
    assert report["deleted"] == len(dead)
    assert report["marked"] >= len(live_segments) * SEGMENT_ENTRIES
    for pack in packs:
        assert (location / pack_key(pack)).exists() == (pack not in dead)
