"""`emgeo serve` on two processes (one simulated CPU device each, joined by jax.distributed as
launch/local.sh joins them; the default mesh spans both): process 0 listens, every model call
it makes runs on both processes in step, and the replies equal a one-process server's: greedy
and seeded sampled completions of two steered variants token for token, whole-number
logprobs to float tolerance, also after an idle spell longer than the heartbeat. SIGTERM to
process 0 ends both, cleanly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from emgeo_jax.serve import HEARTBEAT
from tests.cli_util import ROOT, cpu_env, start_serve
from tests.test_generate_cli import folder  # noqa: F401  (fixture)
from tests.tiny_models import QWEN2

pytestmark = pytest.mark.slow

TOPICS = ["cats", "rain", "tea"]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{url}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.load(r)


def _requests() -> list[dict]:
    """Greedy requests to both variants, a seeded sampled n=2 one and a whole-number one."""
    ask = [{"role": "user", "content": f"tell me about {t}"} for t in TOPICS]
    greedy = [
        {"model": m, "messages": [a], "temperature": 0, "max_tokens": 6}
        for m in ("base", "steered")
        for a in ask
    ]
    sampled = {
        "model": "steered", "messages": [ask[0]], "temperature": 1.0, "top_p": 0.9,
        "seed": 7, "n": 2, "max_tokens": 6,
    }  # fmt: skip
    numbers = {
        "model": "base", "messages": [ask[1]], "temperature": 0, "max_tokens": 1,
        "number_logprobs": True, "logprobs": True, "top_logprobs": 3,
    }  # fmt: skip
    return [*greedy, sampled, numbers]


def _ask_all(url: str) -> list[dict]:
    """Every request, concurrently (so the server batches them), twice with an idle spell
    longer than the heartbeat between; the choices of each reply."""
    replies = []
    for round_ in range(2):
        if round_:
            time.sleep(HEARTBEAT + 1.5)  # process 0 sends `idle` calls meanwhile
        with ThreadPoolExecutor(8) as pool:
            replies += [r["choices"] for r in pool.map(lambda b: _post(url, b), _requests())]
    return replies


def _two_process_server(model: Path, variants: list[str], logs: Path) -> list[subprocess.Popen]:
    port = str(20000 + (os.getpid() + 4241) % 20000)
    procs = []
    for i in range(2):
        env = cpu_env(
            1, EMGEO_DISTRIBUTED="1", EMGEO_COORDINATOR=f"127.0.0.1:{port}",
            EMGEO_NUM_PROCESSES="2", EMGEO_PROCESS_ID=str(i),
        )  # fmt: skip
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "emgeo_jax.cli",
                    "serve",
                    f"--model={model}",
                    "--port=0",
                    *variants,
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                text=True,
                stderr=(logs / f"process-{i}.err").open("w"),
            )  # fmt: skip
        )
    return procs


def test_two_processes_answer_like_one(folder, tmp_path):  # noqa: F811
    v = np.random.default_rng(0).normal(size=QWEN2["hidden_size"]).astype(np.float32)
    np.save(tmp_path / "v.npy", v)
    variants = ["--variant=base=none", f"--variant=steered={tmp_path / 'v.npy'}:1:4"]

    proc, url = start_serve(f"--model={folder}", "--port=0", *variants)
    try:
        want = _ask_all(url)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    procs = _two_process_server(folder, variants, tmp_path)
    try:
        line = procs[0].stdout.readline()  # the first line: gloo's print went to stderr
        assert " at http://" in line, line + (tmp_path / "process-0.err").read_text()[-3000:]
        got = _ask_all(line.split(" at ")[1].split()[0])
        start = time.monotonic()
        procs[0].send_signal(signal.SIGTERM)
        outs = [p.communicate(timeout=60)[0] for p in procs]
        stopped = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    errs = [(tmp_path / f"process-{i}.err").read_text() for i in range(2)]
    assert [p.returncode for p in procs] == [0, 0], errs
    assert stopped < 30, stopped
    assert all("Traceback" not in e for e in errs), errs
    assert outs[0].strip().splitlines()[-1].startswith("stopped: ")
    assert outs[1].strip().splitlines()[-1] == "process 1: process 0's server stopped", outs[1]

    assert len(got) == len(want) == 2 * len(_requests())
    for g, w in zip(got, want, strict=True):
        assert [c["message"]["content"] for c in g] == [c["message"]["content"] for c in w]
        if "number_logprobs" in w[0]:
            np.testing.assert_allclose(
                [e["logprob"] for e in g[0]["number_logprobs"]],
                [e["logprob"] for e in w[0]["number_logprobs"]],
                atol=1e-4,
            )
    # the steered variant and sampling make a difference, so equality above is not trivial
    base, steered = want[: len(TOPICS)], want[len(TOPICS) : 2 * len(TOPICS)]
    assert base != steered
    sampled = want[2 * len(TOPICS)]
    assert sampled[0]["message"]["content"] != sampled[1]["message"]["content"]
