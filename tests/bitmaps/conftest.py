"""Fixtures of the bitmap tests."""

from __future__ import annotations

from testkit.backup_env import env

__all__ = ["env"]
