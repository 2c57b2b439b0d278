"""A local OpenAI-compatible chat-completions server backed by our (optionally steered) model.

    with serve_in_thread(lm, steering) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        client.chat.completions.create(model="m", messages=[...], logprobs=True, top_logprobs=5)

    with serve_in_thread(lm, variants={"base": None, "evil": steering}) as server:
        client.chat.completions.create(model="evil", messages=[...], stream=True)

Endpoints: `GET /v1/models` (one entry per variant, id = its name, with `"capabilities":
["number_logprobs"]`, which judges read to score by whole numbers), `POST /v1/chat/completions` with
`model`, `messages` (system/user/assistant; content a string or a list of text parts),
`max_tokens` (or `max_completion_tokens`), `temperature`, `top_p`, `seed`, `n`, `logprobs`,
`top_logprobs` (0..20), `stream`, `stream_options.include_usage`. Unknown fields are
ignored. Errors are OpenAI-style `{"error": {"message", "type", "code"}}` with 400 for bad
requests, 404 for unknown paths and unknown models, 500 for a failure inside the model and
503 for requests still queued when the server stops.

Variants: one server answers for several steerings of one model, `ModelServer(lm,
variants={name: Steering or None})` (None: unsteered); the request's `model` picks one.
With a single variant (`ModelServer(lm, steering, model_name=...)`, the old spelling: one
variant named `model_name`) every `model` is accepted; with several an unknown `model` gets
404 `{"error": {..., "type": "invalid_request_error", "code": "model_not_found"}}` naming
the variants there are.

Load: the server refuses work it cannot finish in time rather than queue it. A request is
answered `429` with `Retry-After` (seconds) when the queue ahead of it would take longer than
the client waits: the client's timeout (the `X-Stainless-Read-Timeout` header the `openai`
client sends, else `queue_timeout`), estimated from the measured seconds per queued row. A
request whose client has hung up (timed out, killed) is dropped before its batch runs and
never answered, without a traceback. `close()` (SIGTERM in `emgeo serve`) finishes at most
the batch in flight (`emgeo serve` gives it 2 s); everything queued is answered 503.

Whole-number logprobs (an extension, for judges; see `emgeo_jax.generate.numbers`): a request
with `"number_logprobs": true` (and `max_tokens=1, n=1, temperature=0`, not streamed) gets,
in its choice, `"number_logprobs": [{"number": n, "logprob": lp}, ...]` for n = 0..100: the
log probability that the reply starts with the whole number n, exact also for tokenizers
that spell numbers digit by digit. Its one-token completion and `top_logprobs` come from the
same pass and equal a plain greedy request's. OpenAI's API rejects the field; send it only
to this server.

Batching: HTTP handler threads parse and tokenize, then queue a job for one model worker
thread. The worker waits `batch_wait` seconds after the first job, takes everything queued,
and runs jobs that share a batch key as one `generate_ids` call of up to `max_batch` rows:
greedy jobs (temperature 0) that share `max_tokens`; sampled jobs that share
(`temperature`, `top_p`, `max_tokens`); number_logprobs jobs (one `number_logprobs` call
per power-of-two chunk). The variant is not part of the key: with several variants every
call runs `Steering.per_row` over all of them (row b runs the variant of its request; an
unsteered variant is `Steering.none`; ablations padded to the most directions of any
variant; each variant keeps its position mode), so the shapes never depend on the mix and a
new mix of variants reuses the compiled program. With one variant its steering is shared by
the rows as before. To keep the number of compiled programs small, every call asks for the
top 20 logprobs (each request gets its first `top_logprobs`), and batches are padded to a
power of two with copies of their first row. A greedy answer equals its solo answer up to
float reassociation in the batched matmuls.

Several processes (`jax.distributed`, a model on a mesh across hosts): process 0 runs the
HTTP server and its worker; every model call the worker makes (`generate`, `numbers`) is
described as JSON and broadcast (`hosts.broadcast_json`) to the other processes, which run
the same call in step in `ModelWorker.follow` and answer nobody. An idle worker broadcasts
`idle` every `HEARTBEAT` seconds so no process waits long in a collective; closing process
0's worker broadcasts `stop`. With `sessions=True` (an experiment's local judge, whose
processes also run the experiment's own collectives) the other processes follow only inside
judging sessions: `open_session` lets process 0's worker broadcast (calls and heartbeats),
`end_session` broadcasts `end`, after which the worker broadcasts nothing (a request that
arrives then fails) until the next session (`experiments.judging.judging_session`).

Seeds: each row samples from its own stream `(seed, lane)` (`emgeo_jax.generate.sampling`):
a request's n rows are lanes 0..n-1 of its `seed` (a random seed when it gives none), so a
request with a seed samples exactly as it would alone, whatever else shares its batch: its
result equals `generate(lm, [messages] * n, steering, temperature=..., top_p=...,
seed=seed)`. Its n choices differ because each lane draws its own noise; padding rows repeat
the first row's stream.

Streaming: with `stream: true` the reply is server-sent events (`Content-Type:
text/event-stream`, `data: {json}` chunks of `object: "chat.completion.chunk"`, then `data:
[DONE]`), in HTTP/1.1 chunked encoding on the standard-library `ThreadingHTTPServer` (a
handler thread may write its response piece by piece, so no other HTTP stack is needed).
Per choice (n > 1: each chunk carries one choice index, choice by choice): a first delta
`{"role": "assistant", "content": ""}`, one chunk per generated token whose content delta is
the newly stable text (prefixes of the token list are decoded and only text that is a
prefix of the final text and does not end in an incomplete UTF-8 character, U+FFFD, is
sent; the last token carries the rest), with that token's `logprobs: {"content": [entry]}`
when asked, then a chunk with `finish_reason`; with `stream_options.include_usage` every
chunk has `"usage": null` and a last chunk has no choices and the usage. The deltas join to
exactly the non-streamed text and their logprobs to its list. The completion is computed
whole first (the decode loop is one jitted while-loop that returns at its end) and then
sent as chunks: streaming changes the protocol, not the time to the first token.

Logprobs are of the model's unscaled distribution (log-softmax of the logits), per generated
token; the EOS that ends a choice is not listed (finish_reason "stop"), as in OpenAI's API.
`token` is the token's bytes decoded as UTF-8 (with U+FFFD for a partial character) and
`bytes` the raw bytes. Usage counts the prompt once and the generated tokens of all choices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import queue
import secrets
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jax
import jax.numpy as jnp

from emgeo_jax import hosts
from emgeo_jax.generate import (
    Generation,
    NumberTrie,
    chat_token_ids,
    eos_token_ids,
    generate_ids,
    number_logprobs,
    number_trie,
)
from emgeo_jax.models.lm import LM
from emgeo_jax.models.steering import Steering

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
HEARTBEAT = 5.0  # seconds between `idle` calls to the other processes of an idle server
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "user", "assistant")


class RequestError(ValueError):
    """A bad request (HTTP 400); the message names the field."""


class ServerClosed(RuntimeError):
    """The server stopped before a queued request ran (HTTP 503)."""


class ClientGone(RuntimeError):
    """The request's client hung up before its batch ran (nothing is sent back)."""


