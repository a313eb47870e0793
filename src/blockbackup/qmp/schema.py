"""QAPI-like type declarations: one declaration gives validation and introspection.

Why: every QMP command's arguments must be checked exactly as QEMU's generated code checks
them (member order, "Parameter 'sync' is missing", "Invalid parameter type for 'speed',
expected: integer", "Parameter 'x' is unexpected", "Parameter 'sync' does not accept value
'fast'"), and ``query-qmp-schema`` must describe the same arguments. Declaring each type
once, as data, makes both follow from the declaration and never drift apart.

Types: :class:`Builtin` (``str``, ``int``, ``bool``, ``number``, ``any``, ``null``),
:class:`Enum`, :class:`Array`, :class:`Struct` (optionally a flat union: a tag member and
one variant struct per tag value) and :class:`Alternate`. :meth:`QType.check` validates a
JSON value (or, with ``keyval=True``, command-line strings) and returns it with declared
defaults filled in; :class:`SchemaBuilder` renders ``SchemaInfo`` entries with QEMU's
masked (numbered) type names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from blockbackup.errors import BlockBackupError

__all__ = [
    "ANY",
    "BOOL",
    "EMPTY",
    "INT",
    "NUMBER",
    "STR",
    "Alternate",
    "Array",
    "Builtin",
    "Enum",
    "Member",
    "QType",
    "SchemaBuilder",
    "Struct",
]

_NO_DEFAULT: Any = object()
_TRUE = {"on", "yes", "true", "y"}
_FALSE = {"off", "no", "false", "n"}


def _type_error(path: str, expected: str) -> BlockBackupError:
    return BlockBackupError(f"Invalid parameter type for '{path}', expected: {expected}")


class QType:
    """A declared type: validates values and describes itself."""

    #: The JSON type QEMU names in "expected: ..." errors.
    expected: str = "value"

    def check(self, value: Any, path: str, *, keyval: bool = False) -> Any:
        """Validate ``value`` at ``path`` (the QMP member path) and return it."""
        raise NotImplementedError

    def matches(self, value: Any) -> bool:
        """Whether ``value`` has this type's JSON type (for alternates)."""
        return True


@dataclass(frozen=True, eq=False)
class Builtin(QType):
    """One of QAPI's builtin types."""

    name: str
    json_type: str
    expected: str = "value"

    def matches(self, value: Any) -> bool:
        kind = self.name
        if kind == "str":
            return isinstance(value, str)
        if kind == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        if kind == "bool":
            return isinstance(value, bool)
        if kind == "number":
            return isinstance(value, int | float) and not isinstance(value, bool)
        if kind == "null":
            return value is None
        return True

    def check(self, value: Any, path: str, *, keyval: bool = False) -> Any:
        if keyval and isinstance(value, str):
            value = self._from_keyval(value, path)
        if not self.matches(value):
            raise _type_error(path, self.expected)
        return value

    def _from_keyval(self, text: str, path: str) -> Any:
        if self.name == "int":
            try:
                return int(text, 0)
            except ValueError:
                raise BlockBackupError(f"Parameter '{path}' expects an integer") from None
        if self.name == "number":
            try:
                return float(text)
            except ValueError:
                raise BlockBackupError(f"Parameter '{path}' expects a number") from None
        if self.name == "bool":
            if text in _TRUE:
                return True
            if text in _FALSE:
                return False
            raise BlockBackupError(f"Parameter '{path}' expects 'on' or 'off'")
        return text


STR = Builtin("str", "string", "string")
INT = Builtin("int", "int", "integer")
BOOL = Builtin("bool", "boolean", "boolean")
NUMBER = Builtin("number", "number", "number")
ANY = Builtin("any", "value", "value")
NULL = Builtin("null", "null", "null")
BUILTINS = (STR, ANY, BOOL, INT, NULL, NUMBER)


@dataclass(frozen=True, eq=False)
class Enum(QType):
    """A string from a fixed list."""

    name: str
    values: tuple[str, ...]
    expected: str = "string"

    def matches(self, value: Any) -> bool:
        return isinstance(value, str)

    def check(self, value: Any, path: str, *, keyval: bool = False) -> Any:
        if not isinstance(value, str):
            raise _type_error(path, "string")
        if value not in self.values:
            raise BlockBackupError(f"Parameter '{path}' does not accept value '{value}'")
        return value


@dataclass(frozen=True, eq=False)
class Array(QType):
    """A list of one element type."""

    element: QType
    expected: str = "array"

    def matches(self, value: Any) -> bool:
        return isinstance(value, list)

    def check(self, value: Any, path: str, *, keyval: bool = False) -> Any:
        if not isinstance(value, list):
            raise _type_error(path, "array")
        return [self.element.check(v, f"{path}[{i}]", keyval=keyval) for i, v in enumerate(value)]


