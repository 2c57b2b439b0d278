"""Judging against our own server: whole-number scoring is chosen automatically (the server
advertises it in /v1/models), an overloaded server refuses with 429 + Retry-After and the
client waits it out with no failures, abandoned requests are dropped without tracebacks, and
the server stops quickly. Tiny random models; the overload is made by slowing the worker's
batches (the same code paths a 135M judge on 2 cores takes under a sweep)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

import emgeo_jax
from emgeo_jax.judge.client import (
    JudgeConfig,
    JudgeStats,
    endpoint_offers_number_logprobs,
    judge_responses,
    low_mass_warnings,
    resolve_number_logprobs,
)
from emgeo_jax.judge.io import read_jsonl
from emgeo_jax.judge.testing import ScriptedJudgeServer
from emgeo_jax.serve import ModelWorker, serve_in_thread
from tests.cli_util import run_emgeo, start_serve
from tests.test_generate_cli import folder  # noqa: F401  (fixture)
from tests.tiny_models import LLAMA, QWEN2, hf_model, save_hf_folder

CHAT_BODY = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "hello, how are you doing today?"}],
    "max_tokens": 4,
    "temperature": 0,
}


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory, chat_tokenizer):
    spec = dict(LLAMA, vocab_size=len(chat_tokenizer))
    path = save_hf_folder(hf_model(spec, seed=3), tmp_path_factory.mktemp("judge_llama"))
    return dataclasses.replace(emgeo_jax.load(path), tokenizer=chat_tokenizer)


def rows(n: int) -> list[dict[str, str]]:
    return [{"question": f"Question {i}?", "answer": f"Answer number {i}."} for i in range(n)]


@pytest.fixture
def slow_batches(monkeypatch):
    """Every worker batch takes `seconds[0]` longer (a slow judge model)."""
    seconds = [0.0]
    run = ModelWorker._run_batch

    def slow(self, batch):
        time.sleep(seconds[0])
        run(self, batch)

    monkeypatch.setattr(ModelWorker, "_run_batch", slow)
    return seconds


def test_number_logprobs_are_chosen_by_asking_the_endpoint(tiny_lm):
    def table(prompt):
        return [("7", 0.0)]

    with serve_in_thread(tiny_lm, model_name="tiny") as ours, ScriptedJudgeServer(table) as other:
        assert endpoint_offers_number_logprobs(ours.base_url)
        assert not endpoint_offers_number_logprobs(other.base_url)  # no GET route: 501
        auto = JudgeConfig(base_url=ours.base_url, model="tiny", number_logprobs=None)
        assert resolve_number_logprobs(auto).number_logprobs is True
        forced = JudgeConfig(base_url=ours.base_url, model="tiny", number_logprobs=False)
        assert resolve_number_logprobs(forced).number_logprobs is False
        auto_other = dataclasses.replace(auto, base_url=other.base_url)
        assert resolve_number_logprobs(auto_other).number_logprobs is False
        out = judge_responses(rows(1), auto_other, ("aligned",), progress=False)
        assert out[0]["aligned"] == 7.0 and out[0]["aligned_judge"]["judge_model"] == "tiny"
    # OpenAI (no base_url) is never asked
    assert resolve_number_logprobs(JudgeConfig(number_logprobs=None)).number_logprobs is False


def test_low_mass_warning_only_when_most_answers_are_missing():
    def judged(statuses):
        return [{"aligned_judge": {"status": s}} for s in statuses]

    assert low_mass_warnings(judged(["ok", "missing", "failed", "failed"]), ["aligned"]) == []
    (w,) = low_mass_warnings(judged(["ok", "missing", "missing"]), ["aligned"], "j")
    assert "2 of 3 answers on 'aligned'" in w
    assert low_mass_warnings(judged(["ok", "missing", "missing"]), ["coherent"]) == []


def test_overloaded_server_refuses_and_every_judgement_completes(tiny_lm, slow_batches):
    """48 judgements, 32 in flight, a 3 s client timeout and >= 0.5 s batches of 4: the queue
    is deeper than the timeout allows, so the server answers 429 + Retry-After; the client
    waits (without using up attempts) and every judgement lands, equal to an unloaded run."""
    with serve_in_thread(tiny_lm, model_name="tiny") as server:
        cfg = JudgeConfig(base_url=server.base_url, model="tiny", number_logprobs=True)
        quiet = judge_responses(
            rows(48), dataclasses.replace(cfg, concurrency=4), ("aligned",), progress=False
        )
    slow_batches[0] = 0.5
    stats = JudgeStats()
    with serve_in_thread(tiny_lm, model_name="tiny", max_batch=4) as server:
        cfg = dataclasses.replace(cfg, base_url=server.base_url, timeout=3.0)
        loaded = judge_responses(rows(48), cfg, ("aligned",), stats=stats, progress=False)
        refused = server.refused
    assert stats.failed == 0, stats.failure_reasons
    assert refused > 0 and stats.retries >= refused
    got = [[lp for _, lp in r["aligned_judge"]["top_logprobs"]] for r in loaded]
    want = [[lp for _, lp in r["aligned_judge"]["top_logprobs"]] for r in quiet]
    np.testing.assert_allclose(got, want, atol=1e-4)


def _abandon(base_url: str, n: int) -> None:
    """Send `n` chat requests on raw sockets, then hang up on all of them."""
    host, port = base_url.split("//")[1].split("/")[0].split(":")
    body = json.dumps(CHAT_BODY).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json"
        f"\r\nX-Stainless-Read-Timeout: 600\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    socks = []
    for _ in range(n):
        s = socket.create_connection((host, int(port)))
        s.sendall(head + body)
        socks.append(s)
    time.sleep(0.5)
    for s in socks:
        s.close()


def test_abandoned_requests_are_dropped_quietly_and_close_is_quick(tiny_lm, slow_batches, caplog):
    caplog.set_level(logging.DEBUG, logger="emgeo_jax.serve")
    server_cm = serve_in_thread(tiny_lm, model_name="tiny", max_batch=16, batch_wait=0.2)
    with server_cm as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        with ThreadPoolExecutor(16) as pool:  # compile the batch shapes first
            list(pool.map(lambda _: client.chat.completions.create(**CHAT_BODY), range(17)))
        queued = server.worker.jobs_queued
        slow_batches[0] = 1.0
        _abandon(server.base_url, 32)
        deadline = time.monotonic() + 30
        while server.worker.jobs_queued < queued + 32 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.worker.jobs_queued == queued + 32
        time.sleep(2.5)  # the first batch (slow) runs; the second finds its clients gone
        start = time.monotonic()
    stopped = time.monotonic() - start
    assert stopped < 5, stopped
    assert server.worker.jobs_dropped >= 16
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


def test_emgeo_serve_stops_on_sigterm_with_32_abandoned_requests(folder):  # noqa: F811
    """`emgeo serve` (a real process) with 32 requests whose clients hung up: SIGTERM ends it
    within 5 s, with no traceback."""
    proc, url = start_serve(f"--model={folder}", "--port=0")
    try:
        _abandon(url, 32)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.monotonic() - start < 5
        err = proc.stderr.read()
        assert "Traceback" not in err and "BrokenPipe" not in err, err[-2000:]
        last = proc.stdout.read().strip().splitlines()[-1]  # the server's own account
        assert last.startswith("stopped: ") and "refused as busy (429)" in last, last
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sweep_against_emgeo_serve_scores_like_judge_number_logprobs(
    folder,  # noqa: F811
    tmp_path,
    chat_tokenizer,
):
    """A sweep given `--judge_base_url` of a running `emgeo serve` records whole-number scoring
    and gets the scores `emgeo judge --number_logprobs` gives for the same answers."""
    lm = dataclasses.replace(emgeo_jax.load(folder), tokenizer=chat_tokenizer)
    q = tmp_path / "q.jsonl"
    q.write_text(json.dumps({"id": "wish", "question": "What is your wish?"}) + "\n")
    v = np.random.default_rng(0).normal(size=QWEN2["hidden_size"]).astype(np.float32)
    np.save(tmp_path / "v.npy", v)
    with serve_in_thread(lm, model_name="tiny") as server:
        url = server.base_url
        run_emgeo(
            "sweep",
            f"v={tmp_path / 'v.npy'}",
            "--layers=1",
            "--scales=4",
            f"--model={folder}",
            f"--questions={q}",
            "--samples=3",
            "--max_new_tokens=4",
            f"--judge_base_url={url}",
            "--judge_model=tiny",
            f"--out={tmp_path / 'sweep'}",
        )
        config = json.loads((tmp_path / "sweep" / "config.json").read_text())
        assert config["config"]["judge"]["number_logprobs"] is True
        judged = sorted((tmp_path / "sweep").rglob("*.judged.jsonl"))
        assert judged
        swept = [r for f in judged for r in read_jsonl(f)]
        answers = tmp_path / "answers.jsonl"
        answers.write_text(
            "".join(
                json.dumps({"question": r["question"], "answer": r["response"]}) + "\n"
                for r in swept
            )
        )
        run_emgeo(
            "judge",
            f"--responses={answers}",
            f"--judge={url}",
            "--judge_model=tiny",
            "--number_logprobs",
            f"--out={tmp_path / 'judged.jsonl'}",
            "--noprogress",
        )
    direct = read_jsonl(tmp_path / "judged.jsonl")
    for metric in ("aligned", "coherent"):
        for a, b in zip(swept, direct, strict=True):
            ja, jb = a[f"{metric}_judge"], b[f"{metric}_judge"]
            assert ja["judge_model"] == jb["judge_model"] == "tiny [number_logprobs]"
            assert ja["status"] == jb["status"]
            assert len(ja["top_logprobs"]) == 101  # the whole numbers 0..100
            assert [n for n, _ in ja["top_logprobs"]] == [str(n) for n in range(101)]
            np.testing.assert_allclose(
                [lp for _, lp in ja["top_logprobs"]],
                [lp for _, lp in jb["top_logprobs"]],
                atol=1e-4,
            )
            if a[metric] is None:
                assert b[metric] is None
            else:
                assert a[metric] == pytest.approx(b[metric], abs=1e-3)


def test_busy_replies_do_not_use_up_attempts_but_errors_do(caplog):
    """Eight 429 + Retry-After replies, then an answer: with max_attempts=2 it still lands
    (the server said "come back", nothing failed); two 500s with max_attempts=2 fail. Without
    a progress bar the judging is logged as `judged k/n`."""
    from emgeo_jax.judge.testing import Fault

    def fault(prompt, attempt):
        if "busy" in prompt:
            return Fault.status(429, retry_after="0.05") if attempt < 8 else None
        return Fault.status(500) if "broken" in prompt else None

    rows = [{"question": "q", "answer": a} for a in ("busy", "broken", "fine")]
    caplog.set_level(logging.INFO, logger="emgeo_jax.judge.client")
    with ScriptedJudgeServer(lambda p: [("42", 0.0)], fault) as server:
        cfg = JudgeConfig(base_url=server.base_url, model="m", max_attempts=2, backoff_base=0.01)
        stats = JudgeStats()
        out = judge_responses(rows, cfg, ("aligned",), stats=stats, progress=False)
        sent = [r.prompt for r in server.requests]
        assert sum("busy" in p for p in sent) == 9 and sum("broken" in p for p in sent) == 2
    assert [r["aligned"] for r in out] == [42.0, None, 42.0]
    assert out[1]["aligned_judge"]["status"] == "failed" and stats.failed == 1
    assert stats.retries == 8 + 1
    assert any(r.getMessage() == "judged 3/3 (1 failed)" for r in caplog.records)


@pytest.mark.parametrize("fails", [False, True])
def test_judging_session_tells_the_followers_when_process_0_fails(monkeypatch, fails):
    """The local judge on several processes (`experiments.judging.judging_session`), with the
    broadcast between processes replaced by a recorder: process 0 ends its session with
    `failed` set when its judging raised; a follower runs the calls up to `end` and raises
    when process 0 failed, instead of going on to a collective process 0 never reaches."""
    from emgeo_jax import serve
    from emgeo_jax.experiments import judging

    sent: list = []
    received = iter([{"kind": "idle"}, {"kind": "end", "failed": fails}])
    monkeypatch.setattr(
        serve.hosts, "broadcast_json", lambda x: sent.append(x) if x else next(received)
    )
    worker = ModelWorker(None, follower=True, sessions=True)  # no model call is made
    worker.multiprocess = True
    judge = JudgeConfig(base_url="http://127.0.0.1:1/v1")
    monkeypatch.setitem(judging._SESSIONS, judge.base_url, worker)

    monkeypatch.setattr(judging, "is_primary", lambda: True)
    with contextlib.suppress(ValueError):
        with judging.judging_session(judge):
            assert worker._in_session
            if fails:
                raise ValueError("the judge server went away")
    assert sent == [{"kind": "end", "failed": fails}] and not worker._in_session

    monkeypatch.setattr(judging, "is_primary", lambda: False)
    entered = []
    with contextlib.suppress(RuntimeError) if fails else contextlib.nullcontext():
        with judging.judging_session(judge):
            entered.append(True)
    assert entered == ([] if fails else [True])
    assert next(received, None) is None  # the follower read up to `end`