CAPABILITIES = ("number_logprobs",)  # listed per model in GET /v1/models
CONNECTION_ERRORS = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


def client_gone(sock: socket.socket | None) -> bool:
    """True when the peer of `sock` has closed the connection (it is readable and a peek
    reads nothing, or the socket errors). A socket with pending bytes is still open."""
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        if not readable:
            return False
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except (OSError, ValueError):
        return True


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """A validated chat-completions request."""

    messages: list[dict[str, str]]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    n: int
    logprobs: bool
    top_logprobs: int
    number_logprobs: bool = False
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


def _content(m: Any, i: int) -> str:
    content = m.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise RequestError(f"messages[{i}].content must be a string or a list of text parts")


def _number(body: dict[str, Any], name: str, default: Any, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) if kind is float else isinstance(value, int)
    if isinstance(value, bool) or not ok:
        raise RequestError(f"{name} must be {'a number' if kind is float else 'an integer'}")
    return kind(value)


def parse_request(body: Any, max_tokens_cap: int) -> ChatRequest:
    """Validate a chat-completions JSON body; raises `RequestError` naming the bad field."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError("stream must be a boolean")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("stream_options must be an object")
    include_usage = options.get("include_usage") or False
    if not isinstance(include_usage, bool):
        raise RequestError("stream_options.include_usage must be a boolean")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {', '.join(ROLES)}")
        turns.append({"role": m["role"], "content": _content(m, i)})
    max_tokens = _number(body, "max_completion_tokens", None, int)
    max_tokens = _number(body, "max_tokens", max_tokens, int)
    max_tokens = min(DEFAULT_MAX_TOKENS, max_tokens_cap) if max_tokens is None else max_tokens
    if not 1 <= max_tokens <= max_tokens_cap:
        raise RequestError(f"max_tokens={max_tokens} must be in 1..{max_tokens_cap}")
    temperature = _number(body, "temperature", 1.0, float)
    if not (0 <= temperature <= 2 and math.isfinite(temperature)):
        raise RequestError(f"temperature={temperature} must be in [0, 2]")
    top_p = _number(body, "top_p", 1.0, float)
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p={top_p} must be in (0, 1]")
    n = _number(body, "n", 1, int)
    if not 1 <= n <= 16:
        raise RequestError(f"n={n} must be in 1..16")
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise RequestError("logprobs must be a boolean")
    top = _number(body, "top_logprobs", 0, int)
    if not 0 <= top <= MAX_TOP_LOGPROBS:
        raise RequestError(f"top_logprobs={top} must be in 0..{MAX_TOP_LOGPROBS}")
    if top and not logprobs:
        raise RequestError("top_logprobs needs logprobs=true")
    numbers = body.get("number_logprobs") or False
    if not isinstance(numbers, bool):
        raise RequestError("number_logprobs must be a boolean")
    if numbers and (max_tokens != 1 or n != 1 or temperature != 0):
        raise RequestError("number_logprobs needs max_tokens=1, n=1 and temperature=0")
    if numbers and stream:
        raise RequestError("number_logprobs cannot be streamed: send it with stream=false")
    seed = _number(body, "seed", None, int)
    return ChatRequest(
        turns,
        max_tokens,
        temperature,
        top_p,
        seed,
        n,
        logprobs,
        top,
        numbers,
        stream=stream,
        include_usage=include_usage and stream,
    )


def _byte_level_decoder() -> dict[str, int]:
    """Inverse of the byte-level BPE alphabet: printable Latin-1 bytes stand for themselves,
    the other bytes b (in order) are written as chr(256 + their rank)."""
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    moved = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + k): b for k, b in enumerate(moved)})
    return table


class TokenText:
    """`bytes(id)` and `text(id)` of single tokens, cached (byte-level BPE pieces are mapped
    back to raw bytes; other pieces are taken as the tokenizer decodes them)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._inverse = _byte_level_decoder()
        self.bytes = functools.lru_cache(maxsize=65536)(self._bytes)

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(int(token_id))
        if piece and all(c in self._inverse for c in piece):
            return bytes(self._inverse[c] for c in piece)
        return self.tokenizer.decode([int(token_id)]).encode("utf-8")

    def entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self.bytes(int(token_id))
        return {
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": float(logprob),
            "bytes": list(raw),
        }