@dataclass(frozen=True, eq=False)
class Member:
    """One member of a struct. ``default`` is filled in when the member is absent."""

    name: str
    type: QType
    optional: bool = False
    default: Any = _NO_DEFAULT
    features: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.default is not _NO_DEFAULT and not self.optional:
            object.__setattr__(self, "optional", True)


@dataclass(frozen=True, eq=False)
class Struct(QType):
    """An object with declared members; a flat union when ``tag`` is set.

    ``variants`` maps each tag value to a struct whose members join the base members.
    ``open``: any other member is let through unchecked (for ``blockdev-add``, whose
    options the block graph validates with its own texts).
    """

    name: str
    members: Sequence[Member] = ()
    tag: str | None = None
    variants: Mapping[str, Struct] = field(default_factory=dict)
    open: bool = False
    expected: str = "object"

    def matches(self, value: Any) -> bool:
        return isinstance(value, dict)

    def check(self, value: Any, path: str, *, keyval: bool = False) -> Any:
        if not isinstance(value, Mapping):
            raise _type_error(path or "null", "object")
        if self.open:
            return dict(value)
        out: dict[str, Any] = {}
        self._check_members(self.members, value, path, out, keyval)
        if self.tag is not None:
            variant = self.variants.get(out[self.tag])
            if variant is not None:
                variant._check_members(variant.members, value, path, out, keyval)
        for key in value:
            if key not in out:
                raise BlockBackupError(f"Parameter '{_join(path, key)}' is unexpected")
        for key in list(out):
            if out[key] is _NO_DEFAULT:
                del out[key]
        return out

    @staticmethod
    def _check_members(
        members: Sequence[Member],
        value: Mapping[str, Any],
        path: str,
        out: dict[str, Any],
        keyval: bool,
    ) -> None:
        for m in members:
            if m.name in value:
                out[m.name] = m.type.check(value[m.name], _join(path, m.name), keyval=keyval)
            elif not m.optional:
                raise BlockBackupError(f"Parameter '{_join(path, m.name)}' is missing")
            else:
                out[m.name] = m.default

    def all_members(self) -> list[Member]:
        """Base members, then every variant's members (for ``query-commands`` users)."""
        out = list(self.members)
        for variant in self.variants.values():
            out += variant.members
        return out


@dataclass(frozen=True, eq=False)
class Alternate(QType):
    """One of several types, chosen by the value's JSON type."""

    name: str
    choices: tuple[QType, ...]
    expected: str = "value"

    def check(self, value: Any, path: str, *, keyval: bool = False) -> Any:
        for choice in self.choices:
            if choice.matches(value):
                return choice.check(value, path, keyval=keyval)
        raise _type_error(path, self.name)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


EMPTY = Struct("q_empty")


class SchemaBuilder:
    """Renders types as ``query-qmp-schema`` ``SchemaInfo`` entries, names masked as QEMU does."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = [
            {"name": b.name, "meta-type": "builtin", "json-type": b.json_type} for b in BUILTINS
        ]
        self._names: dict[int, str] = {id(EMPTY): "0"}
        self.entries.append({"name": "0", "meta-type": "object", "members": []})
        self._counter = 1

    def _new_name(self, t: QType) -> str:
        name = str(self._counter)
        self._counter += 1
        self._names[id(t)] = name
        return name

    def ref(self, t: QType) -> str:
        """The schema name of ``t``, adding its entry (and its parts') on first use."""
        if isinstance(t, Builtin):
            return t.name
        known = self._names.get(id(t))
        if known is not None:
            return known
        if isinstance(t, Array):
            element = self.ref(t.element)
            name = f"[{element}]"
            self._names[id(t)] = name
            self.entries.append({"name": name, "meta-type": "array", "element-type": element})
            return name
        name = self._new_name(t)
        entry: dict[str, Any] = {"name": name}
        self.entries.append(entry)
        if isinstance(t, Enum):
            entry["meta-type"] = "enum"
            entry["values"] = list(t.values)
            entry["members"] = [{"name": v} for v in t.values]
        elif isinstance(t, Alternate):
            entry["meta-type"] = "alternate"
            entry["members"] = [{"type": self.ref(c)} for c in t.choices]
        elif isinstance(t, Struct):
            entry["meta-type"] = "object"
            entry["members"] = [self._member(m) for m in t.members]
            if t.tag is not None:
                entry["tag"] = t.tag
                entry["variants"] = [
                    {"case": case, "type": self.ref(v)} for case, v in t.variants.items()
                ]
        else:  # pragma: no cover - every QType subclass is handled above
            raise TypeError(t)
        return name

    def _member(self, m: Member) -> dict[str, Any]:
        out: dict[str, Any] = {"name": m.name, "type": self.ref(m.type)}
        if m.optional:
            out["default"] = None
        if m.features:
            out["features"] = list(m.features)
        return out
