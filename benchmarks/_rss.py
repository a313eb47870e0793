"""Run a command; write its wall and CPU seconds and its own peak RSS (``wait4``) as JSON.

Why a wrapper: a child started from a big process by vfork (``subprocess``, ``posix_spawn``)
inherits that process's RSS high-water mark at ``exec``, so ``ru_maxrss`` would report the
benchmark's peak, not the command's. This small process is the one the command is spawned
from, so the floor is its own few MiB.

Usage: ``python _rss.py RESULT.json COMMAND [ARG...]`` (exits with the command's status).
"""

from __future__ import annotations

import json
import os
import sys
import time

if __name__ == "__main__":
    result, argv = sys.argv[1], sys.argv[2:]
    start = time.perf_counter()
    pid = os.posix_spawnp(argv[0], argv, os.environ)
    _pid, status, usage = os.wait4(pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    with open(result, "w") as f:
        cpu = usage.ru_utime + usage.ru_stime
        json.dump(
            {"seconds": seconds, "cpu": cpu, "maxrss": usage.ru_maxrss * 1024, "code": code}, f
        )
    sys.exit(code if code >= 0 else 1)
