"""The QMP layer on its own: framing, negotiation, validation texts, introspection, CLI.

Runs the daemon in-process (the same :class:`~blockbackup.daemon.Daemon` the CLI runs)
and talks to it with raw sockets and with ``qemu.qmp``.
"""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError, QMPClient

from blockbackup.daemon_options import OptionsError, parse_args, parse_keyval
from blockbackup.errors import BlockBackupError
from blockbackup.qmp.jsonstream import JsonParseError, JsonStreamer
from blockbackup.qmp.registry import REGISTRY, CommandNotFoundError
from testkit.monitor import Raw, running_daemon

pytestmark = pytest.mark.timeout(60)


# -- the streaming reader (sans-IO) ---------------------------------------------------------


def test_streamer_split_and_merged() -> None:
    s = JsonStreamer()
    assert s.feed(b'{"a": [1, {"b": "x}"}]}{"c"') == [{"a": [1, {"b": "x}"}]}]
    assert s.feed(b": 2") == []
    assert s.feed(b"}") == [{"c": 2}]
    big = b'{"s": "' + b"\\" * 9 + b'"' + b"x" * 1000 + b'"}'
    out = []
    for i in range(0, len(big), 7):
        out += s.feed(big[i : i + 7])
    assert out == [{"s": "\\" * 4 + '"' + "x" * 1000}]


def test_streamer_errors() -> None:
    s = JsonStreamer()
    assert s.feed(b"@@@ [1]") == [JsonParseError("JSON parse error, stray '@'"), [1]]
    assert s.feed(b"{1: 2}") == [JsonParseError("JSON parse error, key is not a string in object")]
    assert s.feed(b'{"a": tru}') == [JsonParseError("JSON parse error, invalid keyword 'tru'")]


def test_streamer_caps_memory() -> None:
    s = JsonStreamer(max_size=1000)
    out = s.feed(b'{"x": "' + b"a" * 5000)
    assert out == [JsonParseError("JSON token size limit exceeded")]
    assert s.pending < 1000
    assert s.feed(b'"} {"ok": 1}')[-1] == {"ok": 1}
    deep = JsonStreamer(max_nesting=10)
    assert deep.feed(b"[" * 20) == [JsonParseError("JSON nesting depth limit exceeded")]


# -- the monitor ---------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_negotiation_and_framing(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as (_, sock):
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        raw = await Raw.open(sock, negotiate=False)
        assert await raw.error(b'{"execute": "query-jobs"}') == (
            "Expecting capabilities negotiation with 'qmp_capabilities'"
        )
        await raw.send(b'{"execute": "qmp_capabilities", "id": {"x": [1]}}')
        assert await raw.recv() == {"return": {}, "id": {"x": [1]}}
        assert await raw.error(b'{"execute": "qmp_capabilities"}') == (
            "Capabilities negotiation is already complete, command ignored"
        )
        # merged and split objects
        await raw.send(b'{"execute": "query-jobs", "id": 1}{"execute": "query-jobs", "i')
        assert await raw.recv() == {"return": [], "id": 1}
        await raw.send(b'd": 2}')
        assert await raw.recv() == {"return": [], "id": 2}
        assert await raw.error(b"[]") == "QMP input must be a JSON object"
        assert await raw.error(b'{"execute": "query-jobs", "foo": 1}') == (
            "QMP input member 'foo' is unexpected"
        )
        assert await raw.error(b'{"exec-oob": "query-jobs"}') == (
            "QMP input member 'exec-oob' is unexpected"
        )
        assert await raw.error(b"{]") == "JSON parse error, expecting value"
        raw.close()


