"""Hostile QMP input: refused with QEMU's texts, as it arrives, without hurting anyone else.

QEMU's JSON reader refuses a message past 64 MiB, 2 Mi tokens or nesting 1024, turns an
integer too large for 64 bits into a float, and words each refusal. The texts checked
here were taken from qemu-storage-daemon 7.2 (``tests/compat`` compares the two).

What "not hurting anyone else" means is checked without clocks:

* the streamer's work per read follows the read, not the message pending: feeding one
  more chunk of a 16 MiB string allocates about the chunk (tracemalloc), where the old
  reader copied the whole pending text on every read (quadratic: 50-60 s for 64 MiB);
* the session gives the event loop a turn for every few KiB it parses: a task that counts
  loop iterations while 64 MiB stream in sees thousands of them, and a concurrent NBD
  client's reads complete meanwhile with the right data.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockbackup.qmp.jsonstream import MAX_TOKEN_SIZE, JsonParseError, JsonStreamer
from testkit.monitor import Raw, running_daemon
from testkit.startup import nbd_go_reply, nbd_go_request

pytestmark = pytest.mark.timeout(120)

MiB = 1 << 20


def parse_error(text: str) -> JsonParseError:
    return JsonParseError(f"JSON parse error, {text}")


# -- the reader on its own ---------------------------------------------------------------------


def test_qemu_texts_for_values_it_refuses() -> None:
    s = JsonStreamer()
    assert s.feed(b'{"a": 1, "a": 2}') == [parse_error("duplicate key")]
    assert s.feed(b"{tru: 1}") == [parse_error("invalid keyword 'tru'")]
    assert s.feed(b'{{"a": 1}: 1}') == [parse_error("key is not a string in object")]
    assert s.feed(b'["\\ud800"]') == [parse_error("\\ud800 is not a valid Unicode character")]
    assert s.feed(b'["\\ud800\\u0041"]') == [
        parse_error("\\ud800 is not a valid Unicode character")
    ]
    assert s.feed(b'["\\uffff"]') == [parse_error("\\uffff is not a valid Unicode character")]
    assert s.feed(b'["\\u00"]') == [parse_error('\\u00" is not a valid Unicode character')]
    assert s.feed(b'["\\ud83d\\ude00", "\\u00e9\\n"]') == [["\U0001f600", "\xe9\n"]]


def test_huge_numbers_become_floats_as_in_qemu() -> None:
    s = JsonStreamer()
    assert s.feed(b"[" + b"9" * 100_000 + b", -" + b"9" * 100_000 + b"]") == [
        [float("inf"), float("-inf")]
    ]
    assert s.feed(b"[18446744073709551615, 18446744073709551616, -9223372036854775809]") == [
        [18446744073709551615, 1.8446744073709552e19, -9.223372036854776e18]
    ]


def test_tokens_split_anywhere_give_the_same_messages() -> None:
    data = (
        b'{"s": "a\\\\\\"b\\u00e9\\ud83d\\ude00", "n": [-1.5e+3, 0, 12], "k": [true, null]}'
        b'[1.5e+x] @ {"x": 1}'
    )
    whole = JsonStreamer().feed(data)
    assert whole == [
        {"s": 'a\\"b\xe9\U0001f600', "n": [-1500.0, 0, 12], "k": [True, None]},
        parse_error("stray '1.5e'"),  # then skipped up to "]", which ends nothing
        parse_error("expecting value"),
        parse_error("stray '@'"),
        {"x": 1},
    ]
    for step in (1, 2, 3, 5, 7):
        s = JsonStreamer()
        out = []
        for i in range(0, len(data), step):
            out += s.feed(data[i : i + step])
        assert out == whole, step


def _feed_split(data: bytes, cuts: list[int]) -> list[object]:
    s = JsonStreamer()
    out: list[object] = []
    start = 0
    for cut in [*sorted(c % (len(data) + 1) for c in cuts), len(data)]:
        out += s.feed(data[start:cut])
        start = max(start, cut)
    return out


_ALPHABET = b"{}[],:\"'\\u09afe.E+-ntrl \xc3\xa9"
_JSON_BYTES = st.binary(max_size=200).map(lambda b: bytes(_ALPHABET[x % len(_ALPHABET)] for x in b))


@settings(max_examples=300, deadline=None)
@given(_JSON_BYTES, st.lists(st.integers(min_value=0), max_size=8))
def test_any_input_split_anywhere_gives_the_same_messages(data: bytes, cuts: list[int]) -> None:
    assert _feed_split(data, cuts) == JsonStreamer().feed(data)


def _char_ok(c: str) -> bool:
    cp = ord(c)
    return not (0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF or (cp & 0xFFFE) == 0xFFFE)


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters().filter(_char_ok), max_size=20),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(st.characters().filter(_char_ok), max_size=5), inner, max_size=5)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(_VALUES, st.booleans(), st.lists(st.integers(min_value=0), max_size=8))
def test_valid_json_reads_back(value: object, ascii_only: bool, cuts: list[int]) -> None:
    data = json.dumps([value], ensure_ascii=ascii_only).encode()
    assert _feed_split(data, cuts) == [[value]]


def test_limits_have_qemu_texts() -> None:
    assert JsonStreamer(max_tokens=100).feed(b"[" + b"1," * 200 + b"1]")[0] == (
        JsonParseError("JSON token count limit exceeded")
    )
    deep = JsonStreamer().feed(b"[" * 1025)
    assert deep == [JsonParseError("JSON nesting depth limit exceeded")]


@pytest.mark.parametrize(
    ("head", "chunk"),
    [
        (b'{"s": "', b"a" * 65536),  # a string
        (b'{"s": "', b"\\n" * 32768),  # a string of escapes
        (b'{"s": 1', b"1" * 65536),  # a number
        (b'{"s": a', b"a" * 65536),  # a keyword
    ],
    ids=["string", "escapes", "number", "keyword"],
)
def test_a_read_costs_its_own_size_not_the_pending_message(head: bytes, chunk: bytes) -> None:
    s = JsonStreamer()
    s.feed(head)
    for _ in range(256):
        assert s.feed(chunk) == []
    assert s.pending > 16 * MiB
    tracemalloc.start()
    try:
        for _ in range(4):
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            s.feed(chunk)
            assert tracemalloc.get_traced_memory()[1] - before < 8 * len(chunk)
    finally:
        tracemalloc.stop()


def test_size_limit_refuses_as_the_bytes_arrive() -> None:
    s = JsonStreamer(max_size=1 * MiB)
    assert s.feed(b'{"s": "' + b"a" * (MiB - 64)) == []
    assert s.feed(b"a" * 128) == [JsonParseError("JSON token size limit exceeded")]
    assert s.pending == 0  # nothing of the refused message is held
    assert s.feed(b"a" * MiB + b'"} {"ok": 1}') == [parse_error("expecting value"), {"ok": 1}]


# -- the daemon ----------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_huge_number_gets_an_error_reply_and_the_session_goes_on(tmp_path: Path) -> None:
    async with running_daemon(tmp_path) as (_, sock):
        raw = await Raw.open(sock)
        speed = b"9" * 100_000
        assert await raw.error(
            b'{"execute": "block-job-set-speed", "arguments": {"device": "j", "speed": '
            + speed
            + b"}}"
        ) == ("Invalid parameter type for 'speed', expected: integer")
        await raw.send(b'{"execute": "query-jobs", "id": "alive"}')
        assert await raw.recv() == {"return": [], "id": "alive"}
        raw.close()


async def _nbd_reader(sock: Path, pattern: bytes, stop: asyncio.Event) -> int:
    """Read 4 KiB blocks of the export until ``stop``; check each; the count."""
    reader, writer = await asyncio.open_unix_connection(str(sock))
    writer.write(nbd_go_request("src"))
    assert await nbd_go_reply(reader) == ["ack", MiB]
    done = 0
    while not stop.is_set():
        offset = (done * 4096) % MiB
        writer.write(struct.pack(">IHHQQI", 0x25609513, 0, 0, done, offset, 4096))
        magic, error, handle = struct.unpack(">IIQ", await reader.readexactly(16))
        assert (magic, error, handle) == (0x67446698, 0, done)
        assert await reader.readexactly(4096) == pattern[offset : offset + 4096]
        done += 1
    writer.close()
    return done


@pytest.mark.asyncio
async def test_64_mib_string_is_refused_while_the_data_path_keeps_its_turns(
    tmp_path: Path,
) -> None:
    nbd_sock = tmp_path / "nbd.sock"
    extra = [
        "--nbd-server",
        f"addr.type=unix,addr.path={nbd_sock}",
        "--export",
        "type=nbd,id=e0,node-name=src,name=src",
    ]
    async with running_daemon(tmp_path, *extra) as (_, sock):
        pattern = os.urandom(MiB)
        (tmp_path / "src.img").write_bytes(pattern)
        raw = await Raw.open(sock)
        stop = asyncio.Event()
        reads = asyncio.create_task(_nbd_reader(nbd_sock, pattern, stop))
        turns = 0

        async def count_turns() -> None:
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        counter = asyncio.create_task(count_turns())
        try:
            sent = 0
            await raw.send(b'{"execute": "query-jobs", "id": "')
            chunk = b"a" * MiB
            reply = asyncio.create_task(raw.reader.readline())  # bounded by the test timeout
            while not reply.done():  # the refusal comes while the string still streams in
                assert sent < MAX_TOKEN_SIZE + 8 * MiB
                await raw.send(chunk)
                sent += len(chunk)
            assert json.loads(reply.result()) == {
                "error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}
            }
            # Fewer than 32 KiB of QMP input were parsed per turn of the event loop.
            assert turns >= MAX_TOKEN_SIZE // 32768
        finally:
            counter.cancel()
            stop.set()
        assert await reads > 0  # the NBD client was served all along, with the right data
        await raw.send(b'"} {"execute": "query-jobs", "id": "alive"}')
        assert await raw.recv() == {
            "error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}
        }
        assert await raw.recv() == {"return": [], "id": "alive"}
        raw.close()
