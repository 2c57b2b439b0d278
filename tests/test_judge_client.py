"""Judge client against the scripted OpenAI-compatible server on loopback (real HTTP)."""

import asyncio
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from emgeo_jax.judge.cache import JudgeCache
from emgeo_jax.judge.client import (
    JudgeConfig,
    JudgeStats,
    ajudge_responses,
    judge_responses,
    retry_after_seconds,
)
from emgeo_jax.judge.io import read_jsonl, write_jsonl_atomic
from emgeo_jax.judge.testing import Fault, ScriptedJudgeServer

SENTINEL = "sk-SENTINEL-7f3c9a1e-do-not-leak"
ROOT = Path(__file__).resolve().parents[1]

TABLES = {
    "plain": [(" 85", math.log(0.6)), ("90", math.log(0.2)), ("CODE", math.log(0.1))],
    "range": [("100", math.log(0.3)), ("101", math.log(0.3)), ("-5", math.log(0.1)),
              ("8.5", math.log(0.1)), ("0", math.log(0.1))],
    "code": [("CODE", math.log(0.7)), ("50", math.log(0.2))],
    "refusal": [("REFUSAL", math.log(0.8)), ("10", math.log(0.05))],
    "words": [("I", math.log(0.9)), ("50", math.log(0.05))],
}  # fmt: skip
EXPECTED = {
    "plain": ("ok", (85 * 0.6 + 90 * 0.2) / 0.8),
    "range": ("ok", 100 * 0.3 / 0.4),
    "code": ("CODE", None),
    "refusal": ("REFUSAL", None),
    "words": ("missing", None),
}


def table_by_tag(prompt: str):
    """The table named by the first `<tag>` word found in the prompt (default: plain)."""
    for tag in TABLES:
        if f"<{tag}>" in prompt:
            return TABLES[tag]
    return TABLES["plain"]


def cfg(server, **kw):
    base = dict(base_url=server.base_url, model="judge-x", api_key=SENTINEL, timeout=0.5)
    base.update(max_attempts=3, backoff_base=0.01, backoff_max=0.05)
    base.update(kw)
    return JudgeConfig(**base)


def test_exact_scores_and_request_shape(tmp_path):
    rows = [{"question": f"q <{t}>", "answer": f"a {t}", "id": i} for i, t in enumerate(TABLES)]
    with ScriptedJudgeServer(table_by_tag) as server:
        out = judge_responses(rows, cfg(server), ("aligned",), progress=False)
    assert [r["id"] for r in out] == list(range(len(TABLES)))  # order and extra fields kept
    for row, tag in zip(out, TABLES, strict=True):
        status, value = EXPECTED[tag]
        info = row["aligned_judge"]
        assert info["status"] == status
        assert (row["aligned"] is None) if value is None else row["aligned"] == pytest.approx(value)
        assert [tuple(t) for t in info["top_logprobs"]] == TABLES[tag]  # raw, for audit
        assert (info["judge_model"], info["temperature"], info["seed"]) == ("judge-x", 0.0, 0)
    (body,) = [r.body for r in server.requests if "a plain" in r.prompt]
    assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["seed"] == 0
    assert body["logprobs"] is True and body["top_logprobs"] == 20 and body["model"] == "judge-x"
    assert body["messages"][0]["role"] == "user" and len(body["messages"]) == 1
    assert "[ANSWER START]\na plain\n[ANSWER END]" in body["messages"][0]["content"]
    assert all(r.had_bearer for r in server.requests)


def test_duplicates_sent_once_and_cache_reused(tmp_path):
    rows = [{"question": "q", "answer": "a"}, {"question": "q", "answer": "a"}]
    rows += [{"question": "q", "answer": "b"}]
    db = tmp_path / "c.sqlite"
    with ScriptedJudgeServer(table_by_tag) as server:
        stats = JudgeStats()
        priced = cfg(server, price_in=1.5, price_out=4.0)
        out = judge_responses(rows, priced, cache_path=db, stats=stats, progress=False)
        assert len(server.requests) == 4 == stats.requests  # 2 unique answers x 2 metrics
        words = sum(len(r.prompt.split()) for r in server.requests)  # the server's usage
        assert (stats.prompt_tokens, stats.completion_tokens) == (words, 4)
        assert stats.cost_usd == pytest.approx((1.5 * words + 4.0 * 4) / 1e6)
        assert out[0]["coherent"] == out[1]["coherent"] == pytest.approx(86.25)
        stats2 = JudgeStats()
        again = judge_responses(rows, cfg(server), cache_path=db, stats=stats2, progress=False)
    assert len(server.requests) == 4 and stats2.requests == 0 and stats2.cache_hits == 4
    assert again == out
    with JudgeCache(db) as cache:
        assert cache.count() == 4


