"""Flags and helpers shared by `emgeo sweep|ablate|transfer|persona|lora-em` (each imports this
module once, so the flags are defined once per process). The model, dtype, mesh and sampling
flags come from `emgeo_jax.cli.common`."""

from __future__ import annotations

from typing import Any

from absl import flags

from emgeo_jax.cli import common, judge_flags
from emgeo_jax.experiments.folder import Sampling
from emgeo_jax.experiments.questions import read_prompts, select_questions, shipped_questions_path

FLAGS = flags.FLAGS
# Samples per question when neither --samples nor the question file says.
DEFAULT_SAMPLES = 10
common.define_sampling_flags(
    batch_size=32,
    samples_help="samples per question (default: a question YAML's samples_per_paraphrase, 50 "
    f"per paraphrase in the shipped questions; other files {DEFAULT_SAMPLES}); an explicit value "
    "overrides the YAML",
)
common.define_positions_flag()
flags.DEFINE_string("questions", None, "question file (.yaml/.jsonl/.txt); default: ours")
flags.DEFINE_integer("n_questions", None, "use only the first N questions")
flags.DEFINE_string("out", None, "experiment folder (re-running resumes)")
flags.DEFINE_bool("overwrite", False, "discard an existing run with another configuration")


def sampling_from_flags() -> Sampling:
    return Sampling(
        samples=DEFAULT_SAMPLES if FLAGS.samples is None else FLAGS.samples,
        max_new_tokens=FLAGS.max_new_tokens,
        temperature=FLAGS.temperature,
        top_p=FLAGS.top_p,
        batch_size=FLAGS.batch_size,
        seed=FLAGS.seed,
        positions=FLAGS.positions,
    )


def questions_from_flags() -> tuple[list[dict[str, Any]], dict | None]:
    """The --questions rows (the first --n_questions) and their per-question judge prompts
    (a question YAML's `judge_prompts`; None for other files). An explicitly given --samples
    replaces every row's own `samples` (a YAML's samples_per_paraphrase)."""
    from emgeo_jax.judge.prompts import question_file_prompts

    q = FLAGS.questions
    rows = select_questions(read_prompts(q or shipped_questions_path()), FLAGS.n_questions)
    if not rows:
        raise ValueError(f"--questions {q or shipped_questions_path()}: no questions")
    if FLAGS.samples is not None:
        rows = [{k: v for k, v in row.items() if k != "samples"} for row in rows]
    prompts = question_file_prompts(q) if q and q.endswith((".yaml", ".yml")) else None
    return rows, prompts


def rate_text(rate: float | None) -> str:
    """An EM rate for a printed summary: the number, or why there is none."""
    return "n/a (no usable judge scores)" if rate is None else str(rate)


def require_out(command: str) -> str:
    if not FLAGS.out:
        raise SystemExit(f"emgeo {command}: --out DIR is required")
    return FLAGS.out


def planned_judge() -> Any:
    """The judge of the shared judge flags resolved before the model loads
    (`cli.judge_flags.planned_judge_from_flags`): what the experiment folder records."""
    return judge_flags.planned_judge_from_flags()


def judge_from_flags(lm: Any, planned: Any = None):
    """The judge of the shared judge flags (`cli.judge_flags`); lm: the model a local judge
    server runs; planned: `planned_judge()` when already resolved."""
    return judge_flags.judge_from_flags(lm, planned=planned)


def parse_named(specs: list[str], flag: str) -> dict[str, str]:
    """["a=x", "b=y"] -> {"a": "x", "b": "y"}; a bare path is named by its stem."""
    from pathlib import Path

    out = {}
    for spec in specs:
        name, _, value = spec.rpartition("=") if "=" in spec else (Path(spec).stem, "", spec)
        if not name or not value or name in out:
            raise SystemExit(f"--{flag}: '{spec}' is not NAME=VALUE with a new NAME")
        out[name] = value
    return out