@pytest.mark.asyncio
async def test_hostile_input_does_not_kill_the_daemon(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as (_, sock):
        raw = await Raw.open(sock)
        await raw.send(b"\xff\xfe\x00" * 1000 + b"\n")
        await raw.send(b"[" * 5000)
        raw.close()
        raw = await Raw.open(sock)
        await raw.send(b'{"execute": "query-version", "id": "alive"}')
        while (reply := await raw.recv()).get("id") != "alive":
            pass
        assert reply["return"]["package"].startswith("blockbackup")
        raw.close()


@pytest.mark.asyncio
async def test_second_client_waits_and_events_reach_every_monitor(tmp_path: Path) -> None:
    extra = (
        "--chardev",
        f"socket,id=m1,path={tmp_path}/qmp1.sock,server=on,wait=off",
        "--monitor",
        "chardev=m1",
    )
    async with running_daemon(tmp_path, *extra) as (daemon, sock):
        first = await Raw.open(sock)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.readline(), 0.3)
        other = await Raw.open(tmp_path / "qmp1.sock")
        daemon.events.emit("BLOCK_EXPORT_DELETED", {"id": "e0"})
        for conn in (first, other):
            ev = await conn.recv()
            assert ev["event"] == "BLOCK_EXPORT_DELETED"
            assert set(ev["timestamp"]) == {"seconds", "microseconds"}
            assert all(isinstance(v, int) for v in ev["timestamp"].values())
        first.close()
        assert b'"QMP"' in await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        other.close()


