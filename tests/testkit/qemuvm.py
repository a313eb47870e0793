"""A real QEMU for the vm tests: a paused q35 machine with qcow2 disks and three monitors
(one for blockbackup, one for the test, one for a writer thread), and a model of what its
disks must hold at any point of a sequence of writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp.legacy import QEMUMonitorProtocol

BLOCKBACKUP = str(Path(sys.executable).with_name("blockbackup"))
QEMU = shutil.which("qemu-system-x86_64")
MiB = 1024 * 1024
BLOCK = 64 * 1024


def run_bb(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BLOCKBACKUP, *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd
    )


def vm_backup(qmp: str, repo: str, scratch: Path, *extra: str) -> tuple[dict[str, Any], str]:
    """``vm backup --json`` to its end, which must be success: its result and stderr."""
    argv = ["vm", "backup", "--qmp", qmp, "--repo", repo, "--scratch-dir", str(scratch)]
    result = run_bb(*argv, "--json", *extra)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


@dataclass
class DiskSpec:
    node: str
    qdev: str
    path: Path
    size: int


class Vm:
    """One QEMU process; ``qmp`` (blockbackup's socket), ``ctl`` the test's monitor."""

    def __init__(self, tmp: Path, disks: list[DiskSpec], extra: list[str] | None = None) -> None:
        self.tmp = tmp
        self.disks = disks
        self.qmp = str(tmp / "qmp.sock")
        self.ctl_path = str(tmp / "ctl.sock")
        self.writer_path = str(tmp / "wr.sock")
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.ctl: QEMUMonitorProtocol | None = None
        #: Monitors of :class:`Writer` threads, closed with the VM.
        self.monitors: list[QEMUMonitorProtocol] = []

    def argv(self) -> list[str]:
        assert QEMU is not None
        argv = [QEMU, "-M", "q35", "-nodefaults", "-display", "none", "-name", "vm1"]
        for path in (self.qmp, self.ctl_path, self.writer_path):
            argv += ["-qmp", f"unix:{path},server=on,wait=off"]
        for d in self.disks:
            argv += [
                "-blockdev",
                f"driver=qcow2,node-name={d.node},file.driver=file,file.filename={d.path}",
                "-device",
                f"virtio-blk-pci,drive={d.node},id={d.qdev}",
            ]
        return argv + (self.extra or ["-S"])

    def start(self) -> Vm:
        for path in (self.qmp, self.ctl_path, self.writer_path):
            if os.path.exists(path):
                os.unlink(path)
        log = self.tmp / "qemu.log"
        with open(log, "ab") as out:
            self.proc = subprocess.Popen(self.argv(), stdout=out, stderr=out)
        deadline = time.monotonic() + 60
        while not all(os.path.exists(p) for p in (self.qmp, self.ctl_path, self.writer_path)):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU failed: {log.read_text()}")
            assert time.monotonic() < deadline, "QEMU did not start"
            time.sleep(0.05)
        self.ctl = QEMUMonitorProtocol(self.ctl_path)
        self.ctl.connect()
        return self

    def cmd(self, command: str, /, **args: Any) -> Any:
        assert self.ctl is not None
        reply = self.ctl.cmd_raw(command, args or None)
        if "error" in reply:
            raise RuntimeError(reply["error"]["desc"])
        return reply["return"]

    def quit(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.cmd("quit")
            except Exception:
                self.proc.kill()
            self.proc.wait(30)
        self._close_ctl()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)
        self._close_ctl()

    def _close_ctl(self) -> None:
        for mon in self.monitors:
            try:
                mon.close()
            except Exception:
                pass
        self.monitors.clear()
        if self.ctl is not None:
            try:
                self.ctl.close()
            except Exception:
                pass
            self.ctl = None
        self.proc = None

    # -- what tests look at ------------------------------------------------------------------

    def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        for n in self.cmd("query-named-block-nodes"):
            if n["node-name"] == node:
                return {b["name"]: b for b in n.get("dirty-bitmaps") or [] if "name" in b}
        raise KeyError(node)

    def ours_left(self) -> list[str]:
        """Anything of blockbackup's still in QEMU (must be nothing between runs)."""
        left = [e["id"] for e in self.cmd("query-block-exports")]
        left += [j["device"] for j in self.cmd("query-block-jobs")]
        left += [
            n["node-name"]
            for n in self.cmd("query-named-block-nodes")
            if n["node-name"].startswith("bbvm-")
        ]
        return left

    def nbd_server_running(self) -> bool:
        probe = str(self.tmp / "probe.sock")
        try:
            self.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": probe}})
        except RuntimeError as exc:
            if "already running" not in str(exc):
                raise
            return True
        self.cmd("nbd-server-stop")
        return False


def make_disk(tmp: Path, node: str, qdev: str, size: int) -> DiskSpec:
    path = tmp / f"{node}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    return DiskSpec(node, qdev, path, size)


@dataclass
class Write:
    disk: int
    block: int
    pattern: int


@dataclass
class Model:
    """Each disk's initial content and the ordered writes made to it through QEMU; a
    restored disk must equal the state after the first k writes, for one k for all disks."""

    initial: list[bytes]
    writes: list[Write] = field(default_factory=list)

    def state(self, disk: int, k: int) -> bytes:
        data = bytearray(self.initial[disk])
        for w in self.writes[:k]:
            if w.disk == disk:
                data[w.block * BLOCK : (w.block + 1) * BLOCK] = bytes([w.pattern]) * BLOCK
        return bytes(data)

    def interval(self, disk: int, image: bytes) -> tuple[int, int] | None:
        """The k (lo..hi, inclusive) whose state of ``disk`` equals ``image``, or None."""
        n = len(self.writes)
        initial = self.initial[disk]
        if len(image) != len(initial):
            return None
        history: dict[int, list[tuple[int, int]]] = {}
        for j, w in enumerate(self.writes):
            if w.disk == disk:
                history.setdefault(w.block, []).append((j, w.pattern))
        lo, hi = 0, n
        view, init = memoryview(image), memoryview(initial)
        for b in range(-(-len(image) // BLOCK)):  # the last block may be short
            got = view[b * BLOCK : (b + 1) * BLOCK]
            writes = history.get(b)
            if not writes:
                if got != init[b * BLOCK : (b + 1) * BLOCK]:
                    return None
                continue
            if got == init[b * BLOCK : (b + 1) * BLOCK]:
                lo, hi = lo, min(hi, writes[0][0])
                continue
            first = got[0]
            if bytes(got) != bytes([first]) * BLOCK:
                return None
            match = [m for m, (_, p) in enumerate(writes) if p == first]
            if not match:
                return None
            m = match[0]
            lo = max(lo, writes[m][0] + 1)
            hi = min(hi, writes[m + 1][0] if m + 1 < len(writes) else n)
        return (lo, hi) if lo <= hi else None


class Writer:
    """Writes 64 KiB blocks through a disk's own device (HMP qemu-io) from a thread, each
    block's pattern its write count, so a block names which write it holds."""

    def __init__(self, vm: Vm, model: Model, seed: int = 1) -> None:
        self.vm = vm
        self.model = model
        self.seed = seed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.count: dict[tuple[int, int], int] = {}
        self.error: BaseException | None = None
        self.mon = QEMUMonitorProtocol(vm.writer_path)
        self.mon.connect()
        vm.monitors.append(self.mon)

    def write(self, disk: int, block: int) -> None:
        n = self.count.get((disk, block), 0) + 1
        assert n < 255, "a block's pattern must name its write"
        self.count[(disk, block)] = n
        qdev = self.vm.disks[disk].qdev
        line = f'qemu-io -d {qdev}/virtio-backend "write -P {n} {block * BLOCK} {BLOCK}"'
        reply = self.mon.cmd_raw("human-monitor-command", {"command-line": line})
        assert "error" not in reply, reply
        assert "error" not in str(reply.get("return", "")).lower(), reply
        self.model.writes.append(Write(disk, block, n))

    def _loop(self) -> None:
        import random

        rng = random.Random(self.seed)
        try:
            while not self._stop.is_set():
                disk = rng.randrange(len(self.vm.disks))
                blocks = self.vm.disks[disk].size // BLOCK
                self.write(disk, rng.randrange(min(blocks, 256)))
        except BaseException as exc:  # reported by stop()
            self.error = exc

    @contextmanager
    def running(self) -> Iterator[Writer]:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        try:
            yield self
        finally:
            self._stop.set()
            self._thread.join(60)
            if self.error is not None:
                raise self.error

    def close(self) -> None:
        if self.mon in self.vm.monitors:
            self.vm.monitors.remove(self.mon)
        self.mon.close()
