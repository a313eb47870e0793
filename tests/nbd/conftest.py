"""Shared helpers for the sans-IO NBD tests: an in-memory client/server pair.

Why: most tests need a negotiated session; ``ConnectionPair`` wires a
``ClientConnection`` to a ``ServerConnection`` through plain byte copies and
records every byte each side wrote, so fuzz tests can replay real streams.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import pytest

from blockbackup.nbd.proto import (
    NEED_DATA,
    ClientConnection,
    ClientFlags,
    Event,
    ExportInfo,
    Info,
    MetaContext,
    NegotiatedExport,
    OptGo,
    OptionAck,
    OptSetMetaContext,
    OptStructuredReply,
    ServerConnection,
    ServerGreeting,
    TxFlag,
)
from blockbackup.nbd.proto.events import BlockSizeInfo, OptExportName
from blockbackup.nbd.proto.wire import Buffer

EXPORT_SIZE = 1024 * 1024
ALL_TX = (
    TxFlag.HAS_FLAGS
    | TxFlag.SEND_FLUSH
    | TxFlag.SEND_FUA
    | TxFlag.SEND_TRIM
    | TxFlag.SEND_WRITE_ZEROES
    | TxFlag.SEND_DF
    | TxFlag.CAN_MULTI_CONN
    | TxFlag.SEND_CACHE
    | TxFlag.SEND_FAST_ZERO
)
CONTEXTS = ("base:allocation", "qemu:dirty-bitmap:b0")


def drain(conn: ClientConnection | ServerConnection) -> list[Event]:
    """All events currently parseable."""
    out: list[Event] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        assert isinstance(ev, Event)
        out.append(ev)


def join(parts: Sequence[Buffer]) -> bytes:
    return b"".join(bytes(p) for p in parts)


@dataclass
class ConnectionPair:
    """A client and a server connected in memory."""

    client: ClientConnection = field(default_factory=ClientConnection)
    server: ServerConnection = field(default_factory=ServerConnection)
    #: Everything each side sent, in order: ("c"|"s", bytes).
    log: list[tuple[str, bytes]] = field(default_factory=list)
    #: Events the client sent, interleaved with the server bytes it got.
    script: list[tuple[str, object]] = field(default_factory=list)

    EXPORT_SIZE: ClassVar[int] = EXPORT_SIZE
    ALL_TX: ClassVar[TxFlag] = ALL_TX
    drain = staticmethod(drain)
    join = staticmethod(join)

    def c(self, event: Event, **kw: object) -> list[Event]:
        """Client sends ``event``; return what the server parses from it."""
        data = join(self.client.send(event, **kw))  # type: ignore[arg-type]
        self.log.append(("c", data))
        self.script.append(("c", event))
        self.server.receive_data(data)
        return drain(self.server)

    def s(self, *events: Event) -> list[Event]:
        """Server sends ``events``; return what the client parses from them."""
        data = b"".join(join(self.server.send(ev)) for ev in events)
        self.log.append(("s", data))
        self.script.append(("s", data))
        self.client.receive_data(data)
        return drain(self.client)

    def raw_c(self, data: bytes) -> list[Event]:
        self.server.receive_data(data)
        return drain(self.server)

    def greet(self) -> None:
        assert self.s(ServerGreeting()) == [ServerGreeting()]
        assert self.c(ClientFlags()) == [ClientFlags()]

    def handshake(
        self,
        *,
        structured: bool = True,
        contexts: Sequence[str] = CONTEXTS,
        size: int = EXPORT_SIZE,
        flags: TxFlag = ALL_TX,
        block_sizes: BlockSizeInfo | None = None,
        export_name: bool = False,
    ) -> NegotiatedExport:
        """Run a full fixed-newstyle negotiation; return the client's result."""
        self.greet()
        if not structured:
            flags &= ~TxFlag.SEND_DF
        if export_name:
            assert self.c(OptExportName(name="disk")) == [OptExportName(name="disk")]
            (neg,) = self.s(ExportInfo(size=size, transmission_flags=flags))
            assert isinstance(neg, NegotiatedExport)
            return neg
        if structured:
            assert self.c(OptStructuredReply()) == [OptStructuredReply()]
            assert self.s(OptionAck()) == [OptionAck()]
            query = OptSetMetaContext(export_name="disk", queries=tuple(contexts))
            assert self.c(query) == [query]
            metas = [MetaContext(context_id=i + 7, name=n) for i, n in enumerate(contexts)]
            assert self.s(*metas, OptionAck()) == [*metas, OptionAck()]
        go = OptGo(name="disk", info_requests=(Info.BLOCK_SIZE, Info.NAME))
        assert self.c(go) == [go]
        info = ExportInfo(size=size, transmission_flags=flags)
        replies: list[Event] = [info]
        if block_sizes is not None:
            replies.append(block_sizes)
        got = self.s(*replies, OptionAck())
        assert got[:-1] == replies
        neg = got[-1]
        assert isinstance(neg, NegotiatedExport)
        assert self.server.export == neg
        return neg


@pytest.fixture
def pair() -> ConnectionPair:
    return ConnectionPair()


@pytest.fixture
def make_pair() -> type[ConnectionPair]:
    return ConnectionPair
