"""``python -m blockbackup``: the command line."""

from __future__ import annotations

import sys

from blockbackup.cli import main

sys.exit(main())