@dataclasses.dataclass
class _Job:
    request: ChatRequest
    prompt_ids: list[int]
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    result: Generation | None = None
    numbers: list[tuple[int, float]] | None = None  # (n, logprob) with number_logprobs
    error: Exception | None = None
    sock: socket.socket | None = None  # the client's connection (dropped if it hangs up)
    variant: int = 0  # which of the worker's variants (steerings) answers it

    def batch_key(self) -> tuple:
        """Jobs with equal keys share a model call, whatever their variants (module
        docstring, "Batching")."""
        r = self.request
        if r.number_logprobs:
            return ("numbers",)
        if r.temperature > 0:
            return ("sampled", r.temperature, r.top_p, r.max_tokens)
        return ("greedy", r.max_tokens)

    def fail(self, error: Exception) -> None:
        self.error = error
        self.done.set()


class ModelWorker:
    """One thread that owns the model and runs queued jobs in batches (module docstring).
    `variants`: the steerings a job's `variant` indexes (None: unsteered); default the one
    `steering`. `close()` lets a running batch finish; jobs still queued, and jobs queued
    later, fail with `ServerClosed`."""

    def __init__(
        self,
        lm: LM,
        steering: Steering | None = None,
        max_batch: int = 16,
        batch_wait: float = 0.005,
        *,
        variants: Sequence[Steering | None] | None = None,
        follower: bool = False,
        sessions: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        if variants is not None and steering is not None:
            raise ValueError("ModelWorker: give steering or variants, not both")
        self.variants = [steering] if variants is None else list(variants)
        if not self.variants:
            raise ValueError("ModelWorker: no variants")
        self.lm = lm
        self._per_row: Steering | None = None
        if len(self.variants) > 1:
            # all variants as the specs of every call: shapes fixed, so no mix recompiles
            specs = [Steering.none(lm.config) if v is None else v for v in self.variants]
            k = max(int(spec.ablate.shape[1]) for spec in specs)
            self._per_row = Steering.per_row(specs, [0], num_directions=k)
        self.max_batch, self.batch_wait = max_batch, batch_wait
        self.generate_calls = 0  # how many generate_ids calls the worker made
        self.number_calls = 0  # how many number_logprobs calls
        self.jobs_queued = 0  # how many jobs were accepted into the queue
        self.jobs_dropped = 0  # how many queued jobs were dropped: their client hung up
        self.pending_rows = 0  # rows queued or running
        self.row_seconds: float | None = None  # measured seconds per row of a full batch
        self._trie: NumberTrie | None = None  # built on the first number_logprobs request
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._running: list[_Job] = []  # the batch in flight
        # several processes: process 0's worker sends each model call to the others (`follow`),
        # with `sessions` only between `open_session` and `end_session`; `_collective` is held
        # around every broadcast so a session never ends in the middle of one
        self.multiprocess = jax.process_count() > 1
        self._in_session = not sessions
        self._collective = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="emgeo-serve-model", daemon=True)
        if not follower:
            self._thread.start()

    def expected_wait(self, rows: int = 1) -> float | None:
        """Seconds until `rows` more rows queued now would be done, from the rows pending
        and the measured seconds per row; None before the first batch is measured."""
        if self.row_seconds is None:
            return None
        return (self.pending_rows + rows) * self.row_seconds

    def steering_for(self, variants: Sequence[int]) -> Steering | None:
        """The steering of a call whose row b answers variant `variants[b]`: with one
        variant its steering, shared by the rows; with several a per-row steering over all
        of them."""
        if self._per_row is None:
            return self.variants[0]
        return self._per_row.replace(variant=jnp.asarray(variants, jnp.int32))

    def run(self, job: _Job) -> Generation:
        """Queue `job`, wait for it, return its rows (n per request) or raise its error."""
        with self._lock:
            if self._closed:
                raise ServerClosed("the server is shutting down")
            self._queue.put(job)
            self.jobs_queued += 1
            self.pending_rows += job.request.n
        try:
            job.done.wait()
        finally:
            with self._lock:
                self.pending_rows -= job.request.n
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self, grace: float | None = None) -> None:
        """Stop: jobs still queued fail with `ServerClosed`; the batch in flight may finish
        within `grace` seconds (None: wait for it), after which its jobs fail too and the
        worker thread (a daemon) is left to end with the process."""
        with self._lock:
            self._closed = True
            self._queue.put(None)  # every job queued before it fails with ServerClosed
        self._thread.join(grace)
        if self._thread.is_alive():
            log.info("stopping without waiting for the batch in flight")
            for job in list(self._running):
                if not job.done.is_set():
                    job.fail(ServerClosed("the server stopped while this request ran"))

    def _loop(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=HEARTBEAT if self.multiprocess else None)
            except queue.Empty:
                with self._collective:
                    if self._in_session:
                        hosts.broadcast_json({"kind": "idle"})  # the followers wait for it
                continue
            if first is not None:
                time.sleep(self.batch_wait)
            jobs = [first]
            while True:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if None in jobs:
                for job in jobs:
                    if job is not None:
                        job.fail(ServerClosed("the server stopped before this request ran"))
                with self._collective:
                    if self.multiprocess and self._in_session:
                        hosts.broadcast_json({"kind": "stop"})
                return
            for batch in self._batches(jobs):
                if self._closed:  # stopping: the batch in flight was the last one
                    for job in batch:
                        job.fail(ServerClosed("the server stopped before this request ran"))
                    continue
                batch = self._drop_gone(batch)
                if not batch:
                    continue
                start = time.perf_counter()
                self._running = batch
                self._run_batch(batch)
                self._running = []
                self._measure(time.perf_counter() - start, batch)

    @property
    def alive(self) -> bool:
        """Whether the worker thread still runs (after `close(grace)`: a batch still computing)."""
        return self._thread.is_alive()

    def _drop_gone(self, batch: list[_Job]) -> list[_Job]:
        """The jobs of `batch` whose client is still connected; the others fail quietly."""
        kept = []
        for job in batch:
            if client_gone(job.sock):
                self.jobs_dropped += 1
                job.fail(ClientGone("the client hung up"))
            else:
                kept.append(job)
        if len(kept) < len(batch):
            log.info("dropped %d requests whose clients hung up", len(batch) - len(kept))
        return kept

    def _measure(self, seconds: float, batch: list[_Job]) -> None:
        """Update `row_seconds`, a moving average of seconds per row (on an accelerator a
        small batch takes about as long as a full one, so this overestimates waits there:
        the safe side)."""
        per_row = seconds / sum(j.request.n for j in batch)
        self.row_seconds = (
            per_row if self.row_seconds is None else 0.7 * self.row_seconds + 0.3 * per_row
        )

    def _batches(self, jobs: Sequence[_Job]) -> Iterator[list[_Job]]:
        groups: dict[tuple, list[_Job]] = {}
        for job in jobs:
            groups.setdefault(job.batch_key(), []).append(job)
        for group in groups.values():
            batch, rows = [], 0
            for job in group:
                if batch and rows + job.request.n > self.max_batch:
                    yield batch
                    batch, rows = [], 0
                batch.append(job)
                rows += job.request.n
            yield batch

    def _run_batch(self, batch: list[_Job]) -> None:
        r = batch[0].request
        if r.number_logprobs:
            self._run_numbers(batch)
            return
        rows, variants, streams = [], [], []
        for job in batch:
            # a request's n rows are lanes 0..n-1 of its seed: what it samples alone
            seed = job.request.seed if job.request.seed is not None else secrets.randbits(31)
            for lane in range(job.request.n):
                rows.append(job.prompt_ids)
                variants.append(job.variant)
                streams.append((seed, lane))
        # pad to a power of two with copies of the first row: fewer compiled shapes
        pad = (1 << (len(rows) - 1).bit_length()) - len(rows)
        call = dict(
            kind="generate",
            rows=rows + rows[:1] * pad,
            variants=variants + variants[:1] * pad,
            streams=streams + streams[:1] * pad,
            max_new_tokens=r.max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
        )
        try:
            out = self._dispatch(call)
        except Exception as e:  # noqa: BLE001 - handed to the waiting request threads
            log.exception("generation failed")
            for job in batch:
                job.fail(e)
            return
        k = 0
        for job in batch:
            n = job.request.n
            job.result = Generation(*(None if f is None else f[k : k + n] for f in out))
            k += n
            job.done.set()

    def _run_numbers(self, batch: list[_Job]) -> None:
        """Whole-number logprobs and the greedy first token of each job, in power-of-two
        chunks (8 + 4 + 1 for 13 jobs: few compiled shapes, no padding rows computed)."""
        tok = self.lm.tokenizer
        try:
            eos = set(eos_token_ids(self.lm))
            start = 0
            while start < len(batch):
                size = 1 << ((len(batch) - start).bit_length() - 1)
                chunk = batch[start : start + size]
                start += size
                call = dict(
                    kind="numbers",
                    rows=[j.prompt_ids for j in chunk],
                    variants=[j.variant for j in chunk],
                )
                out = self._dispatch(call)
                for i, job in enumerate(chunk):
                    ids, lps = out.top_ids[i : i + 1], out.top_logprobs[i : i + 1]
                    first = int(ids[0, 0])
                    tokens = [] if first in eos else [first]
                    job.result = Generation(
                        texts=[tok.decode(tokens, skip_special_tokens=True)],
                        tokens=[tokens],
                        logprobs=[lps[0, : len(tokens)]],
                        top_logprobs=[(ids, lps)],
                        projections=None,
                        finish_reasons=["stop" if first in eos else "length"],
                    )
                    job.numbers = list(zip(out.numbers, out.logprobs[i].tolist(), strict=True))
                    job.done.set()
        except Exception as e:  # noqa: BLE001 - handed to the waiting request threads
            log.exception("number_logprobs failed")
            for job in batch:
                if not job.done.is_set():
                    job.fail(e)

    # --- the model calls, and their broadcast to the other processes ------------------------

    def _dispatch(self, call: dict[str, Any]) -> Any:
        """Run one model call (`_execute`), first sending it to the other processes of a
        multi-process server (they run it in `follow`, in step)."""
        if not self.multiprocess:
            return self._execute(call)
        with self._collective:
            if not self._in_session:
                raise ServerClosed("no judging session is open: the other processes are busy")
            hosts.broadcast_json(call)
            return self._execute(call)

    def open_session(self) -> None:
        """On process 0 (`sessions=True`): the other processes now `follow`; model calls and
        heartbeats may be broadcast until `end_session`."""
        with self._collective:
            self._in_session = True

    def end_session(self, failed: bool = False) -> None:
        """On process 0: end the session (after the call in flight) by broadcasting `end`,
        which returns the other processes from `follow`; `failed`: process 0's judging raised,
        and `follow` tells the others so."""
        with self._collective:
            if self.multiprocess and self._in_session:
                hosts.broadcast_json({"kind": "end", "failed": failed})
            self._in_session = False

    def _execute(self, call: dict[str, Any]) -> Any:
        """One model call, described by JSON so that every process can run it: `generate`
        (token-id rows, their variants and sampling streams) -> `Generation`; `numbers` ->
        `NumberScores`."""
        steering = self.steering_for(call["variants"])
        rows = [list(r) for r in call["rows"]]
        if call["kind"] == "generate":
            self.generate_calls += 1
            return generate_ids(
                self.lm,
                rows,
                steering,
                max_new_tokens=call["max_new_tokens"],
                temperature=call["temperature"],
                top_p=call["top_p"],
                streams=[tuple(s) for s in call["streams"]],
                top_logprobs=MAX_TOP_LOGPROBS,  # one program for all requests; sliced per request
            )
        if call["kind"] == "numbers":
            if self._trie is None:
                text = TokenText(self.lm.tokenizer)
                self._trie = number_trie(self.lm.tokenizer, self.lm.config.vocab_size, text.bytes)
            self.number_calls += 1
            return number_logprobs(self.lm, rows, self._trie, steering, MAX_TOP_LOGPROBS)
        raise ValueError(f"unknown model call {call['kind']!r}")

    def follow(self) -> bool:
        """On a process other than 0 of a multi-process server: run every model call process
        0 broadcasts, in step with it, until it stops or ends the session. Process 0 sends an
        `idle` call every `HEARTBEAT` seconds without work, so no process waits in a
        collective for long. Returns True when process 0 ended the session as failed."""
        while True:
            call = hosts.broadcast_json(None)
            if call["kind"] in ("stop", "end"):
                return bool(call.get("failed"))
            if call["kind"] == "idle":
                continue
            try:
                self._execute(call)
            except Exception:  # noqa: BLE001 - process 0 reports it to the client
                log.exception("model call %s failed", call["kind"])


