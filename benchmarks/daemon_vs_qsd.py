"""The daemon against qemu-storage-daemon: the same QMP script, the same files, one run.

Why: the daemon issue sets its goals relative to qemu-storage-daemon 7.2 measured on the same
machine (full-backup throughput at least QSD's), or as absolute bounds that QSD itself misses
(a guest writing 4 KiB blocks through the NBD export keeps >= 0.5x of its rate and <= 10x of
its p99 while an unlimited backup runs; a 75%-sparse source gives an equally sparse target;
daemon RSS under 150 MiB). Only a run of both daemons, started with the same command line and
driven by the same QMP script over the same files, makes those ratios meaningful.

For each daemon, one after the other, on a warm page cache, with a fresh target and
warm free memory each time (``_settle.settle``):

1. full backup of a random raw image to a raw target (``blockdev-add`` + ``blockdev-backup
   sync=full``, until ``BLOCK_JOB_COMPLETED``): MiB/s, best of ``--repeat``. Ours flushes
   the target before that event, qemu-storage-daemon only when the node is closed, so the
   goal is judged on the time until ``blockdev-del`` returns (durable on both sides), with
   the time to the event printed as well;
2. the same for an image that is 75% holes (random 64 KiB extents): seconds (to the event
   and, as above, until the target is closed) and target allocation against the source's
   (``st_blocks``; "as sparse" allows 1% or 1 MiB more, for the file system's extent tree);
3. fio 4 KiB random writes at iodepth 16 through the NBD export, once alone and once with an
   unlimited full backup started after 2 s; the guest rate and p99 are taken from fio's
   per-I/O completion log (Unix-epoch timestamps) only inside the job's window, which comes
   from the daemon's QMP event timestamps (``JOB_STATUS_CHANGE`` running to
   ``BLOCK_JOB_COMPLETED``). Latency is fio's completion latency (clat). The baseline is
   the steady state of the run without a backup (its first 1 s and last 0.5 s dropped);
4. the daemon's peak RSS (``VmHWM``) after each of these phases.

Usage::

    .venv/bin/python benchmarks/daemon_vs_qsd.py [--size-mib 2048] [--repeat 2] [--runtime 10]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from _settle import settle

MiB = 1 << 20
GRAIN = 64 * 1024  # extent size of the sparse image's data
QSD = "/usr/bin/qemu-storage-daemon"
OURS = [sys.executable, "-m", "blockbackup", "daemon"]
BACKUP_DELAY = 2.0  # seconds of fio before the backup starts
FIO_CAP = 300  # seconds: fio's hard limit; it is interrupted once the backup is over


# --------------------------------------------------------------------------- images


def make_random(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def make_sparse(path: Path, size: int) -> None:
    """25% of the 64 KiB extents hold random data, chosen at random; the rest are holes."""
    grains = size // GRAIN
    chosen = random.Random(7).sample(range(grains), grains // 4)
    with open(path, "wb") as f:
        f.truncate(size)
        for g in sorted(chosen):
            f.seek(g * GRAIN)
            f.write(os.urandom(GRAIN))


def warm(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(16 * MiB):
            pass


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def fresh_target(path: Path, size: int) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)


# --------------------------------------------------------------------------- daemon


def daemon_args(work: Path, src: Path, sparse: Path) -> list[str]:
    """The command line both daemons get (sockets are per daemon, files shared)."""
    return [
        "--blockdev", f"driver=file,node-name=f,filename={src}",
        "--blockdev", "driver=raw,node-name=src,file=f",
        "--blockdev", f"driver=file,node-name=sf,filename={sparse}",
        "--blockdev", "driver=raw,node-name=sparse,file=sf",
        "--nbd-server", f"addr.type=unix,addr.path={work}/nbd.sock",
        "--export", "type=nbd,id=e,node-name=src,name=src,writable=on",
        "--chardev", f"socket,id=m,path={work}/qmp.sock,server=on,wait=off",
        "--monitor", "chardev=m",
    ]  # fmt: skip


def vm_hwm(pid: int) -> int:
    """Peak resident set size of ``pid`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def job_of(event: dict[str, Any]) -> Any:
    """JOB_* events name the job ``id``, BLOCK_JOB_* events ``device``."""
    data = event.get("data", {})
    return data.get("id", data.get("device"))


def stamp(event: dict[str, Any]) -> float:
    ts = event["timestamp"]
    return float(ts["seconds"]) + float(ts["microseconds"]) / 1e6


@dataclass
class Daemon:
    """One running daemon and its QMP events."""

    name: str
    work: Path
    proc: asyncio.subprocess.Process
    client: QMPClient
    events: list[dict[str, Any]] = field(default_factory=list)
    new_event: asyncio.Event = field(default_factory=asyncio.Event)

    async def collect(self) -> None:
        async for event in self.client.events:
            self.events.append(dict(event))
            self.new_event.set()

    async def cmd(self, name: str, args: dict[str, Any] | None = None) -> Any:
        return await self.client.execute(name, args)

    async def wait_event(self, name: str, job: str, timeout: float) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for ev in self.events:
                    if ev["event"] == name and job_of(ev) == job:
                        return ev
                self.new_event.clear()
                await self.new_event.wait()

    def job_events(self, job: str) -> list[dict[str, Any]]:
        return [ev for ev in self.events if job_of(ev) == job]


@contextlib.asynccontextmanager
async def started(
    name: str, command: list[str], work: Path, args: list[str]
) -> AsyncIterator[Daemon]:
    os.makedirs(work, exist_ok=True)
    sock = work / "qmp.sock"
    with open(work / "stderr.log", "wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *command, *args, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        async with asyncio.timeout(30):
            while not sock.exists():
                if proc.returncode is not None:
                    raise RuntimeError(f"{name} exited: {(work / 'stderr.log').read_text()}")
                await asyncio.sleep(0.02)
        client = QMPClient(name)
        await client.connect(str(sock))
        daemon = Daemon(name, work, proc, client)
        collector = asyncio.create_task(daemon.collect())
        try:
            yield daemon
            with contextlib.suppress(Exception):
                await client.execute("quit")
            async with asyncio.timeout(30):
                await proc.wait()
        finally:
            collector.cancel()
            with contextlib.suppress(BaseException):
                await collector
            with contextlib.suppress(Exception):
                await client.disconnect()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def backup(d: Daemon, job: str, device: str, target: Path, size: int) -> dict[str, float]:
    """Back ``device`` up into a fresh raw ``target``; wall and event times, allocation."""
    fresh_target(target, size)
    settle(size)  # no writeback of an earlier phase competes; both daemons get warm memory
    await d.cmd(
        "blockdev-add",
        {"driver": "raw", "node-name": "tgt", "file": {"driver": "file", "filename": str(target)}},
    )
    start = time.perf_counter()
    await d.cmd("blockdev-backup", {"job-id": job, "device": device, "target": "tgt",
                                    "sync": "full"})  # fmt: skip
    done = await d.wait_event("BLOCK_JOB_COMPLETED", job, timeout=FIO_CAP)
    seconds = time.perf_counter() - start
    if "error" in done.get("data", {}):
        raise RuntimeError(f"{d.name}: {job} failed: {done['data']['error']}")
    await d.cmd("blockdev-del", {"node-name": "tgt"})  # both daemons flush a closing node
    durable = time.perf_counter() - start
    result = {"seconds": seconds, "durable": durable, "target_alloc": float(allocated(target))}
    os.unlink(target)
    return result


# --------------------------------------------------------------------------- fio


def fio_command(work: Path, log: str, size: int) -> list[str]:
    return [
        "fio", "--name=guest", "--ioengine=nbd", f"--uri=nbd+unix:///src?socket={work}/nbd.sock",
        "--rw=randwrite", "--bs=4k", "--iodepth=16", f"--size={size // MiB}M",
        "--time_based", f"--runtime={FIO_CAP}",
        f"--write_lat_log={work}/{log}", "--log_avg_msec=0", "--log_unix_epoch=1",
        "--disable_slat=1", "--disable_lat=1", f"--output={work}/{log}.out",
    ]  # fmt: skip


def read_clat(path: Path) -> list[tuple[float, float]]:
    """(completion time in s since the epoch, completion latency in ms) per I/O."""
    out = []
    with open(path) as f:
        for line in f:
            t_ms, lat_ns = line.split(",", 2)[:2]
            out.append((int(t_ms) / 1000, int(lat_ns) / 1e6))
    return out


def window(ios: list[tuple[float, float]], start: float, end: float) -> dict[str, float]:
    """Writes per second and p99 latency (ms) of the I/Os completed in [start, end]."""
    lats = sorted(lat for t, lat in ios if start <= t <= end)
    if not lats or end <= start:
        return {"rate": 0.0, "p99": math.nan, "seconds": end - start}
    p99 = lats[max(0, math.ceil(0.99 * len(lats)) - 1)]
    return {"rate": len(lats) / (end - start), "p99": p99, "seconds": end - start}


async def fio(
    d: Daemon, log: str, size: int, runtime: float, target: Path | None
) -> dict[str, float]:
    """fio for ``runtime`` s; with ``target``, a full backup starts after BACKUP_DELAY s and
    fio runs on until 0.5 s after it ends. Guest figures over the job window (or the steady
    state without a backup)."""
    if target is not None:
        fresh_target(target, size)
    settle(size)
    proc = await asyncio.create_subprocess_exec(
        *fio_command(d.work, log, size), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    t0 = time.perf_counter()
    res: dict[str, float] = {}
    try:
        if target is not None:
            await asyncio.sleep(BACKUP_DELAY)
            if proc.returncode is not None:
                raise RuntimeError("fio exited early")
            res = await backup(d, "guestjob", "src", target, size)
            await asyncio.sleep(0.5)
        remaining = runtime - (time.perf_counter() - t0)
        if remaining > 0:
            await asyncio.sleep(remaining)
        proc.send_signal(signal.SIGINT)  # fio stops cleanly and writes its logs
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
        if proc.returncode not in (0, 128, 130):  # 128: interrupted by SIGINT
            raise RuntimeError(f"fio failed ({proc.returncode}): {err.decode()}")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    logfile = d.work / f"{log}_clat.1.log"
    ios = read_clat(logfile)
    os.unlink(logfile)
    first, last = ios[0][0], ios[-1][0]
    if target is None:
        res.update(window(ios, first + 1.0, last - 0.5))
        return res
    evs = d.job_events("guestjob")
    start = next(
        (stamp(e) for e in evs if e["event"] == "JOB_STATUS_CHANGE"
         and e["data"]["status"] == "running"),
        stamp(evs[0]),
    )  # fmt: skip
    end = next(stamp(e) for e in evs if e["event"] == "BLOCK_JOB_COMPLETED")
    res.update(window(ios, start, end))
    before = window(ios, first + 1.0, start)
    res["before_rate"], res["before_p99"] = before["rate"], before["p99"]
    res["job_offset"] = start - first
    return res


# --------------------------------------------------------------------------- run


async def measure(
    name: str, command: list[str], work: Path, src: Path, sparse: Path, args: argparse.Namespace
) -> dict[str, float]:
    size = args.size_mib * MiB
    warm(src)
    warm(sparse)
    r: dict[str, float] = {}
    async with started(name, command, work, daemon_args(work, src, sparse)) as d:
        pid = d.proc.pid
        runs = [await backup(d, f"full{i}", "src", work / "tgt.img", size)
                for i in range(args.repeat)]  # fmt: skip
        r["full_s"] = min(x["seconds"] for x in runs)
        r["full_mib_s"] = args.size_mib / r["full_s"]
        r["full_durable_mib_s"] = args.size_mib / min(x["durable"] for x in runs)
        r["full_alloc"] = runs[0]["target_alloc"]
        r["rss_full"] = vm_hwm(pid)
        runs = [await backup(d, f"sparse{i}", "sparse", work / "tgt.img", size)
                for i in range(args.repeat)]  # fmt: skip
        r["sparse_s"] = min(x["seconds"] for x in runs)
        r["sparse_durable_s"] = min(x["durable"] for x in runs)
        r["sparse_alloc"] = max(x["target_alloc"] for x in runs)
        r["rss_sparse"] = vm_hwm(pid)
        base = await fio(d, "base", size, args.runtime, None)
        r["base_rate"], r["base_p99"] = base["rate"], base["p99"]
        r["rss_fio"] = vm_hwm(pid)
        job = await fio(d, "job", size, args.runtime, work / "tgt.img")
        r.update({f"job_{k}": v for k, v in job.items()})
        r["rss_peak"] = vm_hwm(pid)
    return r


def report(size_mib: int, src_alloc: int, qsd: dict[str, float], ours: dict[str, float]) -> None:
    def ratio(key: str) -> str:
        return f"{ours[key] / qsd[key]:.2f}x" if qsd[key] else "-"

    print(f"\n{size_mib} MiB images, raw -> fresh raw target, warm page cache")
    print(f"{'':44} {'qsd':>12} {'ours':>12} {'ours/qsd':>9}")

    def row(label: str, key: str, fmt: str, scale: float = 1.0) -> None:
        q, o = qsd[key] / scale, ours[key] / scale
        print(f"{label:44} {q:>12{fmt}} {o:>12{fmt}} {ratio(key):>9}")

    row("1. full backup, random data: MiB/s", "full_mib_s", ".0f")
    row("   until the target is closed (flushed)", "full_durable_mib_s", ".0f")
    row("   target allocation (MiB)", "full_alloc", ".1f", MiB)
    row("2. full backup, 75% holes: seconds", "sparse_s", ".2f")
    row("   until the target is closed (flushed)", "sparse_durable_s", ".2f")
    row(f"   target allocation (MiB; source {src_alloc / MiB:.1f})", "sparse_alloc", ".1f", MiB)
    row("3. fio 4k randwrite QD16, no backup: IOPS", "base_rate", ".0f")
    row("   p99 (ms)", "base_p99", ".2f")
    row("   during backup (job window): IOPS", "job_rate", ".0f")
    row("   p99 (ms)", "job_p99", ".2f")
    row("   job window (s)", "job_seconds", ".2f")
    row("   same run, before the job: IOPS", "job_before_rate", ".0f")
    for r in (qsd, ours):
        r["slow_rate"] = r["job_rate"] / r["base_rate"]
        r["slow_p99"] = r["job_p99"] / r["base_p99"]
    row("   CBW slowdown: rate during / without", "slow_rate", ".3f")
    row("   CBW slowdown: p99 during / without", "slow_p99", ".1f")
    row("4. peak RSS after backups (MiB)", "rss_sparse", ".1f", MiB)
    row("   peak RSS over the whole run (MiB)", "rss_peak", ".1f", MiB)
    for r in (qsd, ours):
        if r["job_seconds"] < 1.0:
            print(f"note: a job window is under 1 s ({r['job_seconds']:.2f} s): "
                  "use a larger --size-mib")  # fmt: skip

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    print("\ngoals (ours; qsd for reference)")
    goals = [
        ("backup throughput >= qsd (to durable)",
         f"{ours['full_durable_mib_s'] / qsd['full_durable_mib_s']:.2f}x "
         f"(to COMPLETED {ours['full_mib_s'] / qsd['full_mib_s']:.2f}x)",
         ours["full_durable_mib_s"] >= qsd["full_durable_mib_s"]),
        ("guest rate during backup >= 0.5x", f"{ours['slow_rate']:.2f}x "
         f"(qsd {qsd['slow_rate']:.3f}x)", ours["slow_rate"] >= 0.5),
        ("guest p99 during backup <= 10x", f"{ours['slow_p99']:.1f}x "
         f"(qsd {qsd['slow_p99']:.0f}x)", ours["slow_p99"] <= 10),
        ("75%-sparse target as sparse as source", f"{ours['sparse_alloc'] / MiB:.1f} MiB vs "
         f"{src_alloc / MiB:.1f} MiB (qsd {qsd['sparse_alloc'] / MiB:.0f})",
         ours["sparse_alloc"] <= src_alloc + max(MiB, src_alloc / 100)),
        ("daemon RSS < 150 MiB", f"{ours['rss_peak'] / MiB:.0f} MiB "
         f"(qsd {qsd['rss_peak'] / MiB:.0f})", ours["rss_peak"] < 150 * MiB),
    ]  # fmt: skip
    for label, value, ok in goals:
        print(f"  {label:40} {value:36} {verdict(ok)}")


async def amain(args: argparse.Namespace) -> None:
    size = args.size_mib * MiB
    work = Path(args.dir or tempfile.mkdtemp(prefix="bb-vs-qsd-"))
    try:
        src, sparse = work / "src.img", work / "sparse.img"
        make_random(src, size)
        make_sparse(sparse, size)
        src_alloc = allocated(sparse)
        results = {}
        for name, command in (("qsd", [QSD]), ("ours", OURS)):
            load = os.getloadavg()[0]
            results[name] = await measure(name, command, work / name, src, sparse, args)
            # Other work on the machine skews the comparison: say how busy it was.
            print(f"measured {name}: load average {load:.1f} before, "
                  f"{os.getloadavg()[0]:.1f} after", flush=True)  # fmt: skip
        report(args.size_mib, src_alloc, results["qsd"], results["ours"])
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=2048, help="image size (2048)")
    parser.add_argument("--repeat", type=int, default=2, help="backups per image, best kept")
    parser.add_argument("--runtime", type=float, default=10.0, help="fio seconds (10)")
    parser.add_argument("--dir", default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args()
    for tool in ("fio", QSD):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not installed")
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
