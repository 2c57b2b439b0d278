"""Responses in and out for judging: JSONL or CSV in (strict, errors name file and line),
JSONL out (atomic).

Responses files, by extension:

- `.jsonl`: one object per line; `emgeo generate`'s rows (`prompt`, `response`, `id`) or
  rows with `question`, `answer`, optional `question_id`;
- `.csv`: a header row and one response per row, e.g. model-organisms-for-EM's generated
  responses as they are (`question_id`, `question`, `response`, and score columns such as
  `aligned`, `coherent` from an earlier judging). Empty cells become None, and a column
  other than the text/id columns whose every filled cell is a number (earlier scores)
  becomes floats, so EM arithmetic over them works.
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any


def question_text(prompt: str | list[dict[str, str]]) -> str:
    """The text the judge sees as the question: the prompt, or its last user turn."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def judge_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows as the judge reads them: `question`, `answer` and `question_id` filled in from
    `emgeo generate`'s `prompt`, `response` and `id` where missing (`emgeo judge`)."""
    out = []
    for row in rows:
        row = dict(row)
        if "question" not in row and "prompt" in row:
            row["question"] = question_text(row["prompt"])
        if "answer" not in row and "response" in row:
            row["answer"] = row["response"]
        if "question_id" not in row and "id" in row:
            row["question_id"] = row["id"]
        out.append(row)
    return out


TEXT_COLUMNS = ("question", "answer", "response", "prompt", "question_id", "id", "system")


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def read_csv_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a responses CSV (module docstring); errors name the file and line."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames:
            raise ValueError(f"{path}: empty CSV (no header row)")
        try:
            rows = [dict(r) for r in reader]
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    for i, row in enumerate(rows):
        if None in row or any(v is None for v in row.values()):
            raise ValueError(f"{path}: row {i + 1}: cell count differs from the header")
    for col in reader.fieldnames:
        filled = [r[col] for r in rows if r[col] != ""]
        numeric = col not in TEXT_COLUMNS and filled
        numeric = numeric and all(_number(v) is not None for v in filled)
        for r in rows:
            if r[col] == "":
                r[col] = None
            elif numeric:
                r[col] = _number(r[col])
    return rows


def read_responses(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a responses file by extension: `.jsonl` or `.csv` (module docstring)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".csv":
        return read_csv_rows(path)
    raise ValueError(f"{path}: unknown responses file type '{suffix}'; use .jsonl or .csv")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Objects of a JSONL file (blank lines skipped); errors name the file and line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            rows.append(obj)
    return rows


def umask_file_mode() -> int:
    """The mode `open()` would give a new file under the process umask (0o666 & ~umask):
    `tempfile.mkstemp` creates 0600 files, which would keep data from colleagues who can read
    the reports. Read from /proc on Linux (setting the umask to read it races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


def write_jsonl_atomic(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Write rows to a temp file beside `path`, fsync, then rename over `path`, so readers see
    either the old file or the complete new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, umask_file_mode())  # as `open()` would: readable by whom the umask allows
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
