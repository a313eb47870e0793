"""Opening an S3 repository on a host without its cache: pack indexes one at a time or 16.

Why: a host that has never opened the repository (a restore on a new machine, a second
host) fetches every pack's index object. One GET after another, latency multiplies by the
number of packs. This builds a repository of ``--packs`` tiny packs on a local
``rclone serve s3`` (as the tests run it), puts the tests' fault proxy in front of it with
``--latency-ms`` per request (a WAN's round trip), and opens it with an empty cache with
one fetcher (the reference: the old behaviour) and with ``backend.FETCHERS`` (16), in one
run, printing seconds, requests and the ratio.

    ./dev bench s3_cold_open [--packs 300] [--latency-ms 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
from blockbackup.repository import backend as backend_module
from blockbackup.repository.repo import Repository
from testkit.faultproxy import FaultProxy
from testkit.s3server import client_env, start_server


def build(location: str, packs: int) -> None:
    repo = Repository.init(location, None, pack_size=1024)
    for i in range(packs):
        data = os.urandom(700) + i.to_bytes(4, "little")
        repo.store.add(repo.keys.address(data), data)
        repo.store.flush()  # a pack each
    repo.close()


def open_cold(location: str, cache: Path, fetchers: int) -> tuple[float, dict[str, int]]:
    os.environ["BB_CACHE_DIR"] = str(cache)
    backend_module.FETCHERS = fetchers
    repo = Repository.open(location)
    start = time.perf_counter()
    _ = repo.store  # lists and fetches the indexes
    seconds = time.perf_counter() - start
    requests = repo.backend.requests()  # type: ignore[attr-defined]
    repo.close()
    return seconds, requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--packs", type=int, default=300)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    args = parser.parse_args()
    fetchers = backend_module.FETCHERS
    with tempfile.TemporaryDirectory(prefix="bb-s3open-") as tmp:
        work = Path(tmp)
        server = start_server(work / "root", work / "server.log")
        try:
            os.environ.update(client_env(server.endpoint))
            location = f"s3://{server.bucket('coldopen')}/r"
            print(f"building {args.packs} packs ...", flush=True)
            build(location, args.packs)
            proxy = FaultProxy(upstream_port=int(server.endpoint.rsplit(":", 1)[1])).start()
            try:
                proxy.latency = args.latency_ms / 1000
                os.environ.update(client_env(proxy.endpoint))
                runs = [
                    (f"{n} fetcher{'s' if n > 1 else ''}", open_cold(location, work / f"c{n}", n))
                    for n in (1, fetchers)
                ]
            finally:
                proxy.stop()
        finally:
            server.stop()
    reference = runs[0][1][0]
    print(f"{args.packs} packs, {args.latency_ms:.0f} ms per request, no cache:")
    for name, (seconds, requests) in runs:
        print(
            f"  {name:12} {seconds:7.2f} s  {reference / seconds:6.2f}x  "
            f"GET {requests.get('GET', 0)}, LIST {requests.get('LIST', 0)}"
        )


if __name__ == "__main__":
    main()
