"""qcow2 I/O over NBD: our qcow2 driver against QEMU's, on the same workloads.

Why: the qcow2 issue sets the goal of at least 0.7x QEMU on sequential 1 MiB I/O and on
allocating 4 KiB random writes. Both servers (ours, and qemu-storage-daemon) export a
qcow2 node over a unix socket, one after the other, each on a fresh image made by
``qemu-img create -f qcow2``, and fio's nbd engine drives them identically:

- ``seqwrite-1m``: one sequential pass of 1 MiB writes (QD4) over a fresh image: every
  write allocates clusters and grows the file;
- ``seqread-1m``: 1 MiB reads (QD4) of what the pass wrote, for ``--runtime`` seconds;
- ``randwrite-4k-alloc``: 4 KiB random writes (QD16) into a large fresh image, few enough
  that nearly every write allocates a new cluster.

Besides rates it prints each server's CPU time per request (user + system, all threads,
from ``/proc``): on a shared machine the rates move with other load far more than that.

Usage: ``.venv/bin/python benchmarks/qcow2_io.py [--size-mib 512] [--runtime 3]``
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from _ours_server import server_argv, wait_socket

RANDOM_VIRTUAL_GIB = 16


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_fio(uri: str, args: list[str], pid: int) -> dict[str, float]:
    """fio's rate, and the server's (``pid``) CPU microseconds per request."""
    cpu = cpu_seconds(pid)
    out = subprocess.run(
        ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", *args],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    cpu = cpu_seconds(pid) - cpu
    res = json.loads(out[out.index("{") :])["jobs"][0]
    side = res["write"] if res["write"]["io_bytes"] else res["read"]
    us = cpu / max(1, side["total_ios"]) * 1e6
    return {"iops": side["iops"], "mib_s": side["bw_bytes"] / (1 << 20), "cpu_us": us}


class Server:
    """One server process exporting a qcow2 image as ``r`` on a unix socket."""

    def __init__(self, kind: str, image: Path, sock: str) -> None:
        if kind == "ours":
            argv = server_argv(str(image), sock, "qcow2")
        else:
            argv = [
                "qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=f,filename={image}",
                "--blockdev", "driver=qcow2,node-name=r,file=f",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "type=nbd,id=e,node-name=r,name=r,writable=on",
            ]  # fmt: skip
        self.sock = sock
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        wait_socket(sock, self.proc)
        self.uri = f"nbd+unix:///r?socket={sock}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if os.path.exists(self.sock):
            os.unlink(self.sock)


def _fresh(path: Path, size: str) -> Path:
    if path.exists():
        path.unlink()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size], check=True)
    return path


def bench(
    kind: str, d: Path, size_mib: int, runtime: int, rand_mib: int
) -> dict[str, tuple[float, float]]:
    """job -> (rate, server CPU microseconds per request)."""
    sock = str(d / f"{kind}.sock")
    results: dict[str, tuple[float, float]] = {}
    image = _fresh(d / f"{kind}-seq.qcow2", f"{size_mib}M")
    server = Server(kind, image, sock)
    try:
        seq = ["--bs=1M", "--iodepth=4", f"--size={size_mib}M"]
        r = run_fio(server.uri, ["--rw=write", *seq], server.proc.pid)
        results["seqwrite-1m"] = r["mib_s"], r["cpu_us"]
        read = ["--rw=read", *seq, "--time_based", f"--runtime={runtime}"]
        r = run_fio(server.uri, read, server.proc.pid)
        results["seqread-1m"] = r["mib_s"], r["cpu_us"]
    finally:
        server.stop()
    image.unlink()
    image = _fresh(d / f"{kind}-rand.qcow2", f"{RANDOM_VIRTUAL_GIB}G")
    server = Server(kind, image, sock)
    try:
        r = run_fio(
            server.uri,
            ["--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={RANDOM_VIRTUAL_GIB}G",
             f"--io_size={rand_mib}M", f"--runtime={runtime}"],
            server.proc.pid,
        )  # fmt: skip
        results["randwrite-4k-alloc"] = r["iops"], r["cpu_us"]
    finally:
        server.stop()
    image.unlink()
    return results


UNITS = {"seqwrite-1m": "MiB/s", "seqread-1m": "MiB/s", "randwrite-4k-alloc": "IOPS"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=512, help="sequential pass size")
    ap.add_argument("--rand-mib", type=int, default=64, help="random write volume")
    ap.add_argument("--runtime", type=int, default=3, help="seconds per timed job (cap)")
    args = ap.parse_args()
    for tool in ("fio", "qemu-storage-daemon", "qemu-img"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not installed")
    d = Path(tempfile.mkdtemp(prefix="bbqcow2", dir="/tmp"))
    try:
        ours = bench("ours", d, args.size_mib, args.runtime, args.rand_mib)
        qsd = bench("qsd", d, args.size_mib, args.runtime, args.rand_mib)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f"{'job':<20} {'ours':>10} {'qsd':>10} {'unit':<6} ratio  CPU us/request ours qsd")
    for job, unit in UNITS.items():
        (o, ocpu), (q, qcpu) = ours[job], qsd[job]
        print(f"{job:<20} {o:>10.1f} {q:>10.1f} {unit:<6} {o / q:.2f}x {ocpu:>10.1f} {qcpu:>6.1f}")


if __name__ == "__main__":
    main()
