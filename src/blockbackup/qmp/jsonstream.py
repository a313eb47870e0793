"""A streaming JSON reader with QEMU's framing and error texts.

Why not ``json.loads``: QMP input is a byte stream with no delimiter. Several objects may
arrive in one read and one object may be split over many; QEMU's reader (a lexer, a
"streamer" that counts brackets, and a parser) decides where a message ends and words its
errors ("JSON parse error, stray '@'", "... invalid keyword 'this'"). Scripts and tests
rely on those texts, so this module reproduces that behaviour:

* the lexer turns characters into tokens; an invalid character yields an error token,
  after which input is skipped until a structural character (``{ } [ ]``) appears;
* the streamer collects tokens until the brackets balance (or go negative), then hands
  the tokens to the parser, which yields a value or a parse error;
* limits on the size of a pending message, its token count and nesting depth bound
  the memory one client can make the daemon use.

It is sans-IO: :meth:`JsonStreamer.feed` takes bytes and returns complete messages.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any

__all__ = ["JsonParseError", "JsonStreamer"]

#: Bytes one pending message (or token) may hold before it is refused.
MAX_TOKEN_SIZE = 64 << 20
#: Tokens one pending message may hold.
MAX_TOKEN_COUNT = 1 << 18
#: Nesting depth of one message.
MAX_NESTING = 1024


@dataclass(frozen=True, slots=True)
class JsonParseError:
    """A message that could not be read; ``desc`` is QEMU's text."""

    desc: str


class _Tok(Enum):
    LCURLY = auto()
    RCURLY = auto()
    LSQUARE = auto()
    RSQUARE = auto()
    COMMA = auto()
    COLON = auto()
    STRING = auto()
    NUMBER = auto()
    KEYWORD = auto()
    ERROR = auto()


_PUNCT = {
    "{": _Tok.LCURLY,
    "}": _Tok.RCURLY,
    "[": _Tok.LSQUARE,
    "]": _Tok.RSQUARE,
    ",": _Tok.COMMA,
    ":": _Tok.COLON,
}
_WS = " \t\r\n"
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_CHARS = frozenset("0123456789+-.eE")
_KEYWORD = re.compile(r"[a-z]+")
_RECOVER = re.compile(r"[{}\[\]]")
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n"}
_ESCAPES |= {"r": "\r", "t": "\t"}


class _ParseFailure(Exception):
    pass


