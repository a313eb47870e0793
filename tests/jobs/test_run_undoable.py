"""``run_undoable``: a cancelled caller waits for the blocking call to end and undoes what
it made, so its clean-up never races a call still under way."""

from __future__ import annotations

import asyncio
import threading

import pytest

from blockbackup._aio import run_undoable

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(30)]


async def test_a_cancelled_call_is_waited_for_and_undone() -> None:
    started, release = threading.Event(), threading.Event()
    made: list[str] = []
    undone: list[str] = []

    def make() -> str:
        started.set()
        release.wait(10)
        made.append("marker")
        return "marker"

    task = asyncio.ensure_future(run_undoable(make, undone.append))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()  # still waiting for the call, which has made nothing yet
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert made == undone == ["marker"]


async def test_a_call_that_fails_after_the_cancel_has_nothing_to_undo() -> None:
    started, release = threading.Event(), threading.Event()
    undone: list[object] = []

    def fail() -> None:
        started.set()
        release.wait(10)
        raise OSError("failed")

    task = asyncio.ensure_future(run_undoable(fail, undone.append))
    await asyncio.to_thread(started.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert undone == []


async def test_without_a_cancel_it_is_the_call() -> None:
    assert await run_undoable(lambda: 42, pytest.fail) == 42
    with pytest.raises(OSError, match="failed"):
        await run_undoable(_raise, pytest.fail)


def _raise() -> None:
    raise OSError("failed")
