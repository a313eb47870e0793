"""The repository's errors: each a one-line message a user can act on."""

from __future__ import annotations

from blockbackup.errors import BlockBackupError


class RepositoryError(BlockBackupError):
    """Anything wrong with a repository or a request to it."""


class NotARepository(RepositoryError):
    """The path has no readable ``config`` of this format."""


class FormatTooNew(RepositoryError):
    """The repository was written by a newer blockbackup."""


class WrongKey(RepositoryError):
    """No key slot opens with the given passphrase or key file."""


class CorruptData(RepositoryError):
    """Stored bytes fail their check; the message names the object or chunk."""


class NotFound(RepositoryError):
    """An object the repository refers to is missing."""


class AlreadyExists(RepositoryError):
    """``put_if_absent`` found the key taken."""
