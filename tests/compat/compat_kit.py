"""The differential scenario runner: one scenario, two daemons, compared transcripts.

Why: blockbackup must be a drop-in for qemu-storage-daemon 7.2. Each scenario is an async
function driving a daemon through a :class:`Recorder`; the runner starts
qemu-storage-daemon and blockbackup with the *same* command line (images in separate
directories), runs the scenario against both concurrently, and returns both transcripts:

* replies, in order, exactly (error classes and texts included), with values a scenario
  marks volatile (progress while running) masked;
* events per job/export, in order, without timestamps and without the paused/running
  ``JOB_STATUS_CHANGE`` pairs QEMU emits around every command it runs;
* the final images, compared with ``qemu-img compare``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import ConnectError, ExecInterruptedError, ExecuteError, QMPClient

QSD = shutil.which("qemu-storage-daemon")
QEMU_IMG = shutil.which("qemu-img")
OURS = [sys.executable, "-m", "blockbackup", "daemon"]
MiB = 1 << 20
#: Events whose data identify a job (or export) to group sequences by.
_KEYS = {"id", "device"}
#: How often a scenario is run when qemu-storage-daemon crashed under it (see DaemonDied).
REFERENCE_RUNS = 3
_CRASH_CODES = {-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS}
_log = logging.getLogger(__name__)


class DaemonDied(Exception):
    """A daemon exited while a scenario needed it; its exit code and the end of its stderr.

    qemu-storage-daemon 7.2 segfaults now and then (in ``qio_channel_create_watch``
    under ``g_main_context_prepare``: a monitor socket's watch outliving its channel). Seen in
    CI at connect time, as a socket refusing every connection until the timeout, and in a
    loop of the compat tests here with a core dump. A run with a crashed reference compares
    nothing, so :func:`compare` runs the scenario again rather than fail the test.
    """

    def __init__(self, name: str, returncode: int, stderr: bytes) -> None:
        if returncode < 0:
            how = f"signal {signal.Signals(-returncode).name}"
        else:
            how = f"exit {returncode}"
        tail = stderr.decode(errors="replace").strip()[-500:]
        super().__init__(f"{name} died ({how}){': ' + tail if tail else ''}")
        self.name = name
        self.returncode = returncode

    @property
    def crashed(self) -> bool:
        return self.returncode in _CRASH_CODES


async def _died(name: str, proc: asyncio.subprocess.Process) -> DaemonDied:
    err = await proc.stderr.read() if proc.stderr else b""
    assert proc.returncode is not None
    return DaemonDied(name, proc.returncode, err)


def make_images(directory: Path, *, size: int = 4 * MiB, target_size: int | None = None) -> None:
    """``src.img`` with deterministic random data (and a hole), ``tgt.img`` empty."""
    rng = random.Random(42)
    data = bytearray(rng.randbytes(size))
    data[size // 2 : size // 2 + MiB] = bytes(MiB)  # a zero region
    (directory / "src.img").write_bytes(data)
    with open(directory / "tgt.img", "wb") as f:
        f.truncate(target_size if target_size is not None else size)
    with open(directory / "small.img", "wb") as f:
        f.truncate(MiB)


def base_args(directory: Path) -> list[str]:
    """The usual command line: src and tgt (raw over file) and one monitor."""
    return [
        "--blockdev",
        f"driver=file,node-name=srcf,filename={directory}/src.img",
        "--blockdev",
        "driver=raw,node-name=src,file=srcf",
        "--blockdev",
        json.dumps(
            {
                "driver": "raw",
                "node-name": "tgt",
                "file": {"driver": "file", "filename": f"{directory}/tgt.img"},
            }
        ),
        "--chardev",
        f"socket,id=mon0,path={directory}/qmp.sock,server=on,wait=off",
        "--monitor",
        "chardev=mon0",
    ]


@dataclass
class Transcript:
    """What a scenario observed on one daemon."""

    replies: list[Any] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    notes: list[Any] = field(default_factory=list)
    exit_code: int | None = None

    def event_sequences(self) -> dict[str, list[Any]]:
        """Events grouped by job/export id, flaps removed, timestamps dropped."""
        groups: dict[str, list[Any]] = {}
        for ev in self.events:
            data = ev.get("data", {})
            key = next((str(data[k]) for k in ("id", "device") if k in data), "")
            item: Any = ev["event"]
            if ev["event"] == "JOB_STATUS_CHANGE":
                item = data["status"]
            elif data:
                item = [ev["event"], {k: v for k, v in data.items() if k not in _KEYS}]
            groups.setdefault(key, []).append(item)
        for key, seq in groups.items():
            groups[key] = _drop_flaps(seq)
        return groups


def _drop_flaps(seq: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in seq:
        if item == "running" and out and out[-1] == "paused":
            out.pop()
            continue
        out.append(item)
    return out


class Recorder:
    """The scenario's handle on one daemon."""

    def __init__(self, name: str, directory: Path, client: QMPClient, proc: Any) -> None:
        self.name = name
        self.dir = directory
        self.client = client
        self.proc = proc
        self.t = Transcript()
        self._seen = 0
        self._new_event = asyncio.Event()

    async def _collect(self) -> None:
        async for event in self.client.events:
            self.t.events.append(dict(event))
            self._new_event.set()

    async def cmd(
        self, name: str, args: dict[str, Any] | None = None, *, volatile: Sequence[str] = ()
    ) -> Any:
        """Execute and record the reply (volatile keys masked, at any depth)."""
        try:
            result: Any = await self.client.execute(name, args)
            entry: Any = {"return": _mask(result, set(volatile))}
        except ExecuteError as exc:
            entry = {"error": {"class": exc.error_class, "desc": exc.error.error.desc}}
            result = entry
        self.t.replies.append([name, entry])
        return result

    async def wait_event(self, name: str, timeout: float = 20.0, **match: Any) -> dict[str, Any]:
        """Wait for an event (emitted at any time since the scenario started)."""
        async with asyncio.timeout(timeout):
            while True:
                for ev in self.t.events[self._seen :]:
                    self._seen += 1
                    data = ev.get("data", {})
                    if ev["event"] == name and all(data.get(k) == v for k, v in match.items()):
                        return ev
                self._new_event.clear()
                await self._new_event.wait()

    async def wait_status(self, job: str, status: str, timeout: float = 20.0) -> None:
        await self.wait_event("JOB_STATUS_CHANGE", timeout, id=job, status=status)

    def note(self, value: Any) -> None:
        """Record a value the scenario computed (compared like replies)."""
        self.t.notes.append(value)


def _normalize(value: Any, directory: Path) -> Any:
    """Paths of the daemon's directory become ``<dir>``; auto node names ``#block``."""
    text = json.dumps(value).replace(str(directory), "<dir>")
    return json.loads(re.sub(r"#block[0-9]+", "#block", text))


def _mask(value: Any, volatile: set[str]) -> Any:
    if not volatile:
        return value
    if isinstance(value, dict):
        return {k: ("*" if k in volatile else _mask(v, volatile)) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v, volatile) for v in value]
    return value


