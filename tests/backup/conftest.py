"""Fixtures of the backup tests."""

from __future__ import annotations

from testkit.backup_env import env

__all__ = ["env"]
