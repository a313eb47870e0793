"""The repository benchmarks' image: half random data, a quarter holes, a quarter text.

Shared by ``repo_vs_restic.py`` (issue 14's comparison) and ``floors.py`` (what the
machine allows for the same image), so that both measure the same bytes for a seed.
"""

from __future__ import annotations

import random
from pathlib import Path

BLOCK = 1 << 20


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_image(path: Path, size: int, rng: random.Random) -> None:
    """Half random, a quarter holes, a quarter text, in 1 MiB blocks (kinds shuffled)."""
    blocks = size // BLOCK
    kinds = ["random", "random", "text", "hole"] * (blocks // 4 + 1)
    kinds = kinds[:blocks]
    rng.shuffle(kinds)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
        for _ in range(5000)
    ]
    lines = [" ".join(rng.choices(words, k=rng.randint(3, 14))) + "\n" for _ in range(20000)]
    with open(path, "wb") as f:
        f.truncate(size)
        for n, kind in enumerate(kinds):
            if kind == "hole":
                continue
            f.seek(n * BLOCK)
            if kind == "random":
                f.write(rng.randbytes(BLOCK))
            else:
                text = "".join(rng.choices(lines, k=BLOCK // 40)).encode()
                while len(text) < BLOCK:
                    text += text
                f.write(text[:BLOCK])
