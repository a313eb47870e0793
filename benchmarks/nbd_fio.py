"""fio over NBD: our server against qemu-storage-daemon exporting the same image.

Why: the issue sets goals relative to QSD 7.2 (4 KiB random write at QD16 >= 0.8x, 1 MiB
sequential >= 1.0x). Both servers run as separate processes on unix sockets, one after the
other, on the same preallocated image, and fio's nbd engine drives them identically.

Usage: ``.venv/bin/python benchmarks/nbd_fio.py [--size-mib 512] [--runtime 8] [--uvloop]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _ours_server import server_argv, wait_socket

JOBS = {
    "randwrite-4k-qd16": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
    "seqread-1m": ["--rw=read", "--bs=1M", "--iodepth=4"],
    "seqwrite-1m": ["--rw=write", "--bs=1M", "--iodepth=4"],
}


def run_fio(uri: str, job: list[str], size_mib: int, runtime: int) -> dict[str, float]:
    out = subprocess.run(
        ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--size={size_mib}M",
         "--time_based", f"--runtime={runtime}", "--output-format=json", *job],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    res = json.loads(out[out.index("{") :])["jobs"][0]
    side = res["write"] if res["write"]["io_bytes"] else res["read"]
    pct = side["clat_ns"].get("percentile", {})
    return {
        "iops": side["iops"],
        "mib_s": side["bw_bytes"] / (1 << 20),
        "p50_us": pct.get("50.000000", 0) / 1000,
        "p99_us": pct.get("99.000000", 0) / 1000,
    }


def bench(
    name: str, argv: list[str], sock: str, size: int, runtime: int
) -> dict[str, dict[str, float]]:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        wait_socket(sock, proc)
        uri = f"nbd+unix:///r?socket={sock}"
        results = {job: run_fio(uri, args, size, runtime) for job, args in JOBS.items()}
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if os.path.exists(sock):
            os.unlink(sock)
    for job, r in results.items():
        print(f"{name:>12} {job:<18} {r['iops']:>9.0f} IOPS {r['mib_s']:>8.1f} MiB/s "
              f"p50 {r['p50_us']:>7.1f} us p99 {r['p99_us']:>8.1f} us")  # fmt: skip
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=512)
    ap.add_argument("--runtime", type=int, default=8)
    ap.add_argument("--uvloop", action="store_true")
    args = ap.parse_args()
    for tool in ("fio", "qemu-storage-daemon"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not installed")
    d = Path(tempfile.mkdtemp(prefix="bbbench", dir="/tmp"))
    try:
        image = d / "img.raw"
        with open(image, "wb") as f:  # preallocate: both servers read real data
            block = os.urandom(1 << 20)
            for _ in range(args.size_mib):
                f.write(block)
        sock = str(d / "s")
        loop = "uvloop" if args.uvloop else "asyncio"
        ours = bench(f"ours/{loop}", server_argv(str(image), sock, "raw", loop),
                     sock, args.size_mib, args.runtime)  # fmt: skip
        qsd = bench(
            "qsd",
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,node-name=f,filename={image}",
             "--blockdev", "driver=raw,node-name=r,file=f",
             "--nbd-server", f"addr.type=unix,addr.path={sock}",
             "--export", "type=nbd,id=e,node-name=r,name=r,writable=on"],
            sock, args.size_mib, args.runtime,
        )  # fmt: skip
        print("\nratios (ours / qsd):")
        for job in JOBS:
            o, q = ours[job], qsd[job]
            print(f"  {job:<18} throughput {o['iops'] / q['iops']:.2f}x   "
                  f"p50 {o['p50_us'] / max(q['p50_us'], 1e-9):.2f}x   "
                  f"p99 {o['p99_us'] / max(q['p99_us'], 1e-9):.2f}x")  # fmt: skip
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    main()
