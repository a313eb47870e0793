"""The known-address table in memory against the table in its file: memory, opening, lookups.

Why: every backup, restore and verify opens the repository and loads the table of every
stored blob. Held in memory it costs ~60 bytes a blob and every pack index read at each
opening; past ``BB_TABLE_MEMORY_RECORDS`` (512Ki) records it lives in a sorted file of the
local cache (``repository/knowntable.py``). This opens a synthetic repository (tiny blobs,
real packs and indexes: ``tests/repository/test_gc_scale.py``'s) in a process of its own
three ways, the first being the reference:

- ``memory``: the whole table in memory (the limit set above the repository's size);
- ``file, first``: the default, with an empty cache (the opening writes the file);
- ``file, again``: the default, the file in the cache.

and prints each opening's wall time and peak RSS, and the time of 100,000 lookups of
stored addresses (the deduplication's question: which pack holds it?) and of 100,000
addresses not stored (a new chunk's question), with ratios to the reference.

Usage::

    ./dev bench table_file [--chunks 4000000]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20

PROBE = """
import json, os, random, sys, time
from blockbackup.repository.chunkstore import decode_pack_header, index_key
from blockbackup.repository.repo import Repository

start = time.perf_counter()
repo = Repository.open(sys.argv[1])
store = repo.store
opening = time.perf_counter() - start
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
rng = random.Random(1)
packs = sorted(k.rsplit("/", 1)[1] for k in repo.backend.list("index/"))
stored = []
for pack in rng.sample(packs, 10):
    header = repo.backend.get(index_key(pack))
    stored += [entry[0] for entry in decode_pack_header(repo.keys, header, pack)]
stored = rng.sample(stored, 100_000)
absent = [rng.randbytes(32) for _ in range(100_000)]
table = store.table
start = time.perf_counter()
assert all(table.pack_for(address) is not None for address in stored)
hits = time.perf_counter() - start
start = time.perf_counter()
assert not any(table.pack_for(address) is not None for address in absent)
misses = time.perf_counter() - start
print(json.dumps({"open": opening, "peak": peak, "hits": hits, "misses": misses,
                  "in_file": table.in_file, "records": table.records}))
"""


def build(repo: Path, chunks: int) -> None:
    sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "repository")]
    import test_gc_scale  # type: ignore[import-not-found]

    test_gc_scale.CHUNKS = chunks
    test_gc_scale.build(repo)


def probe(repo: Path, cache: Path, limit: str | None) -> dict[str, float]:
    env = {**os.environ, "BB_CACHE_DIR": str(cache)}
    env.pop("BB_TABLE_MEMORY_RECORDS", None)
    if limit is not None:
        env["BB_TABLE_MEMORY_RECORDS"] = limit
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(repo)],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunks", type=int, default=4_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bb-table-", dir="/var/tmp") as tmp:
        repo, cache = Path(tmp) / "repo", Path(tmp) / "cache"
        print(f"building a repository of {args.chunks:,} chunks ...", flush=True)
        build(repo, args.chunks)
        runs = [
            ("memory", probe(repo, cache, str(1 << 40))),
            ("file, first", probe(repo, cache, None)),
            ("file, again", probe(repo, cache, None)),
        ]
    ref = runs[0][1]
    print(
        f"{'':12} {'open s':>7} {'x':>6} {'peak MiB':>9} {'x':>6} "
        f"{'100k hits s':>11} {'x':>6} {'100k misses s':>13} {'x':>6} {'in file':>9}"
    )
    for name, r in runs:
        print(
            f"{name:12} {r['open']:7.2f} {r['open'] / ref['open']:6.2f} "
            f"{r['peak'] / MiB:9.1f} {r['peak'] / ref['peak']:6.2f} "
            f"{r['hits']:11.3f} {r['hits'] / ref['hits']:6.2f} "
            f"{r['misses']:13.3f} {r['misses'] / ref['misses']:6.2f} {int(r['in_file']):9,}"
        )


if __name__ == "__main__":
    main()
