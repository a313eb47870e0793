"""The QMP monitor: qemu-storage-daemon's control protocol, served by blockbackup.

Why a package of its own: the wire framing (:mod:`.jsonstream`), the per-connection
session (:mod:`.session`), the declarative command registry (:mod:`.schema`,
:mod:`.registry`) and the command handlers (:mod:`.commands`) change for different
reasons, and each is tested on its own.
"""

from __future__ import annotations
