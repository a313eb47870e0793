"""Test kit shared by the test suites (importable because pytest puts tests/ on sys.path)."""

from __future__ import annotations
