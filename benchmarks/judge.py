"""Judging throughput: our default concurrency vs one request at a time (the reference code).

    PYTHONPATH=. python benchmarks/judge.py [--answers 1000] [--serial_answers 25]
        [--latency 0.2] [--concurrency 32]

The scripted OpenAI-compatible server (emgeo_jax.judge.testing) runs in its own process, as a
real judge would, and sleeps `latency` seconds before each reply. The serial baseline judges
`serial_answers` answers with concurrency 1 and its rate is extrapolated (it would take
answers * latency seconds in full). Each answer is one `aligned` judgement. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import time

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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--answers", type=int, default=1000)
    p.add_argument("--serial_answers", type=int, default=25)
    p.add_argument("--latency", type=float, default=0.2)
    p.add_argument("--concurrency", type=int, default=JudgeConfig().concurrency)
    args = p.parse_args()
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
