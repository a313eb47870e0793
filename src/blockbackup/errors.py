"""The error root shared by the whole project.

Every error a user can cause (bad arguments, a verb a job cannot accept, an unknown
job or node) is a :class:`BlockBackupError`. Its message is ``str(e)`` and is sent to QMP
clients verbatim as ``desc``, so the text must match QEMU's wording exactly; the class
attribute :attr:`~BlockBackupError.error_class` becomes the QMP error ``class``.

I/O failures are *not* part of this tree: drivers raise plain
``OSError(errno, os.strerror(errno))`` so the errno survives up to the error policy
(``report``/``ignore``/``stop``/``enospc``) and its ``strerror`` becomes the job's error text.

Exception tree::

    Exception
     +-- BlockBackupError            error_class "GenericError"
     |    +-- DeviceNotActiveError   error_class "DeviceNotActive"
     +-- OSError                     (I/O errors from drivers, not wrapped)
"""

from __future__ import annotations

from enum import Enum
from typing import ClassVar, TypeVar

_E = TypeVar("_E", bound=Enum)


class BlockBackupError(Exception):
    """A user-visible error; ``str(e)`` is QEMU's exact ``desc`` text."""

    #: The QMP error class sent in ``{"error": {"class": ..., "desc": ...}}``.
    error_class: ClassVar[str] = "GenericError"

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: A second sentence for people (QEMU's ``error_append_hint``): printed by the
        #: command line, never sent over QMP (QEMU does not send hints either).
        self.hint = hint

    def __str__(self) -> str:
        return self.message

    def for_people(self) -> str:
        """The message and its hint on one line, for a command line's error exit."""
        return f"{self.message}. {self.hint}" if self.hint else self.message


class DeviceNotActiveError(BlockBackupError):
    """A legacy ``block-job-*`` command named a job that does not exist."""

    error_class: ClassVar[str] = "DeviceNotActive"


def enum_value(kind: type[_E], name: str, value: object) -> _E:
    """``value`` as a member of the option enum ``kind``, checked once where it enters.

    A bad value gets QEMU's text for a bad enum value of parameter ``name`` (the same
    text the QMP schema gives), so the library API and QMP refuse it alike.
    """
    try:
        return kind(value)
    except ValueError:
        raise BlockBackupError(f"Parameter '{name}' does not accept value '{value}'") from None
