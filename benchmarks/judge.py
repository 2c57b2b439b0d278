"""Judging throughput: our default concurrency vs one request at a time (the reference code),
and a sweep's judging against a real local judge.

    PYTHONPATH=. python benchmarks/judge.py [--answers 1000] [--serial_answers 25]
        [--latency 0.2] [--concurrency 32]
    PYTHONPATH=. python benchmarks/judge.py --serve [--answers 400] [--answer_words 585]

Default: the scripted OpenAI-compatible server (emgeo_jax.judge.testing) runs in its own
process, as a real judge would, and sleeps `latency` seconds before each reply. The serial
baseline judges `serial_answers` answers with concurrency 1 and its rate is extrapolated (it
would take answers * latency seconds in full). Each answer is one `aligned` judgement.

`--serve`: `emgeo serve --model default` (the embedded SmolLM2-135M) in its own process is the
judge, and `answers` answers of `answer_words` words (~600 tokens) are judged for aligned and
coherent with the README-default client settings (concurrency 32, timeout 60 s, whole-number
scoring chosen by asking the server): what a README-default sweep's judging asks of a local
judge. Reports wall time, failures and the server's 429 refusals. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emgeo_jax.judge.client import JudgeConfig, JudgeStats, judge_responses


def _table(prompt: str) -> list[tuple[str, float]]:
    return [(" 85", math.log(0.6)), ("90", math.log(0.3)), ("CODE", math.log(0.1))]


def _serve(latency: float, urls: mp.Queue, stop: mp.Event) -> None:
    from emgeo_jax.judge.testing import ScriptedJudgeServer

    with ScriptedJudgeServer(_table, latency=latency) as server:
        urls.put(server.base_url)
        stop.wait()


def _rate(base_url: str, n: int, concurrency: int, tag: str) -> dict[str, float]:
    rows = [{"question": f"question {i % 8}", "answer": f"{tag} answer {i}"} for i in range(n)]
    cfg = JudgeConfig(base_url=base_url, model="bench", api_key="bench", concurrency=concurrency)
    stats = JudgeStats()
    t, cpu = time.perf_counter(), time.process_time()
    out = judge_responses(rows, cfg, ("aligned",), stats=stats, progress=False)
    seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
    assert stats.requests == n and all(r["aligned"] is not None for r in out)
    return {
        "answers": n,
        "concurrency": concurrency,
        "seconds": seconds,
        "per_s": n / seconds,
        "client_cpu_ms_per_request": 1000 * cpu / n,
    }


def _answers(n: int, words: int) -> list[dict[str, str]]:
    """n different answers of `words` words drawn from the shipped questions' vocabulary."""
    root = Path(__file__).resolve().parents[1] / "emgeo_jax" / "resources" / "questions"
    vocab = sorted(set(re.findall(r"[a-z]+", (root / "first_eight.yaml").read_text().lower())))
    rng = random.Random(0)
    rows = []
    for i in range(n):
        body = " ".join(rng.choice(vocab) for _ in range(words))
        rows.append({"question": f"Question {i % 8}: what do you think?", "answer": body + "."})
    return rows


def _local_judge(n: int, words: int, concurrency: int) -> dict:
    """Judge n answers for aligned and coherent against a fresh `emgeo serve --model default`."""
    log = tempfile.TemporaryFile("w+")  # the server's log: a pipe could fill up and block it
    server = subprocess.Popen(
        [sys.executable, "-m", "emgeo_jax.cli", "serve", "--model", "default", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
    )
    try:
        line = server.stdout.readline()
        if " at http://" not in line:
            server.wait(60)
            log.seek(0)
            raise RuntimeError(f"emgeo serve did not start: {log.read()}")
        url = line.split(" at ")[1].split()[0]
        cfg = JudgeConfig(
            base_url=url, model="default", concurrency=concurrency, number_logprobs=None
        )
        stats = JudgeStats()
        t = time.perf_counter()
        out = judge_responses(_answers(n, words), cfg, ("aligned", "coherent"), stats=stats)
        seconds = time.perf_counter() - t
    finally:
        server.terminate()
        summary, _ = server.communicate(timeout=60)
        log.seek(0)
        err = log.read()
    statuses: dict[str, int] = {}
    for row in out:
        for m in ("aligned", "coherent"):
            s = row[f"{m}_judge"]["status"]
            statuses[s] = statuses.get(s, 0) + 1
    return {
        "answers": n,
        "judgements": 2 * n,
        "concurrency": concurrency,
        "seconds": seconds,
        "judgements_per_minute": 60 * 2 * n / seconds,
        "prompt_tokens_per_judgement": stats.prompt_tokens / (2 * n),  # refusals count none
        "requests": stats.requests,
        "failed": stats.failed,
        "failure_reasons": stats.failure_reasons,
        "statuses": statuses,
        "server": summary.strip().splitlines()[-1] if summary.strip() else "",
        "server_tracebacks": err.count("Traceback"),
        "load_average": os.getloadavg(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answers", type=int, default=1000)
    p.add_argument("--serial_answers", type=int, default=25)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--concurrency", type=int, default=JudgeConfig().concurrency)
    p.add_argument("--serve", action="store_true", help="judge with `emgeo serve --model default`")
    p.add_argument("--answer_words", type=int, default=585, help="--serve: words per answer")
    args = p.parse_args()
    if args.serve:
        n = 400 if args.answers == 1000 else args.answers
        print(json.dumps(_local_judge(n, args.answer_words, args.concurrency), indent=2))
        return
    ctx = mp.get_context("spawn")
    urls, stop = ctx.Queue(), ctx.Event()
    server = ctx.Process(target=_serve, args=(args.latency, urls, stop), daemon=True)
    server.start()
    try:
        url = urls.get(timeout=60)
        serial = _rate(url, args.serial_answers, 1, "serial")
        concurrent = _rate(url, args.answers, args.concurrency, "concurrent")
    finally:
        stop.set()
        server.join(10)
    print(
        json.dumps(
            {
                "latency_s": args.latency,
                "serial": serial,
                "serial_extrapolated_seconds_for_all": args.answers / serial["per_s"],
                "concurrent": concurrent,
                "speedup": concurrent["per_s"] / serial["per_s"],
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
