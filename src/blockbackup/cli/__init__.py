"""The ``blockbackup`` command line (see ``cli.main``)."""

from __future__ import annotations

from blockbackup.cli.main import main

__all__ = ["main"]
