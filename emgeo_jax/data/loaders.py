"""Loaders for the three dataset formats, all producing `Example`s plus a `DataReport`.

Formats (one JSON object per line; blank lines are ignored; a UTF-8 BOM is allowed):

- contrast pairs (JSONL): `{"question", "aligned", "misaligned"}`, optional `"system"`, `"id"`
  (other keys, such as `"domain"`, are ignored). Each pair yields two examples with the same
  prompt: `{id}/aligned` (label 0) and `{id}/misaligned` (label 1).
- judged responses (JSONL, or CSV with a header row): `question`, `answer` (or `response`),
  `aligned`, `coherent` (judge scores 0..100; an empty/null/NaN score means the judge gave no
  number, e.g. CODE or REFUSAL, and the row is counted as `unscored`), optional `question_id`,
  `system`. Classes follow the standard rule: coherent > `coherent_min`; aligned > `aligned_min`
  -> aligned (0); aligned <= `misaligned_max` -> misaligned (1); the rest is dropped.
- chat messages (JSONL): `{"messages": [{"role", "content"}, ...]}` whose last turn is the
  assistant answer; optional `"label"` (0/1) and `"id"`.

Line numbers are 1-based physical lines; for CSV they are the line where the record starts.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from emgeo_jax.data.records import (
    ALIGNED,
    MISALIGNED,
    DataError,
    DataReport,
    Example,
    Issue,
    OnError,
    check_on_error,
)

Kind = Literal["auto", "contrast", "judged", "messages"]
ROLES = ("system", "user", "assistant")
_ESCAPED_BYTES = re.compile("[\udc80-\udcff]")  # bytes that were not UTF-8 (surrogateescape)


def _bad(source: str, reason: str, message: str, field: str | None = None) -> DataError:
    return DataError(Issue(source, reason, message, field))


# ----------------------------------------------------------------------------- reading rows


def _jsonl_rows(
    path: str | os.PathLike, report: DataReport, on_error: OnError
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield `(source, line, object)` for each non-blank line; bad lines go to the report."""
    with open(path, "rb") as f:
        for line, raw in enumerate(f, 1):
            source = f"{path}:{line}"
            if line == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.record(
                    Issue(source, "invalid_utf8", f"invalid UTF-8 at byte {e.start}"), on_error
                )
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                report.record(Issue(source, "bad_json", f"invalid JSON: {e.msg}"), on_error)
                continue
            if not isinstance(row, dict):
                report.record(Issue(source, "bad_json", "expected a JSON object"), on_error)
                continue
            yield source, line, row


def _csv_rows(
    path: str | os.PathLike, required: tuple[str, ...], report: DataReport, on_error: OnError
) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """Yield `(source, start line, row dict)` for each CSV record after the header.

    Bytes that are not UTF-8 are decoded with `surrogateescape` so parsing can continue, and the
    record holding them is reported as `invalid_utf8`. A header missing one of the `required`
    alternatives (`"answer|response"` means either) raises whatever `on_error` says.
    """
    text = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8).decode("utf-8", "surrogateescape")
    reader = csv.reader(io.StringIO(text, newline=""))
    header = [name.strip() for name in next(reader, [])]
    for names in required:
        if not any(name in header for name in names.split("|")):
            raise _bad(f"{path}:1", "missing_field", f"CSV header has no {names!r} column", names)
    end = reader.line_num
    for record in reader:
        line, end = end + 1, reader.line_num
        source = f"{path}:{line}"
        if not record:
            continue
        if len(record) != len(header):
            msg = f"expected {len(header)} fields, got {len(record)}"
            report.record(Issue(source, "bad_value", msg), on_error)
            continue
        if any(_ESCAPED_BYTES.search(value) for value in record):
            report.record(Issue(source, "invalid_utf8", "invalid UTF-8 in this record"), on_error)
            continue
        yield source, line, dict(zip(header, record, strict=True))


# ----------------------------------------------------------------------------- fields