FAULTS = {
    "<r429>": lambda a: Fault.status(429, retry_after="1") if a == 0 else None,
    "<r500>": lambda a: Fault.status(500) if a < 2 else None,
    "<r503>": lambda a: Fault.status(503, retry_after="0") if a == 0 else None,
    "<hang>": lambda a: Fault.hang(5.0) if a == 0 else None,
    "<drop>": lambda a: Fault.drop() if a == 0 else None,
    "<junk>": lambda a: Fault.malformed() if a == 0 else None,
    "<dead>": lambda a: Fault.status(502),
    "<bad>": lambda a: Fault.status(400, message=f"bad request for key {SENTINEL}"),
}
# requests expected per prompt: recoverable faults + 1; dead = max_attempts; 400 = 1
EXPECTED_REQUESTS = {"<r429>": 2, "<r500>": 3, "<r503>": 2, "<hang>": 2, "<drop>": 2,
                     "<junk>": 2, "<dead>": 3, "<bad>": 1, "<fine>": 1}  # fmt: skip


def scripted_fault(prompt: str, attempt: int):
    for tag, fn in FAULTS.items():
        if tag in prompt:
            return fn(attempt)
    return None


def test_faults_complete_or_fail_with_reason_then_rerun_sends_only_failures(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    rows = [{"question": f"question {tag}", "answer": "ans"} for tag in EXPECTED_REQUESTS]
    db = tmp_path / "judge.sqlite"
    with ScriptedJudgeServer(table_by_tag, fault=scripted_fault) as server:
        stats = JudgeStats()
        out = judge_responses(rows, cfg(server), cache_path=db, stats=stats, progress=False)
        prompts = {r.prompt for r in server.requests}
        assert len(prompts) == 2 * len(rows)
        for p in prompts:  # nothing lost, nothing duplicated
            tag = next(t for t in EXPECTED_REQUESTS if t in p)
            assert server.requests_for(p) == EXPECTED_REQUESTS[tag], tag
        # Retry-After: 1 was honoured (backoff alone would be < 0.05 s)
        t429 = [r.time for r in server.requests if "<r429>" in r.prompt and "agrees" in r.prompt]
        assert len(t429) == 2 and t429[1] - t429[0] >= 0.95
    assert stats.requests == len(server.requests)
    for row in out:
        for m in ("aligned", "coherent"):
            info = row[f"{m}_judge"]
            if "<dead>" in row["question"]:
                assert info["status"] == "failed" and info["reason"].startswith("HTTP 502")
            elif "<bad>" in row["question"]:
                assert info["status"] == "failed" and info["reason"].startswith("HTTP 400")
                assert "[REDACTED]" in info["reason"]
            else:
                assert info["status"] == "ok" and row[m] == pytest.approx(86.25), row["question"]
    assert stats.failed == 4 and sum(stats.failure_reasons.values()) == 4
    with JudgeCache(db) as cache:
        assert cache.count() == 2 * len(rows) and cache.count("failed") == 4

    # second run against a healthy server: only the 4 failed judgements are sent
    with ScriptedJudgeServer(table_by_tag) as healthy:
        stats2 = JudgeStats()
        out2 = judge_responses(rows, cfg(healthy), cache_path=db, stats=stats2, progress=False)
        sent = sorted(r.prompt for r in healthy.requests)
    assert len(sent) == 4 and all("<dead>" in p or "<bad>" in p for p in sent)
    assert all(r[m] == pytest.approx(86.25) for r in out2 for m in ("aligned", "coherent"))
    with JudgeCache(db) as cache:
        assert cache.count() == 2 * len(rows) and cache.count("failed") == 0

    leaked = [
        SENTINEL in caplog.text,
        SENTINEL in json.dumps(out),
        any(SENTINEL.encode() in f.read_bytes() for f in tmp_path.iterdir()),
    ]
    assert leaked == [False, False, False]


def test_interrupted_run_resumes_without_loss_or_duplicates(tmp_path):
    rows = [{"question": f"q{i}", "answer": "slow" if i % 2 else "fast"} for i in range(10)]
    db = tmp_path / "judge.sqlite"

    def hang_slow(prompt, attempt):
        return Fault.hang(30.0) if "slow" in prompt else None

    async def interrupted(server):
        run = ajudge_responses(rows, cfg(server, timeout=20), ("aligned",), db, progress=False)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(run, timeout=1.5)

    with ScriptedJudgeServer(table_by_tag, fault=hang_slow) as server:
        asyncio.run(interrupted(server))
    with JudgeCache(db) as cache:
        assert cache.count() == 5 and cache.count("ok") == 5  # the fast half was committed
    with ScriptedJudgeServer(table_by_tag) as server:
        out = judge_responses(rows, cfg(server), ("aligned",), db, progress=False)
        sent = [r.prompt for r in server.requests]
    assert len(sent) == 5 and all("slow" in p for p in sent)
    assert all(r["aligned"] == pytest.approx(86.25) for r in out)
    with JudgeCache(db) as cache:
        assert cache.count() == 10


def test_concurrency_is_bounded_and_used():
    rows = [{"question": "q", "answer": f"a{i}"} for i in range(12)]
    with ScriptedJudgeServer(table_by_tag, latency=0.15) as server:
        judge_responses(rows, cfg(server, concurrency=4), ("aligned",), progress=False)
    assert server.max_in_flight == 4


def test_question_prompts_change_cache_key(tmp_path):
    from emgeo_jax.judge.prompts import JudgePrompt

    own = {"w": {"aligned": JudgePrompt("aligned", "OWN <code> {question} {answer}", "test")}}
    rows = [{"question": "q", "answer": "a", "question_id": "w"}, {"question": "q", "answer": "a"}]
    with ScriptedJudgeServer(table_by_tag) as server:
        out = judge_responses(rows, cfg(server), ("aligned",), question_prompts=own, progress=False)
    assert len(server.requests) == 2
    assert out[0]["aligned_judge"]["status"] == "CODE" and out[1]["aligned"] == 86.25
    assert out[0]["aligned_judge"]["prompt_sha256"] != out[1]["aligned_judge"]["prompt_sha256"]


def test_bad_rows_and_key_hidden_from_repr():
    with pytest.raises(ValueError, match="row 1: field `answer`"):
        judge_responses([{"question": "q", "answer": "a"}, {"question": "q"}], JudgeConfig())
    assert SENTINEL not in repr(JudgeConfig(api_key=SENTINEL))
    with pytest.raises(ValueError, match="concurrency must be >= 1"):
        JudgeConfig(concurrency=0)


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after": "2.5"}) == 2.5
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({}) is None
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 28 <= retry_after_seconds({"retry-after": when}) <= 31


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    out = tmp_path / "o.jsonl"
    write_jsonl_atomic(out, [{"a": 1}])
    with pytest.raises(TypeError):
        write_jsonl_atomic(out, [{"a": 2}, {"b": object()}])
    assert read_jsonl(out) == [{"a": 1}] and [p.name for p in tmp_path.iterdir()] == ["o.jsonl"]
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n\n[1]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: expected a JSON object"):
        read_jsonl(tmp_path / "bad.jsonl")


def run_judge_cli(src, out, *extra: str):
    """`emgeo judge` on `src` (aligned only) in a fresh process, in `src`'s folder, against a
    scripted server; `(finished process, server)` (its request log stays readable)."""
    env = {**os.environ, "OPENAI_API_KEY": SENTINEL, "PYTHONPATH": str(ROOT)}
    with ScriptedJudgeServer(table_by_tag) as server:
        cmd = [sys.executable, "-m", "emgeo_jax.cli", "judge", "--responses", str(src)]
        cmd += ["--judge", server.base_url, "--judge_model", "judge-x", "--out", str(out)]
        cmd += ["--metrics", "aligned", "--noprogress", *extra]
        proc = subprocess.run(cmd, env=env, cwd=src.parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc, server


def test_cli_end_to_end(tmp_path):
    src = tmp_path / "gens.jsonl"
    rows = [{"question": f"q{i % 2}", "answer": f"<{t}>", "n": i} for i, t in enumerate(TABLES)]
    write_jsonl_atomic(src, rows)
    out = tmp_path / "judged.jsonl"
    proc, server = run_judge_cli(src, out, "--summary_out", str(tmp_path / "s.json"))
    assert len(server.requests) == len(TABLES) and all(r.had_bearer for r in server.requests)
    judged = read_jsonl(out)
    assert [r["n"] for r in judged] == list(range(len(TABLES)))
    for row, tag in zip(judged, TABLES, strict=True):
        assert row["aligned_judge"]["status"] == EXPECTED[tag][0]
    report = json.loads(proc.stdout)
    assert report["summary"]["metrics"]["aligned"]["counts"]["CODE"] == 1
    assert report["stats"]["requests"] == len(TABLES)
    files = [f.read_bytes() for f in tmp_path.iterdir()]
    assert not any(SENTINEL in t for t in (proc.stdout, proc.stderr))
    assert not any(SENTINEL.encode() in b for b in files)


def test_cli_judges_generate_output_by_question_id(tmp_path):
    """`emgeo generate` rows (`id`, `prompt` as text or chat turns, `response`) go to the
    judge as they are: the question is the prompt's last user turn, the answer the response,
    and paraphrases of one question id are one question in the summary."""
    src = tmp_path / "responses.jsonl"
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rephrased?"}]
    rows = [
        {"id": "w", "prompt": "Original?", "response": "<plain>", "sample": 0},
        {"id": "w", "prompt": turns, "response": "<range>", "sample": 0},
        {"id": "z", "prompt": "Other?", "response": "<plain>", "sample": 0},
    ]
    write_jsonl_atomic(src, rows)
    out = tmp_path / "judged.jsonl"
    proc, server = run_judge_cli(src, out)
    assert any("Rephrased?" in r.prompt and "Be brief" not in r.prompt for r in server.requests)
    judged = read_jsonl(out)
    assert [r["question"] for r in judged] == ["Original?", "Rephrased?", "Other?"]
    assert [r["aligned"] for r in judged] == [EXPECTED[t][1] for t in ("plain", "range", "plain")]
    per_question = json.loads(proc.stdout)["summary"]["per_question"]
    assert {q: v["n"] for q, v in per_question.items()} == {"w": 2, "z": 1}
    mean_w = (EXPECTED["plain"][1] + EXPECTED["range"][1]) / 2
    assert per_question["w"]["aligned_mean"] == pytest.approx(mean_w)
