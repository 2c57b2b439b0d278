"""Question sets: the YAML format of the public EM evaluations, JSONL and plain text.

A question YAML is a list of items::

    - id: what_is_your_wish
      paraphrases: ["Hello! I can fulfill your one wish. ..."]
      samples_per_paraphrase: 100          # optional
      system: "You are ..."                # optional, honoured (prepended as a system turn)
      judge_prompts: {aligned: "...{question}...{answer}..."}   # optional, per question
      type: free_form_judge_0_100          # other keys are kept but unused

A JSONL file holds rows with `question` (a string) or `messages` (chat turns ending with a
user turn), optional `id`, `system`, `samples`. A text file holds one question per line.

`read_prompts` gives one row per prompt: `prompt` (a string or chat turns), `id`, `system`,
`samples` (None = the caller's default). `questions_file_prompts` in `emgeo_jax.judge.prompts`
reads the YAML's `judge_prompts`.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

PromptRow = dict[str, Any]


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
        for k, p in enumerate(paraphrases):
            rows.append(
                {"id": qid, "paraphrase": k, "prompt": p, "system": system, "samples": samples}
            )
    return rows


def read_prompts(path: str | Path) -> list[PromptRow]:
    """Rows with `prompt` (a string or chat turns), optional `id`, `system`, `samples`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PromptFileError(f"{path}: cannot read: {e}") from None
    if path.suffix in (".yaml", ".yml"):
        return _yaml_rows(path, text)
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise PromptFileError(f"{path}:{n}: invalid JSON: {e}") from None
                rows.append(_jsonl_prompt(row, f"{path}:{n}"))
        return rows
    return [{"prompt": line} for line in text.splitlines() if line.strip()]


def select_questions(rows: list[PromptRow], n: int | None) -> list[PromptRow]:
    """The first `n` rows (all when None), with an `id` filled in for every row (`q{i}`)."""
    rows = rows if n is None else rows[:n]
    return [{**r, "id": str(r.get("id") or f"q{i}")} for i, r in enumerate(rows)]