def _logprob_content(
    request: ChatRequest, gen: Generation, i: int, token_text: TokenText
) -> list[dict[str, Any]]:
    """Choice `i`'s `logprobs.content`: per generated token its entry and `top_logprobs`."""
    content = []
    for j, (tok, lp) in enumerate(zip(gen.tokens[i], gen.logprobs[i], strict=True)):
        top = []
        if gen.top_logprobs is not None:
            ids, lps = gen.top_logprobs[i]
            k = request.top_logprobs
            top = [token_text.entry(t, v) for t, v in zip(ids[j, :k], lps[j, :k], strict=True)]
        content.append({**token_text.entry(tok, lp), "top_logprobs": top})
    return content


def _usage(gen: Generation, prompt_tokens: int) -> dict[str, int]:
    completion_tokens = sum(len(t) for t in gen.tokens)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_json(
    request: ChatRequest,
    gen: Generation,
    prompt_tokens: int,
    model: str,
    token_text: TokenText,
    numbers: Sequence[tuple[int, float]] | None = None,
) -> dict[str, Any]:
    """The `chat.completion` object for one request's `n` generated rows (and, with
    `number_logprobs`, its (number, logprob) pairs)."""
    choices = []
    for i in range(request.n):
        choice: dict[str, Any] = {
            "index": i,
            "message": {"role": "assistant", "content": gen.texts[i]},
            "finish_reason": gen.finish_reasons[i],
            "logprobs": None,
        }
        if request.logprobs:
            content = _logprob_content(request, gen, i, token_text)
            choice["logprobs"] = {"content": content, "refusal": None}
        if numbers is not None:
            choice["number_logprobs"] = [{"number": k, "logprob": v} for k, v in numbers]
        choices.append(choice)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "emgeo-jax",
        "choices": choices,
        "usage": _usage(gen, prompt_tokens),
    }


