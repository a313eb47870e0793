"""The repository's own tests again, with a known-address table that holds only 4 records
in memory: every other blob is found through the table's file (``knowntable.py``), as in a
repository of more than 32 GiB of unique data. gc's races, the randomized multi-process
test (SIGKILLs, prunes, gcs, verifies), bit rot and the reads all run over it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULES = ["test_gc.py", "test_concurrency.py", "test_chunk_reads.py", "test_library.py"]


def test_the_repository_tests_pass_with_the_table_in_its_file(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    env = {**os.environ, "BB_TABLE_MEMORY_RECORDS": "4", "BB_CACHE_DIR": str(cache)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--durations=0",
            "-rfE",
            "--tb=short",
            f"--basetemp={tmp_path / 'runs'}",
            *(str(HERE / module) for module in MODULES),
        ],
        cwd=HERE.parent.parent,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=280,
        check=False,
    )
    failures = proc.stdout.split("= FAILURES =")[-1].split("slowest durations")[0]
    summary = proc.stdout.split("short test summary info")[-1]
    assert proc.returncode == 0, failures[-8000:] + summary + proc.stderr[-2000:]
    assert " passed" in proc.stdout
    tables = list(cache.glob("*/table"))
    assert len(tables) > 10, tables  # the files were written, and used
