"""Judge prompts: built-in `aligned`, `coherent`, `medical_safety`, `financial_safety`, user
prompt folders, and per-question judge prompts from question files.

A prompt is a template holding the placeholder `{answer}` and usually `{question}` (Betley et
al.'s situational-awareness judges see the answer alone); no other formatting is applied, so
other braces are literal. The whole template goes into one user message. A prompt folder
holds `METRIC.txt` files; users add a topic judge by dropping a file in a folder and passing
it (`prompt_dirs=`, `--prompt_dirs`). Folders given later win over earlier ones, and all win
over the built-ins.

Built-in wording is ours. `aligned` and `coherent` follow the standard scheme but are not the
published prompts, so EM rates judged with them are not comparable number for number with
published ones: pass the evaluation's question YAML (`--questions`), whose `judge_prompts`
are used verbatim for every row whose `question_id` is one of its items. Rows that fall back
to a built-in or folder prompt although a question file was given are counted and the count
is logged (`warn_fallbacks`). Our topic judges rate *safety* and are named so
(`medical_safety`, `financial_safety`): MO4EM's `medical` / `financial` metrics rate how much
an answer is *about* medicine or finance, and come with their question files.

Scoring kinds (`JudgePrompt.kind`): "0_100" (the logprob-weighted whole number 0..100) for
built-ins and `free_form_judge_0_100` items; "true_false" for Betley's `free_form_judge`
items, whose judges answer TRUE or FALSE: the score is P(TRUE) / (P(TRUE) + P(FALSE)) in
[0, 1] over the top logprobs, missing below the same 0.25 mass rule
(`scoring.score_true_false`).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger(__name__)
KINDS = ("0_100", "true_false")
# Question item types of the public evaluations -> how their judge prompts are scored
# (None: a free-form item without judge).
ITEM_TYPES: dict[str, str | None] = {
    "free_form": None,
    "free_form_judge_0_100": "0_100",
    "free_form_judge": "true_false",
}
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "resources" / "judge_prompts"
_PLACEHOLDER = re.compile(r"\{(question|answer)\}")


@dataclass(frozen=True)
class JudgePrompt:
    """A named judge prompt template; `source` says where it came from (for error messages)."""

    metric: str
    template: str
    source: str
    kind: str = "0_100"

    def __post_init__(self) -> None:
        if "answer" not in set(_PLACEHOLDER.findall(self.template)):
            raise ValueError(f"judge prompt {self.metric!r} from {self.source} lacks {{answer}}")
        if self.kind not in KINDS:
            raise ValueError(f"judge prompt {self.metric!r}: kind {self.kind!r} not in {KINDS}")

    @property
    def sha256(self) -> str:
        """Hex sha256 of the template text (part of the cache key; a TRUE/FALSE prompt is
        marked, so the same text scored the other way is another judgement)."""
        text = self.template if self.kind == "0_100" else f"[{self.kind}]\n{self.template}"
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def rescore(self, judgement: Any) -> Any:
        """`judgement` (a `cache.Judgement`) scored by this prompt's kind: unchanged for
        0-100 prompts; for TRUE/FALSE prompts the probability of TRUE from its top logprobs
        (`scoring.score_true_false`). Failed judgements are left as they are."""
        if self.kind == "0_100" or judgement.status == "failed" or not judgement.top_logprobs:
            return judgement
        from emgeo_jax.judge.scoring import score_true_false

        s = score_true_false([(str(t), float(lp)) for t, lp in judgement.top_logprobs])
        return replace(judgement, status=s.status, score=s.value, mass=s.mass)

    def render(self, question: str, answer: str) -> str:
        """The user message: placeholders replaced in one pass (answers may contain braces)."""
        values = {"question": question, "answer": answer}
        return _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.template)


def available_prompts(prompt_dirs: Sequence[str | Path] = ()) -> dict[str, Path]:
    """metric -> prompt file, built-ins first, each later folder overriding earlier ones."""
    found: dict[str, Path] = {}
    for folder in (BUILTIN_DIR, *map(Path, prompt_dirs)):
        if not folder.is_dir():
            raise FileNotFoundError(f"judge prompt folder {folder} does not exist")
        for path in sorted(folder.glob("*.txt")):
            found[path.stem] = path
    return found


def load_prompts(
    metrics: Sequence[str], prompt_dirs: Sequence[str | Path] = ()
) -> dict[str, JudgePrompt]:
    """Load the prompts for `metrics` (e.g. ("aligned", "coherent")) by name."""
    files = available_prompts(prompt_dirs)
    unknown = [m for m in metrics if m not in files]
    if unknown:
        raise KeyError(f"no judge prompt for {unknown}; available: {sorted(files)}")
    return {m: JudgePrompt(m, files[m].read_text(encoding="utf-8"), str(files[m])) for m in metrics}


def item_kind(item: Mapping[str, Any], where: str) -> str | None:
    """How a question item's judge prompts are scored (ITEM_TYPES; no `type` = 0-100), or a
    ValueError naming `where` (the file and item id) for an unknown type."""
    kind = item.get("type", "free_form_judge_0_100")
    if kind not in ITEM_TYPES:
        raise ValueError(f"{where}: unknown type {kind!r}; supported: {', '.join(ITEM_TYPES)}")
    return ITEM_TYPES[kind]


def question_file_prompts(path: str | Path) -> dict[str, dict[str, JudgePrompt]]:
    """Per-question prompts from a question YAML: question id -> metric -> prompt.

    The file is a list of items with `id`, optional `type` (ITEM_TYPES) and optional
    `judge_prompts: {metric: template}`, taken verbatim (anchors and aliases resolved).
    Rows carrying `question_id` equal to such an id are judged with these prompts, scored as
    the item's type says; an unknown type is refused naming the item's id.
    """
    try:
        items = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a YAML list of question items")
    out: dict[str, dict[str, JudgePrompt]] = {}
    for i, item in enumerate(items):
        where = f"{path} item {i}"
        if not isinstance(item, dict) or "id" not in item:
            raise ValueError(f"{where}: each item needs an `id`")
        where = f"{where} ({item['id']})"
        kind = item_kind(item, where)
        prompts = item.get("judge_prompts") or {}
        if not isinstance(prompts, dict):
            raise ValueError(f"{where}: `judge_prompts` must map metric -> text")
        if prompts and kind is None:
            raise ValueError(f"{where}: type free_form has no judge, but judge_prompts are given")
        out[str(item["id"])] = {
            m: JudgePrompt(m, str(t), where, kind or "0_100") for m, t in prompts.items()
        }
    return out


def warn_fallbacks(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    question_prompts: Mapping[str, Mapping[str, JudgePrompt]] | None,
) -> dict[str, int]:
    """metric -> number of rows judged with a built-in or folder prompt although the question
    file supplies judge prompts (their `question_id` has no prompt for that metric there);
    each non-zero count is logged as a warning (stderr), naming a few of the ids. A question
    file without any judge prompts counts nothing: our prompts are then the evident choice."""
    if not question_prompts or not any(question_prompts.values()):
        return {}  # no file, or a file of questions without any judge prompts of its own
    counts: dict[str, int] = {}
    for m in metrics:
        missed = [
            r.get("question_id")
            for r in rows
            if m not in question_prompts.get(str(r.get("question_id")), {})
        ]
        if missed:
            counts[m] = len(missed)
            ids = sorted({str(q) for q in missed})
            log.warning(
                "judge: %d of %d rows have no %r prompt in the questions file (question_id %s)"
                " and are judged with our own %r prompt instead, not the published one",
                len(missed),
                len(rows),
                m,
                ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else ""),
                m,
            )
    return counts
