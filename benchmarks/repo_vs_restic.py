"""The repository against restic and borg: the same image, the same changes, one run.

Why: issue 14 sets the repository's goals relative to restic and borg (Debian's, each with
its defaults plus encryption) measured on the same machine: first backup >= 4x restic's
throughput and >= 5x borg's; a second backup after ~2% changed >= 20x faster than restic's
with a dirty bitmap (storing <= 0.2x what restic stores) and >= 3x without one (the image
read whole and compared with its previous snapshot); restore >= 3x restic's; verify >= 3x
``restic check --read-data``; every command's peak RSS < 200 MiB.

The image: SIZE bytes in 1 MiB blocks, half random data, a quarter holes (real holes of a
sparse file), a quarter text (lines drawn at random from a pool: compressible, not
repeating). The change: 10 clustered runs of random data (together 1.5% of the image) plus
scattered random 4 KiB writes (0.5%), about 2% in all.

Order: ours (CLI) first backup, restic's, borg's; then the changes are written into the
image through a node with a dirty bitmap and our incremental runs from that bitmap (in a
child process through the library: ``_repo_bitmap.py``; the live CLI path runs the same job
in a daemon); then restic's and borg's second backups and ours without a bitmap (the CLI,
``--base`` = the first snapshot, so it compares with the same snapshot restic's parent is).
Then restore (ours, restic's) and verify (ours, ``restic check --read-data``), each from a
cold page cache (dropped before each, as root): a restore or a verify days after the backup
reads the disk, and ours writes packs past the page cache anyway. Last, the floors of a
first backup on this machine (``floors.py``) against the goals' budgets.

Every command runs as a child process; wall time and the child's own peak RSS come from
``os.wait4``. Stored bytes: growth of the repository directory. Before each timed command
the page cache is written back and free memory warmed (``_settle``); the image stays in the
page cache for every tool's backups alike.

Usage (``./dev bench repo_vs_restic --size 512M`` while iterating)::

    .venv/bin/python benchmarks/repo_vs_restic.py [--size 2G] [--keep DIR]
"""

from __future__ import annotations

import argparse
import compileall
import filecmp
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import floors
from _repo_image import BLOCK, make_image, parse_size
from _settle import settle

MiB = 1 << 20
PASSPHRASE = "benchmark passphrase"
HERE = Path(__file__).resolve().parent
OURS = [str(Path(sys.executable).with_name("blockbackup"))]
RSS_LIMIT = 200 * MiB


@dataclass
class Run:
    tool: str
    what: str
    seconds: float
    rss: int  # bytes
    cpu: float = 0.0  # user + system seconds of the command
    stored: int | None = None
    note: str = ""
    output: str = ""


# --------------------------------------------------------------------------- setup


