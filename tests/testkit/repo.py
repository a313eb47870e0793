"""Repository test helpers: store and read a disk through the library, as the nodes do."""

from __future__ import annotations

from blockbackup.repository.catalog import DiskRecord
from blockbackup.repository.diskindex import DiskIndex
from blockbackup.repository.keys import ZERO_ADDRESS
from blockbackup.repository.repo import Repository


def store_disk(
    repo: Repository, name: str, data: bytes, base: DiskRecord | None = None
) -> DiskRecord:
    """What the target node does, without the engine: chunk, dedup, index, flush."""
    index = DiskIndex(repo.store, len(data), repo.chunk_size, base.segments if base else None)
    for i in range(index.chunks):
        chunk = data[i * repo.chunk_size : (i + 1) * repo.chunk_size]
        if chunk.count(0) == len(chunk):
            index.set(i, ZERO_ADDRESS)
        else:
            address = repo.keys.address(chunk)
            repo.store.add(address, chunk)
            index.set(i, address)
    segments = index.save()
    repo.store.flush()
    return DiskRecord(name, len(data), repo.chunk_size, segments)


def read_disk(repo: Repository, record: DiskRecord) -> bytes:
    index = DiskIndex(repo.store, record.size, record.chunk_size, record.segments)
    out = bytearray()
    for i in range(index.chunks):
        address = index.get(i)
        if address == ZERO_ADDRESS:
            out += bytes(index.chunk_length(i))
        else:
            out += repo.store.read(address)
    return bytes(out)
