"""Shared pytest setup for the whole suite; kept minimal and generic.

Tests run with ``--import-mode=importlib`` and the test directories are not packages, so
reusable helper modules (``tests/block/driver_conformance.py``) are made importable by
appending ``tests/`` to ``sys.path`` (last, so a test directory never shadows a
real module of the same name): ``from block.driver_conformance import ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.append(_TESTS)
