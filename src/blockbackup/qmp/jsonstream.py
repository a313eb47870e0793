"""A streaming JSON reader with QEMU's framing, limits and error texts.

Why not ``json.loads``: QMP input is a byte stream with no delimiter. Several objects may
arrive in one read and one object may be split over many; QEMU's reader (a lexer, a
"streamer" that counts brackets, and a parser) decides where a message ends and words its
errors ("JSON parse error, stray '@'", "... invalid keyword 'this'"). Scripts and tests
rely on those texts, so this module reproduces that behaviour:

* the lexer turns characters into tokens; an invalid character yields an error token,
  after which input is skipped until a structural character (``{ } [ ]``) appears;
* the streamer counts brackets and hands each token to a push parser
  (:mod:`blockbackup.qmp.jsonparser`); when the brackets balance (or go negative) the
  message ends with a value or a parse error;
* QEMU's limits bound what one client can make the daemon hold: 64 MiB per message
  (token text included), 2 Mi tokens, nesting 1024.

Why everything is incremental: a client that sends a 64 MiB string (or number, or
keyword) must not cost the daemon more than the bytes themselves. Each :meth:`feed` does
work proportional to the data it is given, never to what is already pending: an open
token grows as a list of pieces (strings are unescaped piece by piece), its size is
checked as the bytes arrive, and the parser builds the value token by token. So the
size limit refuses a message the moment it is exceeded, and a monitor client that
floods never holds the event loop longer than one read takes.

It is sans-IO: :meth:`JsonStreamer.feed` takes bytes and returns complete messages.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from typing import Any

from blockbackup.qmp.jsonparser import BadString, PushParser, Tok

__all__ = ["JsonParseError", "JsonStreamer"]

#: Bytes one pending message (or token) may hold before it is refused (QEMU's).
MAX_TOKEN_SIZE = 64 << 20
#: Tokens one pending message may hold (QEMU's).
MAX_TOKEN_COUNT = 2 << 20
#: Nesting depth of one message (QEMU's).
MAX_NESTING = 1024


@dataclass(frozen=True, slots=True)
class JsonParseError:
    """A message that could not be read; ``desc`` is QEMU's text."""

    desc: str


_PUNCT = {
    "{": Tok.LCURLY,
    "}": Tok.RCURLY,
    "[": Tok.LSQUARE,
    "]": Tok.RSQUARE,
    ",": Tok.COMMA,
    ":": Tok.COLON,
}
_WS_RUN = re.compile(r"[ \t\r\n]+")
_RECOVER = re.compile(r"[{}\[\]]")
_KEYWORD_RUN = re.compile(r"[a-z]*")
_DIGIT_RUN = re.compile(r"[0-9]*")
_STRING_SPECIAL = {'"': re.compile(r'["\\]'), "'": re.compile(r"['\\]")}
_HEX4 = re.compile(r"[0-9a-fA-F]{4}\Z")
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n"}
_ESCAPES |= {"r": "\r", "t": "\t"}
_NUMBER_CHARS = frozenset("0123456789+-.eE")

# The number grammar (RFC 8259) as a small automaton, so that a number split over
# reads is checked as it arrives: state -> {character class -> next state}.
_N_START, _N_MINUS, _N_ZERO, _N_INT, _N_DOT, _N_FRAC, _N_EXP, _N_ESIGN, _N_EXPD = range(9)
_N_ACCEPT = frozenset({_N_ZERO, _N_INT, _N_FRAC, _N_EXPD})
_N_DIGITS = frozenset({_N_INT, _N_FRAC, _N_EXPD})  # states that loop on any digit
_N_NEXT: dict[int, dict[str, int]] = {
    _N_START: {"-": _N_MINUS, "0": _N_ZERO, "d": _N_INT},
    _N_MINUS: {"0": _N_ZERO, "d": _N_INT},
    _N_ZERO: {".": _N_DOT, "e": _N_EXP},
    _N_INT: {"0": _N_INT, "d": _N_INT, ".": _N_DOT, "e": _N_EXP},
    _N_DOT: {"0": _N_FRAC, "d": _N_FRAC},
    _N_FRAC: {"0": _N_FRAC, "d": _N_FRAC, "e": _N_EXP},
    _N_EXP: {"+": _N_ESIGN, "-": _N_ESIGN, "0": _N_EXPD, "d": _N_EXPD},
    _N_ESIGN: {"0": _N_EXPD, "d": _N_EXPD},
    _N_EXPD: {"0": _N_EXPD, "d": _N_EXPD},
}


def _char_class(c: str) -> str:
    if c == "0":
        return "0"
    if "1" <= c <= "9":
        return "d"
    if c in "eE":
        return "e"
    return c


def _valid_code_point(cp: int) -> bool:
    """QEMU's ``is_valid_codepoint``: no surrogates, no noncharacters."""
    if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF or 0xFDD0 <= cp <= 0xFDEF:
        return False
    return (cp & 0xFFFE) != 0xFFFE


