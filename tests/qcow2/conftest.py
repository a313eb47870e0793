"""Fixtures for the qcow2 tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from blockbackup.block.graph import Graph


@pytest_asyncio.fixture
async def graph() -> AsyncIterator[Graph]:
    g = Graph()
    try:
        yield g
    finally:
        await g.aclose()
