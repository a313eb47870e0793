"""Clear words, no tracebacks (issue 13, points 10 to 12, for backup, jobs and bitmaps).

Every user error is one line on stderr and a non-zero exit; options that would do nothing
are refused; sizes and rates are in one unit family; a sparse backup says what it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from testkit.backupcli import (
    BLOCKBACKUP,
    MiB,
    Served,
    assert_clean,
    assert_no_noise,
    bb,
    one_line,
    partials,
    random_image,
    running_job,
    serving,
    start,
    wait_until,
)

#: Root without the capabilities that bypass file permissions: permissions apply again.
NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]
needs_setpriv = pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    image = tmp_path / "disk.img"
    random_image(image, 4 * MiB)
    with serving([image], tmp_path / "run") as s:
        yield s


# -- point 10: one line on stderr, never a traceback ---------------------------------------


def test_a_missing_target_directory(served: Served, tmp_path: Path) -> None:
    run = bb("backup", "--connect", served.qmp, "disk", str(tmp_path / "no/such/b.img"),
             check=False)  # fmt: skip
    assert run.returncode == 1
    assert one_line(run.stderr) == f"blockbackup backup: no such directory: {tmp_path}/no/such"
    run = bb("backup", "--connect", served.qmp, "disk", str(tmp_path / "no/such/b.img"),
             "--json", check=False)  # fmt: skip
    result = json.loads(run.stdout)  # scripts get a result for every failure
    assert (result["status"], result["error"]) == (
        "failed",
        f"no such directory: {tmp_path}/no/such",
    )
    assert_clean(served.qmp, tmp_path)


def test_a_read_only_file_system(served: Served, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
                             capture_output=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs")
    try:
        run = bb("backup", "--connect", served.qmp, "disk", str(ro / "b.img"), check=False)
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    assert run.returncode == 1
    assert one_line(run.stderr) == (
        f"blockbackup backup: cannot create a file in {ro}: read-only file system"
    )
    assert_clean(served.qmp, tmp_path)


@needs_setpriv
def test_no_permission_to_write_the_target(served: Served, tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    run = bb("backup", "--connect", served.qmp, "disk", str(theirs / "b.img"),
             check=False, prefix=NO_DAC)  # fmt: skip
    assert run.returncode == 1
    assert one_line(run.stderr) == (
        f"blockbackup backup: cannot create a file in {theirs}: permission denied"
    )
    assert os.listdir(theirs) == []
    assert_clean(served.qmp, tmp_path)


@needs_setpriv
def test_a_daemon_that_cannot_open_the_file(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, 4 * MiB)
    hidden = tmp_path / "hidden"  # the command may write here, the daemon may not
    hidden.mkdir(mode=0o700)
    os.chown(hidden, 65534, 65534)
    with serving([image], tmp_path / "run", prefix=NO_DAC) as s:
        run = bb("backup", "--connect", s.qmp, "disk", str(hidden / "b.img"), check=False)
        assert run.returncode == 1
        line = one_line(run.stderr)
        assert line.startswith("blockbackup backup: the daemon cannot open the new target file")
        assert "Permission denied" in line
        assert os.listdir(hidden) == []
        assert_clean(s.qmp, tmp_path)


def test_a_daemon_that_was_killed(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    random_image(image, MiB)
    with serving([image], tmp_path / "run") as s:
        s.proc.kill()
        s.proc.wait(timeout=30)
    for command in (["backup", "disk", str(tmp_path / "b.img")], ["jobs"], ["bitmaps", "list"]):
        run = bb(command[0], "--connect", s.qmp, *command[1:], check=False)
        assert run.returncode == 1
        assert one_line(run.stderr) == (  # said once, by the command, not by the library
            f"blockbackup {command[0]}: cannot connect to {s.qmp}: connection refused "
            "(the daemon that made this socket is gone)"
        )
    assert partials(tmp_path) == []


@contextmanager
def hanging_up_daemon(path: str) -> Iterator[None]:
    """A monitor that greets, answers the capabilities negotiation, and hangs up, each time
    (qemu-storage-daemon was seen to do it once, right after it started)."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return  # closed: the test is over
            with conn:
                conn.sendall(b'{"QMP": {"version": {}, "capabilities": []}}\r\n')
                conn.recv(4096)
                conn.sendall(b'{"return": {}}\r\n')

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(timeout=10)