class _Incomplete(Exception):
    """An escape sequence continues in the next read."""


@dataclass(slots=True)
class _Open:
    """The token being read: its kind, its pieces and their length so far."""

    kind: Tok
    pieces: list[str] = field(default_factory=list)
    size: int = 0  # raw characters, quotes included
    quote: str = ""
    carry: str = ""  # the start of an escape sequence cut by the end of a read
    bad: str | None = None  # why the string's content is refused
    state: int = _N_START
    accepted: int = 0  # length of the longest valid number prefix


class JsonStreamer:
    """Bytes in, complete JSON messages (values or :class:`JsonParseError`) out."""

    def __init__(
        self,
        *,
        max_size: int = MAX_TOKEN_SIZE,
        max_tokens: int = MAX_TOKEN_COUNT,
        max_nesting: int = MAX_NESTING,
    ) -> None:
        self.max_size = max_size
        self.max_tokens = max_tokens
        self.max_nesting = max_nesting
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._open: _Open | None = None
        self._recovering = False
        self._parser = PushParser()
        self._size = 0
        self._count = 0
        self._depth_brace = 0
        self._depth_square = 0

    @property
    def pending(self) -> int:
        """Characters held for an incomplete message (for tests and limits)."""
        return self._size + (self._open.size if self._open is not None else 0)

    def feed(self, data: bytes | memoryview) -> list[Any | JsonParseError]:
        """Consume ``data``; return every message it completed, in order."""
        out: list[Any | JsonParseError] = []
        self._lex(self._decoder.decode(data), out)
        return out

    # -- the lexer ---------------------------------------------------------------------------

    def _lex(self, text: str, out: list[Any | JsonParseError]) -> None:
        i = 0
        n = len(text)
        while i < n:
            if self._open is not None:
                i = self._continue(text, i, out)
                continue
            if self._recovering:
                m = _RECOVER.search(text, i)
                if m is None:
                    return
                i = m.start()
                self._recovering = False
            c = text[i]
            punct = _PUNCT.get(c)
            if punct is not None:
                self._token(punct, c, 1, out)
                i += 1
            elif c in " \t\r\n":
                m = _WS_RUN.match(text, i)
                assert m is not None
                i = m.end()
            elif c in "\"'":
                self._open = _Open(Tok.STRING, quote=c, size=1)
                i += 1
            elif c == "-" or "0" <= c <= "9":
                self._open = _Open(Tok.NUMBER)
            elif "a" <= c <= "z":
                self._open = _Open(Tok.KEYWORD)
            else:
                self._error(c, out)
                i += 1

    def _continue(self, text: str, i: int, out: list[Any | JsonParseError]) -> int:
        """Read on in the open token; the index where its reading stopped."""
        tok = self._open
        assert tok is not None
        if tok.kind is Tok.STRING:
            end = self._string(tok, text, i, out)
        elif tok.kind is Tok.NUMBER:
            end = self._number(tok, text, i, out)
        else:
            m = _KEYWORD_RUN.match(text, i)
            assert m is not None
            end = m.end()
            tok.pieces.append(text[i:end])
            tok.size += end - i
            if end < len(text) and self._open is tok:
                self._open = None
                self._token(Tok.KEYWORD, "".join(tok.pieces), tok.size, out)
        if self._open is tok and self._size + tok.size + 1 > self.max_size:
            # Refused as the bytes arrive; what follows is skipped as after an error.
            self._open = None
            self._limit("JSON token size limit exceeded", out)
            self._recovering = True
            return len(text)
        return end

    def _string(self, tok: _Open, text: str, i: int, out: list[Any | JsonParseError]) -> int:
        """Scan and unescape string content from ``i``; close the token at its quote."""
        if tok.carry:
            # An escape sequence was cut by the end of the previous read (it has no
            # quote, at most 11 characters): read it again in front of this text.
            carry, tok.carry = tok.carry, ""
            tok.size -= len(carry)
            return self._string(tok, carry + text[i:], 0, out) - len(carry) + i
        n = len(text)
        special = _STRING_SPECIAL[tok.quote]
        start = i
        while True:
            m = special.search(text, i)
            if m is None:
                if tok.bad is None:
                    tok.pieces.append(text[i:])
                tok.size += n - start
                return n
            k = m.start()
            if tok.bad is None and k > i:
                tok.pieces.append(text[i:k])
            if text[k] == tok.quote:
                tok.size += k + 1 - start
                self._open = None
                value = BadString(tok.bad) if tok.bad is not None else "".join(tok.pieces)
                self._token(Tok.STRING, value, tok.size, out)
                return k + 1
            try:
                i = self._escape(tok, text, k)
            except _Incomplete:
                tok.carry = text[k:]
                tok.size += n - start
                return n

    @staticmethod
    def _escape(tok: _Open, text: str, k: int) -> int:
        """Decode the escape at ``text[k]`` (a backslash) into ``tok``; the index after it.

        QEMU's ``parse_string``: the usual escapes plus ``\\'``; ``\\uXXXX`` with
        surrogate pairs; anything else, or a code point that is not a valid character,
        makes the string an error (its text then no longer matters, only its end).
        """
        if k + 1 >= len(text):
            raise _Incomplete
        e = text[k + 1]
        if tok.bad is not None or e != "u":
            if tok.bad is None:
                decoded = _ESCAPES.get(e)
                if decoded is None:
                    tok.bad = "invalid escape sequence in string"
                else:
                    tok.pieces.append(decoded)
            return k + 2
        hex1 = text[k + 2 : k + 6]
        if tok.quote in hex1:  # the string ends inside: QEMU shows up to its quote
            tok.bad = f"{text[k : k + 3 + hex1.index(tok.quote)]} is not a valid Unicode character"
            return k + 2
        if len(hex1) < 4:
            raise _Incomplete
        if not _HEX4.match(hex1):
            tok.bad = f"{text[k : k + 6]} is not a valid Unicode character"
            return k + 2
        cp = int(hex1, 16)
        end = k + 6
        if 0xD800 <= cp <= 0xDBFF:
            nxt = text[end : end + 6]
            if len(nxt) < 6 and "\\u".startswith(nxt[:2]) and tok.quote not in nxt:
                raise _Incomplete  # a low surrogate may follow in the next read
            if nxt[:2] == "\\u":
                low = int(nxt[2:], 16) if _HEX4.match(nxt[2:]) else -1
                cp = (
                    0x10000 + ((cp & 0x3FF) << 10) + (low & 0x3FF)
                    if 0xDC00 <= low <= 0xDFFF
                    else -1
                )
                if cp >= 0:
                    end += 6
        if cp < 0 or not _valid_code_point(cp):
            tok.bad = f"{text[k : k + 6]} is not a valid Unicode character"
            return k + 6
        tok.pieces.append(chr(cp))
        return end

    def _number(self, tok: _Open, text: str, i: int, out: list[Any | JsonParseError]) -> int:
        """Run the number automaton from ``i``; finish the token where it stops."""
        n = len(text)
        j = i
        state = tok.state
        while j < n:
            c = text[j]
            if state in _N_DIGITS and "0" <= c <= "9":
                m = _DIGIT_RUN.match(text, j)
                assert m is not None
                j = m.end()
                tok.accepted = tok.size + (j - i)
                continue
            nxt = _N_NEXT[state].get(_char_class(c))
            if nxt is None:
                break
            state = nxt
            j += 1
            if state in _N_ACCEPT:
                tok.accepted = tok.size + (j - i)
        tok.pieces.append(text[i:j])
        tok.size += j - i
        tok.state = state
        if j == n:
            return n  # may continue in the next read
        self._open = None
        if state in _N_ACCEPT and text[j] not in _NUMBER_CHARS:
            self._token(Tok.NUMBER, "".join(tok.pieces), tok.size, out)
            return j
        # QEMU's error text: the longest valid prefix and the character after it; the
        # characters read beyond that (at most two, like "e+") are read again.
        whole = "".join(tok.pieces)
        bad = max(tok.accepted, 1)
        if bad < tok.size:
            self._error(whole[: bad + 1], out)
            self._lex(whole[bad + 1 :], out)
            return j
        self._error(whole + text[j], out)
        return j + 1

    # -- the streamer ------------------------------------------------------------------------

    def _reset(self) -> None:
        self._parser = PushParser()
        self._size = 0
        self._count = 0
        self._depth_brace = 0
        self._depth_square = 0

    def _limit(self, desc: str, out: list[Any | JsonParseError]) -> None:
        self._reset()
        out.append(JsonParseError(desc))

    def _error(self, text: str, out: list[Any | JsonParseError]) -> None:
        self._reset()
        self._recovering = True
        out.append(JsonParseError(f"JSON parse error, stray '{text}'"))

    def _token(self, kind: Tok, value: Any, size: int, out: list[Any | JsonParseError]) -> None:
        """QEMU's ``json_message_process_token``: count, check the limits, parse."""
        if kind is Tok.LCURLY:
            self._depth_brace += 1
        elif kind is Tok.RCURLY:
            self._depth_brace -= 1
        elif kind is Tok.LSQUARE:
            self._depth_square += 1
        elif kind is Tok.RSQUARE:
            self._depth_square -= 1
        if self._size + size + 1 > self.max_size:
            self._limit("JSON token size limit exceeded", out)
            return
        if self._count + 1 > self.max_tokens:
            self._limit("JSON token count limit exceeded", out)
            return
        if self._depth_brace + self._depth_square > self.max_nesting:
            self._limit("JSON nesting depth limit exceeded", out)
            return
        self._size += size
        self._count += 1
        self._parser.push(kind, value)
        if (self._depth_brace > 0 or self._depth_square > 0) and (
            self._depth_brace >= 0 and self._depth_square >= 0
        ):
            return
        result, error = self._parser.result()
        self._reset()
        out.append(JsonParseError(error) if error is not None else result)
