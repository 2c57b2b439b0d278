"""A local OpenAI-compatible chat-completions server backed by our (optionally steered) model.

    with serve_in_thread(lm, steering) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        client.chat.completions.create(model="m", messages=[...], logprobs=True, top_logprobs=5)

Endpoints: `GET /v1/models` (one model, id = `model_name`, with `"capabilities":
["number_logprobs"]`, which judges read to score by whole numbers), `POST /v1/chat/completions` with
`messages` (system/user/assistant; content a string or a list of text parts), `max_tokens`
(or `max_completion_tokens`), `temperature`, `top_p`, `seed`, `n`, `logprobs`,
`top_logprobs` (0..20). Unknown fields are ignored, as is `model` (there is one model);
`stream: true` is refused. Errors are OpenAI-style `{"error": {"message", "type"}}` with
400 for bad requests, 404 for unknown paths, 500 for a failure inside the model and 503 for
requests still queued when the server stops.

Load: the server refuses work it cannot finish in time rather than queue it. A request is
answered `429` with `Retry-After` (seconds) when the queue ahead of it would take longer than
the client waits: the client's timeout (the `X-Stainless-Read-Timeout` header the `openai`
client sends, else `queue_timeout`), estimated from the measured seconds per queued row. A
request whose client has hung up (timed out, killed) is dropped before its batch runs and
never answered, without a traceback. `close()` (SIGTERM in `emgeo serve`) finishes at most
the batch in flight (`emgeo serve` gives it 2 s); everything queued is answered 503.

Whole-number logprobs (an extension, for judges; see `emgeo_jax.generate.numbers`): a request
with `"number_logprobs": true` (and `max_tokens=1, n=1, temperature=0`) gets, in its choice,
`"number_logprobs": [{"number": n, "logprob": lp}, ...]` for n = 0..100: the log probability
that the reply starts with the whole number n, exact also for tokenizers that spell numbers
digit by digit. Its one-token completion and `top_logprobs` come from the same pass and equal
a plain greedy request's. OpenAI's API rejects the field; send it only to this server.

Batching: HTTP handler threads parse and tokenize, then queue a job for one model worker
thread. The worker waits `batch_wait` seconds after the first job, takes everything queued,
and runs greedy jobs (temperature 0) that share `max_tokens` as one `generate_ids` call of up
to `max_batch` rows. To keep the number of compiled programs small, every call asks for the
top 20 logprobs (each request gets its first `top_logprobs`), and greedy batches are padded
to a power of two with copies of their first row. A greedy answer equals its
solo answer up to float reassociation in the batched matmuls.

Seeds: a sampled job (temperature > 0) always runs alone, as one call whose `n` rows use the
key `PRNGKey(seed)`, so a request with a seed is reproducible and independent of other
traffic: its result equals `generate(lm, [messages] * n, temperature=..., seed=seed)`. Its n
choices differ because each row draws its own noise from that key. Without a seed a random
one is drawn.

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
import queue
import secrets
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

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
    if body.get("stream"):
        raise RequestError("stream=true is not supported by this server")
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
    seed = _number(body, "seed", None, int)
    return ChatRequest(turns, max_tokens, temperature, top_p, seed, n, logprobs, top, numbers)


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

    def batch_key(self) -> tuple:
        """Jobs with equal keys may share a model call; sampled jobs never do."""
        r = self.request
        if r.number_logprobs:
            return ("numbers",)
        if r.temperature > 0:
            return ("sampled", id(self))
        return ("greedy", r.max_tokens)

    def fail(self, error: Exception) -> None:
        self.error = error
        self.done.set()


class ModelWorker:
    """One thread that owns the model and runs queued jobs in batches (module docstring).
    `close()` lets a running batch finish; jobs still queued, and jobs queued later, fail
    with `ServerClosed`."""

    def __init__(
        self, lm: LM, steering: Steering | None, max_batch: int = 16, batch_wait: float = 0.005
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch={max_batch} must be >= 1")
        self.lm, self.steering = lm, steering
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
        self._thread = threading.Thread(target=self._loop, name="emgeo-serve-model", daemon=True)
        self._thread.start()

    def expected_wait(self, rows: int = 1) -> float | None:
        """Seconds until `rows` more rows queued now would be done, from the rows pending
        and the measured seconds per row; None before the first batch is measured."""
        if self.row_seconds is None:
            return None
        return (self.pending_rows + rows) * self.row_seconds

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
            first = self._queue.get()
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
        rows = [job.prompt_ids for job in batch for _ in range(job.request.n)]
        real = len(rows)
        if r.temperature == 0:  # pad greedy batches to a power of two: fewer compiled shapes
            rows += [rows[0]] * ((1 << (real - 1).bit_length()) - real)
        seed = r.seed if r.seed is not None else secrets.randbits(31)
        try:
            self.generate_calls += 1
            out = generate_ids(
                self.lm,
                rows,
                self.steering,
                max_new_tokens=r.max_tokens,
                temperature=r.temperature,
                top_p=r.top_p,
                seed=seed,
                top_logprobs=MAX_TOP_LOGPROBS,  # one program for all requests; sliced per request
            )
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
        lm, tok = self.lm, self.lm.tokenizer
        try:
            if self._trie is None:
                text = TokenText(tok)
                self._trie = number_trie(tok, lm.config.vocab_size, text.bytes)
            eos = set(eos_token_ids(lm))
            start = 0
            while start < len(batch):
                size = 1 << ((len(batch) - start).bit_length() - 1)
                chunk = batch[start : start + size]
                start += size
                self.number_calls += 1
                out = number_logprobs(
                    lm, [j.prompt_ids for j in chunk], self._trie, self.steering, MAX_TOP_LOGPROBS
                )
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
            content = []
            for j, (tok, lp) in enumerate(zip(gen.tokens[i], gen.logprobs[i], strict=True)):
                entry = token_text.entry(tok, lp)
                top = []
                if gen.top_logprobs is not None:
                    ids, lps = gen.top_logprobs[i]
                    k = request.top_logprobs
                    top = [
                        token_text.entry(t, v) for t, v in zip(ids[j, :k], lps[j, :k], strict=True)
                    ]
                content.append({**entry, "top_logprobs": top})
            choice["logprobs"] = {"content": content, "refusal": None}
        if numbers is not None:
            choice["number_logprobs"] = [{"number": k, "logprob": v} for k, v in numbers]
        choices.append(choice)
    completion_tokens = sum(len(t) for t in gen.tokens)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": "emgeo-jax",
        "choices": choices,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


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
    `queue_timeout`: the seconds a client is assumed to wait when it does not say (module
    docstring, "Load")."""

    def __init__(
        self,
        lm: LM,
        steering: Steering | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        model_name: str | None = None,
        max_batch: int = 16,
        batch_wait: float = 0.005,
        max_tokens_cap: int = 4096,
        queue_timeout: float = 60.0,
    ) -> None:
        if lm.tokenizer is None or not getattr(lm.tokenizer, "chat_template", None):
            raise ValueError(f"serve: model {lm.source!r} has no tokenizer with a chat template")
        self.lm = lm
        self.model_name = model_name or lm.source or "emgeo"
        self.max_tokens_cap = max_tokens_cap
        self.queue_timeout = queue_timeout
        self.refused = 0  # requests answered 429 because the queue was too deep
        self.token_text = TokenText(lm.tokenizer)
        self.worker = ModelWorker(lm, steering, max_batch, batch_wait)
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
            model = {
                "id": self.model_name,
                "object": "model",
                "created": 0,
                "owned_by": "emgeo",
                "capabilities": list(CAPABILITIES),
            }
            _send_json(h, 200, {"object": "list", "data": [model]})
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
        job = _Job(request, prompt_ids, sock=h.connection)
        try:
            gen = self.worker.run(job)
            reply = completion_json(
                request, gen, len(prompt_ids), self.model_name, self.token_text, job.numbers
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
        _send_json(h, 200, reply)


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
) -> None:
    _send_json(h, code, {"error": {"message": message, "type": kind, "code": code}}, headers)


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