@pytest.mark.asyncio
async def test_argument_validation_texts(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as (_, sock):
        client = QMPClient("t")
        await client.connect(str(sock))
        cases: list[tuple[dict[str, Any], str]] = [
            ({"job-id": "j", "device": "src", "target": "src"}, "Parameter 'sync' is missing"),
            (
                {"job-id": "j", "device": "src", "target": "src", "sync": "fast"},
                "Parameter 'sync' does not accept value 'fast'",
            ),
            (
                {"device": "src", "target": "src", "sync": "full", "speed": "x"},
                "Invalid parameter type for 'speed', expected: integer",
            ),
            (
                {"device": "src", "target": "src", "sync": "full", "x": 1},
                "Parameter 'x' is unexpected",
            ),
            (
                {"device": "src", "target": "src", "sync": "full", "x-perf": {"max-workers": []}},
                "Invalid parameter type for 'x-perf.max-workers', expected: integer",
            ),
        ]
        for args, text in cases:
            with pytest.raises(ExecuteError) as info:
                await client.execute("blockdev-backup", args)
            assert info.value.error.error.desc == text
        with pytest.raises(ExecuteError) as info:
            await client.execute("block-job-cancel", {"device": "nojob"})
        assert info.value.error_class == "DeviceNotActive"
        await client.disconnect()


@pytest.mark.asyncio
async def test_schema_is_derived_and_usable(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as (_, sock):
        client = QMPClient("t")
        await client.connect(str(sock))
        schema: Any = await client.execute("query-qmp-schema")
        commands: Any = await client.execute("query-commands")
        await client.disconnect()
    assert isinstance(schema, list)
    by_name = {e["name"]: e for e in schema}
    assert {c["name"] for c in commands} == set(REGISTRY.commands)
    for name in REGISTRY.commands:
        entry = by_name[name]
        assert entry["meta-type"] == "command"
        assert entry["arg-type"] in by_name
        assert entry["ret-type"] in by_name
    args = by_name[by_name["blockdev-backup"]["arg-type"]]
    members = {m["name"]: m for m in args["members"]}
    assert "default" not in members["sync"]
    assert "default" in members["speed"]
    assert by_name[members["sync"]["type"]]["values"] == [
        "top",
        "full",
        "none",
        "incremental",
        "bitmap",
    ]
    assert members["x-perf"]["features"] == ["unstable"]
    events = {e["name"] for e in schema if e["meta-type"] == "event"}
    assert {"JOB_STATUS_CHANGE", "BLOCK_JOB_COMPLETED", "BLOCK_EXPORT_DELETED"} <= events


# -- the command line -------------------------------------------------------------------------


def test_keyval() -> None:
    assert parse_keyval(
        "driver=raw,file.driver=blkdebug,file.inject-error.0.event=write_aio,"
        "file.inject-error.1.event=read_aio,file.image.filename=a,,b"
    ) == {
        "driver": "raw",
        "file": {
            "driver": "blkdebug",
            "inject-error": [{"event": "write_aio"}, {"event": "read_aio"}],
            "image": {"filename": "a,b"},
        },
    }
    assert parse_keyval("secret,id=s0", "qom-type") == {"qom-type": "secret", "id": "s0"}
    with pytest.raises(OptionsError):
        parse_keyval("a=1,a.b=2")
    with pytest.raises(OptionsError):
        parse_keyval("l.1=x")


def test_parse_args_order_and_json() -> None:
    args = parse_args(
        [
            "--blockdev",
            '{"driver": "null-co", "node-name": "n"}',
            "--object=secret,id=s,data=x",
            "--pidfile",
            "/tmp/p",
            "--daemonize",
        ]
    )
    assert [o.name for o in args.options] == ["blockdev", "object"]
    assert args.options[0].keyval is False
    assert args.options[1].value == {"qom-type": "secret", "id": "s", "data": "x"}
    assert args.pidfile == "/tmp/p"
    assert args.daemonize


def test_daemonize_pidfile_and_sigterm(tmp_path: Path) -> None:
    sock = tmp_path / "qmp.sock"
    pidfile = tmp_path / "pid"
    cmd = [sys.executable, "-m", "blockbackup", "daemon", "--daemonize", "--pidfile", str(pidfile)]
    cmd += ["--blockdev", "driver=null-co,node-name=n0,size=1048576"]
    cmd += ["--chardev", f"socket,id=m,path={sock},server=on,wait=off", "--monitor", "m"]
    res = subprocess.run(cmd, capture_output=True, timeout=30, check=False)
    assert res.returncode == 0, res.stderr
    assert sock.exists()
    pid = int(pidfile.read_text())
    os.kill(pid, 15)
    for _ in range(200):
        if not pidfile.exists():
            break
        import time

        time.sleep(0.05)
    assert not pidfile.exists()
    bad = subprocess.run(
        [sys.executable, "-m", "blockbackup", "daemon", "--blockdev", "driver=nosuch"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 1
    assert b"Parameter 'driver' does not accept value 'nosuch'" in bad.stderr


def test_blockdev_backup_accepts_newer_members() -> None:
    """discard-source (QEMU 9.1) and on-cbw-error (10.1) are accepted: deliberate, 7.2 refuses."""
    from blockbackup.qmp.commands.backup import BLOCKDEV_BACKUP, backup_options

    args = BLOCKDEV_BACKUP.check(
        {
            "job-id": "j",
            "device": "src",
            "target": "tgt",
            "sync": "full",
            "discard-source": True,
            "on-cbw-error": "break-snapshot",
        },
        "",
    )
    options = backup_options(args)
    assert options.discard_source is True
    assert options.on_cbw_error == "break-snapshot"
    with pytest.raises(
        BlockBackupError, match="Parameter 'on-cbw-error' does not accept value 'x'"
    ):
        BLOCKDEV_BACKUP.check(
            {"device": "s", "target": "t", "sync": "full", "on-cbw-error": "x"}, ""
        )


@pytest.mark.asyncio
async def test_daemon_execute_is_the_registry_dispatch(tmp_path: Path) -> None:
    """The command line and the library-style ``Daemon.execute`` run commands exactly as
    a monitor does: the same lookup and error, validation and ``{}`` for no result."""
    async with running_daemon(tmp_path) as (daemon, _):
        with pytest.raises(CommandNotFoundError, match=r"^The command nosuch has not been found$"):
            await daemon.execute("nosuch", {})
        added = {"driver": "null-co", "node-name": "n0", "size": 4096}
        assert await daemon.execute("blockdev-add", added) == {}
        assert daemon.graph.get("n0").size == 4096
        speed = {"device": "nosuch", "speed": "10"}
        with pytest.raises(BlockBackupError, match=r"^Invalid parameter type for 'speed'"):
            await daemon.execute("block-job-set-speed", speed)
        with pytest.raises(BlockBackupError) as keyval:  # converted, then looked up
            await daemon.execute("block-job-set-speed", speed, keyval=True)
        assert "nosuch" in str(keyval.value)
