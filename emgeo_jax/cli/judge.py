"""`emgeo judge`: score a JSONL of {question, answer, ...} rows with an LLM judge.

`emgeo generate` output is accepted as it is: a row without `question` / `answer` takes them
from its `prompt` (the last user turn of chat messages) and `response`, and its `id` (a
question YAML item) becomes `question_id`. EM and per-question means are grouped by
`question_id` when every row has one (paraphrases of a question count as one question, as in
the sweep), else by the question text.

    emgeo judge --responses gens.jsonl --judge openai --judge_model gpt-4o-mini \
        --metrics aligned,coherent --out judged.jsonl
    emgeo judge --responses gens.jsonl --judge http://127.0.0.1:8000/v1 --out judged.jsonl
        # `emgeo serve` says so in /v1/models, so it is asked for whole-number scores
        # (right for digit-splitting tokenizers); --[no]number_logprobs forces either way

Each output row is the input row plus, per metric, the score (or null) and `METRIC_judge`
with status, raw top logprobs, judge model, temperature and seed. Judgements are cached in an
SQLite file (default: judge_cache.sqlite beside --out), so re-running after an interruption
or a failure sends only what is missing. A metrics summary (JSON) goes to stdout and, with
--summary_out, to a file. The API key is read from the environment variable named by
--api_key_env (never from the command line). Exits 1 if any judgement failed.

The judge settings are the ones every judging command shares (`emgeo_jax.cli.judge_flags`:
--judge_model, --judge_concurrency, --judge_timeout, --judge_number_logprobs,
--judge_max_attempts); --concurrency, --timeout, --number_logprobs and --max_attempts are
their short names here. --judge_base_url, when given, is the same as --judge URL.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from absl import flags

from emgeo_jax.cli import judge_flags
from emgeo_jax.experiments.judging import DEFAULT_TIMEOUT
from emgeo_jax.judge.client import JudgeConfig, JudgeStats, judge_responses
from emgeo_jax.judge.io import judge_rows, read_responses, write_jsonl_atomic
from emgeo_jax.judge.metrics import summarize
from emgeo_jax.judge.prompts import question_file_prompts

FLAGS = flags.FLAGS
flags.DEFINE_string("responses", None, "responses .jsonl or .csv (question/answer per row)")
flags.DEFINE_string("judge", "openai", "`openai` or an OpenAI-compatible base URL")
flags.DEFINE_list("metrics", ["aligned", "coherent"], "judge prompts to score, by name")
flags.DEFINE_string("out", None, "output JSONL (written atomically)")
flags.DEFINE_string("cache", None, "SQLite judge cache (default: judge_cache.sqlite beside --out)")
flags.DEFINE_list("prompt_dirs", [], "extra folders of METRIC.txt judge prompts")
flags.DEFINE_string("questions", None, "question YAML whose `judge_prompts` apply by question_id")
flags.DEFINE_string("api_key_env", "OPENAI_API_KEY", "environment variable holding the API key")
flags.DEFINE_alias("concurrency", "judge_concurrency")
flags.DEFINE_alias("timeout", "judge_timeout")
flags.DEFINE_alias("max_attempts", "judge_max_attempts")
flags.DEFINE_alias("number_logprobs", "judge_number_logprobs")
flags.DEFINE_float("price_in", None, "USD per 1M input tokens (default: known list price)")
flags.DEFINE_float("price_out", None, "USD per 1M output tokens (default: known list price)")
flags.DEFINE_string("summary_out", None, "also write the metrics summary JSON here")
flags.DEFINE_bool("progress", True, "show a progress bar")


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise SystemExit(f"emgeo judge: unexpected arguments {argv[1:]}")
    if not FLAGS.responses or not FLAGS.out:
        raise SystemExit("emgeo judge: --responses and --out are required")
    logging.getLogger("emgeo_jax.judge").setLevel(logging.WARNING)
    base_url = FLAGS.judge_base_url or (None if FLAGS.judge == "openai" else FLAGS.judge)
    if base_url is None and not os.environ.get(FLAGS.api_key_env):
        raise SystemExit(f"emgeo judge: --judge openai needs an API key in ${FLAGS.api_key_env}")
    judge = JudgeConfig(
        base_url=base_url,
        model=FLAGS.judge_model,
        api_key=os.environ.get(FLAGS.api_key_env),
        concurrency=FLAGS.judge_concurrency,
        timeout=FLAGS.judge_timeout or DEFAULT_TIMEOUT,
        max_attempts=FLAGS.judge_max_attempts,
        price_in=FLAGS.price_in,
        price_out=FLAGS.price_out,
        number_logprobs=judge_flags.number_logprobs_flag(),
    )
    rows = judge_rows(read_responses(FLAGS.responses))
    cache = FLAGS.cache or str(Path(FLAGS.out).resolve().parent / "judge_cache.sqlite")
    Path(cache).parent.mkdir(parents=True, exist_ok=True)
    q_prompts = question_file_prompts(FLAGS.questions) if FLAGS.questions else None
    stats = JudgeStats()
    try:
        out = judge_responses(
            rows,
            judge,
            FLAGS.metrics,
            cache,
            FLAGS.prompt_dirs,
            q_prompts,
            stats,
            FLAGS.progress,
        )
    except (ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"emgeo judge: {FLAGS.responses}: {e}") from None
    write_jsonl_atomic(FLAGS.out, out)
    by = "question_id" if out and all("question_id" in r for r in out) else "question"
    report = {"stats": vars(stats), "summary": summarize(out, FLAGS.metrics, question_key=by)}
    text = json.dumps(report, indent=2)
    if FLAGS.summary_out:
        Path(FLAGS.summary_out).write_text(text + "\n", encoding="utf-8")
    print(text)
    print(
        f"{len(out)} rows -> {FLAGS.out}; {stats.requests} requests, {stats.cache_hits} cached,"
        f" {stats.failed} failed, ${stats.cost_usd:.4f}",
        file=sys.stderr,
    )
    return 1 if stats.failed else 0