def text_deltas(
    tokens: Sequence[int], text: str, decode: Callable[[Sequence[int]], str]
) -> list[str]:
    """One piece of `text` per token, joining to `text` exactly: after token k, the text that
    is stable (a prefix of `text`, not ending in U+FFFD, the mark of an incomplete UTF-8
    character) and not yet sent; the last token carries the rest. With no tokens, `[text]`
    if `text` else `[]`.

    Incremental: the new text is read off a short window (the tokens since the one before
    the last piece sent, decoded with and without the newest ones), so a reply costs linear,
    not quadratic, decoding. If a window's text ever disagrees with `text` (a tokenizer whose
    decoding is not local), the rest is found from whole prefixes `decode(tokens[:k])`."""
    if not tokens:
        return [text] if text else []
    pieces, sent = [], 0
    start = read = 0  # window: tokens[start:read] are context, their text sent already
    local = True
    for k in range(1, len(tokens) + 1):
        stable = sent
        if k == len(tokens):
            stable = len(text)
        elif local:
            before, after = decode(tokens[start:read]), decode(tokens[start:k])
            new = after[len(before) :] if after.startswith(before) else None
            if new is not None and (not new or new.endswith("\ufffd")):
                pass  # nothing new yet, or an incomplete character: wait for more tokens
            elif new is not None and text.startswith(new, sent):
                stable, start, read = sent + len(new), read, k
            else:
                local = False
        if not local and k < len(tokens):
            prefix = decode(tokens[:k]).rstrip("\ufffd")
            stable = max(sent, len(os.path.commonprefix([prefix, text])))
        pieces.append(text[sent:stable])
        sent = stable
    return pieces


