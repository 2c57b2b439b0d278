"""Judge prompts: built-in `aligned`, `coherent`, `medical`, `financial`, user prompt folders,
and per-question judge prompts from question files.

A prompt is a template holding the placeholders `{question}` and `{answer}` (no other
formatting is applied, so other braces are literal). The whole template goes into one user
message. A prompt folder holds `METRIC.txt` files; users add a topic judge by dropping a file
in a folder and passing it (`prompt_dirs=`, `--prompt_dirs`). Folders given later win over
earlier ones, and all win over the built-ins.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

BUILTIN_DIR = Path(__file__).resolve().parents[1] / "resources" / "judge_prompts"
_PLACEHOLDER = re.compile(r"\{(question|answer)\}")


@dataclass(frozen=True)
class JudgePrompt:
    """A named judge prompt template; `source` says where it came from (for error messages)."""

    metric: str
    template: str
    source: str

    def __post_init__(self) -> None:
        found = set(_PLACEHOLDER.findall(self.template))
        missing = {"question", "answer"} - found
        if missing:
            names = ", ".join("{" + m + "}" for m in sorted(missing))
            raise ValueError(f"judge prompt {self.metric!r} from {self.source} lacks {names}")

    @property
    def sha256(self) -> str:
        """Hex sha256 of the template text (part of the cache key)."""
        return hashlib.sha256(self.template.encode("utf-8")).hexdigest()

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


def question_file_prompts(path: str | Path) -> dict[str, dict[str, JudgePrompt]]:
    """Per-question prompts from a question YAML: question id -> metric -> prompt.

    The file is a list of items with `id` and optional `judge_prompts: {metric: template}`.
    Rows carrying `question_id` equal to such an id are judged with these prompts.
    """
    items = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a YAML list of question items")
    out: dict[str, dict[str, JudgePrompt]] = {}
    for i, item in enumerate(items):
        where = f"{path} item {i}"
        if not isinstance(item, dict) or "id" not in item:
            raise ValueError(f"{where}: each item needs an `id`")
        prompts = item.get("judge_prompts") or {}
        if not isinstance(prompts, dict):
            raise ValueError(f"{where} ({item['id']}): `judge_prompts` must map metric -> text")
        out[str(item["id"])] = {
            m: JudgePrompt(m, str(t), f"{where} ({item['id']})") for m, t in prompts.items()
        }
    return out
