"""Which judge an experiment uses: an explicit OpenAI-compatible URL, else OpenAI when
OPENAI_API_KEY is set, else our local OpenAI-compatible server running the model itself (a
smoke test: a small model is no judge of alignment).

Whole-number scoring (`JudgeConfig.number_logprobs`, right for tokenizers that spell numbers
digit by digit) is on for the local server, and by default (`number_logprobs=None`) decided by
asking an explicit URL whether it is `emgeo serve` (`judge.client.resolve_number_logprobs`),
so `--judge_base_url` pointing at `emgeo serve` scores exactly as `emgeo judge
--number_logprobs` does. The yielded config is resolved: what it says is what was used.

Several processes (a model on a mesh across hosts): the local server listens on process 0
and its model calls run on every process, in step. The experiment's own collectives
(generation) must not interleave with them, so every process enters `judging_session(judge)`
around process 0's judging (`experiments.folder.CellRunner` does): process 0's server
broadcasts its model calls only inside it, and the other processes follow them
(`serve.ModelWorker.follow`) until process 0 ends the session. With one process, or a judge
elsewhere, `judging_session` does nothing."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from emgeo_jax.hosts import broadcast_json, is_primary
from emgeo_jax.judge.client import JudgeConfig, resolve_number_logprobs

DEFAULT_TIMEOUT = 60.0  # seconds per judge request
LOCAL_TIMEOUT = 600.0  # the in-process local judge: its first batches compile


def uses_local_judge(base_url: str | None) -> bool:
    """True when `judge_context` would serve the model locally."""
    return not base_url and not os.environ.get("OPENAI_API_KEY")


def planned_judge(
    local_name: str,
    judge_model: str = "gpt-4o-mini",
    base_url: str | None = None,
    concurrency: int = 32,
    timeout: float | None = None,
    number_logprobs: bool | None = None,
    max_attempts: int = 6,
) -> JudgeConfig:
    """The `JudgeConfig` `judge_context` yields for these arguments, resolved without a model:
    an explicit URL or OpenAI as given (automatic whole-number scoring decided by asking the
    endpoint), or for the local server every field but its `base_url` (None here; the server
    is started by `judge_context`). Its identity (`experiments.sweep.judge_identity`) is what
    an experiment folder records, so a folder can be checked before the model loads."""
    if not uses_local_judge(base_url):
        return resolve_number_logprobs(
            JudgeConfig(
                base_url=base_url,
                model=judge_model,
                concurrency=concurrency,
                timeout=DEFAULT_TIMEOUT if timeout is None else timeout,
                max_attempts=max_attempts,
                number_logprobs=number_logprobs,
            )
        )
    return JudgeConfig(
        base_url=None,
        model=local_name,
        concurrency=concurrency,
        timeout=LOCAL_TIMEOUT if timeout is None else timeout,
        max_attempts=max_attempts,
        number_logprobs=True if number_logprobs is None else number_logprobs,
    )


@contextlib.contextmanager
def judge_context(lm: Any, planned: JudgeConfig) -> Iterator[JudgeConfig]:
    """Yield the judge `planned` (from `planned_judge`, see module docstring): as it is for an
    explicit endpoint or OpenAI; for the local judge, with the `base_url` of a server started
    here in a thread, running `lm` under `planned.model` (its identity in caches and configs).
    A busy local server answers 429 with Retry-After rather than let a request wait longer
    than `planned.timeout`."""
    import dataclasses

    if not uses_local_judge(planned.base_url):
        yield planned
        return
    import jax

    from emgeo_jax.serve import ModelWorker, serve_in_thread

    several = jax.process_count() > 1
    # One client's concurrent requests arrive over a few ms; waiting 50 ms (against seconds
    # per batch) fills the batches, so fewer distinct batch shapes get compiled.
    serving = (
        serve_in_thread(lm, model_name=planned.model, batch_wait=0.05, sessions=several)
        if is_primary()
        else contextlib.nullcontext()
    )
    with serving as server:  # the server listens on process 0 alone
        url = broadcast_json(None if server is None else server.base_url)
        if several:  # the worker `judging_session` opens: process 0's, or a follower
            _SESSIONS[url] = server.worker if server else ModelWorker(lm, follower=True)
        try:
            yield dataclasses.replace(planned, base_url=url)
        finally:
            _SESSIONS.pop(url, None)


_SESSIONS: dict[str, Any] = {}  # base_url -> the local judge's worker, on several processes


@contextlib.contextmanager
def judging_session(judge: JudgeConfig) -> Iterator[None]:
    """Enter on every process around process 0's judging with `judge` (module docstring):
    for the local judge on several processes, process 0's server runs its model calls on
    every process while inside; on the others, entering returns when process 0 leaves.
    Otherwise a no-op. When process 0's judging raises, the others raise `RuntimeError` on
    entering (rather than wait in the experiment's next collective for a process that left)."""
    worker = _SESSIONS.get(judge.base_url or "")
    if worker is None:
        yield
    elif is_primary():
        worker.open_session()
        failed = True
        try:
            yield
            failed = False
        finally:
            worker.end_session(failed)
    else:
        if worker.follow():  # process 0's judge calls, until it ends the session
            raise RuntimeError("the judging on process 0 failed (its log says why)")
        yield
