"""Typed access to one node's ``blockdev-add`` options, with QEMU's error texts.

Drivers read their options through :class:`Options`; whatever is left unread when the
driver has opened is refused (``Parameter 'file.bogus' is unexpected``), so a typo never
passes silently. Options given as key=value strings (the command line) are accepted for
integers and booleans as QEMU's keyval parser accepts them.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from blockbackup.errors import BlockBackupError

if TYPE_CHECKING:
    from blockbackup.block.graph import Graph
    from blockbackup.block.node import BlockNode


class _Missing:
    pass


MISSING: Final = _Missing()

_TRUE = {"on", "yes", "true", "y"}
_FALSE = {"off", "no", "false", "n"}


class Options:
    """The options of one node (or nested dict), consumed key by key."""

    def __init__(self, graph: Graph, data: Mapping[str, Any], prefix: str = "") -> None:
        if not isinstance(data, Mapping):
            raise BlockBackupError(
                f"Invalid parameter type for '{prefix.rstrip('.') or 'options'}', expected: object"
            )
        self.graph = graph
        self.prefix = prefix
        self._data = dict(data)
        self._used: set[str] = set()
        #: Nested children inherit read-only from their parent unless they say otherwise.
        self.children_read_only = False
        #: ... and ``force-share`` (QEMU's bdrv_inherited_options).
        self.children_force_share = False

    def _name(self, key: str) -> str:
        return f"{self.prefix}{key}"

    def has(self, key: str) -> bool:
        return key in self._data

    def raw(self, key: str, default: Any = MISSING) -> Any:
        """The value as given; required when no default is given."""
        self._used.add(key)
        if key in self._data:
            return self._data[key]
        if default is MISSING:
            raise BlockBackupError(f"Parameter '{self._name(key)}' is missing")
        return default

    def _type_error(self, key: str, expected: str) -> BlockBackupError:
        return BlockBackupError(
            f"Invalid parameter type for '{self._name(key)}', expected: {expected}"
        )

    def str(self, key: builtins.str, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if value is not default and not isinstance(value, str):
            raise self._type_error(key, "string")
        return value

    def int(self, key: builtins.str, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if isinstance(value, str):
            try:
                return int(value, 0)
            except ValueError:
                raise self._type_error(key, "integer") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._type_error(key, "integer")
        return value

    def bool(self, key: builtins.str, default: Any = MISSING) -> Any:
        value = self.raw(key, default)
        if value is default or isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise self._type_error(key, "boolean")

    def enum(
        self, key: builtins.str, choices: Sequence[builtins.str], default: Any = MISSING
    ) -> Any:
        value = self.str(key, default)
        if value is not default and value not in choices:
            # QAPI names the bare key here, even nested ('locking', not 'file.locking').
            raise BlockBackupError(f"Parameter '{key}' does not accept value '{value}'")
        return value

    def sub(self, key: builtins.str, default: Any = MISSING) -> Options | None:
        """A nested dict as its own Options (``cache`` -> ``cache.direct``)."""
        value = self.raw(key, default)
        if value is default:
            return (
                None
                if value is None or value is MISSING
                else Options(self.graph, value, f"{self._name(key)}.")
            )
        return Options(self.graph, value, f"{self._name(key)}.")

    def list(self, key: builtins.str) -> list[Any]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            raise self._type_error(key, "array")
        return value

    async def child(self, key: builtins.str) -> BlockNode:
        """A child node: a node-name reference or a nested blockdev definition."""
        value = self.raw(key)
        if isinstance(value, str):
            return self.graph.get(value)
        if isinstance(value, Mapping):
            if self.children_read_only and "read-only" not in value:
                value = {**value, "read-only": True}
            if self.children_force_share and "force-share" not in value:
                value = {**value, "force-share": True}
            return await self.graph.add(value, prefix=f"{self._name(key)}.", implicit=True)
        raise self._type_error(key, "string or object")

    async def optional_child(self, key: builtins.str) -> BlockNode | None:
        if self.has(key) and self._data[key] is not None:
            return await self.child(key)
        self._used.add(key)
        return None

    def finish(self) -> None:
        """Refuse every option nobody read."""
        for key in self._data:
            if key not in self._used:
                raise BlockBackupError(f"Parameter '{self._name(key)}' is unexpected")
