"""The command line's exit codes, in one place (and cheap to import before anything else)."""

from __future__ import annotations

EXIT_FAILED = 1
#: Options that cannot work together, or do nothing (like argparse).
EXIT_USAGE = 2
#: Ctrl-C: 128 + SIGINT's number (2), as shells report it. No ``import signal`` for it: that
#: loads enum and functools, and ``cli.main`` wants Ctrl-C handled while they load.
EXIT_INTERRUPTED = 128 + 2
