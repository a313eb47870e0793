"""Sizes on the command line, as QEMU writes them."""

from __future__ import annotations

import argparse


def parse_size(text: str) -> int:
    """``256M``, ``1G``, ``4096``: a size in bytes with QEMU-style suffixes."""
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    suffix = text[-1:] if text[-1:] in units else ""
    try:
        value = float(text[: len(text) - len(suffix)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid size: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("size must not be negative")
    return int(value * units[suffix])
