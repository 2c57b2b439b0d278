"""Concurrent, cached, resumable LLM judging through the `openai` client.

Each (row, metric) becomes one chat completion: the rendered judge prompt as a single user
message, `max_tokens=1, temperature=0, logprobs=True, top_logprobs=20, seed=0`, scored with
`scoring.score_top_logprobs`; with `number_logprobs` (our local server only) the request
also asks for whole-number logprobs 0..100, scored with `scoring.score_numbers` (right for
tokenizers that spell numbers digit by digit). `number_logprobs=None` asks the endpoint once
(`GET /models`): our server advertises the capability there, so it is used exactly when the
judge is `emgeo serve`. Identical judgements are sent once. Requests run under an
`asyncio.Semaphore(concurrency)`; 408/409/429/5xx, timeouts, dropped connections and
malformed JSON are retried with exponential backoff and jitter, waiting at least the
server's Retry-After. A 429/503 that carries Retry-After is the server saying "busy, come
back then": it does not use up one of `max_attempts` (the waits are bounded by
`max_queue_wait` seconds in total per judgement). Every finished judgement is committed to
the SQLite cache at once, so a re-run sends nothing already answered and an interrupted run
resumes. A judgement that still fails is recorded as `failed` with its reason (and retried
on the next run).

The API key is never logged, cached, written to output or put in an exception message: every
error text is scrubbed of it before it leaves this module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from tqdm.auto import tqdm

from emgeo_jax.judge.cache import CacheKey, JudgeCache, Judgement
from emgeo_jax.judge.prompts import JudgePrompt, available_prompts, load_prompts, warn_fallbacks
from emgeo_jax.judge.scoring import score_numbers, score_top_logprobs

log = logging.getLogger(__name__)

OPENAI_BASE_URL = "https://api.openai.com/v1"
# USD per 1M (input, output) tokens, OpenAI list prices (2025); override in JudgeConfig.
PRICES: dict[str, tuple[float, float]] = {
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4o-2024-08-06": (2.50, 10.00),
    "gpt-4o": (2.50, 10.00),
    "gpt-4.1-mini": (0.40, 1.60),
}
_RETRY_STATUS = {408, 409, 429}


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask the judge.

    base_url: any OpenAI-compatible endpoint (e.g. `http://127.0.0.1:8000/v1`); None means
      the OpenAI API. api_key: None reads OPENAI_API_KEY; a local base_url without a key
      sends the placeholder "EMPTY". It is excluded from repr.
    price_in / price_out: USD per 1M tokens; None looks the model up in PRICES (else 0).
    number_logprobs: ask for whole-number logprobs (`emgeo_jax.serve` extension; OpenAI
      rejects it). Part of the judge's identity: such scores are cached apart. None: ask the
      endpoint whether it offers them (`resolve_number_logprobs`; OpenAI: no).
    timeout: seconds per request (the client sends it; `emgeo serve` refuses with 429 and
      Retry-After rather than queue a request longer than that).
    max_queue_wait: total seconds one judgement may spend waiting out a busy server's
      Retry-After replies before it is recorded as failed.
    """

    base_url: str | None = None
    model: str = "gpt-4o-mini"
    api_key: str | None = field(default=None, repr=False)
    concurrency: int = 32
    timeout: float = 60.0
    max_attempts: int = 6
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0
    temperature: float = 0.0
    seed: int = 0
    top_logprobs: int = 20
    price_in: float | None = None
    price_out: float | None = None
    number_logprobs: bool | None = False
    max_queue_wait: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("concurrency", "max_attempts", "top_logprobs"):
            if getattr(self, name) < 1:
                raise ValueError(f"JudgeConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout <= 0:
            raise ValueError(f"JudgeConfig.timeout must be > 0, got {self.timeout}")

    def resolved_key(self) -> str:
        key = self.api_key or os.environ.get("OPENAI_API_KEY")
        if key:
            return key
        if self.base_url is None:
            raise ValueError("the OpenAI judge needs an API key: set OPENAI_API_KEY")
        return "EMPTY"

    @property
    def identity(self) -> str:
        """The judge's name in cache keys: the model, marked when scored by whole numbers."""
        if self.number_logprobs is None:
            raise ValueError("JudgeConfig.number_logprobs=None: call resolve_number_logprobs")
        return f"{self.model} [number_logprobs]" if self.number_logprobs else self.model

    def prices(self) -> tuple[float, float]:
        table = PRICES.get(self.model, (0.0, 0.0))
        return (
            table[0] if self.price_in is None else self.price_in,
            table[1] if self.price_out is None else self.price_out,
        )


@dataclass
class JudgeStats:
    """Counters for one run: requests sent (including retries), cache hits, tokens, cost."""

    judgements: int = 0
    cache_hits: int = 0
    requests: int = 0
    retries: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    seconds: float = 0.0
    failure_reasons: dict[str, int] = field(default_factory=dict)


def scrub(text: str, secret: str | None) -> str:
    """`text` with every occurrence of `secret` replaced by [REDACTED]."""
    if secret and secret != "EMPTY":
        return text.replace(secret, "[REDACTED]")
    return text


def retry_after_seconds(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def backoff_delay(attempt: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff with equal jitter: d/2 + U(0, d/2), d = min(cap, base * 2**attempt)."""
    d = min(cap, base * 2.0**attempt)
    return d / 2 + rng.uniform(0, d / 2)


NUMBER_LOGPROBS_CAPABILITY = "number_logprobs"  # what `emgeo serve` lists in /v1/models
_capabilities: dict[str, bool] = {}  # base_url -> offers number_logprobs (asked once)


def endpoint_offers_number_logprobs(base_url: str, api_key: str = "EMPTY", timeout: float = 10.0):
    """Whether the OpenAI-compatible endpoint at `base_url` is `emgeo serve` (or another
    server listing `"number_logprobs"` in a model's `capabilities` in `GET /models`). Asked
    once per URL per process; an endpoint that does not answer counts as not offering it."""
    if base_url in _capabilities:
        return _capabilities[base_url]
    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=1, timeout=timeout)
    try:
        data = client.get("/models", cast_to=dict)
        models = data.get("data") if isinstance(data, dict) else None
        offers = any(
            isinstance(m, dict) and NUMBER_LOGPROBS_CAPABILITY in (m.get("capabilities") or ())
            for m in models or ()
        )
    except (openai.OpenAIError, ValueError) as e:
        log.info("judge %s: GET /models failed (%s); plain top-logprob scoring", base_url, e)
        offers = False
    finally:
        client.close()
    _capabilities[base_url] = offers
    return offers


def resolve_number_logprobs(cfg: JudgeConfig) -> JudgeConfig:
    """`cfg` with `number_logprobs=None` (auto) decided: True when the endpoint advertises
    whole-number logprobs (`endpoint_offers_number_logprobs`), False for OpenAI or any other
    server. An explicit True/False is kept."""
    if cfg.number_logprobs is not None:
        return cfg
    offers = cfg.base_url is not None and endpoint_offers_number_logprobs(
        cfg.base_url, cfg.resolved_key(), min(cfg.timeout, 30.0)
    )
    if offers:
        log.info("judge %s offers whole-number logprobs: scoring with them", cfg.base_url)
    return dataclasses.replace(cfg, number_logprobs=offers)


class _Retryable(Exception):
    def __init__(self, reason: str, wait: float | None = None, busy: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.wait = wait
        self.busy = busy  # the server asked us to come back later (429/503 + Retry-After)


class _Fatal(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _top_logprobs(data: Any) -> list[tuple[str, float]]:
    """(token, logprob) pairs of the first output token of a chat.completion JSON object."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list):
        raise _Retryable("response is not a chat completion")
    if not data["choices"]:
        raise _Retryable("response has no choices")
    content = (data["choices"][0].get("logprobs") or {}).get("content")
    if not content:
        raise _Fatal("judge returned no logprobs (does it support logprobs/top_logprobs?)")
    try:
        return [(str(t["token"]), float(t["logprob"])) for t in content[0]["top_logprobs"]]
    except (KeyError, TypeError, ValueError) as e:
        raise _Retryable(f"malformed top_logprobs ({type(e).__name__}: {e})") from None


def _number_logprobs(data: dict[str, Any]) -> list[tuple[int, float]]:
    """(number, logprob) pairs of a reply to a `number_logprobs` request."""
    pairs = data["choices"][0].get("number_logprobs")
    if pairs is None:
        raise _Fatal("judge returned no number_logprobs (is it emgeo's local server?)")
    try:
        return [(int(p["number"]), float(p["logprob"])) for p in pairs]
    except (KeyError, TypeError, ValueError) as e:
        raise _Retryable(f"malformed number_logprobs ({type(e).__name__}: {e})") from None


async def _ask(
    client: openai.AsyncOpenAI, cfg: JudgeConfig, prompt: str, stats: JudgeStats
) -> tuple[list[tuple[str, float]], list[tuple[int, float]] | None]:
    """One request -> (first-token top logprobs, number logprobs or None); raises _Retryable /
    _Fatal with a (not yet scrubbed) reason."""
    stats.requests += 1
    extra = {"number_logprobs": True} if cfg.number_logprobs else {}
    try:
        # `client.post` is the client's documented raw-request path: same auth, timeout and
        # error types as `chat.completions.create`, without its TypedDict transform of the
        # parameters and its model construction of the reply. That halves the client's CPU
        # per request (6.7 -> 4.1 ms here), which bounds throughput at high concurrency.
        response = await client.post(
            "/chat/completions",
            body={
                "model": cfg.model,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 1,
                "temperature": cfg.temperature,
                "logprobs": True,
                "top_logprobs": cfg.top_logprobs,
                "seed": cfg.seed,
                **extra,
            },
            cast_to=dict,
        )
    except openai.APIStatusError as e:
        reason = f"HTTP {e.status_code}: {e.message}"
        if e.status_code in _RETRY_STATUS or e.status_code >= 500:
            wait = retry_after_seconds(e.response.headers)
            busy = wait is not None and e.status_code in (429, 503)
            raise _Retryable(reason, wait, busy) from None
        raise _Fatal(reason) from None
    except openai.APITimeoutError:
        raise _Retryable(f"timeout after {cfg.timeout:g} s") from None
    except openai.APIConnectionError as e:
        cause = f" ({type(e.__cause__).__name__})" if e.__cause__ is not None else ""
        raise _Retryable(f"connection error{cause}") from None
    except ValueError as e:  # the client's json.loads on a malformed body
        raise _Retryable(f"malformed JSON response: {e}") from None
    top = _top_logprobs(response)
    numbers = _number_logprobs(response) if cfg.number_logprobs else None
    usage = response.get("usage") or {}
    stats.prompt_tokens += int(usage.get("prompt_tokens") or 0)
    stats.completion_tokens += int(usage.get("completion_tokens") or 0)
    return top, numbers


async def _judge_one(
    client: openai.AsyncOpenAI,
    cfg: JudgeConfig,
    prompt: str,
    sem: asyncio.Semaphore,
    stats: JudgeStats,
    rng: random.Random,
) -> Judgement:
    """Ask until scored or out of attempts; never raises for judge-side problems."""
    key = cfg.resolved_key()
    reason = "not attempted"
    attempt, queued = 0, 0.0  # failed attempts; seconds spent waiting out a busy server
    async with sem:
        while attempt < cfg.max_attempts:
            try:
                top, numbers = await _ask(client, cfg, prompt, stats)
            except _Fatal as e:
                reason = scrub(e.reason, key)
                break
            except _Retryable as e:
                reason = scrub(e.reason, key)
                if e.busy and queued + (e.wait or 0.0) <= cfg.max_queue_wait:
                    # "busy, come back in N s": not a failure, so no attempt is used up;
                    # jitter spreads the clients the server turned away at once
                    wait = min(e.wait or 0.0, cfg.max_retry_after) * rng.uniform(1.0, 1.5)
                    queued += max(wait, 0.5)  # charged at least 0.5 s: never an endless loop
                    stats.retries += 1
                    log.debug("judge busy, back in %.2f s: %s", wait, reason)
                    await asyncio.sleep(wait)
                    continue
                attempt += 1
                if attempt == cfg.max_attempts:
                    break
                stats.retries += 1
                wait = backoff_delay(attempt - 1, cfg.backoff_base, cfg.backoff_max, rng)
                if e.wait is not None:
                    wait = max(min(e.wait, cfg.max_retry_after), wait)
                log.info("judge retry %d in %.2f s: %s", attempt, wait, reason)
                await asyncio.sleep(wait)
                continue
            except Exception as e:  # noqa: BLE001 - recorded, never lost; text scrubbed
                reason = scrub(f"{type(e).__name__}: {e}", key)
                break
            if numbers is None:
                s = score_top_logprobs(top)
            else:  # kept: the whole-number distribution the score came from
                s, top = score_numbers(numbers, top), [(str(n), lp) for n, lp in numbers]
            return Judgement(s.status, s.value, s.mass, top, None, cfg.temperature, cfg.seed)
    log.warning("judgement failed: %s", reason)
    return Judgement("failed", None, None, None, reason, cfg.temperature, cfg.seed)


def judge_for(judge: JudgeConfig, prompt: JudgePrompt) -> JudgeConfig:
    """The request settings for one prompt: whole-number logprobs are a 0-100 scheme, so a
    TRUE/FALSE prompt is always asked for its first token's top logprobs (`number_logprobs`
    off), whatever the judge's setting; its judgements are cached under that identity."""
    if prompt.kind == "0_100" or not judge.number_logprobs:
        return judge
    return dataclasses.replace(judge, number_logprobs=False)


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> None:
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {i}: expected a dict with `question` and `answer`")
        for f in ("question", "answer"):
            if not isinstance(row.get(f), str):
                raise ValueError(f"row {i}: field `{f}` must be a string, got {row.get(f)!r:.60}")


def _prompt_for(
    i: int,
    row: Mapping[str, Any],
    metric: str,
    prompts: Mapping[str, JudgePrompt],
    question_prompts: Mapping[str, Mapping[str, JudgePrompt]],
) -> JudgePrompt:
    own = question_prompts.get(str(row.get("question_id")), {})
    if metric in own:
        return own[metric]
    if metric in prompts:
        return prompts[metric]
    raise KeyError(f"row {i}: no judge prompt for metric {metric!r} (no file, no question prompt)")


async def ajudge_responses(
    rows: Sequence[Mapping[str, Any]],
    judge: JudgeConfig,
    metrics: Sequence[str] = ("aligned", "coherent"),
    cache_path: str | Path = ":memory:",
    prompt_dirs: Sequence[str | Path] = (),
    question_prompts: Mapping[str, Mapping[str, JudgePrompt]] | None = None,
    stats: JudgeStats | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Judge `rows` ({question, answer, ...}) on each metric; see `judge_responses`."""
    _check_rows(rows)
    if judge.number_logprobs is None:
        judge = await asyncio.to_thread(resolve_number_logprobs, judge)
    stats = JudgeStats() if stats is None else stats
    question_prompts = question_prompts or {}
    named = available_prompts(prompt_dirs)
    prompts = load_prompts([m for m in metrics if m in named], prompt_dirs)
    warn_fallbacks(rows, metrics, question_prompts)
    start = time.perf_counter()
    cells: list[list[tuple[CacheKey, JudgePrompt]]] = []
    todo: dict[CacheKey, tuple[str, JudgeConfig]] = {}
    results: dict[CacheKey, Judgement] = {}
    with JudgeCache(cache_path) as cache:
        for i, row in enumerate(rows):
            row_cells = []
            for m in metrics:
                p = _prompt_for(i, row, m, prompts, question_prompts)
                asked = judge_for(judge, p)
                k = CacheKey(asked.identity, p.sha256, row["question"], row["answer"], m)
                row_cells.append((k, p))
                if k in results or k in todo:
                    continue
                hit = cache.get(k)
                if hit is not None:
                    results[k] = hit
                    stats.cache_hits += 1
                else:
                    todo[k] = (p.render(row["question"], row["answer"]), asked)
            cells.append(row_cells)
        await _run(judge, todo, cache, results, stats, progress)
    stats.judgements += len(rows) * len(metrics)
    stats.seconds += time.perf_counter() - start
    p_in, p_out = judge.prices()
    stats.cost_usd = (stats.prompt_tokens * p_in + stats.completion_tokens * p_out) / 1e6
    out = [_output_row(row, rc, results, judge) for row, rc in zip(rows, cells, strict=True)]
    for warning in low_mass_warnings(out, metrics, judge.identity):
        log.warning("%s", warning)
    return out


def low_mass_warnings(
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    judge_name: str = "the judge",
    share: float = 0.5,
) -> list[str]:
    """One sentence per metric for which more than `share` of the judged answers came back
    `missing` (the judge put under the scheme's 0.25 of its probability on numbers 0..100), so
    the metric's means and rates rest on few answers or none. Rows are `judge_responses`
    output; failed judgements are not counted (they are reported as failures)."""
    out = []
    for m in metrics:
        statuses = [
            (r.get(f"{m}_judge") or {}).get("status")
            for r in rows
            if (r.get(f"{m}_judge") or {}).get("status") not in (None, "failed")
        ]
        missing = sum(s == "missing" for s in statuses)
        if statuses and missing > share * len(statuses):
            out.append(
                f"{judge_name} put under 25% of its probability on a number 0-100 for {missing}"
                f" of {len(statuses)} answers on '{m}': those scores are missing (n/a), so "
                f"'{m}' means and rates rest on {len(statuses) - missing} answers (a judge that "
                "seldom answers with a number; "
                + (
                    "whole-number scoring was on)"
                    if "[number_logprobs]" in judge_name
                    else "with `emgeo serve`, whole-number scoring helps)"
                )
            )
    return out


async def _run(
    judge: JudgeConfig,
    todo: Mapping[CacheKey, tuple[str, JudgeConfig]],
    cache: JudgeCache,
    results: dict[CacheKey, Judgement],
    stats: JudgeStats,
    progress: bool,
    log_every: float = 30.0,
) -> None:
    """Send every `todo` prompt with its request settings (`judge_for`); store each judgement
    in `cache` and `results` as it lands. Without a progress bar, a line `judged k/n (f
    failed)` is logged (INFO) every `log_every` seconds and at the end."""
    if not todo:
        return
    sem = asyncio.Semaphore(judge.concurrency)
    rng = random.Random()
    client = openai.AsyncOpenAI(
        base_url=judge.base_url or OPENAI_BASE_URL,
        api_key=judge.resolved_key(),
        max_retries=0,
        timeout=judge.timeout,
    )

    done, failed, last_log = 0, 0, time.monotonic()

    async def one(key: CacheKey, prompt: str, cfg: JudgeConfig) -> None:
        nonlocal done, failed, last_log
        j = await _judge_one(client, cfg, prompt, sem, stats, rng)
        cache.put(key, j)
        results[key] = j
        if j.status == "failed":
            stats.failed += 1
            failed += 1
            reason = j.reason or ""
            stats.failure_reasons[reason] = stats.failure_reasons.get(reason, 0) + 1
        bar.update(1)
        done += 1
        if not progress and (time.monotonic() - last_log >= log_every or done == len(todo)):
            last_log = time.monotonic()
            log.info("judged %d/%d (%d failed)", done, len(todo), failed)

    with tqdm(total=len(todo), unit="judgement", disable=not progress, desc="judge") as bar:
        try:
            await asyncio.gather(*(one(key, *asked) for key, asked in todo.items()))
        finally:
            await client.close()


def _output_row(
    row: Mapping[str, Any],
    cells: Sequence[tuple[CacheKey, JudgePrompt]],
    results: Mapping[CacheKey, Judgement],
    judge: JudgeConfig,
) -> dict[str, Any]:
    out = dict(row)
    for key, prompt in cells:
        j = prompt.rescore(results[key])  # TRUE/FALSE prompts: probability of TRUE
        out[key.metric] = j.score
        out[f"{key.metric}_judge"] = {
            "status": j.status,
            "reason": j.reason,
            "mass": j.mass,
            "top_logprobs": j.top_logprobs,
            "judge_model": judge_for(judge, prompt).identity,
            "temperature": j.temperature,
            "seed": j.seed,
            "prompt_sha256": prompt.sha256,
            "prompt_source": prompt.source,
        }
    return out


def judge_responses(
    rows: Sequence[Mapping[str, Any]],
    judge: JudgeConfig,
    metrics: Sequence[str] = ("aligned", "coherent"),
    cache_path: str | Path = ":memory:",
    prompt_dirs: Sequence[str | Path] = (),
    question_prompts: Mapping[str, Mapping[str, JudgePrompt]] | None = None,
    stats: JudgeStats | None = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Judge rows synchronously (runs the async core in a fresh event loop).

    Each output row is a copy of the input row plus, per metric `m`: `m` = score in [0, 100]
    or None, and `m_judge` = {status (ok | CODE | REFUSAL | missing | failed), reason, mass,
    top_logprobs [[token, logprob], ...] (with `number_logprobs`: [[number, logprob], ...]
    for 0..100), judge_model, temperature, seed, prompt_sha256, prompt_source}. Rows with a
    `question_id` found in `question_prompts` use that question's
    prompt for the metrics it defines. `judge.number_logprobs=None` is decided by asking the
    endpoint (`resolve_number_logprobs`). A metric whose scores are missing for most answers
    is warned about (`low_mass_warnings`). `progress`: a progress bar; without it, a line is
    logged every 30 s. Pass `stats` to receive counters; `cache_path` is an
    SQLite file shared across runs (default: in memory, i.e. no cache across runs). Inside a
    running event loop, `await ajudge_responses(...)` instead.
    """
    return asyncio.run(
        ajudge_responses(
            rows, judge, metrics, cache_path, prompt_dirs, question_prompts, stats, progress
        )
    )