def test_a_daemon_that_hangs_up_after_negotiating(tmp_path: Path) -> None:
    """One line, exit 1: depending on when the hang-up is seen, while connecting or at the
    first command."""
    path = str(tmp_path / "qmp.sock")
    repo = tmp_path / "repo"
    bb("repo", "init", str(repo), "--no-encryption")
    commands = (
        ["backup", "disk", str(tmp_path / "b.img")],
        ["backup", "disk", "--repo", str(repo)],
        ["jobs"],
        ["bitmaps", "list"],
    )
    with hanging_up_daemon(path):
        for command in commands:
            run = bb(command[0], "--connect", path, *command[1:], check=False)
            assert run.returncode == 1
            assert one_line(run.stderr) in (
                f"blockbackup {command[0]}: cannot connect to {path}: "
                "the daemon hung up right after its greeting",
                f"blockbackup {command[0]}: lost the connection to the daemon at {path}",
            )
    assert partials(tmp_path) == []
    assert not (tmp_path / "b.img").exists()
    assert bb("snapshots", "--repo", str(repo)).stdout == "no snapshots\n"


def test_a_monitor_held_by_another_client(served: Served, tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as holder:
        holder.connect(served.qmp)  # the daemon serves one client at a time: this one
        assert holder.recv(4096).startswith(b'{"QMP"')
        for command in (["jobs"], ["backup", "disk", str(tmp_path / "b.img")]):
            run = bb(command[0], "--connect", served.qmp, "--timeout", "1", *command[1:],
                     check=False)  # fmt: skip
            assert run.returncode == 1
            assert one_line(run.stderr) == (
                f"blockbackup {command[0]}: {served.qmp}: another client holds the monitor "
                "(no greeting within 1 s); try again when it is done"
            )
    assert not (tmp_path / "b.img").exists()
    assert_clean(served.qmp, tmp_path)


def test_a_full_monitor_backlog_is_a_busy_monitor_too(served: Served) -> None:
    """Clients beyond the monitor's backlog get EAGAIN (asyncio: EINVAL on the first read):
    the command waits for its turn like any client of a busy monitor."""
    holder = socket.socket(socket.AF_UNIX)
    holder.connect(served.qmp)
    assert holder.recv(4096).startswith(b'{"QMP"')
    waiting = _fill_backlog(served.qmp)
    try:
        run = bb("jobs", "--connect", served.qmp, "--timeout", "1", check=False)
        assert "another client holds the monitor" in one_line(run.stderr)
        proc = start("jobs", "--connect", served.qmp, "--timeout", "60")
    finally:
        for sock in [holder, *waiting]:
            sock.close()
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (0, "no jobs\n", "")


@pytest.mark.parametrize("command", [["jobs"], ["bitmaps", "list"], ["backup", "disk", "b.img"]])
def test_ctrl_c_while_waiting_for_the_monitor(tmp_path: Path, command: list[str]) -> None:
    """A monitor that accepts but never greets (held by another client): Ctrl-C ends the
    wait at once, rather than after --timeout."""
    path = str(tmp_path / "qmp.sock")
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(path)
        listener.listen(1)
        proc = start(command[0], "--connect", path, "--timeout", "300", *command[1:])
        try:
            conn, _ = listener.accept()  # the command is waiting for its greeting now
            with conn:
                proc.send_signal(signal.SIGINT)
                _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 130
    assert "(SIGINT)" in one_line(err)
    assert not (tmp_path / "b.img").exists()


#: ``python -c`` this with a command's arguments: the console script, plus ``{hook}`` run when
#: ``cli.main`` starts loading the parser's module. There blockbackup's own start-up has
#: begun; before it, a Ctrl-C is Python's (a traceback of its start-up, or of the import of
#: ``blockbackup.cli``), whatever the program.
CONSOLE_SCRIPT = """
import os, signal, sys, weakref

# As started from a terminal: a test run started in the background (``./dev test &``)
# passes on an ignored SIGINT, which Python and blockbackup rightly keep ignoring.
signal.signal(signal.SIGINT, signal.default_int_handler)

class Hook:
    def find_spec(self, name, path, target=None):
        if name == "blockbackup.cli.app":
            sys.meta_path.remove(self)
            {hook}
        return None

sys.meta_path.insert(0, Hook())
from blockbackup.cli import main
sys.exit(main())
"""
#: A Ctrl-C while Python runs a weakref callback, as every import does for its module lock.
CTRL_C_IN_A_CALLBACK = "weakref.ref(Hook(), lambda _: os.kill(os.getpid(), signal.SIGINT))"
SAY_STARTED = 'os.write(1, b"started\\n")'


def start_hooked(hook: str, *args: str) -> subprocess.Popen[str]:
    """``blockbackup ARGS`` with ``hook`` run in its start-up (see CONSOLE_SCRIPT)."""
    script = CONSOLE_SCRIPT.format(hook=hook)
    return subprocess.Popen([sys.executable, "-c", script, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def test_ctrl_c_while_python_runs_a_callback_in_start_up(tmp_path: Path) -> None:
    """Python drops a KeyboardInterrupt raised in a callback ("Exception ignored in"): the
    command went on as if no Ctrl-C had come (``jobs`` waited its whole --timeout, in about
    one CI run in three). Start-up leaves Ctrl-C to the system: the process ends at once."""
    proc = start_hooked(CTRL_C_IN_A_CALLBACK, "jobs", "--connect", str(tmp_path / "qmp.sock"))
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out, err) == (-signal.SIGINT, "", "")


@pytest.mark.parametrize(
    ("signum", "monitor"),
    [
        (signal.SIGINT, "never greets"),
        (signal.SIGINT, "full backlog"),  # the command retries until --timeout
        (signal.SIGTERM, "never greets"),
    ],
    ids=["sigint", "sigint-full-backlog", "sigterm"],
)
def test_a_signal_while_the_command_starts(tmp_path: Path, signum: int, monitor: str) -> None:
    """A signal at any moment from blockbackup's start-up on, even while the modules load:
    exit 128 + its number (or the signal itself, before the command began), never a
    traceback, never a wait for the --timeout."""
    path = str(tmp_path / "qmp.sock")
    with socket.socket(socket.AF_UNIX) as listener:  # a monitor that never greets
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
        backlog = _fill_backlog(path) if monitor == "full backlog" else []
        try:
            for step in range(10):
                _signal_while_it_starts(listener, signum, delay=step * 0.06, empty=not backlog)
        finally:
            for sock in backlog:
                sock.close()


QMP_LIBRARY_CRITICAL = """
import logging, sys
from blockbackup.cli.qmpclient import quiet_library_logs
logging.basicConfig(level=logging.WARNING)  # as the command sets it up
quiet_library_logs(verbose=sys.argv[1] == "verbose")
logging.getLogger("qemu.qmp.protocol.blockbackup").critical("Unexpected bottom half exception")
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_the_qmp_library_says_nothing_unless_verbose(verbose: bool) -> None:
    """Even its CRITICAL "a bug in the QMP library" traceback, which it logged once when a
    Ctrl-C cancelled its disconnect during a socket error (a fresh run of
    ``test_a_signal_while_the_command_starts[sigint-full-backlog]``): the command's own
    "interrupted" is the one line."""
    argv = [sys.executable, "-c", QMP_LIBRARY_CRITICAL, "verbose" if verbose else "quiet"]
    ran = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True)
    assert ("bottom half" in ran.stderr) is verbose, ran.stderr


def _signal_while_it_starts(
    listener: socket.socket, signum: int, delay: float, *, empty: bool
) -> None:
    """``jobs`` gets ``signum`` ``delay`` seconds into its start-up; ``empty``: hang up on
    the client it was, if it got in."""
    path = listener.getsockname()
    proc = start_hooked(SAY_STARTED, "jobs", "--connect", path, "--timeout", "300")
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "started\n"
        time.sleep(delay)  # not a wait for something: where the signal lands
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()  # collect it and close its pipes
        if empty:
            _hang_up_on_every_client(listener)
    assert proc.returncode in (128 + signum, -signum), err
    assert_no_noise(err)


def _fill_backlog(path: str) -> list[socket.socket]:
    """Clients that fill a listener's backlog: the next connect fails with EAGAIN."""
    waiting: list[socket.socket] = []
    while True:
        sock = socket.socket(socket.AF_UNIX)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            return waiting
        waiting.append(sock)


def _hang_up_on_every_client(listener: socket.socket) -> None:
    """Empty the backlog: the next command gets in and waits for the greeting."""
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return
        conn.close()


# -- point 11: options that would do nothing are errors ------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--backing", "full.img", "--incremental", "b"], "--backing needs --format qcow2"),
        (["--format", "qcow2", "--backing", "f.qcow2"], "--backing only makes sense with"),
        (["--format", "qcow2", "--incremental", "b"], "--incremental needs --format qcow2"),
        (["--persistent"], "--persistent only applies to the bitmap --start-bitmap creates"),
        (["--no-persistent"], "--no-persistent only applies to the bitmap --start-bitmap"),
        (["--sync", "none"], "--sync none copies nothing by itself"),
        (
            [
                "--incremental",
                "b",
                "--start-bitmap",
                "b",
                "--format",
                "qcow2",
                "--backing",
                "f.qcow2",
            ],
            "--start-bitmap is for full backups",
        ),
    ],
)
def test_options_that_do_nothing_are_refused(
    served: Served, tmp_path: Path, options: list[str], message: str
) -> None:
    run = bb("backup", "--connect", served.qmp, "disk", str(tmp_path / "b.img"), *options,
             check=False)  # fmt: skip
    assert run.returncode == 2
    assert message in one_line(run.stderr)
    assert not (tmp_path / "b.img").exists()
    assert_clean(served.qmp, tmp_path)


