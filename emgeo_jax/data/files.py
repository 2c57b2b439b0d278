"""File fingerprints. (JSONL output that survives interruption, `ResumableJsonl`, lives in
`emgeo_jax.runs` with the other resumable-file helpers; it is re-exported here.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

from emgeo_jax.runs import ResumableJsonl

__all__ = ["ResumableJsonl", "file_sha256"]


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
