"""The one guarantee, as a property: a backup equals the source at T0, byte for byte.

Hypothesis builds a random source image (data, zero data, holes), random concurrent
workloads of writes, write-zeroes and discards (offsets, lengths, overlaps and timing all
random, several writers at once) and random backup settings (cluster size 4 KiB to 2 MiB,
workers, chunk cap, speed, copy offload, a target that starts sparse or full of garbage).
The backup starts in the middle of the workload. The reference image is read from the
source file with plain ``os.pread`` at T0 (inside the quiesced section), independently of
blockbackup's copy path; the target must equal it exactly.

CI runs 300 examples; set BLOCKBACKUP_GUARANTEE_EXAMPLES=5000 for a nightly-size run.
"""

from __future__ import annotations

import asyncio
import os
import random
from dataclasses import dataclass
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockbackup.api import BlockBackup
from blockbackup.jobs.backup import BackupJob, BackupPerf
from testkit.images import make_image, raw_node, read_file

EXAMPLES = int(os.environ.get("BLOCKBACKUP_GUARANTEE_EXAMPLES", "300"))
KINDS = ("write", "zeroes", "unmap", "discard")


@dataclass(frozen=True)
class Op:
    kind: str
    offset: int
    length: int
    yields: int
    seed: int


@dataclass(frozen=True)
class Scenario:
    size: int
    layout: tuple[tuple[int, int, bool], ...]  # offset, length, zero-filled data?
    writers: tuple[tuple[Op, ...], ...]
    start_after_yields: int
    cluster_size: int
    max_workers: int
    max_chunk_clusters: int
    speed: int
    use_copy_range: bool
    garbage_target: bool


@st.composite
def ops(draw: st.DrawFn, size: int) -> Op:
    offset = draw(st.integers(0, size - 1))
    length = draw(st.integers(1, min(size - offset, 256 * 1024)))
    return Op(
        draw(st.sampled_from(KINDS)),
        offset,
        length,
        draw(st.integers(0, 6)),
        draw(st.integers(0, 2**32)),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    size = draw(st.integers(1, 256)) * 8192 + draw(st.sampled_from([0, 0, 512, 4096 + 512]))
    extents = draw(
        st.lists(
            st.tuples(st.integers(0, size - 1), st.integers(1, 128 * 1024), st.booleans()),
            max_size=6,
        )
    )
    layout = tuple((o, min(n, size - o), z) for o, n, z in extents)
    writers = draw(
        st.lists(st.lists(ops(size), max_size=12).map(tuple), min_size=1, max_size=4).map(tuple)
    )
    cluster = draw(st.sampled_from([4096, 8192, 16384, 65536, 131072, 1 << 20, 2 << 20]))
    return Scenario(
        size=size,
        layout=layout,
        writers=writers,
        start_after_yields=draw(st.integers(0, 30)),
        cluster_size=cluster,
        max_workers=draw(st.sampled_from([1, 2, 4, 64])),
        max_chunk_clusters=draw(st.sampled_from([0, 1, 3])),
        speed=draw(st.sampled_from([0, 0, 64 << 20])),
        use_copy_range=draw(st.booleans()),
        garbage_target=draw(st.booleans()),
    )


async def _apply(node: object, op: Op) -> None:
    from blockbackup.block.driver import WriteFlags
    from blockbackup.block.node import BlockNode

    assert isinstance(node, BlockNode)
    for _ in range(op.yields):
        await asyncio.sleep(0)
    if op.kind == "write":
        await node.write(op.offset, random.Random(op.seed).randbytes(op.length))
    elif op.kind == "zeroes":
        await node.write_zeroes(op.offset, op.length)
    elif op.kind == "unmap":
        await node.write_zeroes(op.offset, op.length, WriteFlags.MAY_UNMAP)
    else:
        await node.discard(op.offset, op.length)


async def run_scenario(tmp: Path, sc: Scenario) -> None:
    rng = random.Random(sc.size)
    extents = [(o, bytes(n) if z else rng.randbytes(n)) for o, n, z in sc.layout]
    src_path = make_image(tmp / "src.img", sc.size, extents)
    tgt_path = make_image(
        tmp / "tgt.img", sc.size, [(0, b"\xa5" * sc.size)] if sc.garbage_target else []
    )
    snapshot: list[bytes] = []

    async def take_snapshot() -> None:
        snapshot.append(read_file(src_path))

    async with BlockBackup() as bb:
        src = await bb.blockdev_add(raw_node("src", src_path, discard="unmap"))
        await bb.blockdev_add(raw_node("tgt", tgt_path))
        perf = BackupPerf(
            use_copy_range=sc.use_copy_range,
            max_workers=sc.max_workers,
            max_chunk=sc.max_chunk_clusters * sc.cluster_size,
            cluster_size=sc.cluster_size,
        )
        jobs: list[BackupJob] = []

        async def writer(ops: tuple[Op, ...]) -> None:
            for op in ops:
                await _apply(src, op)

        async def starter() -> None:
            for _ in range(sc.start_after_yields):
                await asyncio.sleep(0)
            jobs.append(
                await bb.backup(
                    "src", "tgt", perf=perf, speed=sc.speed, at_point_in_time=take_snapshot
                )
            )

        async with asyncio.TaskGroup() as tg:
            tg.create_task(starter())
            for ops_ in sc.writers:
                tg.create_task(writer(ops_))
        job = jobs[0]
        await bb.wait(job)
        assert job.progress_current == job.progress_total == sc.size
        assert not job.block_copy.reqs, "copies still in flight after the job ended"
        assert not src._before_write, "interception not removed"
        assert [
            n for n in bb.graph.nodes.values() if n.driver.driver_name == "copy-before-write"
        ] == []
    assert read_file(tgt_path) == snapshot[0]


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(sc=scenarios())
def test_backup_equals_source_at_t0(tmp_path: Path, sc: Scenario) -> None:
    asyncio.run(asyncio.wait_for(run_scenario(tmp_path, sc), timeout=10))
