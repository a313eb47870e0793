"""Sizes on the command line, as QEMU writes them, and sizes in messages, in one unit family.

Every size and rate the commands print is binary (KiB, MiB, GiB, TiB; MiB/s): the progress
bar, the summary and the tables agree.
"""

from __future__ import annotations

import argparse

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_EXAMPLE = "a number of bytes with an optional K, M, G or T suffix, e.g. 4096, 64K, 100M, 1.5G"


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``4096``: a size in bytes with QEMU-style suffixes."""
    normal = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = normal[-1:] if normal[-1:] in _UNITS else ""
    try:
        value = float(normal[: len(normal) - len(suffix)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: expected {_EXAMPLE}") from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: it must be 0 or more")
    return int(value * _UNITS[suffix])


def format_size(n: float) -> str:
    """``12.0 MiB``: bytes in the binary unit that keeps the number readable."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def format_rate(bytes_per_second: float) -> str:
    """``35.2 MiB/s``: always MiB/s, so that runs compare at a glance."""
    return f"{bytes_per_second / (1 << 20):.1f} MiB/s"
