"""Which judge an experiment uses: an explicit OpenAI-compatible URL, else OpenAI when
OPENAI_API_KEY is set, else our local OpenAI-compatible server running the model itself (a
smoke test: a small model is no judge of alignment). The local judge is scored by whole-number
logprobs (`JudgeConfig.number_logprobs`), since small models' tokenizers spell numbers digit by
digit."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from emgeo_jax.judge.client import JudgeConfig


def uses_local_judge(base_url: str | None) -> bool:
    """True when `judge_context` would serve the model locally."""
    return not base_url and not os.environ.get("OPENAI_API_KEY")


@contextlib.contextmanager
def judge_context(
    lm: Any,
    local_name: str,
    judge_model: str = "gpt-4o-mini",
    base_url: str | None = None,
    concurrency: int = 32,
) -> Iterator[JudgeConfig]:
    """Yield the `JudgeConfig` (see module docstring). The local server is named
    `local_name` (that name is the judge's identity in caches and configs)."""
    if not uses_local_judge(base_url):
        yield JudgeConfig(base_url=base_url, model=judge_model, concurrency=concurrency)
        return
    from emgeo_jax.serve import serve_in_thread

    # One client's concurrent requests arrive over a few ms; waiting 50 ms (against seconds
    # per batch) fills the batches, so fewer distinct batch shapes get compiled.
    with serve_in_thread(lm, model_name=local_name, batch_wait=0.05) as server:
        yield JudgeConfig(
            base_url=server.base_url,
            model=local_name,
            concurrency=concurrency,
            timeout=600,
            number_logprobs=True,
        )