def _bitmaps(qmp: str) -> list[tuple[str, bool]]:
    rows = json.loads(bb("bitmaps", "--connect", qmp, "list", "--json").stdout)
    return [(r["name"], r["persistent"]) for r in rows if "name" in r]  # not successors


def test_start_bitmap_is_persistent_by_default(served: Served, tmp_path: Path) -> None:
    bb("backup", "--connect", served.qmp, "disk", str(tmp_path / "a.img"),
       "--start-bitmap", "nightly")  # fmt: skip
    assert _bitmaps(served.qmp) == [("nightly", True)]
    # an existing bitmap restarts at the next full backup's point in time
    bb("backup", "--connect", served.qmp, "disk", str(tmp_path / "b.img"),
       "--start-bitmap", "nightly")  # fmt: skip
    assert _bitmaps(served.qmp) == [("nightly", True)]
    run = bb("backup", "--connect", served.qmp, "disk", str(tmp_path / "c.img"),
             "--start-bitmap", "nightly", "--no-persistent", check=False)  # fmt: skip
    assert run.returncode == 2
    assert "bitmap 'nightly' exists and is persistent" in one_line(run.stderr)
    bb("backup", "--connect", served.qmp, "disk", str(tmp_path / "d.img"),
       "--start-bitmap", "memory", "--no-persistent")  # fmt: skip
    assert sorted(_bitmaps(served.qmp)) == [("memory", False), ("nightly", True)]


