"""Tests for ``blockbackup.block.reqlist``: waiting semantics, then a stateful model check.

No wall-clock sleeps: waiting tests let the loop run until every task is blocked (see
``settle``) and then inspect which tasks finished.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    multiple,
    rule,
)

from blockbackup.block.reqlist import ReqList, Request


async def settle() -> None:
    """Give every ready task a chance to run until it blocks again."""
    for _ in range(10):
        await asyncio.sleep(0)


# -- sync API ------------------------------------------------------------------------------


def test_add_find_remove() -> None:
    rl = ReqList()
    a = rl.add(0, 4096)
    b = rl.add(8192, 4096)
    assert (a.offset, a.length, a.end) == (0, 4096, 4096)
    assert len(rl) == 2
    assert list(rl) == [a, b]
    assert rl.bytes_in_flight == 8192
    assert rl.find_conflict(4096, 4096) is None  # touching is not overlapping
    assert rl.find_conflict(4095, 1) is a
    assert rl.find_conflict(0, 100_000) is a  # oldest first
    assert rl.find_conflict(12_287, 10) is b
    assert rl.find_conflict(100, 0) is None  # empty range never conflicts
    rl.remove(a)
    assert a.done
    assert not b.done
    assert rl.find_conflict(0, 4096) is None
    assert rl.bytes_in_flight == 4096
    assert len(rl) == 1


def test_add_does_not_check_conflicts() -> None:
    rl = ReqList()
    a = rl.add(0, 100)
    b = rl.add(50, 100)
    assert rl.find_conflict(60, 1) is a
    rl.remove(a)
    assert rl.find_conflict(60, 1) is b


def test_zero_length_request_never_conflicts() -> None:
    rl = ReqList()
    rl.add(10, 0)
    assert rl.find_conflict(0, 100) is None
    assert len(rl) == 1


def test_add_rejects_negative() -> None:
    rl = ReqList()
    with pytest.raises(ValueError, match="invalid"):
        rl.add(-1, 10)
    with pytest.raises(ValueError, match="invalid"):
        rl.add(0, -10)


def test_remove_twice_or_foreign_raises() -> None:
    rl, other = ReqList(), ReqList()
    a = rl.add(0, 10)
    rl.remove(a)
    with pytest.raises(ValueError, match="not in this list"):
        rl.remove(a)
    b = other.add(0, 10)
    with pytest.raises(ValueError, match="not in this list"):
        rl.remove(b)
    assert len(other) == 1


def test_shrink() -> None:
    rl = ReqList()
    a = rl.add(1000, 1000)
    rl.shrink(a, 400)
    assert (a.offset, a.length, a.end) == (1000, 400, 1400)
    assert rl.bytes_in_flight == 400
    assert rl.find_conflict(1400, 600) is None
    assert rl.find_conflict(1399, 1) is a
    rl.shrink(a, 400)  # same length: no-op
    for bad in (0, -1, 401):
        with pytest.raises(ValueError, match="cannot shrink"):
            rl.shrink(a, bad)
    rl.remove(a)
    with pytest.raises(ValueError, match="not in this list"):
        rl.shrink(a, 100)


def test_iteration_is_a_snapshot() -> None:
    rl = ReqList()
    reqs = [rl.add(i * 10, 10) for i in range(5)]
    for req in rl:
        rl.remove(req)
    assert len(rl) == 0
    assert all(r.done for r in reqs)
    assert "0 requests" in repr(rl)
    assert "done" in repr(reqs[0])


# -- waiting -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_wait_conflicts_returns_at_once_without_conflict() -> None:
    rl = ReqList()
    rl.add(0, 10)
    await rl.wait_conflicts(10, 10)  # would hang (test timeout) if it waited


@pytest.mark.asyncio
async def test_wait_conflicts_wakes_on_remove() -> None:
    rl = ReqList()
    a = rl.add(0, 100)
    b = rl.add(200, 100)
    waiter = asyncio.create_task(rl.wait_conflicts(50, 200))  # overlaps both
    await settle()
    assert not waiter.done()
    rl.remove(a)
    await settle()
    assert not waiter.done()  # woke, rechecked, now waits for b
    rl.remove(b)
    await settle()
    assert waiter.done()
    await waiter


@pytest.mark.asyncio
async def test_remove_wakes_all_waiters() -> None:
    rl = ReqList()
    a = rl.add(0, 100)
    waiters = [asyncio.create_task(rl.wait_conflicts(i * 10, 5)) for i in range(5)]
    plain = asyncio.create_task(a.wait())
    await settle()
    assert not any(w.done() for w in [*waiters, plain])
    rl.remove(a)
    await asyncio.gather(*waiters, plain)


@pytest.mark.asyncio
async def test_shrink_wakes_only_waiters_that_no_longer_overlap() -> None:
    rl = ReqList()
    a = rl.add(0, 1000)
    head = asyncio.create_task(rl.wait_conflicts(100, 10))
    tail = asyncio.create_task(rl.wait_conflicts(900, 50))
    finish = asyncio.create_task(a.wait())
    await settle()
    rl.shrink(a, 500)
    await settle()
    assert tail.done()  # its range is free now
    assert not head.done()  # still overlaps the remaining [0, 500)
    assert not finish.done()  # Request.wait() waits for removal, not for shrinking
    rl.remove(a)
    await settle()
    assert head.done()
    assert finish.done()
    await asyncio.gather(head, tail, finish)


@pytest.mark.asyncio
async def test_wait_on_removed_request_returns() -> None:
    rl = ReqList()
    a = rl.add(0, 1)
    rl.remove(a)
    await a.wait()


@pytest.mark.asyncio
async def test_cancelled_waiter_leaves_list_intact() -> None:
    rl = ReqList()
    a = rl.add(0, 100)
    cancelled = asyncio.create_task(rl.wait_conflicts(0, 10))
    other = asyncio.create_task(rl.wait_conflicts(50, 10))
    await settle()
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert list(rl) == [a]
    rl.remove(a)
    await other


@pytest.mark.asyncio
async def test_waiter_then_add_serialises_overlapping_copies() -> None:
    """The block-copy pattern: wait for conflicts, then add, with no await in between."""
    rl = ReqList()
    order: list[str] = []
    gate = asyncio.Event()

    async def copy(name: str, offset: int, length: int) -> None:
        await rl.wait_conflicts(offset, length)
        req = rl.add(offset, length)
        assert rl.find_conflict(offset, length) is req
        order.append(f"{name} start")
        await gate.wait()
        order.append(f"{name} end")
        rl.remove(req)

    first = asyncio.create_task(copy("first", 0, 100))
    await settle()
    second = asyncio.create_task(copy("second", 50, 100))
    await settle()
    assert order == ["first start"]
    gate.set()
    await asyncio.gather(first, second)
    assert order == ["first start", "first end", "second start", "second end"]
    assert len(rl) == 0


# -- stateful comparison against a list-of-intervals model ---------------------------------

SPAN = 256


class ReqListMachine(RuleBasedStateMachine):
    """Drive ``ReqList`` and a model ``dict[Request, (offset, length)]`` in lockstep."""

    reqs = Bundle("reqs")

    def __init__(self) -> None:
        super().__init__()
        self.rl = ReqList()
        self.model: dict[int, tuple[Request, int, int]] = {}  # id -> (req, offset, length)

    @rule(
        target=reqs,
        offset=st.integers(0, SPAN),
        length=st.integers(0, SPAN // 4),
    )
    def add(self, offset: int, length: int) -> Request:
        req = self.rl.add(offset, length)
        self.model[id(req)] = (req, offset, length)
        return req

    @rule(req=consumes(reqs))
    def remove(self, req: Request) -> None:
        self.rl.remove(req)
        del self.model[id(req)]
        assert req.done
        with pytest.raises(ValueError, match="not in this list"):
            self.rl.remove(req)

    @rule(target=reqs, req=consumes(reqs), data=st.data())
    def shrink(self, req: Request, data: st.DataObject) -> object:
        _, offset, length = self.model[id(req)]
        if length == 0:
            with pytest.raises(ValueError, match="cannot shrink"):
                self.rl.shrink(req, 1)
            return multiple(req)
        new_length = data.draw(st.integers(1, length), label="new_length")
        self.rl.shrink(req, new_length)
        self.model[id(req)] = (req, offset, new_length)
        return multiple(req)

    @rule(offset=st.integers(0, SPAN + SPAN // 4), length=st.integers(0, SPAN // 2))
    def probe(self, offset: int, length: int) -> None:
        overlapping = [
            req
            for req, o, n in self.model.values()
            if n > 0 and length > 0 and o < offset + length and offset < o + n
        ]
        found = self.rl.find_conflict(offset, length)
        if overlapping:
            assert found is not None
            assert any(found is r for r in overlapping)
            assert found is next(r for r in self.rl if any(r is o for o in overlapping))
        else:
            assert found is None

    @invariant()
    def agrees_with_model(self) -> None:
        assert len(self.rl) == len(self.model)
        assert {id(r) for r in self.rl} == set(self.model)
        assert self.rl.bytes_in_flight == sum(n for _, _, n in self.model.values())
        for req, offset, length in self.model.values():
            assert (req.offset, req.length, req.end) == (offset, length, offset + length)
            assert not req.done


ReqListMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=30, deadline=None)
TestReqListMachine = ReqListMachine.TestCase
