"""Hypothesis model test: random writes, zero-writes, discards and flushes on a qcow2 node
(with and without a backing file) against a plain bytearray."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockbackup.block.driver import WriteFlags
from blockbackup.block.graph import Graph
from blockbackup.block.qcow2.create import create_qcow2_file

SIZE = 96 * 1024
BACKING = bytes((i * 7 + 3) % 251 for i in range(SIZE))

op = st.tuples(
    st.sampled_from(["write", "zero", "zero-unmap", "discard", "flush"]),
    st.integers(0, SIZE - 1),
    st.integers(1, 20000),
    st.integers(0, 255),
)


async def _run(
    tmp: Path, ops: list[tuple[str, int, int, int]], backing: bool, cluster: int, version: int
) -> None:
    img = tmp / "m.qcow2"
    kwargs: dict[str, object] = {"cluster_size": cluster, "version": version}
    if backing:
        (tmp / "b.raw").write_bytes(BACKING)
        kwargs["backing_file"] = "b.raw"
        if version >= 3:
            kwargs["backing_fmt"] = "raw"
    create_qcow2_file(img, SIZE, **kwargs)
    model = bytearray(BACKING if backing else bytes(SIZE))
    g = Graph()
    try:
        node = await g.add(
            {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(img)}}
        )
        for kind, off, ln, byte in ops:
            ln = min(ln, SIZE - off)
            if kind == "write":
                data = bytes([byte]) * ln
                await node.write(off, data)
                model[off : off + ln] = data
            elif kind.startswith("zero"):
                flags = WriteFlags.MAY_UNMAP if kind == "zero-unmap" else WriteFlags.NONE
                await node.write_zeroes(off, ln, flags)
                model[off : off + ln] = bytes(ln)
            elif kind == "discard":
                before = bytes(model[off : off + ln])
                await node.discard(off, ln)
                got = bytes(await node.read(off, ln))
                # discard is advisory: each byte keeps its value, reads zero, or reads backing
                pos = off
                while pos < off + ln:
                    nxt = min((pos // cluster + 1) * cluster, off + ln)
                    seg = slice(pos - off, nxt - off)
                    b = BACKING[pos:nxt] if backing else None
                    assert got[seg] in (before[seg], bytes(nxt - pos), b)
                    pos = nxt
                model[off : off + ln] = got
            else:
                await node.flush()
            assert bytes(await node.read(0, SIZE)) == bytes(model)
        await g.delete("q")
        node = await g.add(
            {"driver": "qcow2", "node-name": "q", "file": {"driver": "file", "filename": str(img)}}
        )
        assert bytes(await node.read(0, SIZE)) == bytes(model)
    finally:
        await g.aclose()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op, max_size=25),
    backing=st.booleans(),
    cluster=st.sampled_from([512, 4096, 16384]),
    version=st.sampled_from([2, 3]),
)
def test_model(
    ops: list[tuple[str, int, int, int]], backing: bool, cluster: int, version: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_run(Path(tmp), ops, backing, cluster, version))