@pytest.fixture
def null_daemon(tmp_path: Path) -> Iterator[str]:
    """A daemon whose node cannot store bitmaps (null-co)."""
    qmp = str(tmp_path / "qmp.sock")
    argv = [BLOCKBACKUP, "daemon", "--blockdev", "driver=null-co,node-name=disk,size=4194304",
            "--chardev", f"socket,id=m0,path={qmp},server=on,wait=off",
            "--monitor", "chardev=m0"]  # fmt: skip
    with subprocess.Popen(argv, stderr=subprocess.DEVNULL) as proc:
        try:
            wait_until(lambda: os.path.exists(qmp) or proc.poll() is not None, "the daemon")
            assert proc.poll() is None
            yield qmp
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_start_bitmap_where_the_node_cannot_store_it(null_daemon: str, tmp_path: Path) -> None:
    run = bb("backup", "--connect", null_daemon, "disk", str(tmp_path / "a.img"),
             "--start-bitmap", "nightly")  # fmt: skip
    assert one_line(run.stderr) == (
        "blockbackup backup: warning: Can't store persistent bitmaps to disk: Operation not "
        "supported; bitmap 'nightly' is kept in memory only and will not survive a restart "
        "of the daemon"
    )
    assert _bitmaps(null_daemon) == [("nightly", False)]
    run = bb("backup", "--connect", null_daemon, "disk", str(tmp_path / "b.img"),
             "--start-bitmap", "other", "--persistent", check=False)  # fmt: skip
    assert run.returncode == 1
    assert "Can't store persistent bitmaps to disk" in one_line(run.stderr)
    assert not (tmp_path / "b.img").exists()
    assert _bitmaps(null_daemon) == [("nightly", False)]
    assert_clean(null_daemon, tmp_path)


