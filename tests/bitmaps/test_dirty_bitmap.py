"""DirtyBitmap on its own: registry rules, tracking, and successors against a set model.

The stateful test is the guarantee of the bitmap layer: after any sequence of writes,
enables/disables/clears and backup jobs ending in any mode and outcome, the bitmap holds
exactly what the model says, so a write is never lost from tracking.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blockbackup.block.bitmap import Bitmap
from blockbackup.block.dirty_bitmap import (
    DirtyBitmap,
    bitmaps_of,
    default_granularity,
    find_bitmap,
)
from blockbackup.block.graph import Graph
from blockbackup.block.node import BlockNode
from blockbackup.errors import BlockBackupError

GRAN = 512
NGRAN = 32
SIZE = GRAN * NGRAN


def make_node(size: int = SIZE) -> BlockNode:
    async def build() -> BlockNode:
        return await Graph().add({"driver": "null-co", "node-name": "n", "size": size})

    return asyncio.run(build())


def write(node: BlockNode, offset: int, length: int) -> None:
    """What the request layer does for every change of the node."""
    for tracker in node.dirty_trackers:
        tracker.mark_dirty(offset, length)


def granules(bm: Bitmap) -> set[int]:
    out: set[int] = set()
    for start, length in bm.runs():
        out.update(range(start // bm.granularity, -(-(start + length) // bm.granularity)))
    return out


def test_registry_rules_and_texts() -> None:
    node = make_node(1 << 20)
    reg = bitmaps_of(node)
    b0 = reg.create("b0")
    assert b0.granularity == default_granularity(node) == 65536
    assert find_bitmap(node, "b0") is b0
    assert find_bitmap(node, "nosuch") is None
    with pytest.raises(BlockBackupError, match=r"^Bitmap already exists: b0$"):
        reg.create("b0")
    for bad in (256, 1000, 0):
        with pytest.raises(BlockBackupError, match="Granularity must be power of 2 and at least"):
            reg.create("x", bad)
    with pytest.raises(BlockBackupError, match=r"^Bitmap name too long: x+$"):
        reg.create("x" * 1024)
    reg.create("y" * 1023)
    with pytest.raises(
        BlockBackupError, match="Can't store persistent bitmaps to n: Operation not supported"
    ):
        reg.create("p", persistent=True)
    b1 = reg.create("b1", 4096, disabled=True)
    write(node, 5000, 10)
    assert b0.count == 65536
    assert b1.count == 0
    assert not b1.recording
    b1.enable()
    b1.enable()  # idempotent
    write(node, 5000, 10)
    assert b1.count == 4096
    assert node.dirty_trackers.count(b1) == 1
    assert b0.info() == {
        "name": "b0",
        "recording": True,
        "persistent": False,
        "busy": False,
        "granularity": 65536,
        "count": 65536,
    }
    reg.release(b0)
    assert b0 not in node.dirty_trackers
    assert reg.get("b0") is None


def test_successor_freezes_and_is_listed_newest() -> None:
    node = make_node()
    reg = bitmaps_of(node)
    b0 = reg.create("b0", GRAN)
    reg.create("b1", GRAN)
    write(node, 0, 1)
    succ = b0.create_successor()
    assert b0.busy
    assert b0.recording
    assert not b0.enabled
    assert succ.name is None
    with pytest.raises(BlockBackupError, match="'b0' is currently in use by another operation"):
        b0.check_usable()
    write(node, GRAN, 1)
    assert b0.count == GRAN
    assert succ.count == GRAN
    assert [b.name for b in reg] == ["b0", "b1", None]
    result = b0.abdicate()
    assert result is succ
    assert result.name == "b0"
    assert granules(result.bitmap) == {1}
    assert [b.name for b in reg] == ["b1", "b0"]  # in the successor's place, as QEMU
    assert reg.get("b0") is result
    assert not result.busy


def test_sha256_matches_qemu_for_an_empty_bitmap() -> None:
    node = make_node(4 << 20)
    bm = bitmaps_of(node).create("b", 4096)
    # 1024 bits = 128 zero bytes, what qemu-storage-daemon 7.2 reports.
    assert bm.sha256() == "38723a2e5e8a17aa7950dc008209944e898f69a7bd10a23c839d341e935fd5ca"


ranges = st.tuples(st.integers(0, SIZE - 1), st.integers(1, 4 * GRAN)).map(
    lambda t: (t[0], min(t[1], SIZE - t[0]))
)


class SuccessorMachine(RuleBasedStateMachine):
    """The bitmap against a set model through freezes, writes and job endings."""

    @initialize()
    def setup(self) -> None:
        self.node = make_node()
        self.bm: DirtyBitmap = bitmaps_of(self.node).create("b0", GRAN)
        self.model: set[int] = set()  # what the named bitmap must hold (when not frozen)
        self.recording = True
        self.frozen: set[int] | None = None  # the frozen content while a job runs
        self.during: set[int] = set()  # writes while frozen

    @staticmethod
    def _span(offset: int, length: int) -> set[int]:
        return set(range(offset // GRAN, -(-(offset + length) // GRAN)))

    @rule(r=ranges)
    def write(self, r: tuple[int, int]) -> None:
        write(self.node, *r)
        if not self.recording:
            return
        if self.frozen is None:
            self.model |= self._span(*r)
        else:
            self.during |= self._span(*r)

    @precondition(lambda self: self.frozen is None)
    @rule(enable=st.booleans())
    def toggle(self, enable: bool) -> None:
        (self.bm.enable if enable else self.bm.disable)()
        self.recording = enable

    @precondition(lambda self: self.frozen is None)
    @rule()
    def clear(self) -> None:
        self.bm.clear()
        self.model = set()

    @precondition(lambda self: self.frozen is None)
    @rule()
    def start_job(self) -> None:
        self.bm.create_successor()
        self.frozen, self.during = set(self.model), set()

    @precondition(lambda self: self.frozen is not None)
    @rule(
        mode=st.sampled_from(["on-success", "always", "never"]),
        success=st.booleans(),
        uncopied=st.sets(st.integers(0, NGRAN - 1)),
    )
    def end_job(self, mode: str, success: bool, uncopied: set[int]) -> None:
        assert self.frozen is not None
        left = uncopied & self.frozen
        if (success or mode == "always") and mode != "never":
            self.bm = self.bm.abdicate()
            self.model = set(self.during)
        else:
            self.bm = self.bm.reclaim()
            self.model = self.frozen | self.during
        if not success and mode == "always":
            rest = Bitmap(SIZE, GRAN)
            for g in left:
                rest.set(g * GRAN, GRAN)
            self.bm.bitmap.merge(rest)
            self.model |= left
        self.frozen, self.during = None, set()
        assert self.bm.name == "b0"
        assert bitmaps_of(self.node).get("b0") is self.bm

    @invariant()
    def matches_model(self) -> None:
        if self.frozen is None:
            assert granules(self.bm.bitmap) == self.model
            assert self.bm.recording == self.recording == (self.bm in self.node.dirty_trackers)
        else:
            assert granules(self.bm.bitmap) == self.frozen
            assert self.bm.successor is not None
            assert granules(self.bm.successor.bitmap) == self.during
            assert self.bm.recording == self.recording

    @invariant()
    def writes_never_lost(self) -> None:
        tracked = granules(self.bm.bitmap)
        if self.bm.successor is not None:
            tracked |= granules(self.bm.successor.bitmap)
        assert self.during <= tracked


SuccessorMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=30, deadline=None
)
test_successor_machine = SuccessorMachine.TestCase