def ensure_packages() -> None:
    """restic and borg from Debian when missing (as ``./dev`` installs its packages)."""
    missing = [
        pkg
        for cmd, pkg in (("restic", "restic"), ("borg", "borgbackup"))
        if shutil.which(cmd) is None
    ]
    if not missing:
        return
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    print(f"installing {' '.join(missing)}", file=sys.stderr)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run([*sudo, "apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
        check=True,
        env=env,
    )


def compile_ours() -> None:
    """Byte-compile our package once, as ``pip install`` does: with
    ``PYTHONDONTWRITEBYTECODE`` set (as in some shells) an editable checkout is otherwise
    compiled from source by every command, ~0.12 s each that no installed copy pays."""
    spec = importlib.util.find_spec("blockbackup")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            compileall.compile_dir(location, quiet=1)


def make_changes(size: int, rng: random.Random) -> list[list[int]]:
    """[offset, length, seed]: 10 clustered runs (1.5% of the image) and scattered 4 KiB
    writes (0.5%), 4 KiB aligned, as a guest's writes are."""
    changes: list[list[int]] = []
    run = (size * 15 // 1000 // 10) & ~4095
    for _ in range(10):
        offset = rng.randrange(0, size - run) & ~4095
        changes.append([offset, run, rng.randrange(1 << 30)])
    scattered = size * 5 // 1000 // 4096
    changes += [
        [rng.randrange(0, size // 4096) * 4096, 4096, rng.randrange(1 << 30)]
        for _ in range(scattered)
    ]
    return changes


# --------------------------------------------------------------------------- measuring


def measure(
    tool: str, what: str, argv: list[str], env: dict[str, str], cwd: Path, size_hint: int
) -> Run:
    """Run ``argv`` to completion: wall seconds and its peak RSS (``wait4``)."""
    settle(size_hint)
    result = cwd / "rss.json"
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        wrapped = [sys.executable, str(HERE / "_rss.py"), str(result), *argv]
        proc = subprocess.run(wrapped, env=env, cwd=cwd, stdout=out, stderr=err, check=False)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    measured = json.loads(result.read_text())
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{stderr}{stdout}")
    return Run(tool, what, measured["seconds"], measured["maxrss"], measured["cpu"], output=stdout)


def tree_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def stored(run: Run, repo: Path, before: int) -> int:
    run.stored = tree_size(repo) - before
    return run.stored


# --------------------------------------------------------------------------- the run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="2G", help="image size (default 2G, the issue's)")
    parser.add_argument("--keep", metavar="DIR", help="work in DIR and keep it")
    parser.add_argument("--seed", type=int, default=14)
    args = parser.parse_args()
    size = parse_size(args.size) // BLOCK * BLOCK
    ensure_packages()
    compile_ours()
    rng = random.Random(args.seed)
    work = Path(args.keep or tempfile.mkdtemp(prefix="bb-repo-bench-", dir="/var/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        run_all(work, size, rng)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def drop_caches() -> None:
    """Restores and verifies read their repository cold, as one does days after the
    backup: every tool's, so that none is measured from the page cache. (Ours writes packs
    past the page cache, so only this makes the tools' runs alike.) Needs root."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        print(f"  (cannot drop the page cache: {exc.strerror}; this run is not cold)")


def run_all(work: Path, size: int, rng: random.Random) -> None:
    image = work / "disk.img"
    print(f"image: {size / MiB:.0f} MiB (half random, a quarter holes, a quarter text)")
    make_image(image, size, rng)
    changes = make_changes(size, rng)
    changed = sum(c[1] for c in changes)
    (work / "changes.json").write_text(json.dumps(changes))
    ours_repo, restic_repo, borg_repo = work / "bb", work / "restic", work / "borg"
    env = dict(
        os.environ,
        BB_PASSPHRASE=PASSPHRASE,
        RESTIC_PASSWORD=PASSPHRASE,
        BORG_PASSPHRASE=PASSPHRASE,
        RESTIC_CACHE_DIR=str(work / "restic-cache"),
        BORG_BASE_DIR=str(work / "borg-base"),
        BORG_RELOCATED_REPO_ACCESS_IS_OK="yes",
        BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
    )
    secret = ["--passphrase-env", "BB_PASSPHRASE"]
    subprocess.run(
        [*OURS, "repo", "init", str(ours_repo), *secret],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    subprocess.run(
        ["restic", "-r", str(restic_repo), "init"], env=env, check=True, stdout=subprocess.DEVNULL
    )
    subprocess.run(
        ["borg", "init", "--encryption=repokey", str(borg_repo)],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    runs: list[Run] = []

    def go(tool: str, what: str, argv: list[str], repo: Path | None, cold: bool = False) -> Run:
        if cold:
            drop_caches()
        before = tree_size(repo) if repo is not None else 0
        run = measure(tool, what, argv, env, work, size)
        if repo is not None:
            stored(run, repo, before)
        runs.append(run)
        print(f"  {tool:7} {what:22} {run.seconds:7.2f} s  {run.rss / MiB:6.1f} MiB", flush=True)
        return run

    ours_backup = [*OURS, "backup", "disk.img", "--repo", str(ours_repo), *secret, "--json"]
    first = go("ours", "first backup", ours_backup, ours_repo)
    first_id = json.loads(first.output)["snapshot"]
    go(
        "restic",
        "first backup",
        ["restic", "-r", str(restic_repo), "backup", "disk.img"],
        restic_repo,
    )
    go("borg", "first backup", ["borg", "create", f"{borg_repo}::first", "disk.img"], borg_repo)

    print(
        f"changing {changed / MiB:.1f} MiB ({100 * changed / size:.1f}%): "
        f"10 runs + {len(changes) - 10} scattered 4 KiB writes"
    )
    before = tree_size(ours_repo)
    bitmap = go(
        "ours",
        "second, dirty bitmap",
        [
            sys.executable,
            str(HERE / "_repo_bitmap.py"),
            str(ours_repo),
            str(image),
            str(work / "changes.json"),
        ],
        None,
    )
    result = json.loads(bitmap.output)
    bitmap.stored = tree_size(ours_repo) - before
    bitmap.note = (
        f"library in-process, timed from target open to commit "
        f"({bitmap.seconds:.2f} s with process start and writing the changes; "
        f"CPU is the whole process's)"
    )
    bitmap.seconds = result["seconds"]
    restic2 = go(
        "restic",
        "second backup",
        ["restic", "-r", str(restic_repo), "backup", "disk.img"],
        restic_repo,
    )
    go("borg", "second backup", ["borg", "create", f"{borg_repo}::second", "disk.img"], borg_repo)
    nobitmap = go("ours", "second, no bitmap", [*ours_backup, "--base", first_id], ours_repo)
    nobitmap.note = "stored: its changes are already stored by the bitmap run (deduplicated)"

    out = work / "restored"
    out.mkdir()
    restore = go(
        "ours",
        "restore",
        [*OURS, "restore", "--repo", str(ours_repo), *secret, "latest", str(out / "ours.img")],
        None,
        cold=True,
    )
    restic_restore = go(
        "restic",
        "restore",
        ["restic", "-r", str(restic_repo), "restore", "latest", "--target", str(out / "restic")],
        None,
        cold=True,
    )
    if not filecmp.cmp(out / "ours.img", image, shallow=False):
        raise SystemExit("our restore differs from the image")
    shutil.rmtree(out)
    verify = go(
        "ours",
        "verify (all snapshots)",
        [*OURS, "verify", "--repo", str(ours_repo), *secret],
        None,
        cold=True,
    )
    restic_check = go(
        "restic",
        "check --read-data",
        ["restic", "-r", str(restic_repo), "check", "--read-data"],
        None,
        cold=True,
    )

    report(
        runs, size, first, bitmap, nobitmap, restic2, restore, restic_restore, verify, restic_check
    )
    # The least time this machine needs for a first backup's required work (the image
    # now holds the changes too: 2% of it, the same kinds of data).
    by = {(r.tool, r.what): r for r in runs}
    floors.report(
        image, by[("restic", "first backup")].seconds, by[("borg", "first backup")].seconds
    )


def report(
    runs: list[Run],
    size: int,
    first: Run,
    bitmap: Run,
    nobitmap: Run,
    restic2: Run,
    restore: Run,
    restic_restore: Run,
    verify: Run,
    restic_check: Run,
) -> None:
    by = {(r.tool, r.what): r for r in runs}
    print()
    print(
        f"{'tool':7} {'command':24} {'seconds':>8} {'MiB/s':>8} {'CPU s':>7} "
        f"{'stored MiB':>11} {'peak RSS':>9}"
    )
    for r in runs:
        stored_text = "" if r.stored is None else f"{r.stored / MiB:11.1f}"
        print(
            f"{r.tool:7} {r.what:24} {r.seconds:8.2f} {size / MiB / r.seconds:8.0f} "
            f"{r.cpu:7.2f} {stored_text:>11} {r.rss / MiB:7.1f} M"
        )
    for r in runs:
        if r.note:
            print(f"  {r.tool} {r.what}: {r.note}")
    restic1, borg1 = by[("restic", "first backup")], by[("borg", "first backup")]
    assert restic2.stored is not None
    assert bitmap.stored is not None
    speed = [
        ("first backup vs restic", restic1, first, 4.0),
        ("first backup vs borg", borg1, first, 5.0),
        ("second, bitmap, speed vs restic", restic2, bitmap, 20.0),
        ("second, no bitmap, speed vs restic", restic2, nobitmap, 3.0),
        ("restore vs restic", restic_restore, restore, 3.0),
        ("verify vs restic check --read-data", restic_check, verify, 3.0),
    ]
    print()
    print("goal (wall-time ratio; the CPU-time ratio is steadier on a loaded machine)")
    for name, theirs, ours, goal in speed:
        ratio = theirs.seconds / ours.seconds
        cpu = theirs.cpu / max(ours.cpu, 1e-3)
        verdict = "PASS" if ratio >= goal else "FAIL"
        print(f"{name:38} {ratio:7.2f}x  (goal >= {goal}x)  {verdict}   CPU {cpu:5.2f}x")
    stored_ratio = bitmap.stored / max(restic2.stored, 1)
    verdict = "PASS" if stored_ratio <= 0.2 else "FAIL"
    print(
        f"{'second, bitmap, stored vs restic':38} {stored_ratio:7.2f}x  (goal <= 0.2x)  {verdict}"
    )
    worst = max((r for r in runs if r.tool == "ours"), key=lambda r: r.rss)
    ok = worst.rss < RSS_LIMIT
    print(
        f"{'peak RSS of our commands (max)':38} {worst.rss / MiB:6.1f} MiB ({worst.what})"
        f"  (goal < 200 MiB)  {'PASS' if ok else 'FAIL'}"
    )


if __name__ == "__main__":
    main()