Scenario = Callable[[Recorder], Awaitable[None]]
#: Seconds one connection attempt may take (a session answers in milliseconds).
ATTEMPT = 3.0


async def _connect(
    name: str, sock: Path, proc: asyncio.subprocess.Process | None = None
) -> QMPClient:
    """Connect, retrying while the daemon is still starting.

    qemu-storage-daemon creates its socket file before it listens (a client can get
    ECONNREFUSED) and has been seen to fail the first capabilities negotiation right
    after startup; retries end at the caller's timeout. qemu.qmp reports such a failure
    as a ConnectError, or (seen in CI and in a fresh clone, against qemu-storage-daemon)
    as an AssertionError of its own state check after the failed negotiation, or as the
    EOFError of the connection the daemon closed meanwhile. The client is disconnected
    either way, so that its socket does not leak into the next test; that disconnect
    re-raises what the client's reader saw (seen in CI: the EOFError of the closed
    connection), which is the failure already being retried, so it is not raised again.
    The session that follows such a failure has been seen reset too, at its first
    command: a session counts once it answered ``query-version``. A daemon that died
    (``proc``) is :class:`DaemonDied` at once, not refused connections until the timeout.
    And once (a fresh clone, against qemu-storage-daemon) the negotiation neither
    finished nor failed: the client's reader waited on a closed connection until the
    caller's 15 s were gone. So each attempt has ``ATTEMPT`` seconds, then is retried.
    """
    while True:
        if proc is not None and proc.returncode is not None:
            raise await _died(name, proc)
        client = QMPClient(name)
        try:
            async with asyncio.timeout(ATTEMPT):
                await client.connect(str(sock))
                await client.execute("query-version")
        except (
            ConnectError,
            AssertionError,
            EOFError,
            ExecInterruptedError,
            OSError,
            TimeoutError,
        ):
            with contextlib.suppress(ConnectError, AssertionError, EOFError, OSError):
                await client.disconnect()
            await asyncio.sleep(0.05)
            continue
        return client


