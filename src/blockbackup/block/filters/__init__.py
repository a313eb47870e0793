"""Filter drivers: nodes that pass data through to one child and add a behaviour."""

from __future__ import annotations
