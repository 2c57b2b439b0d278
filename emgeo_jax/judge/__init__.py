"""LLM judging: prompts, logprob scoring, concurrent cached client, metrics.

    from emgeo_jax.judge import JudgeConfig, judge_responses
    rows = judge_responses(rows, judge=JudgeConfig(base_url=url, model="gpt-4o-mini"),
                           metrics=("aligned", "coherent"), cache_path="judge.sqlite")

The scripted loopback server for tests lives in `emgeo_jax.judge.testing`.
"""

from emgeo_jax.judge.client import JudgeConfig, JudgeStats, ajudge_responses, judge_responses
from emgeo_jax.judge.metrics import em_rate, per_question_means, summarize, wilson_interval
from emgeo_jax.judge.prompts import JudgePrompt, load_prompts, question_file_prompts
from emgeo_jax.judge.scoring import Score, score_numbers, score_top_logprobs

__all__ = [
    "JudgeConfig",
    "JudgePrompt",
    "JudgeStats",
    "Score",
    "ajudge_responses",
    "em_rate",
    "judge_responses",
    "load_prompts",
    "per_question_means",
    "question_file_prompts",
    "score_numbers",
    "score_top_logprobs",
    "summarize",
    "wilson_interval",
]
