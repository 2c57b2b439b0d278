"""Shared benchmark helpers: machine matmul peak, timing, child-process peak RSS.

Each side of a comparison runs in its own subprocess (`run_side`) so peak RSS is its own."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


LOWERED = "/jax/core/compile/jaxpr_to_mlir_module_duration"  # jax.monitoring: one per lowering


@contextlib.contextmanager
def recorded_lowerings() -> Iterator[list[str]]:
    """The names (`jit(prefill)`, ...) of the programs this thread lowers inside the block, in
    order, from `jax.monitoring`'s lowering events; another thread's (a server left running)
    are not counted. A warm call that lowers nothing compiles nothing."""
    from jax import monitoring

    lowered: list[str] = []
    this_thread = threading.get_ident()

    def listen(event: str, _secs: float, **kw) -> None:
        if event == LOWERED and threading.get_ident() == this_thread:
            lowered.append(str(kw.get("fun_name")))

    monitoring.register_event_duration_secs_listener(listen)
    try:
        yield lowered
    finally:
        monitoring.unregister_event_duration_listener(listen)


def time_call(fn: Callable[[], object], repeats: int = 5) -> float:
    """Median wall time (s) of `fn()` over `repeats` calls (after one warm-up call)."""
    return time_interleaved([fn], repeats)[0]


def time_interleaved(fns: Sequence[Callable[[], object]], repeats: int = 5) -> list[float]:
    """Median wall time (s) of each of `fns` over `repeats` rounds that call them in turn
    (after one warm-up round), so that the machine's drift moves them alike: for a figure
    made from their difference."""
    times = [[] for _ in fns]
    for round_ in range(repeats + 1):
        for fn, t in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            if round_:
                t.append(time.perf_counter() - start)
    return [sorted(t)[len(t) // 2] for t in times]


def matmul_peak_flops(n: int = 2048, dtype: str = "float32") -> float:
    """Measured FLOP/s of a large jitted square matmul on the default JAX device."""
    import jax

    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    t = time_call(lambda: f(a).block_until_ready(), repeats=5)
    return 2 * n**3 / t


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_side(script: str, side: str, *args: str) -> dict:
    """Run `python script --side SIDE ARGS` and return the JSON dict it prints last."""
    env = dict(os.environ)
    out = subprocess.run(
        [sys.executable, script, "--side", side, *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    print(json.dumps(result), flush=True)
