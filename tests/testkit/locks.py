"""What image locks a file carries, read from the kernel (``/proc/locks``), and holders.

Why from the kernel: a test of image locking must not believe the code under test about
which locks it holds; ``/proc/locks`` lists every byte-range lock on the machine with the
file's device and inode, whoever holds it.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def lock_bytes(path: Path) -> set[int]:
    """Every byte of ``path`` that some process holds an OFD or POSIX lock on."""
    st = os.stat(path)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    held: set[int] = set()
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:  # a waiter, not a holder
                continue
            try:
                at = fields.index(ident)
            except ValueError:
                continue
            start, end = fields[at + 1], fields[at + 2]
            stop = int(end) if end != "EOF" else int(start) + 1024
            held.update(range(int(start), stop + 1))
    return held


def wait_for_locks(path: Path, expect: set[int], timeout: float = 15.0) -> None:
    """Poll until the locks on ``path`` are exactly ``expect`` (locks are taken one byte
    at a time: seeing some is not seeing all)."""
    deadline = time.monotonic() + timeout
    while (held := lock_bytes(path)) != expect:
        if time.monotonic() > deadline:
            raise TimeoutError(f"locks on {path}: {sorted(held)}, never {sorted(expect)}")
        time.sleep(0.01)


#: What qemu-io (read-write, no -U) holds on an image file, by format.
QEMU_IO_LOCKS = {"qcow2": {100, 101, 103, 201, 203}, "raw": {100, 101}}


class QemuIoHolder:
    """An interactive ``qemu-io`` that keeps an image open (and locked) until closed.

    Read-write, no other options: it holds :data:`QEMU_IO_LOCKS` once open.
    """

    def __init__(self, path: Path, fmt: str) -> None:
        self.path = path
        self.proc = subprocess.Popen(
            ["qemu-io", "-f", fmt, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 15
        while lock_bytes(path) != QEMU_IO_LOCKS[fmt]:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"qemu-io exited: {err}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError("qemu-io never locked the image")
            time.sleep(0.01)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # end of input: qemu-io quits and closes the image
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> QemuIoHolder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class DaemonHolder:
    """A process (qemu-storage-daemon) that keeps ``path`` locked with ``expect`` until
    closed (SIGTERM)."""

    def __init__(self, argv: list[str], path: Path, expect: set[int]) -> None:
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            wait_for_locks(path, expect)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
