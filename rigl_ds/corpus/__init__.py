"""The bundled corpus: the King James Bible, one verse per line (public domain; see README.md here).

Shipped inside the package so training needs no download and no apt step.
"""

from __future__ import annotations

import functools
import hashlib
import json
import lzma
from pathlib import Path

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


@functools.lru_cache(maxsize=1)
def verified_kjv_path() -> Path:
    """The bundled file's path, after checking it once per process."""
    kjv_text(verify=True)
    return KJV_PATH