def _decode_string(text: str) -> str:
    """The value of a string token (with its quotes), QEMU's escapes included."""
    body = text[1:-1]
    if "\\" not in body:
        return body
    if text[0] == '"':
        try:
            value = json.loads(text)
        except ValueError:
            pass
        else:
            assert isinstance(value, str)
            return value
    out: list[str] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out.append(c)
            i += 1
            continue
        e = body[i + 1 : i + 2]
        if e in _ESCAPES:
            out.append(_ESCAPES[e])
            i += 2
        elif e == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", body[i + 2 : i + 6]):
            out.append(chr(int(body[i + 2 : i + 6], 16)))
            i += 6
        else:
            raise _ParseFailure("invalid escape sequence in string")
    return "".join(out).encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class _Parser:
    """Recursive descent over one message's tokens (QEMU's json-parser wording)."""

    def __init__(self, tokens: list[tuple[_Tok, str]]) -> None:
        self.tokens = tokens
        self.pos = 0

    def _next(self) -> tuple[_Tok, str] | None:
        if self.pos >= len(self.tokens):
            return None
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def value(self) -> Any:
        tok = self._next()
        if tok is None:
            raise _ParseFailure("premature EOI")
        kind, text = tok
        if kind is _Tok.LCURLY:
            return self._object()
        if kind is _Tok.LSQUARE:
            return self._array()
        if kind is _Tok.STRING:
            return _decode_string(text)
        if kind is _Tok.NUMBER:
            if re.fullmatch(r"-?[0-9]+", text):
                number = int(text)
                if -(1 << 63) <= number < (1 << 64):
                    return number
            return float(text)
        if kind is _Tok.KEYWORD:
            keywords: dict[str, Any] = {"true": True, "false": False, "null": None}
            if text in keywords:
                return keywords[text]
            raise _ParseFailure(f"invalid keyword '{text}'")
        raise _ParseFailure("expecting value")

    def _object(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        tok = self._peek()
        if tok is _Tok.RCURLY:
            self.pos += 1
            return out
        while True:
            key = self._next()
            if key is None:
                raise _ParseFailure("premature EOI")
            if key[0] is not _Tok.STRING:
                if key[0] in (_Tok.LCURLY, _Tok.LSQUARE, _Tok.NUMBER, _Tok.KEYWORD):
                    raise _ParseFailure("key is not a string in object")
                raise _ParseFailure("expecting value")
            colon = self._next()
            if colon is None or colon[0] is not _Tok.COLON:
                raise _ParseFailure("missing : in object pair")
            out[_decode_string(key[1])] = self.value()
            sep = self._next()
            if sep is None:
                raise _ParseFailure("premature EOI")
            if sep[0] is _Tok.RCURLY:
                return out
            if sep[0] is not _Tok.COMMA:
                raise _ParseFailure("expected separator in dict")

    def _array(self) -> list[Any]:
        out: list[Any] = []
        if self._peek() is _Tok.RSQUARE:
            self.pos += 1
            return out
        while True:
            out.append(self.value())
            sep = self._next()
            if sep is None:
                raise _ParseFailure("premature EOI")
            if sep[0] is _Tok.RSQUARE:
                return out
            if sep[0] is not _Tok.COMMA:
                raise _ParseFailure("expected separator in list")

    def _peek(self) -> _Tok | None:
        return self.tokens[self.pos][0] if self.pos < len(self.tokens) else None


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
        self._buf = ""  # text not yet turned into tokens
        self._scan = 0  # how far an open string in _buf was scanned
        self._recovering = False
        self._tokens: list[tuple[_Tok, str]] = []
        self._size = 0
        self._depth_brace = 0
        self._depth_square = 0

    @property
    def pending(self) -> int:
        """Characters held for an incomplete message (for tests and limits)."""
        return self._size + len(self._buf)

    def feed(self, data: bytes) -> list[Any | JsonParseError]:
        """Consume ``data``; return every message it completed, in order."""
        self._buf += self._decoder.decode(data)
        out: list[Any | JsonParseError] = []
        self._lex(out)
        return out

    # -- the lexer ---------------------------------------------------------------------------

    def _lex(self, out: list[Any | JsonParseError]) -> None:
        buf = self._buf
        n = len(buf)
        i = 0
        while i < n:
            if self._recovering:
                m = _RECOVER.search(buf, i)
                if m is None:
                    i = n
                    break
                i = m.start()
                self._recovering = False
            c = buf[i]
            if c in _WS:
                i += 1
                continue
            punct = _PUNCT.get(c)
            if punct is not None:
                self._token(punct, c, out)
                i += 1
                continue
            if c in "\"'":
                end = self._string_end(buf, i, c)
                if end < 0:
                    if n - i > self.max_size:
                        self._limit("JSON token size limit exceeded", out)
                        self._recovering = True
                        i = n
                    break
                self._scan = 0
                self._token(_Tok.STRING, buf[i:end], out)
                i = end
                continue
            if c == "-" or c.isdigit():
                j = i + 1
                while j < n and buf[j] in _NUMBER_CHARS:
                    j += 1
                if j == n:
                    break  # may continue in the next read
                m = _NUMBER.match(buf, i, j)
                if m is None or m.end() != j:
                    # QEMU's error text holds the token so far plus the offending char.
                    bad = m.end() if m is not None and m.end() > i + 1 else i + 1
                    self._error(buf[i : bad + 1], out)
                    i = bad + 1
                    continue
                self._token(_Tok.NUMBER, buf[i:j], out)
                i = j
                continue
            if "a" <= c <= "z":
                m = _KEYWORD.match(buf, i)
                assert m is not None
                if m.end() == n:
                    if n - i > self.max_size:
                        self._limit("JSON token size limit exceeded", out)
                        self._recovering = True
                        i = n
                    break
                self._token(_Tok.KEYWORD, m.group(), out)
                i = m.end()
                continue
            self._error(c, out)
            i += 1
        self._buf = buf[i:]

    def _string_end(self, buf: str, start: int, quote: str) -> int:
        """The index after the closing quote of the string at ``start``, or -1.

        An unfinished string is not rescanned from its start when more data comes:
        ``_scan`` remembers how far it was searched (relative to the string's start).
        """
        i = max(start + 1, start + self._scan)
        while True:
            q = buf.find(quote, i)
            if q < 0:
                self._scan = len(buf) - start
                return -1
            k = q - 1
            while k > start and buf[k] == "\\":
                k -= 1
            if (q - 1 - k) % 2 == 0:
                return q + 1
            i = q + 1

    # -- the streamer ------------------------------------------------------------------------

    def _reset(self) -> None:
        self._tokens = []
        self._size = 0
        self._depth_brace = 0
        self._depth_square = 0

    def _limit(self, desc: str, out: list[Any | JsonParseError]) -> None:
        self._reset()
        self._scan = 0
        out.append(JsonParseError(desc))

    def _error(self, text: str, out: list[Any | JsonParseError]) -> None:
        self._reset()
        self._recovering = True
        out.append(JsonParseError(f"JSON parse error, stray '{text}'"))

    def _token(self, kind: _Tok, text: str, out: list[Any | JsonParseError]) -> None:
        if kind is _Tok.LCURLY:
            self._depth_brace += 1
        elif kind is _Tok.RCURLY:
            self._depth_brace -= 1
        elif kind is _Tok.LSQUARE:
            self._depth_square += 1
        elif kind is _Tok.RSQUARE:
            self._depth_square -= 1
        self._tokens.append((kind, text))
        self._size += len(text)
        if self._size > self.max_size:
            self._limit("JSON token size limit exceeded", out)
            return
        if len(self._tokens) > self.max_tokens:
            self._limit("JSON token count limit exceeded", out)
            return
        if self._depth_brace + self._depth_square > self.max_nesting:
            self._limit("JSON nesting depth limit exceeded", out)
            return
        if (
            self._depth_brace < 0
            or self._depth_square < 0
            or (self._depth_brace == 0 and self._depth_square == 0)
        ):
            tokens = self._tokens
            self._reset()
            out.append(self._parse(tokens))

    @staticmethod
    def _parse(tokens: list[tuple[_Tok, str]]) -> Any | JsonParseError:
        parser = _Parser(tokens)
        try:
            value = parser.value()
        except _ParseFailure as exc:
            return JsonParseError(f"JSON parse error, {exc}")
        except RecursionError:
            return JsonParseError("JSON parse error, nesting too deep")
        return value