def test_a_cancelled_backup_removes_the_bitmap_it_started(tmp_path: Path) -> None:
    """A bitmap started with a backup that never completed would be a base for
    incrementals over a backup that does not exist: it goes with the backup."""
    image = tmp_path / "disk.img"
    random_image(image, 16 * MiB)
    with serving([image], tmp_path / "run") as s:
        proc = start("backup", "--connect", s.qmp, "disk", str(tmp_path / "b.img"),
                     "--start-bitmap", "nightly", "--speed", "2M")  # fmt: skip
        try:
            wait_until(lambda: running_job(s.qmp, 0.1), "the backup to run")
            assert _bitmaps(s.qmp) == [("nightly", True)]
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
        assert proc.returncode == 130
        assert _bitmaps(s.qmp) == []
        assert_clean(s.qmp, tmp_path)


# -- point 12: messages --------------------------------------------------------------------


def test_a_raw_backup_in_mib_without_a_block_size_warning(served: Served, tmp_path: Path) -> None:
    run = bb("backup", "--connect", served.qmp, "disk", str(tmp_path / "b.img"))
    assert "MiB/s" in run.stdout
    assert "MB/s" not in run.stdout
    assert run.stdout.splitlines()[-1].startswith(
        "backup of disk done: b.img: 4.0 MiB disk, 4.0 MiB written in "
    )
    assert "block size" not in served.stderr()


def test_a_sparse_backup_reports_data_written_and_logical_size(tmp_path: Path) -> None:
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(1 << 30)
        f.seek(512 * MiB)
        f.write(os.urandom(MiB))
    with serving([image], tmp_path / "run") as s:
        target = tmp_path / "b.img"
        result = json.loads(
            bb("backup", "--connect", s.qmp, "sparse", str(target), "--json").stdout
        )
        assert result["disk-size"] == 1 << 30
        assert MiB <= result["written"] <= 2 * MiB
        assert target.read_bytes() == image.read_bytes()
        run = bb("backup", "--connect", s.qmp, "sparse", str(tmp_path / "c.img"))
        summary = run.stdout.splitlines()[-1]
        assert summary.startswith("backup of sparse done: c.img: 1.0 GiB disk, 1.0 MiB written")


def test_help_explains_node_connect_and_sync() -> None:
    text = bb("backup", "--help").stdout
    assert "NODE is the node name of the disk in the daemon" in text
    assert "the daemon's QMP monitor socket" in text
    assert "full: the whole disk" in text
    assert "'none' is refused" in text


def test_a_size_that_is_not_one_says_what_a_size_looks_like(tmp_path: Path) -> None:
    run = bb("backup", "--connect", "q", "disk", "b.img", "--speed", "abc", check=False)
    assert run.returncode == 2
    assert (
        "argument --speed: invalid size 'abc': expected a number of bytes with an optional "
        "K, M, G or T suffix, e.g. 4096, 64K, 100M, 1.5G"
    ) in run.stderr


def test_empty_lists_say_so(served: Served) -> None:
    assert bb("jobs", "--connect", served.qmp).stdout == "no jobs\n"
    assert bb("bitmaps", "--connect", served.qmp, "list").stdout == "no bitmaps\n"
