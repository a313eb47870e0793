"""The repository on a local S3 server (rclone serve s3) against the same on a directory.

One image (half random, a quarter zeroes, a quarter text), backed up, restored and verified
into a directory repository and into an s3:// repository on a local ``rclone serve s3``
(fetched from PyPI as the tests do), in one run, through the CLI as a user runs it. Prints
throughputs, the S3/directory ratios (goals: backup and restore >= 0.7x), the CPU time of
each command (ours, and the S3 server's: it runs on the same cores) and S3 requests per GiB
of image for each command, and each command's peak RSS (goal, issue 14: < 200 MiB).
Restores and verifies read a cold page cache on both sides.

    ./dev bench s3_vs_dir [--size 512M] [--rounds 1]
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

sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
from testkit.s3server import client_env, start_server

HERE = Path(__file__).resolve().parent

BB = [sys.executable, "-m", "blockbackup"]
MiB = 1 << 20
GiB = 1 << 30


def settle(cold: bool) -> None:
    """Write back the page cache; ``cold``: drop it too (as root), so that a restore or a
    verify reads the disk on both sides. A directory repository's packs are written past
    the page cache, the server's files are not: warm, S3 would read from memory where the
    directory reads the disk."""
    os.sync()
    if cold:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError as exc:
            print(f"(cannot drop the page cache: {exc.strerror}; not a cold run)")


def make_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(size // 2))
        f.write(bytes(size // 4))
        line = b"the quick brown fox jumps over the lazy dog 0123456789\n"
        rest = size - size // 2 - size // 4
        f.write((line * (rest // len(line) + 1))[:rest])


def run(
    args: list[str], env: dict[str, str], work: Path
) -> tuple[float, float, int, dict[str, object]]:
    """Wall seconds, CPU seconds (user + system) and peak RSS of the command (through
    ``_rss.py``: its own, not inherited from this process), and its JSON output."""
    result = work / "rss.json"
    wrapped = [sys.executable, str(HERE / "_rss.py"), str(result), *BB, *args, "--json"]
    proc = subprocess.run(wrapped, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(args)}: {proc.stderr}")
    measured = json.loads(result.read_text())
    return measured["seconds"], measured["cpu"], measured["maxrss"], json.loads(proc.stdout)


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a running process (the S3 server shares this machine's cores:
    what it spends is taken from the client, which the directory case does not pay)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def per_gib(requests: object, size: int) -> str:
    if not isinstance(requests, dict):
        return "-"
    total = sum(v for k, v in requests.items() if k != "retried-body")
    detail = " ".join(f"{k}={v}" for k, v in sorted(requests.items()))
    return f"{total * GiB / size:.0f}/GiB ({detail})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="512M", help="image size (K/M/G suffix)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat and keep the best")
    opts = parser.parse_args()
    from blockbackup.cli.sizes import parse_size

    size = parse_size(opts.size)
    work = Path(tempfile.mkdtemp(prefix="bb-s3bench-"))
    server = start_server(work / "s3root", work / "rclone.log")
    try:
        server.bucket("bench")
        img = work / "disk.img"
        make_image(img, size)
        env = client_env(server.endpoint)
        env["BB_CACHE_DIR"] = str(work / "cache")
        results: dict[str, dict[str, float]] = {"dir": {}, "s3": {}}
        client_cpu: dict[str, dict[str, float]] = {"dir": {}, "s3": {}}
        peak_rss: dict[str, dict[str, int]] = {"dir": {}, "s3": {}}
        requests: dict[str, object] = {}
        server_cpu: dict[str, float] = {}
        for rnd in range(opts.rounds):
            for kind in ("dir", "s3"):
                repo = str(work / f"dir{rnd}") if kind == "dir" else f"s3://bench/r{rnd}"
                shutil.rmtree(work / "cache", ignore_errors=True)
                subprocess.run(
                    [*BB, "repo", "init", repo, "--no-encryption"],
                    env=env,
                    check=True,
                    capture_output=True,
                )
                steps = {
                    "backup": ["backup", str(img), "--repo", repo, "--name", "disk"],
                    "restore": ["restore", "--repo", repo, "latest", str(work / "out.img")],
                    "verify": ["verify", "--repo", repo],
                }
                for step, argv in steps.items():
                    (work / "out.img").unlink(missing_ok=True)
                    settle(cold=step != "backup")
                    before = cpu_seconds(server.process.pid)
                    elapsed, cpu, rss, out = run(argv, env, work)
                    spent = cpu_seconds(server.process.pid) - before
                    best = results[kind].get(step)
                    results[kind][step] = elapsed if best is None else min(best, elapsed)
                    client_cpu[kind][step] = min(client_cpu[kind].get(step, cpu), cpu)
                    peak_rss[kind][step] = max(peak_rss[kind].get(step, rss), rss)
                    if kind == "s3":
                        requests[step] = out.get("requests")
                        server_cpu[step] = min(server_cpu.get(step, spent), spent)
        print(f"image {size / MiB:.0f} MiB, best of {opts.rounds}; rclone serve s3 on loopback")
        print(
            f"{'':8} {'directory':>12} {'s3':>12} {'ratio':>7}"
            f" {'CPU: dir':>9} {'s3':>6} {'server':>6} {'RSS: dir':>9} {'s3':>6}  s3 requests"
        )
        for step in ("backup", "restore", "verify"):
            d, s = results["dir"][step], results["s3"][step]
            ours = client_cpu["dir"][step], client_cpu["s3"][step]
            cpu = f"{ours[0]:7.2f} s {ours[1]:6.2f} {server_cpu[step]:6.2f}"
            rss = f"{peak_rss['dir'][step] / MiB:6.0f} M {peak_rss['s3'][step] / MiB:5.0f} M"
            print(
                f"{step:8} {size / MiB / d:8.1f} MiB/s {size / MiB / s:8.1f} MiB/s"
                f" {d / s:6.2f}x {cpu} {rss}  {per_gib(requests.get(step), size)}"
            )
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
