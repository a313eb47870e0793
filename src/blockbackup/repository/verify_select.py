"""Which packs a verify reads: a random sample, minus those verified recently; and the
record of each pack that passed.

Why a record in the repository: a big repository cannot be read whole every night, so a
pack that passed is remembered as ``verified/<pack-id>``, and a later verify with
``--skip-verified-within DAYS`` skips it. The object holds the time of the check, taken
from the verifying host's clock and compared only with a verifying host's clock (never
with backend object times, which a host cannot read uniformly: file mtimes, S3
LastModified): skew between hosts is minutes, the unit here is days. When the repository
is encrypted the record is an authenticated blob (AAD ``verified:<pack-id>``), so a
storage server that cannot read the data cannot forge "verified" either; a record that
does not decode is ignored (the pack is read).

The disk index segments are always read (they are few, and everything depends on them);
sampling and skipping apply to the data packs only.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from blockbackup.repository import blob
from blockbackup.repository.errors import RepositoryError
from blockbackup.repository.repo import Repository

PREFIX = "verified/"
RECORD_VERSION = 1


def record_key(pack: str) -> str:
    return PREFIX + pack


def _aad(pack: str) -> bytes:
    return f"verified:{pack}".encode()


@dataclass(frozen=True)
class Selection:
    """How a verify chooses packs: ``sample`` percent of them (None: all), drawn with
    ``seed`` (None: a fresh one), minus those that passed within ``skip_within``."""

    sample: float | None = None
    seed: int | None = None
    skip_within: timedelta | None = None
    record: bool = True  # write ``verified/<pack>`` for each pack that passes


@dataclass
class Chosen:
    """The packs to read, and what was left out and why."""

    packs: list[str]
    skipped_recent: list[str] = field(default_factory=list)
    skipped_sample: list[str] = field(default_factory=list)


def choose(repo: Repository, packs: list[str], selection: Selection, now: datetime) -> Chosen:
    """Of ``packs`` (the packs the chosen snapshots use), those to read."""
    remaining = sorted(packs)
    recent: list[str] = []
    if selection.skip_within is not None:
        since = now - selection.skip_within
        recent = [p for p in remaining if (_verified_at(repo, p) or since) > since]
        remaining = [p for p in remaining if p not in set(recent)]
    unsampled: list[str] = []
    if selection.sample is not None and selection.sample < 100:
        count = math.ceil(len(remaining) * selection.sample / 100)
        picked = set(random.Random(selection.seed).sample(remaining, count))
        unsampled = [p for p in remaining if p not in picked]
        remaining = [p for p in remaining if p in picked]
    return Chosen(remaining, recent, unsampled)


def _verified_at(repo: Repository, pack: str) -> datetime | None:
    """When ``pack`` last passed a verify, or None (never, or the record is unreadable)."""
    try:
        stored = repo.backend.get(record_key(pack))
        data = json.loads(blob.decode(repo.keys, stored, _aad(pack), f"record of {pack}", 4096))
        if data.get("version") != RECORD_VERSION or data.get("pack") != pack:
            return None
        return datetime.strptime(data["time"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (RepositoryError, ValueError, KeyError, TypeError, AttributeError):
        return None


def record(repo: Repository, pack: str, now: datetime) -> None:
    """Remember that ``pack`` passed a verify at ``now`` (replacing an older record)."""
    data = {"version": RECORD_VERSION, "pack": pack, "time": now.strftime("%Y-%m-%dT%H:%M:%SZ")}
    repo.backend.put(
        record_key(pack), blob.encode(repo.keys, json.dumps(data).encode(), _aad(pack))
    )


def forget(repo: Repository, pack: str) -> None:
    """Drop the record of ``pack`` (it failed a check). Idempotent."""
    repo.backend.delete(record_key(pack))
