"""The judge flags every judging command shares (`emgeo sweep|ablate|transfer|persona|lora-em|
demo` import this module; `emgeo judge` uses `--judge` for the URL and keeps its own names as
aliases). Only the chosen subcommand's module is imported, so these are defined once per
process.

    --judge_base_url URL        OpenAI-compatible judge (default: OpenAI if OPENAI_API_KEY is
                                set, else a local server running --model; one process only:
                                a multi-process run must name a judge)
    --judge_model NAME          judge model name
    --judge_concurrency N       requests in flight
    --judge_timeout S           seconds per request (default 60; 600 for the local server a
                                command starts itself); a busy `emgeo serve` answers 429 with
                                Retry-After rather than let a request wait longer
    --judge_number_logprobs     whole-number scoring: default automatic (on exactly when the
                                judge is `emgeo serve`, which says so in /v1/models);
                                --judge_number_logprobs / --nojudge_number_logprobs force it
    --judge_max_attempts N      attempts per judgement before recording a failure
"""

from __future__ import annotations

from typing import Any

from absl import flags

from emgeo_jax.experiments.judging import DEFAULT_TIMEOUT, LOCAL_TIMEOUT, judge_context

FLAGS = flags.FLAGS
flags.DEFINE_string("judge_model", "gpt-4o-mini", "judge model name")
flags.DEFINE_string(
    "judge_base_url",
    None,
    "OpenAI-compatible judge URL (default: OpenAI if OPENAI_API_KEY is set, else a local "
    "server running --model)",
)
flags.DEFINE_integer("judge_concurrency", 32, "concurrent judge requests", lower_bound=1)
flags.DEFINE_float(
    "judge_timeout",
    None,
    f"seconds per judge request (default {DEFAULT_TIMEOUT:g}; {LOCAL_TIMEOUT:g} for the local "
    "server a command starts itself); a busy `emgeo serve` answers 429 + Retry-After instead "
    "of letting a request wait longer",
    lower_bound=0.001,
)
flags.DEFINE_bool(
    "judge_number_logprobs",
    None,
    "score by whole-number logprobs; default: automatic (on when the judge is `emgeo serve`, "
    "which advertises them in /v1/models); give --[no]judge_number_logprobs to force",
)
flags.DEFINE_integer(
    "judge_max_attempts", 6, "attempts per judgement before it is recorded failed", lower_bound=1
)


def number_logprobs_flag() -> bool | None:
    """--judge_number_logprobs as given, or None (automatic) when not given."""
    return FLAGS.judge_number_logprobs


def _judge_args(model_flag: str) -> tuple:
    return (
        f"local:{FLAGS[model_flag].value}",
        FLAGS.judge_model,
        FLAGS.judge_base_url,
        FLAGS.judge_concurrency,
        FLAGS.judge_timeout,
        number_logprobs_flag(),
        FLAGS.judge_max_attempts,
    )


def planned_judge_from_flags(model_flag: str = "model") -> Any:
    """The `JudgeConfig` the flags describe, resolved before any model loads
    (`experiments.judging.planned_judge`): its identity is what an experiment folder records,
    so commands check an existing --out folder against it first."""
    from emgeo_jax.experiments.judging import planned_judge

    return planned_judge(*_judge_args(model_flag))


def judge_from_flags(lm: Any, model_flag: str = "model", planned: Any = None) -> Any:
    """`judge_context` for the flags (lm: the model a local judge server runs, named
    `local:` + the value of --`model_flag`; planned: `planned_judge_from_flags()` if already
    resolved)."""
    return judge_context(lm, planned or planned_judge_from_flags(model_flag))