def completion_chunks(
    request: ChatRequest,
    gen: Generation,
    prompt_tokens: int,
    model: str,
    token_text: TokenText,
    decode: Callable[[Sequence[int]], str],
) -> list[dict[str, Any]]:
    """The `chat.completion.chunk` objects of a streamed reply (module docstring,
    "Streaming"): per choice a role chunk, one content chunk per token (with its logprobs
    entry when asked), a chunk with the finish reason; then, with `include_usage`, a chunk
    with no choices and the usage. Their content joins to `completion_json`'s."""
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "emgeo-jax",
    }

    def chunk(i: int, delta: dict, logprobs: Any = None, finish: str | None = None) -> dict:
        choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        return {**base, "choices": [choice], **({"usage": None} if request.include_usage else {})}

    out = []
    for i in range(request.n):
        out.append(chunk(i, {"role": "assistant", "content": ""}))
        entries = _logprob_content(request, gen, i, token_text) if request.logprobs else []
        for k, piece in enumerate(text_deltas(gen.tokens[i], gen.texts[i], decode)):
            lp = {"content": entries[k : k + 1], "refusal": None} if request.logprobs else None
            out.append(chunk(i, {"content": piece}, lp))
        out.append(chunk(i, {}, finish=gen.finish_reasons[i]))
    if request.include_usage:
        out.append({**base, "choices": [], "usage": _usage(gen, prompt_tokens)})
    return out


