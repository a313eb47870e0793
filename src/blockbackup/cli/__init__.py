"""The ``blockbackup`` command line (the parser and its dispatch are in ``cli.app``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from blockbackup.cli.exitcodes import EXIT_INTERRUPTED

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. A Ctrl-C that comes before a command installed its own signal
    handling (while the modules load) is an interruption like any other: exit 130, no
    traceback."""
    try:
        from blockbackup.cli.app import main as run  # lazy: Ctrl-C while it loads lands here

        return run(argv)
    except KeyboardInterrupt:
        print("blockbackup: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
