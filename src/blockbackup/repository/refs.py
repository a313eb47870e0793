"""Which packs a snapshot's disks rely on: every segment and every chunk they name.

Why at commit: an incremental names chunks (and whole unchanged segments) it never wrote,
inherited from its base snapshot. If that base is pruned and gc condemns their packs while
the backup runs, only a re-check of *every* pack the new manifest names keeps the commit
from naming a pack that may go (docs/repository.md, "Concurrency without locks").
"""

from __future__ import annotations

from collections.abc import Iterable

from blockbackup.repository.catalog import DiskRecord
from blockbackup.repository.chunkstore import ChunkStore
from blockbackup.repository.diskindex import ADDRESS_SIZE, DiskIndex
from blockbackup.repository.errors import CorruptData, NotFound, RepositoryError
from blockbackup.repository.keys import ZERO_ADDRESS


def referenced_packs(store: ChunkStore, disks: Iterable[DiskRecord]) -> set[str]:
    """The pack of every segment and chunk ``disks`` name, from the store's table; a blob
    the table does not know (its pack was condemned before this writer loaded the index)
    is an error that asks for another run."""
    packs: set[str] = set()
    table = store.table
    try:
        for disk in disks:
            index = DiskIndex(store, disk.size, disk.chunk_size, disk.segments)
            for n, segment in enumerate(disk.segments):
                if segment == ZERO_ADDRESS:
                    continue
                packs.add(store.locate(segment).pack)
                data = index.segment_bytes(n)
                seen: set[bytes] = set()
                for start in range(0, len(data), ADDRESS_SIZE):
                    address = data[start : start + ADDRESS_SIZE]
                    if address != ZERO_ADDRESS and address not in seen:
                        seen.add(address)
                        pack = table.pack_for(address)  # no Location made: 32k a GiB
                        packs.add(pack if pack is not None else store.locate(address).pack)
    except (NotFound, CorruptData) as exc:
        raise RepositoryError(
            f"a pack this backup relies on was removed meanwhile ({exc}); nothing was "
            "committed: run the backup again"
        ) from None
    return packs
