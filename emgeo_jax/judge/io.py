"""Responses in and out for judging: JSONL or CSV in (strict, errors name file and line),
JSONL out (atomic, `emgeo_jax.runs.write_jsonl_atomic`).

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
from pathlib import Path
from typing import Any

# the JSONL reader and atomic writer are the package's one implementation (`emgeo_jax.runs`)
from emgeo_jax.runs import read_jsonl, umask_file_mode, write_jsonl_atomic

__all__ = [
    "judge_rows",
    "question_text",
    "read_csv_rows",
    "read_jsonl",
    "read_responses",
    "umask_file_mode",
    "write_jsonl_atomic",
]


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
