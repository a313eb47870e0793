"""The repository commands keep freed buffers for reuse (``cli/heap.py``)."""

from __future__ import annotations

import subprocess
import sys

CHILD = """
import resource, sys, threading
from blockbackup.cli.heap import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def work():
    for _ in range(200):
        buffers = [bytearray(1 << 20) for _ in range(4)]  # as a copy's 1 MiB requests
        del buffers
def run():
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads: t.start()
    for t in threads: t.join()
run()  # the heaps grow once
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
run()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout)


def test_freed_buffers_are_reused_not_faulted_in_again() -> None:
    """3,200 MiB allocated and freed in four threads, after the heaps grew once: each
    buffer is fresh pages again by default (one page fault per 4 KiB: ~800,000), reused
    once the repository commands' thresholds are set."""
    kept = _faults("keep")
    assert kept < 20_000
    assert _faults("default") > 10 * kept
