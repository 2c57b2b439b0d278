"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1 for tests and benchmarks.

It answers `POST .../chat/completions` with one output token and its top logprobs, in the JSON
shape the `openai` client parses (`choices[0].logprobs.content[0].top_logprobs`). Per request
it asks two functions of the user prompt:

- `table(prompt) -> [(token, logprob), ...]`: the top logprobs to return (the first entry with
  the highest logprob is the sampled token);
- `fault(prompt, attempt) -> Fault | None`: a fault to inject instead, where `attempt` counts
  earlier requests with the same prompt (0 for the first), so "fail twice then succeed" is
  `lambda p, a: Fault.status(500) if a < 2 else None`.

Every request is logged (prompt, model, request JSON, whether a bearer token was sent, the
fault served); the token itself is never logged. `latency` seconds are slept before every
reply. Use as a context manager; `.base_url` is `http://127.0.0.1:PORT/v1`.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Table = Sequence[tuple[str, float]]


@dataclass(frozen=True)
class Fault:
    """A scripted failure: `kind` is status | hang | drop | malformed."""

    kind: str
    status_code: int = 0
    retry_after: str | None = None
    seconds: float = 0.0
    message: str = ""

    @staticmethod
    def status(code: int, retry_after: str | None = None, message: str = "") -> Fault:
        """Answer with HTTP `code`, an error body holding `message`, and Retry-After if given."""
        return Fault("status", status_code=code, retry_after=retry_after, message=message)

    @staticmethod
    def hang(seconds: float) -> Fault:
        """Say nothing for `seconds` (longer than the client timeout), then close."""
        return Fault("hang", seconds=seconds)

    @staticmethod
    def drop() -> Fault:
        """Close the connection without any response."""
        return Fault("drop")

    @staticmethod
    def malformed() -> Fault:
        """Answer 200 application/json with a truncated JSON body."""
        return Fault("malformed")


@dataclass(frozen=True)
class LoggedRequest:
    prompt: str
    model: str
    body: dict[str, Any]
    had_bearer: bool
    fault: Fault | None
    time: float  # time.monotonic() on arrival


class _Server(ThreadingHTTPServer):
    request_queue_size = 256  # many concurrent clients connect at once
    daemon_threads = True


def _no_fault(prompt: str, attempt: int) -> Fault | None:
    return None


class ScriptedJudgeServer:
    """Threaded loopback server; see the module docstring."""

    def __init__(
        self,
        table: Callable[[str], Table],
        fault: Callable[[str, int], Fault | None] = _no_fault,
        latency: float = 0.0,
    ) -> None:
        self.table = table
        self.fault = fault
        self.latency = latency
        self.requests: list[LoggedRequest] = []
        self._attempts: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0  # most requests being handled at once
        self._lock = threading.Lock()
        self._stop = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in separate writes

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                server._handle(self)

        self._httpd = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def requests_for(self, prompt: str) -> int:
        """How many requests carried exactly this prompt."""
        with self._lock:
            return self._attempts.get(prompt, 0)

    def __enter__(self) -> ScriptedJudgeServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        if not h.path.endswith("/chat/completions"):
            _send_json(h, 404, {"error": {"message": f"no route {h.path}"}})
            return
        length = int(h.headers.get("Content-Length", "0"))
        body = json.loads(h.rfile.read(length))
        prompt = body["messages"][-1]["content"]
        with self._lock:
            attempt = self._attempts.get(prompt, 0)
            self._attempts[prompt] = attempt + 1
        fault = self.fault(prompt, attempt)
        auth = h.headers.get("Authorization", "")
        with self._lock:
            self.requests.append(
                LoggedRequest(
                    prompt,
                    body.get("model", ""),
                    body,
                    auth.startswith("Bearer "),
                    fault,
                    time.monotonic(),
                )
            )
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self._reply(h, body, prompt, fault)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _reply(
        self, h: BaseHTTPRequestHandler, body: dict[str, Any], prompt: str, fault: Fault | None
    ) -> None:
        if self.latency:
            time.sleep(self.latency)
        if fault is None:
            _send_json(h, 200, _completion(body, list(self.table(prompt))))
        elif fault.kind == "status":
            headers = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            text = fault.message or f"scripted {fault.status_code}"
            err = {"error": {"message": text, "type": "scripted"}}
            _send_json(h, fault.status_code, err, headers)
        elif fault.kind == "hang":
            self._stop.wait(fault.seconds)
            h.close_connection = True
        elif fault.kind == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)
        elif fault.kind == "malformed":
            h.send_response(200)
            payload = b'{"id": "x", "choices": [{"index": 0, "logprobs": {"content": [{"tok'
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(payload)))
            h.end_headers()
            h.wfile.write(payload)
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")


def _send_json(
    h: BaseHTTPRequestHandler, code: int, obj: dict[str, Any], headers: dict[str, str] | None = None
) -> None:
    payload = json.dumps(obj).encode()
    h.send_response(code)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(payload)))
    for k, v in (headers or {}).items():
        h.send_header(k, v)
    h.end_headers()
    h.wfile.write(payload)


def _completion(body: dict[str, Any], table: list[tuple[str, float]]) -> dict[str, Any]:
    """A chat.completion object with one token whose top logprobs are `table`."""
    n = int(body.get("top_logprobs") or 0)
    top = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in table[:n]]
    chosen = max(table, key=lambda t: t[1]) if table else ("", 0.0)
    prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
    return {
        "id": "chatcmpl-scripted",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", ""),
        "system_fingerprint": "scripted",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": chosen[0]},
                "finish_reason": "length",
                "logprobs": {
                    "content": [
                        {
                            "token": chosen[0],
                            "logprob": chosen[1],
                            "bytes": list(chosen[0].encode()),
                            "top_logprobs": top,
                        }
                    ]
                },
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": 1,
            "total_tokens": prompt_tokens + 1,
        },
    }
