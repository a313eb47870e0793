"""The ``blockbackup`` command line (see ``cli.main``)."""

from __future__ import annotations

import importlib
import sys


def main() -> int:
    """The console script. A Ctrl-C that comes before a command installed its own signal
    handling (while the modules load) is an interruption like any other: exit 130, no
    traceback."""
    try:
        module = importlib.import_module("blockbackup.cli.main")
        # Importing the submodule ``main`` rebinds this package's ``main`` to it: put the
        # entry point back, so that ``from blockbackup.cli import main`` stays this function.
        globals()["main"] = _entry_point
        return int(module.main())
    except KeyboardInterrupt:
        print("blockbackup: interrupted", file=sys.stderr)
        return 130


_entry_point = main

__all__ = ["main"]
