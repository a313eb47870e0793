"""QEMU's JSON parser as a push parser: one token in at a time, constant work per token.

Why push, not recursive descent over a finished token list: a QMP message may hold up
to 2 Mi tokens (QEMU's limit). Parsing such a list in one go holds the event loop for
seconds; pushing each token as the lexer produces it spreads the work over the reads
that brought the bytes, so no single step costs more than its input. The grammar and
the error texts are those of QEMU's ``json-parser.c``: the first error wins, a key is
parsed as any value and then refused if it is not a string, a repeated key is a
"duplicate key", an integer too large for 64 bits becomes a float (``strtod``).

The tokens come from :mod:`blockbackup.qmp.jsonstream`, which decides where a message
ends (brackets balance) and calls :meth:`PushParser.result` there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Any

__all__ = ["BadString", "PushParser", "Tok", "number_value"]


class Tok(Enum):
    """Token kinds of QEMU's lexer (numbers are one kind here)."""

    LCURLY = auto()
    RCURLY = auto()
    LSQUARE = auto()
    RSQUARE = auto()
    COMMA = auto()
    COLON = auto()
    STRING = auto()
    NUMBER = auto()
    KEYWORD = auto()


@dataclass(frozen=True, slots=True)
class BadString:
    """A string token whose content QEMU refuses (the parser reports it when reached)."""

    reason: str


#: Integers with more digits than this cannot fit in 64 bits (and Python refuses to
#: convert strings of more than ~4300 digits to int): they go straight to float.
_MAX_INT_DIGITS = 20
_KEYWORDS: dict[str, Any] = {"true": True, "false": False, "null": None}


def number_value(text: str) -> int | float:
    """QEMU's ``parse_literal``: int64, else uint64, else a double (``inf`` if huge)."""
    integer = "." not in text and "e" not in text and "E" not in text
    if integer and len(text.lstrip("-")) <= _MAX_INT_DIGITS:
        number = int(text)
        if -(1 << 63) <= number < (1 << 64):
            return number
    return float(text)


class _State(Enum):
    TOP = auto()  # expecting the message's value
    OBJ_FIRST = auto()  # after "{": a key or "}"
    OBJ_KEY = auto()  # after ",": a key
    OBJ_COLON = auto()
    OBJ_VALUE = auto()
    OBJ_SEP = auto()  # "," or "}"
    ARR_FIRST = auto()  # after "[": a value or "]"
    ARR_VALUE = auto()  # after ","
    ARR_SEP = auto()  # "," or "]"


_EXPECTS_VALUE = frozenset(
    {
        _State.TOP,
        _State.OBJ_FIRST,
        _State.OBJ_KEY,
        _State.OBJ_VALUE,
        _State.ARR_FIRST,
        _State.ARR_VALUE,
    }
)


@dataclass(slots=True)
class _Frame:
    container: Any  # dict or list being filled
    state: _State
    key: str = ""


@dataclass(slots=True)
class PushParser:
    """One message's parse; :meth:`push` every token, then :meth:`result`."""

    _stack: list[_Frame] = field(default_factory=list)
    _error: str | None = None
    _done: bool = False
    _value: Any = None

    def result(self) -> tuple[Any, str | None]:
        """``(value, None)`` or ``(None, QEMU's error text)`` once the message ended."""
        if self._error is not None:
            return None, f"JSON parse error, {self._error}"
        if not self._done:
            return None, "JSON parse error, premature EOI"
        return self._value, None

    def _fail(self, reason: str) -> None:
        self._error = reason
        self._stack.clear()  # nothing after the first error is kept

    def push(self, kind: Tok, value: Any) -> None:
        """Take the next token: ``value`` is the keyword's or number's text, or the
        decoded string (a :class:`BadString` if it cannot be)."""
        if self._error is not None or self._done:
            return
        frame = self._stack[-1] if self._stack else None
        state = frame.state if frame is not None else _State.TOP
        if frame is not None and (
            (state is _State.OBJ_FIRST and kind is Tok.RCURLY)
            or (state is _State.ARR_FIRST and kind is Tok.RSQUARE)
        ):
            self._stack.pop()
            self._complete(frame.container)
        elif state in _EXPECTS_VALUE:
            if frame is not None and state is _State.OBJ_FIRST:
                frame.state = _State.OBJ_KEY
            elif frame is not None and state is _State.ARR_FIRST:
                frame.state = _State.ARR_VALUE
            self._start_value(kind, value)
        elif frame is None:  # pragma: no cover - TOP expects a value
            raise AssertionError(state)
        elif state is _State.OBJ_COLON:
            if kind is Tok.COLON:
                frame.state = _State.OBJ_VALUE
            else:
                self._fail("missing : in object pair")
        elif state is _State.OBJ_SEP:
            self._separator(frame, kind, Tok.RCURLY, _State.OBJ_KEY, "dict")
        else:
            self._separator(frame, kind, Tok.RSQUARE, _State.ARR_VALUE, "list")

    def _separator(self, frame: _Frame, kind: Tok, close: Tok, nxt: _State, what: str) -> None:
        if kind is close:
            self._stack.pop()
            self._complete(frame.container)
        elif kind is Tok.COMMA:
            frame.state = nxt
        else:
            self._fail(f"expected separator in {what}")

    def _start_value(self, kind: Tok, value: Any) -> None:
        if kind is Tok.LCURLY:
            self._stack.append(_Frame({}, _State.OBJ_FIRST))
        elif kind is Tok.LSQUARE:
            self._stack.append(_Frame([], _State.ARR_FIRST))
        elif kind is Tok.STRING:
            if isinstance(value, BadString):
                self._fail(value.reason)
            else:
                self._complete(value)
        elif kind is Tok.NUMBER:
            self._complete(number_value(value))
        elif kind is Tok.KEYWORD:
            if value in _KEYWORDS:
                self._complete(_KEYWORDS[value])
            else:
                self._fail(f"invalid keyword '{value}'")
        else:
            self._fail("expecting value")

    def _complete(self, value: Any) -> None:
        """A value is finished: it is the message, a key, a member or an element."""
        if not self._stack:
            self._value = value
            self._done = True
            return
        frame = self._stack[-1]
        if frame.state is _State.OBJ_KEY:
            if isinstance(value, str):
                frame.key = value
                frame.state = _State.OBJ_COLON
            else:
                self._fail("key is not a string in object")
        elif frame.state is _State.OBJ_VALUE:
            if frame.key in frame.container:
                self._fail("duplicate key")
            else:
                frame.container[frame.key] = value
                frame.state = _State.OBJ_SEP
        else:
            frame.container.append(value)
            frame.state = _State.ARR_SEP
