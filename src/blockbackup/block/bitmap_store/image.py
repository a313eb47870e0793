"""What the bitmap store needs from a format that keeps persistent bitmaps in its image.

Why an interface here: the store (a feature of the block layer) must not know any format;
a format driver (``qcow2``) implements :class:`ImageBitmaps` and the store finds it on
the node's driver. Layers stay one way: the format imports this module, never the
reverse. A format without bitmaps in its image (raw, file) keeps them in a sidecar file,
which the store writes itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from blockbackup.block.node import BlockNode


class StoredEntry(Protocol):
    """One bitmap as the image stores it (the store keeps those it cannot interpret)."""

    @property
    def name(self) -> str: ...

    @property
    def granularity(self) -> int: ...

    @property
    def in_use(self) -> bool:
        """Not stored cleanly: whoever had the image open did not close it."""
        ...

    @property
    def auto(self) -> bool:
        """Recording when loaded (enabled)."""
        ...

    @property
    def supported(self) -> bool:
        """A dirty-tracking bitmap the store can load; others are kept as they are."""
        ...


@dataclass(frozen=True, slots=True)
class FreshBitmap:
    """A bitmap to store in the image: its exact bits at a clean close."""

    name: str
    granularity: int
    recording: bool
    data: bytes


@runtime_checkable
class ImageBitmaps(Protocol):
    """A format driver storing persistent bitmaps inside its image (qcow2)."""

    @property
    def bitmap_file(self) -> BlockNode:
        """The node holding the image (the store's journal lives next to its file)."""
        ...

    def can_store_bitmaps(self) -> bool:
        """Whether this image can hold bitmaps at all (qcow2 version 3)."""
        ...

    async def stored_bitmaps(self) -> list[StoredEntry]:
        """The bitmaps the image holds (``OSError``: its directory cannot be read)."""
        ...

    async def load_stored_bitmap(self, entry: StoredEntry) -> bytes:
        """The bits of ``entry``, one per granule, least significant bit first."""
        ...

    async def mark_bitmaps_in_use(self, names: set[str]) -> None:
        """Flag the bitmaps ``names`` as in use (not stored cleanly) in the image."""
        ...

    async def store_bitmaps(self, fresh: list[FreshBitmap], kept: Iterable[StoredEntry]) -> None:
        """Replace the image's bitmaps by ``fresh`` plus ``kept`` left as they are stored
        (still in use if they were: their content was never known here)."""
        ...

    async def remove_stored_bitmap(self, name: str) -> None:
        """Remove the bitmap ``name`` from the image now, if it is there."""
        ...
