"""The qcow2 image format: header, tables, refcounts, compression, bitmaps, the driver.

Split by job so each part can be read (and fuzzed) on its own; :mod:`.driver` ties them
together as the ``qcow2`` block driver.
"""

from __future__ import annotations
