"""Exhaustive checks of the handshake transition table.

Why: every (state, event type) pair is either in ``TRANSITIONS`` and lands
exactly where the table says, or is refused with ``LocalProtocolError`` and
moves the machine to ERROR; nothing in between.
"""

from __future__ import annotations

import pytest

from blockbackup.nbd.proto import (
    TRANSITIONS,
    BlockSizeInfo,
    ClientFlags,
    Event,
    ExportDescription,
    ExportInfo,
    ExportName,
    HandshakeState,
    InvalidOption,
    LocalProtocolError,
    MetaContext,
    OptAbort,
    OptExportName,
    OptGo,
    OptInfo,
    OptionAck,
    OptionError,
    OptList,
    OptListMetaContext,
    OptSetMetaContext,
    OptStartTls,
    OptStructuredReply,
    ServerGreeting,
    ServerListEntry,
    TlsEstablished,
    UnknownInfo,
    UnknownOption,
)
from blockbackup.nbd.proto.constants import HandshakeFlag
from blockbackup.nbd.proto.handshake import HandshakeCore

SAMPLES: list[Event] = [
    ServerGreeting(),
    ClientFlags(),
    OptExportName(name="a"),
    OptAbort(),
    OptList(),
    OptStartTls(),
    OptInfo(name="a"),
    OptGo(name="a"),
    OptStructuredReply(),
    OptListMetaContext(export_name="a"),
    OptSetMetaContext(export_name="a", queries=("base:allocation",)),
    UnknownOption(option=77),
    InvalidOption(option=7, data=b"x"),
    OptionAck(),
    OptionError(),
    ServerListEntry(name="a"),
    ExportInfo(size=1),
    ExportName(name="a"),
    ExportDescription(description="d"),
    BlockSizeInfo(),
    UnknownInfo(info_type=99),
    MetaContext(context_id=1, name="base:allocation"),
    TlsEstablished(),
]

_OPTION_FOR = {
    HandshakeState.GO_REPLY: OptGo(name="a"),
    HandshakeState.INFO_REPLY: OptInfo(name="a"),
    HandshakeState.EXPORT_NAME_REPLY: OptExportName(name="a"),
    HandshakeState.SET_META_REPLY: OptSetMetaContext(export_name="a"),
}


def primed(state: HandshakeState) -> HandshakeCore:
    """A core in ``state`` with the guards' preconditions satisfied."""
    core = HandshakeCore()
    core.server_flags = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
    core.state = state
    core.option = _OPTION_FOR.get(state, OptList())
    if state in (HandshakeState.GO_REPLY, HandshakeState.INFO_REPLY):
        core._info = ExportInfo(size=1)
    return core


def test_table_covers_every_state():
    assert set(TRANSITIONS) == set(HandshakeState)


def test_every_event_type_appears_in_samples():
    in_table = {t for row in TRANSITIONS.values() for t in row}
    assert in_table == {type(e) for e in SAMPLES}


@pytest.mark.parametrize("state", list(HandshakeState), ids=lambda s: s.name)
@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_transition(state: HandshakeState, event: Event):
    core = primed(state)
    if isinstance(event, ExportInfo) and state in (
        HandshakeState.GO_REPLY,
        HandshakeState.INFO_REPLY,
    ):
        core._info = None  # ExportInfo is allowed once per reply
    expected = TRANSITIONS[state].get(type(event))
    if expected is None:
        with pytest.raises(LocalProtocolError):
            core.process(event)
        assert core.state is HandshakeState.ERROR
    else:
        assert core.process(event) is expected
        assert core.state is expected


def test_guard_ack_to_go_needs_export_info():
    core = primed(HandshakeState.GO_REPLY)
    core._info = None
    with pytest.raises(LocalProtocolError):
        core.process(OptionAck())
    assert core.state is HandshakeState.ERROR


def test_guard_client_flags():
    for flags, ok in ((1, True), (3, True), (0, False), (1 | 4, False)):
        core = primed(HandshakeState.CLIENT_FLAGS)
        if ok:
            core.process(ClientFlags(flags=flags))
        else:
            with pytest.raises(LocalProtocolError):
                core.process(ClientFlags(flags=flags))
    core = primed(HandshakeState.CLIENT_FLAGS)
    core.server_flags = HandshakeFlag.FIXED_NEWSTYLE
    with pytest.raises(LocalProtocolError):
        core.process(ClientFlags(flags=3))  # NO_ZEROES not offered


def test_tls_forgets_clear_text_negotiation():
    core = primed(HandshakeState.TLS_UPGRADE)
    core.structured_replies = True
    core.meta_contexts = {1: "base:allocation"}
    core.process(TlsEstablished())
    assert not core.structured_replies
    assert not core.meta_contexts
    assert core.tls


def test_set_meta_failure_clears_selection():
    core = primed(HandshakeState.OPTIONS)
    core.meta_contexts = {1: "base:allocation"}
    core.process(OptSetMetaContext(export_name="a"))
    core.process(MetaContext(context_id=3, name="base:allocation"))
    core.process(OptionError())
    assert core.meta_contexts == {}