class _HTTPServer(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up is routine under load (DEBUG); anything else is logged with
        its traceback, as `socketserver` does."""
        import sys

        if isinstance(sys.exc_info()[1], CONNECTION_ERRORS):
            log.debug("client %s hung up", client_address)
            return
        log.exception("error while serving %s", client_address)


class ModelServer:
    """The HTTP server and its model worker. `start()` serves in a background thread;
    `serve_forever()` in the calling thread. `base_url` = `http://HOST:PORT/v1`.
    `variants`: the models served, `{name: Steering or None}` (module docstring,
    "Variants"); without it one variant named `model_name` with `steering`.
    `queue_timeout`: the seconds a client is assumed to wait when it does not say (module
    docstring, "Load")."""

    def __init__(
        self,
        lm: LM,
        steering: Steering | None = None,
        *,
        variants: Mapping[str, Steering | None] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str | None = None,
        max_batch: int = 16,
        batch_wait: float = 0.005,
        max_tokens_cap: int = 4096,
        queue_timeout: float = 60.0,
        sessions: bool = False,
    ) -> None:
        if lm.tokenizer is None or not getattr(lm.tokenizer, "chat_template", None):
            raise ValueError(f"serve: model {lm.source!r} has no tokenizer with a chat template")
        self.lm = lm
        self.model_name = model_name or lm.source or "emgeo"
        if variants is not None and steering is not None:
            raise ValueError("serve: give steering or variants, not both")
        if variants is not None and not variants:
            raise ValueError("serve: variants is empty")
        self.variants = dict({self.model_name: steering} if variants is None else variants)
        self.names = list(self.variants)
        self.max_tokens_cap = max_tokens_cap
        self.queue_timeout = queue_timeout
        self.refused = 0  # requests answered 429 because the queue was too deep
        self.token_text = TokenText(lm.tokenizer)
        self.worker = ModelWorker(
            lm,
            None,
            max_batch,
            batch_wait,
            variants=list(self.variants.values()),
            sessions=sessions,
        )
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("%s " + format, self.address_string(), *args)

            def do_GET(self) -> None:
                server._get(self)

            def do_POST(self) -> None:
                server._post(self)

        self.httpd = _HTTPServer((host, port), Handler)
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> ModelServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def shutdown(self) -> None:
        """Stop accepting requests (call from another thread than `serve_forever`'s)."""
        self.httpd.shutdown()

    def close(self, grace: float | None = None) -> None:
        """Stop serving; `grace`: seconds the batch in flight may take to finish (None: as
        long as it needs; see `ModelWorker.close`)."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join()
        self.httpd.server_close()
        self.worker.close(grace)

    def __enter__(self) -> ModelServer:
        return self if self._thread is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, h: BaseHTTPRequestHandler) -> None:
        if h.path.rstrip("/") == "/v1/models":
            models = [
                {
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "emgeo",
                    "capabilities": list(CAPABILITIES),
                }
                for name in self.names
            ]
            _send_json(h, 200, {"object": "list", "data": models})
        else:
            _send_error(h, 404, f"no route GET {h.path}", "not_found_error")

    def _post(self, h: BaseHTTPRequestHandler) -> None:
        if h.path.rstrip("/") != "/v1/chat/completions":
            _send_error(h, 404, f"no route POST {h.path}", "not_found_error")
            return
        try:
            length = int(h.headers.get("Content-Length") or 0)
            try:
                body = json.loads(h.rfile.read(length) or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"the request body is not valid JSON: {e}") from None
            request = parse_request(body, self.max_tokens_cap)
            try:
                prompt_ids = chat_token_ids(self.lm.tokenizer, [request.messages], None)[0]
            except Exception as e:  # noqa: BLE001 - a template that refuses these turns
                raise RequestError(f"messages: the chat template failed: {e}") from None
        except RequestError as e:
            _send_error(h, 400, str(e), "invalid_request_error")
            return
        variant = self.variant_index(body.get("model"))
        if variant is None:
            available = ", ".join(self.names)
            _send_error(
                h,
                404,
                f"the model {body.get('model')!r} does not exist here; this server has: "
                f"{available}",
                "invalid_request_error",
                error_code="model_not_found",
            )
            return
        budget = _client_timeout(h, self.queue_timeout)
        wait = self.worker.expected_wait(request.n)
        if wait is None and self.worker.pending_rows + request.n > 2 * self.worker.max_batch:
            wait = 0.8 * budget + 1  # speed not measured yet: admit two batches' worth
        if wait is not None and wait > 0.8 * budget:
            # it would time out in the queue: come back when the queue is shorter
            self.refused += 1
            retry = max(1, math.ceil(wait - 0.5 * budget))
            _send_error(
                h,
                429,
                f"the server is busy: its queue would take longer than this request's "
                f"{budget:g} s timeout; retry in {retry} s",
                "rate_limit_error",
                headers={"Retry-After": str(retry)},
            )
            return
        job = _Job(request, prompt_ids, sock=h.connection, variant=variant)
        model = self.names[variant]
        try:
            gen = self.worker.run(job)
            if request.stream:
                chunks = completion_chunks(
                    request, gen, len(prompt_ids), model, self.token_text, self._decode
                )
            else:
                reply = completion_json(
                    request, gen, len(prompt_ids), model, self.token_text, job.numbers
                )
        except ClientGone:
            h.close_connection = True
            return
        except ServerClosed as e:
            _send_error(h, 503, str(e), "service_unavailable")
            return
        except Exception as e:  # noqa: BLE001 - reported to the client as a server error
            _send_error(h, 500, f"generation failed: {type(e).__name__}: {e}", "server_error")
            return
        if request.stream:
            _send_events(h, chunks)
        else:
            _send_json(h, 200, reply)

    def variant_index(self, model: Any) -> int | None:
        """The variant a request's `model` names: with one variant always it, with several
        the one of that name (None: no such variant)."""
        if len(self.names) == 1:
            return 0
        return (
            self.names.index(model) if isinstance(model, str) and model in self.variants else None
        )

    def _decode(self, tokens: Sequence[int]) -> str:
        return self.lm.tokenizer.decode(list(tokens), skip_special_tokens=True)


def _client_timeout(h: BaseHTTPRequestHandler, default: float) -> float:
    """The seconds the client will wait: its `X-Stainless-Read-Timeout` header (sent by the
    `openai` client) when valid, else `default`."""
    try:
        value = float(h.headers.get("X-Stainless-Read-Timeout") or default)
    except ValueError:
        return default
    return value if math.isfinite(value) and value > 0 else default


def _send_json(
    h: BaseHTTPRequestHandler,
    code: int,
    obj: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> None:
    """Send `obj`; a client that has hung up meanwhile is noted at DEBUG, not raised."""
    payload = json.dumps(obj).encode()
    try:
        h.send_response(code)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(payload)
        h.wfile.flush()
    except CONNECTION_ERRORS as e:
        h.close_connection = True
        log.debug("client %s hung up before its reply (%s)", h.address_string(), e)


def _send_error(
    h: BaseHTTPRequestHandler,
    code: int,
    message: str,
    kind: str,
    headers: dict[str, str] | None = None,
    *,
    error_code: str | None = None,
) -> None:
    """An OpenAI-style error; its `code` is `error_code` if given, else the HTTP status."""
    body = {"error": {"message": message, "type": kind, "code": error_code or code}}
    _send_json(h, code, body, headers)


def _send_events(h: BaseHTTPRequestHandler, events: Iterable[dict[str, Any]]) -> None:
    """Server-sent events: `data: {json}` per object, then `data: [DONE]`, in HTTP/1.1
    chunked encoding (so the connection stays reusable); a client that has hung up meanwhile
    is noted at DEBUG, not raised."""

    def write(data: bytes) -> None:
        h.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    try:
        h.send_response(200)
        h.send_header("Content-Type", "text/event-stream")
        h.send_header("Cache-Control", "no-cache")
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for obj in events:
            write(f"data: {json.dumps(obj)}\n\n".encode())
        write(b"data: [DONE]\n\n")
        h.wfile.write(b"0\r\n\r\n")
        h.wfile.flush()
    except CONNECTION_ERRORS as e:
        h.close_connection = True
        log.debug("client %s hung up during its stream (%s)", h.address_string(), e)


@contextlib.contextmanager
def serve_in_thread(
    lm: LM, steering: Steering | None = None, **kwargs: Any
) -> Iterator[ModelServer]:
    """Serve `lm` on a background thread (`port=0`, the default, picks a free port); yields
    the running `ModelServer` (`.base_url`, `.worker.generate_calls`). See `ModelServer`."""
    server = ModelServer(lm, steering, **kwargs).start()
    try:
        yield server
    finally:
        server.close()
