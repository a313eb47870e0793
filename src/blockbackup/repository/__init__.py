"""The backup repository: deduplicated, compressed, encrypted snapshots of disks.

The format and the reasons behind it are in ``docs/repository.md``. The layers, bottom up:
:mod:`.backend` (object storage), :mod:`.keys`, :mod:`.blob`, :mod:`.chunkstore`,
:mod:`.diskindex`, :mod:`.catalog`, :mod:`.repo` (the facade), :mod:`.drivers` (block nodes).
"""

from __future__ import annotations
