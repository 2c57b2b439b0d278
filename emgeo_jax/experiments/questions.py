"""Question sets, read by file extension (anything else is refused):

- `.yaml` / `.yml`: the format of the public EM evaluations (Betley et al.'s
  `evaluation/*.yaml`, MO4EM's question files), a list of items::

    - id: some_question
      type: free_form_judge_0_100          # optional; see below
      paraphrases: ["...", "..."]
      samples_per_paraphrase: 100          # optional
      system: "You are ..."                # optional, honoured (prepended as a system turn)
      context: [{role: user, content: ...}, {role: assistant, content: ...}]  # optional
      judge: gpt-4o-2024-08-06             # optional, recorded, not used to pick the judge
      judge_prompts: {aligned: "...{question}...{answer}..."}   # optional, per question

  `context` (chat turns before the question) makes each prompt those turns plus the
  paraphrase as the last user turn. `type` must be one of `emgeo_jax.judge.prompts.ITEM_TYPES`:
  `free_form` (no judge),
  `free_form_judge_0_100` (judge prompts scored 0-100), `free_form_judge` (judge prompts
  answered TRUE/FALSE, scored as the probability of TRUE); an unknown type is refused with
  the item's id. Other keys are kept but unused.
- `.jsonl`: rows with `question` (a string) or `messages` (chat turns ending with a user
  turn), optional `id`, `system`, `samples`;
- `.json`: an object with a `questions` list (persona_vectors' trait files: `instruction`,
  `questions`, `eval_prompt`), or a list of such rows or of strings;
- `.csv`: a `question` column (optional `id` / `question_id`, `system`);
- `.txt`: one question per non-empty line.

`read_prompts` gives one row per prompt: `prompt` (a string or chat turns), `id`, `system`,
`samples` (None = the caller's default). `questions_file_prompts` in `emgeo_jax.judge.prompts`
reads the YAML's `judge_prompts`.
"""

from __future__ import annotations

import csv
import io
import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from emgeo_jax.judge.prompts import item_kind
from emgeo_jax.runs import iter_jsonl

PromptRow = dict[str, Any]
EXTENSIONS = (".yaml", ".yml", ".jsonl", ".json", ".csv", ".txt")


class PromptFileError(ValueError):
    """A prompt file that cannot be read; the message names the file and line or item."""


def shipped_questions_path() -> Path:
    """Our own first set: 8 open questions in the spirit of the standard first-plot set
    (`first_eight.yaml`, written for this project)."""
    path = resources.files("emgeo_jax") / "resources" / "questions" / "first_eight.yaml"
    return Path(str(path))


def _jsonl_prompt(row: Any, where: str) -> PromptRow:
    if not isinstance(row, dict):
        raise PromptFileError(f"{where}: expected a JSON object")
    if isinstance(row.get("question"), str) and row["question"].strip():
        return {**row, "prompt": row["question"]}
    turns = row.get("messages")
    if isinstance(turns, list) and turns:
        ok = all(isinstance(t, dict) and isinstance(t.get("content"), str) for t in turns)
        if ok and turns[-1].get("role") == "user":
            return {**row, "prompt": turns}
        raise PromptFileError(f"{where}: 'messages' must be chat turns ending with a user turn")
    raise PromptFileError(f"{where}: needs a non-empty 'question' string or 'messages' list")