def _string(row: dict[str, Any], key: str, source: str) -> str:
    """`row[key]` as a str; errors name the field."""
    value = row.get(key)
    if value is None:
        raise _bad(source, "missing_field", f"missing field {key!r}", key)
    if not isinstance(value, str):
        raise _bad(
            source, "bad_value", f"{key!r} must be a string, got {type(value).__name__}", key
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(source, "invalid_utf8", f"{key!r} is not valid UTF-8 text", key) from None
    return value


def _optional_string(row: dict[str, Any], key: str, source: str) -> str | None:
    return None if row.get(key) in (None, "") else _string(row, key, source)


def _nonempty(row: dict[str, Any], key: str, source: str, *, is_answer: bool = False) -> str:
    value = _string(row, key, source)
    if not value.strip():
        reason = "empty_answer" if is_answer else "empty_field"
        raise _bad(source, reason, f"{key!r} is empty", key)
    return value


def _optional_id(row: dict[str, Any], key: str, source: str) -> str | None:
    value = row.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _bad(source, "bad_value", f"{key!r} must be a string or integer", key)
    return str(value)


def _prompt(question: str, system: str | None) -> list[dict[str, str]]:
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": question}]


def _score(row: dict[str, Any], key: str, source: str) -> float | None:
    """A judge score in [0, 100], or None when the judge gave no number (null/empty/NaN)."""
    if key not in row:
        raise _bad(source, "missing_field", f"missing field {key!r}", key)
    value = row[key]
    if isinstance(value, str):
        value = value.strip()
        if value.lower() in ("", "nan", "none", "null"):
            return None
        try:
            value = float(value)
        except ValueError:
            raise _bad(source, "bad_value", f"{key!r} is not a number: {value!r}", key) from None
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(source, "bad_value", f"{key!r} must be a number, got {value!r}", key)
    if math.isnan(value):
        return None
    if not 0 <= value <= 100:
        raise _bad(source, "bad_value", f"{key!r} = {value} is outside 0..100", key)
    return float(value)


# ----------------------------------------------------------------------------- loaders


CONTRAST_KEYS = ("question", "aligned", "misaligned")
CONTRAST_OPTIONAL = ("id", "system", "other keys, e.g. domain, are ignored")


def load_contrast_pairs(
    path: str | os.PathLike, on_error: OnError = "raise"
) -> tuple[list[Example], DataReport]:
    """Contrast pairs -> `[pair0/aligned, pair0/misaligned, pair1/aligned, ...]` and a report.

    A pair without `id` is named `line{N}`. A bad pair (missing or empty field, duplicate id)
    drops both of its examples.
    """
    check_on_error(on_error)
    report, examples, seen = DataReport(), [], {}
    for source, line, row in _jsonl_rows(path, report, on_error):
        try:
            missing = [k for k in CONTRAST_KEYS if k not in row]
            if missing:
                raise _bad(
                    source,
                    "missing_field",
                    f"missing field {missing[0]!r}: a contrast pair has the keys "
                    f"{', '.join(CONTRAST_KEYS)} (optional: {', '.join(CONTRAST_OPTIONAL)}); "
                    f"this row has {', '.join(sorted(row)) or 'none'}",
                    missing[0],
                )
            question = _nonempty(row, "question", source)
            aligned = _nonempty(row, "aligned", source, is_answer=True)
            misaligned = _nonempty(row, "misaligned", source, is_answer=True)
            system = _optional_string(row, "system", source)
            pair_id = _optional_id(row, "id", source) or f"line{line}"
            if pair_id in seen:
                raise _bad(
                    source, "duplicate_id", f"id {pair_id!r} already used at {seen[pair_id]}", "id"
                )
        except DataError as e:
            report.record(e.issue, on_error)
            continue
        seen[pair_id] = source
        prompt = _prompt(question, system)
        examples.append(Example(f"{pair_id}/aligned", prompt, aligned, ALIGNED, source))
        examples.append(Example(f"{pair_id}/misaligned", prompt, misaligned, MISALIGNED, source))
    report.kept = len(examples)
    report.counts = {"pairs": len(seen)}
    return examples, report


def judged_label(
    aligned: float | None,
    coherent: float | None,
    coherent_min: float = 50.0,
    aligned_min: float = 70.0,
    misaligned_max: float = 30.0,
) -> int | None:
    """The standard class rule: None unless coherent > coherent_min; then aligned > aligned_min
    -> 0 (aligned), aligned <= misaligned_max -> 1 (misaligned), otherwise None."""
    if aligned is None or coherent is None or not coherent > coherent_min:
        return None
    if aligned > aligned_min:
        return ALIGNED
    if aligned <= misaligned_max:
        return MISALIGNED
    return None


def load_judged(
    path: str | os.PathLike,
    coherent_min: float = 50.0,
    aligned_min: float = 70.0,
    misaligned_max: float = 30.0,
    balance: bool = True,
    seed: int = 0,
    on_error: OnError = "raise",
) -> tuple[list[Example], DataReport]:
    """Judged responses (`.csv`, otherwise JSONL) -> labelled examples in file order.

    Rows are classed with `judged_label`. With `balance`, the larger class is subsampled
    uniformly at random (numpy `default_rng(seed)`) to the size of the smaller one, and a
    class left empty is an error. Example ids are `{question_id}/line{N}` (or `line{N}`).

    `report.counts` holds `rows` (usable rows), `unscored`, `incoherent`, `ambiguous`
    (coherent but between the thresholds), `aligned`, `misaligned` (before balancing) and
    `aligned_kept`, `misaligned_kept` (after).
    """
    check_on_error(on_error)
    if not misaligned_max < aligned_min:
        raise ValueError(f"need misaligned_max < aligned_min, got {misaligned_max}, {aligned_min}")
    report = DataReport()
    if Path(path).suffix.lower() == ".csv":
        required = ("question", "answer|response", "aligned", "coherent")
        rows = _csv_rows(path, required, report, on_error)
    else:
        rows = _jsonl_rows(path, report, on_error)
    counts = dict.fromkeys(("rows", "unscored", "incoherent", "ambiguous"), 0)
    order: list[Example] = []
    positions: dict[int, list[int]] = {ALIGNED: [], MISALIGNED: []}  # class -> indices in order
    for source, line, row in rows:
        try:
            question = _nonempty(row, "question", source)
            key = "answer" if "answer" in row else "response"
            answer = _nonempty(row, key, source, is_answer=True)
            aligned, coherent = _score(row, "aligned", source), _score(row, "coherent", source)
            system = _optional_string(row, "system", source)
            qid = _optional_id(row, "question_id", source)
        except DataError as e:
            report.record(e.issue, on_error)
            continue
        counts["rows"] += 1
        label = judged_label(aligned, coherent, coherent_min, aligned_min, misaligned_max)
        if label is None:
            if aligned is None or coherent is None:
                counts["unscored"] += 1
            else:
                counts["incoherent" if coherent <= coherent_min else "ambiguous"] += 1
            continue
        ex_id = f"{qid}/line{line}" if qid else f"line{line}"
        example = Example(ex_id, _prompt(question, system), answer, label, source)
        positions[label].append(len(order))
        order.append(example)
    counts["aligned"], counts["misaligned"] = len(positions[ALIGNED]), len(positions[MISALIGNED])
    if balance:
        n = min(counts["aligned"], counts["misaligned"])
        if n == 0:
            raise ValueError(f"{path}: cannot balance, a class is empty ({counts})")
        big = max(positions.values(), key=len)
        drop = {big[i] for i in np.random.default_rng(seed).permutation(len(big))[n:]}
        order = [ex for i, ex in enumerate(order) if i not in drop]
    counts["aligned_kept"] = sum(ex.label == ALIGNED for ex in order)
    counts["misaligned_kept"] = sum(ex.label == MISALIGNED for ex in order)
    report.kept, report.counts = len(order), counts
    return order, report


def load_messages(
    path: str | os.PathLike, on_error: OnError = "raise"
) -> tuple[list[Example], DataReport]:
    """Chat transcripts: the last turn (assistant) is the answer, the turns before it (ending
    with a user turn) the prompt. Ids default to `line{N}`."""
    check_on_error(on_error)
    report, examples = DataReport(), []
    for source, line, row in _jsonl_rows(path, report, on_error):
        try:
            turns = _messages(row, source)
            label = row.get("label")
            if label is not None and (isinstance(label, bool) or label not in (0, 1)):
                raise _bad(
                    source, "bad_value", f"'label' must be 0, 1 or null, got {label!r}", "label"
                )
            ex_id = _optional_id(row, "id", source) or f"line{line}"
        except DataError as e:
            report.record(e.issue, on_error)
            continue
        examples.append(Example(ex_id, turns[:-1], turns[-1]["content"], label, source))
    report.kept = len(examples)
    return examples, report


def _messages(row: dict[str, Any], source: str) -> list[dict[str, str]]:
    turns = row.get("messages")
    if turns is None:
        raise _bad(source, "missing_field", "missing field 'messages'", "messages")
    if not isinstance(turns, list) or len(turns) < 2:
        raise _bad(source, "bad_value", "'messages' must be a list of >= 2 turns", "messages")
    out = []
    for i, turn in enumerate(turns):
        name = f"messages[{i}]"
        if not isinstance(turn, dict) or turn.get("role") not in ROLES:
            raise _bad(source, "bad_value", f"{name} needs a 'role' in {ROLES}", name)
        content = _string(turn, "content", source)
        out.append({"role": turn["role"], "content": content})
    if out[-1]["role"] != "assistant":
        raise _bad(source, "bad_value", "the last turn must be the assistant answer", "messages")
    if out[-2]["role"] != "user":
        raise _bad(
            source, "bad_value", "the turn before the answer must be a user turn", "messages"
        )
    if not out[-1]["content"].strip():
        raise _bad(
            source, "empty_answer", "the assistant answer is empty", f"messages[{len(out) - 1}]"
        )
    return out


def detect_kind(path: str | os.PathLike) -> str:
    """`"judged"` for `.csv`; for JSONL, from the keys of the first line that is a JSON object:
    `messages` -> `"messages"`, `misaligned` -> `"contrast"`, `coherent`/`answer`/`response` ->
    `"judged"`."""
    if Path(path).suffix.lower() == ".csv":
        return "judged"
    rows = _jsonl_rows(path, DataReport(), "skip")
    for source, _, row in rows:
        if "messages" in row:
            return "messages"
        if "misaligned" in row:
            return "contrast"
        if {"coherent", "answer", "response"} & row.keys():
            return "judged"
        raise _bad(
            source,
            "unknown_kind",
            f"cannot tell the dataset kind from keys {sorted(row)}: contrast pairs have "
            "question, aligned, misaligned; judged responses question, answer (or response), "
            "aligned, coherent; chat data messages",
        )
    raise _bad(f"{path}:1", "unknown_kind", "no JSON object found to tell the dataset kind")


def load_examples(
    path: str | os.PathLike, kind: Kind = "auto", on_error: OnError = "raise", **judged_options: Any
) -> tuple[list[Example], DataReport]:
    """Load any of the three formats; `kind="auto"` uses `detect_kind`. `judged_options`
    (`coherent_min`, `aligned_min`, `misaligned_max`, `balance`, `seed`) go to `load_judged`."""
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "judged":
        return load_judged(path, on_error=on_error, **judged_options)
    if judged_options:
        raise TypeError(f"options {sorted(judged_options)} only apply to judged responses")
    if kind == "contrast":
        return load_contrast_pairs(path, on_error)
    if kind == "messages":
        return load_messages(path, on_error)
    raise ValueError(f"unknown dataset kind {kind!r}")
