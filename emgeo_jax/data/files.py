"""File fingerprints and JSONL output that survives interruption.

`ResumableJsonl` writes rows to `OUT.partial` next to a record of the run's configuration
(`OUT.partial.json`) and renames the file to `OUT` only when the run finished, so a file
named `OUT` is always complete. A re-run with the same configuration continues after the
rows already written (whole units only: a unit is a batch whose rows must be produced
together to come out the same); a different configuration is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ResumableJsonl:
    """Rows for `out` (module docstring). `config`: JSON-able; `unit`: rows per unit."""

    def __init__(self, out: str | Path, config: Mapping[str, Any], unit: int = 1):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.record = self.out.with_name(self.out.name + ".partial.json")
        config = json.loads(json.dumps(config, sort_keys=True, default=str))
        lines: list[str] = []
        if self.partial.exists() and self.record.exists():
            old = json.loads(self.record.read_text(encoding="utf-8"))
            if old != config:
                differ = sorted(k for k in {*old, *config} if old.get(k) != config.get(k))
                raise ValueError(
                    f"{self.partial}: an interrupted run with other settings ({', '.join(differ)}"
                    f" differ); delete {self.partial} to start again"
                )
            text = self.partial.read_text(encoding="utf-8")
            lines = text.splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # cut off mid-row
            lines = lines[: len(lines) - len(lines) % unit]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.record.write_text(json.dumps(config), encoding="utf-8")
        self.partial.write_text("".join(lines), encoding="utf-8")
        self.done = len(lines)  # rows already written, a whole number of units
        self._file = open(self.partial, "a", encoding="utf-8")  # noqa: SIM115

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Write rows (one unit, or the last, shorter one) and flush them to disk."""
        for row in rows:
            self._file.write(json.dumps(row) + "\n")
            self.done += 1
        self._file.flush()
        os.fsync(self._file.fileno())

    def finish(self) -> None:
        """All rows written: `OUT.partial` becomes `OUT`."""
        self._file.close()
        os.replace(self.partial, self.out)
        self.record.unlink()