async def run_one(
    name: str,
    command: list[str],
    directory: Path,
    scenario: Scenario,
    args: list[str],
    *,
    quit_at_end: bool = True,
) -> Transcript:
    """Start one daemon in ``directory``, run ``scenario``, stop it; its transcript."""
    proc = await asyncio.create_subprocess_exec(
        *command,
        *args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=directory,
    )
    try:
        try:
            return await _drive(name, directory, scenario, proc, quit_at_end=quit_at_end)
        except Exception as exc:
            if not isinstance(exc, DaemonDied):
                with contextlib.suppress(TimeoutError):  # did the daemon die under it?
                    async with asyncio.timeout(1):
                        await proc.wait()
                if proc.returncode in _CRASH_CODES:
                    raise await _died(name, proc) from exc
            raise
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def _drive(
    name: str,
    directory: Path,
    scenario: Scenario,
    proc: asyncio.subprocess.Process,
    *,
    quit_at_end: bool,
) -> Transcript:
    """Connect to the started daemon, run ``scenario``, quit it; its transcript."""
    sock = directory / "qmp.sock"
    async with asyncio.timeout(15):
        while not sock.exists():
            if proc.returncode is not None:
                raise await _died(name, proc)
            await asyncio.sleep(0.02)
        client = await _connect(name, sock, proc)
    rec = Recorder(name, directory, client, proc)
    collector = asyncio.create_task(rec._collect())
    try:
        try:
            await scenario(rec)
        finally:
            rec.t.replies = _normalize(rec.t.replies, directory)
            rec.t.notes = _normalize(rec.t.notes, directory)
        if quit_at_end and proc.returncode is None:
            with contextlib.suppress(Exception):
                await client.execute("quit")
        async with asyncio.timeout(15):
            rec.t.exit_code = await proc.wait()
        if rec.t.exit_code in _CRASH_CODES:
            raise await _died(name, proc)
        await asyncio.sleep(0)  # let the collector take the last events
    finally:
        collector.cancel()
        with contextlib.suppress(BaseException):
            await collector
        with contextlib.suppress(Exception):
            await client.disconnect()
    return rec.t


async def compare(
    tmp: Path,
    scenario: Scenario,
    *,
    setup: Callable[[Path], None] = make_images,
    args: Callable[[Path], list[str]] = base_args,
    quit_at_end: bool = True,
) -> tuple[Transcript, Transcript]:
    """Run ``scenario`` against both daemons at once; (reference, ours).

    Both run again, on fresh images, when qemu-storage-daemon crashed (:class:`DaemonDied`).
    """
    assert QSD is not None
    for attempt in range(1, REFERENCE_RUNS + 1):
        dirs = []
        for sub in ("qsd", "ours"):
            d = tmp / sub
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
            setup(d)
            dirs.append(d)
        ref, ours = await asyncio.gather(
            run_one("qsd", [QSD], dirs[0], scenario, args(dirs[0]), quit_at_end=quit_at_end),
            run_one("ours", OURS, dirs[1], scenario, args(dirs[1]), quit_at_end=quit_at_end),
            return_exceptions=True,
        )
        if isinstance(ref, DaemonDied) and ref.crashed and attempt < REFERENCE_RUNS:
            _log.warning("the reference crashed, running the scenario again: %s", ref)
            continue
        if isinstance(ref, BaseException):
            raise ref
        if isinstance(ours, BaseException):
            raise ours
        return ref, ours
    raise AssertionError("unreachable")


def images_identical(a: Path, b: Path) -> bool:
    """``qemu-img compare`` of two raw images."""
    assert QEMU_IMG is not None
    res = subprocess.run(
        [QEMU_IMG, "compare", "-f", "raw", "-F", "raw", str(a), str(b)],
        capture_output=True,
        check=False,
    )
    return res.returncode == 0


def assert_same(ref: Transcript, ours: Transcript) -> None:
    """Replies, notes, event sequences and exit codes must be equal (diff on failure)."""
    problems = diff(ref, ours)
    if problems:
        raise AssertionError("\n".join(problems))


def diff(ref: Transcript, ours: Transcript) -> list[str]:
    """Human-readable differences, reference first."""
    out: list[str] = []
    for kind, a, b in (
        ("reply", ref.replies, ours.replies),
        ("note", ref.notes, ours.notes),
    ):
        for i in range(max(len(a), len(b))):
            x = a[i] if i < len(a) else None
            y = b[i] if i < len(b) else None
            if x != y:
                out.append(f"{kind} {i}:\n  qsd:  {json.dumps(x)}\n  ours: {json.dumps(y)}")
    ea, eb = ref.event_sequences(), ours.event_sequences()
    out.extend(
        f"events {key!r}:\n  qsd:  {json.dumps(ea.get(key))}\n  ours: {json.dumps(eb.get(key))}"
        for key in sorted(set(ea) | set(eb))
        if ea.get(key) != eb.get(key)
    )
    if ref.exit_code != ours.exit_code:
        out.append(f"exit code: qsd {ref.exit_code}, ours {ours.exit_code}")
    return out


def env_ok() -> bool:
    return QSD is not None and QEMU_IMG is not None and os.name == "posix"
