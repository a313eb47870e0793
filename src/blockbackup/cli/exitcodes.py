"""The command line's exit codes, in one place (and cheap to import before anything else)."""

from __future__ import annotations

import signal

EXIT_FAILED = 1
#: Options that cannot work together, or do nothing (like argparse).
EXIT_USAGE = 2
#: Ctrl-C (SIGINT): 128 + the signal's number, as shells report it.
EXIT_INTERRUPTED = 128 + signal.SIGINT
