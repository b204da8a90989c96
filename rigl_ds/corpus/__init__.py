"""The bundled corpus: the King James Bible, one verse per line (public domain; see README.md here).

Shipped inside the package so training needs no download and no apt step.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from pathlib import Path
from typing import List, Tuple

HERE = Path(__file__).resolve().parent
KJV_PATH = HERE / "kjv.txt.xz"


def kjv_text(verify: bool = True) -> str:
    """The whole text, verses separated by newlines; checked against the recorded SHA-256."""
    with lzma.open(KJV_PATH, "rt", encoding="utf-8") as f:
        text = f.read()
    if verify:
        expected = json.loads((HERE / "kjv.json").read_text())["sha256_uncompressed"]
        got = hashlib.sha256(text.encode("utf-8")).hexdigest()
        if got != expected:
            raise RuntimeError(f"{KJV_PATH} is corrupt: sha256 {got}, expected {expected}")
    return text


def kjv_split(validation_fraction: float = 0.05) -> Tuple[List[str], List[str]]:
    """Train and validation verses: the last ``validation_fraction`` of the book order is validation
    (a contiguous held-out tail, so no verse leaks across the split)."""
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in (0, 1), got {validation_fraction}")
    lines = kjv_text().splitlines()
    cut = int(len(lines) * (1.0 - validation_fraction))
    return lines[:cut], lines[cut:]
