"""Opening several target nodes of one repository in one process: time and memory.

Why: a live backup of N disks (``backup --connect Q disk0 disk1 ...``, ``vm backup``) adds
one ``bb-repo-target`` node per disk to the daemon. Each used to open the repository for
itself (key derivation, writer marker, the table of every stored chunk at ~210 bytes a
chunk); they now share one (``repository/opened.py``). This prints, for 1 node (the
reference) and for N, the wall time of the ``blockdev-add`` calls and the RSS they add,
each in a process of its own, on a synthetic repository of 1,000,000 chunks (tiny blobs,
real packs and indexes: the repository of ``tests/repository/test_gc_scale.py``).

Usage::

    ./dev bench repo_nodes_open [--nodes 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MiB = 1 << 20


def build(repo: Path) -> int:
    """The synthetic repository; its number of chunks."""
    sys.path[:0] = [str(HERE.parent / "tests"), str(HERE.parent / "tests" / "repository")]
    import test_gc_scale  # type: ignore[import-not-found]

    test_gc_scale.build(repo)
    return int(test_gc_scale.CHUNKS)


def rss() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) * 1024


async def open_nodes(repo: str, nodes: int) -> dict[str, float]:
    import blockbackup.repository.drivers  # noqa: F401  (registers the repository nodes)
    from blockbackup.api import BlockBackup

    async with BlockBackup() as bb:
        before, start = rss(), time.perf_counter()
        for n in range(nodes):
            await bb.blockdev_add(
                {
                    "driver": "bb-repo-target",
                    "node-name": f"t{n}",
                    "repository": repo,
                    "disk": f"disk{n}",
                    "size": 1 << 30,
                    "base": "none",
                    "encoder-processes": 0,
                }
            )
        return {"seconds": time.perf_counter() - start, "rss": rss() - before}


def measure(repo: Path, nodes: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(repo), str(nodes)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    result: dict[str, float] = json.loads(out)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(open_nodes(args.child[0], int(args.child[1])))))
        return
    with tempfile.TemporaryDirectory(prefix="bb-nodes-") as work:
        repo = Path(work) / "repo"
        chunks = build(repo)
        one = measure(repo, 1)
        many = measure(repo, args.nodes)
    print(f"repository of {chunks:,} chunks, target nodes opened in one process")
    for label, r in ((" 1 node", one), (f"{args.nodes:2d} nodes", many)):
        print(f"{label}: {r['seconds']:.2f} s, +{r['rss'] / MiB:.0f} MiB RSS")
    print(
        f"{args.nodes} nodes / 1 node: time {many['seconds'] / one['seconds']:.2f}x, "
        f"memory {many['rss'] / max(one['rss'], 1):.2f}x (shared: about 1x each; "
        f"one repository per node: about {args.nodes}x)"
    )


if __name__ == "__main__":
    main()