def _yaml_rows(path: Path, text: str) -> list[PromptRow]:
    try:
        items = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PromptFileError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(items, list):
        raise PromptFileError(f"{path}: a question YAML is a list of items")
    rows, seen = [], set()
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise PromptFileError(f"{path}: item {i} is not a mapping")
        qid = str(item.get("id", f"item{i}"))
        where = f"{path}: item {i} ({qid})"
        if qid in seen:
            raise PromptFileError(f"{where}: duplicate id")
        seen.add(qid)
        paraphrases = item.get("paraphrases")
        if not isinstance(paraphrases, list) or not paraphrases:
            raise PromptFileError(f"{where}: needs a non-empty 'paraphrases' list")
        if not all(isinstance(p, str) and p.strip() for p in paraphrases):
            raise PromptFileError(f"{where}: every paraphrase must be a non-empty string")
        system = item.get("system")
        if system is not None and not isinstance(system, str):
            raise PromptFileError(f"{where}: 'system' must be a string")
        samples = item.get("samples_per_paraphrase")
        if samples is not None and (not isinstance(samples, int) or samples < 1):
            raise PromptFileError(f"{where}: 'samples_per_paraphrase' must be an integer >= 1")
        try:
            item_kind(item, where)
        except ValueError as e:
            raise PromptFileError(str(e)) from None
        context = _context(item.get("context"), where)
        for k, p in enumerate(paraphrases):
            prompt = p if context is None else [*context, {"role": "user", "content": p}]
            rows.append(
                {"id": qid, "paraphrase": k, "prompt": prompt, "system": system, "samples": samples}
            )
    return rows


def _context(turns: Any, where: str) -> list[dict[str, str]] | None:
    """An item's `context`: chat turns before the question (None when absent)."""
    if turns is None:
        return None
    ok = isinstance(turns, list) and all(
        isinstance(t, dict)
        and t.get("role") in ("system", "user", "assistant")
        and isinstance(t.get("content"), str)
        for t in turns
    )
    if not ok:
        raise PromptFileError(
            f"{where}: 'context' must be a list of chat turns {{role: user|assistant|system, "
            "content: text}} that come before the question"
        )
    return [{"role": t["role"], "content": t["content"]} for t in turns]


def _json_rows(path: Path, text: str) -> list[PromptRow]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}: invalid JSON: {e}") from None
    if isinstance(data, dict):
        if "questions" not in data:
            raise PromptFileError(
                f"{path}: a JSON object needs a 'questions' list (has {sorted(data)})"
            )
        data = data["questions"]
    if not isinstance(data, list) or not data:
        raise PromptFileError(f"{path}: 'questions' must be a non-empty list")
    rows = []
    for i, row in enumerate(data):
        where = f"{path}: question {i}"
        if isinstance(row, str):
            if not row.strip():
                raise PromptFileError(f"{where}: empty question")
            rows.append({"prompt": row})
        else:
            rows.append(_jsonl_prompt(row, where))
    return rows


def _csv_rows(path: Path, text: str) -> list[PromptRow]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or "question" not in reader.fieldnames:
        raise PromptFileError(
            f"{path}: a prompt CSV needs a 'question' column (has {reader.fieldnames or []})"
        )
    rows = []
    for rec in reader:
        question = rec.get("question") or ""
        if not question.strip():
            raise PromptFileError(f"{path}:{reader.line_num}: empty 'question'")
        row: PromptRow = {"prompt": question}
        qid = rec.get("id") or rec.get("question_id")
        if qid:
            row["id"] = qid
        if rec.get("system"):
            row["system"] = rec["system"]
        rows.append(row)
    return rows


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Rows with `prompt` (a string or chat turns), optional `id`, `system`, `samples`, read
    by the file's extension (module docstring); other extensions are refused."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in EXTENSIONS:
        raise PromptFileError(
            f"{path}: unknown prompt file type '{suffix}'; use one of {', '.join(EXTENSIONS)}"
        )
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise PromptFileError(f"{path}: cannot read: {e}") from None
    if suffix in (".yaml", ".yml"):
        return _yaml_rows(path, text)
    if suffix == ".json":
        return _json_rows(path, text)
    if suffix == ".csv":
        return _csv_rows(path, text)
    if suffix == ".jsonl":
        rows = iter_jsonl(path, PromptFileError, encoding="utf-8-sig")
        return [_jsonl_prompt(row, f"{path}:{n}") for n, row in rows]
    return [{"prompt": line} for line in text.splitlines() if line.strip()]


def select_questions(rows: list[PromptRow], n: int | None) -> list[PromptRow]:
    """The first `n` rows (all when None), with an `id` filled in for every row (`q{i}`)."""
    rows = rows if n is None else rows[:n]
    return [{**r, "id": str(r.get("id") or f"q{i}")} for i, r in enumerate(rows)]
