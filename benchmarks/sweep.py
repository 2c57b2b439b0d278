"""A steering sweep's generation, packed vs cell by cell, in one run.

    python benchmarks/sweep.py [--jobs 8 --batch 32 --new 32 --layers 3]

On the embedded default (SmolLM2-135M-Instruct, fp32): a random direction at `--layers`
layers x scales -8, -4, 4, 8, plus the unsteered baseline (13 cells with the default 3
layers), each cell sampling `--jobs` answers (the shipped questions, one sample each;
temperature 1, `--new` new tokens). Three ways to generate the same rows
(`emgeo_jax.experiments.folder.generate_cells`, the sweep's own generation):

- today: each cell alone in batches of `--batch` (a cell smaller than the batch is padded to
  it, as `emgeo sweep` did before packing);
- cell by cell, tight: each cell alone, batches of `--jobs` rows (no padding);
- packed: every cell's rows in shared batches of `--batch` (per-row steering).

Each mode runs once after a warm-up call that compiles its batch shape. Reports wall seconds,
responses/s, the ratio packed vs the other two, that the rows are equal across modes, new
tokens/s as a fraction of the machine's matmul peak (2 x params FLOPs per token), the load
average, and what `emgeo plan` predicts for the same sweep on a v5e-8 with Qwen2.5-7B at the
tight and the packed batch (decode tokens/s, so time for the same tokens).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import ROOT, matmul_peak_flops

SCALES = (-8.0, -4.0, 4.0, 8.0)


def cells_of(lm, layers: int, seed: int = 0):
    """The baseline and one cell per (layer, scale): a random unit direction x 8 at `layers`
    evenly spaced layers."""
    from emgeo_jax.models.steering import Steering

    cfg = lm.config
    v = np.random.default_rng(seed).normal(size=cfg.hidden_size).astype(np.float32)
    v *= 8.0 / np.linalg.norm(v)
    picks = np.linspace(0, cfg.num_layers - 1, layers + 2)[1:-1].round().astype(int)
    cells = [None]
    for layer in picks:
        for s in SCALES:
            cells.append(Steering.addition(lm, v, [int(layer)], s))
    return cells


def run_mode(lm, cells, jobs, sampling, packed: bool) -> tuple[float, list[list[str]]]:
    """Seconds to generate every cell's rows (packed or one cell at a time) and the rows."""
    from emgeo_jax.experiments.folder import generate_cells

    start = time.perf_counter()
    if packed:
        out = generate_cells(lm, [(c, jobs) for c in cells], sampling)
    else:
        out = [generate_cells(lm, [(c, jobs)], sampling)[0] for c in cells]
    seconds = time.perf_counter() - start
    return seconds, [[r["response"] for r in rows] for rows in out]


def plan_tokens_per_s(batch: int, seq: int, new: int) -> float | None:
    """`emgeo plan`'s v5e tokens/s for Qwen2.5-7B generation on fsdp=8 at `batch`."""
    cmd = [sys.executable, "-m", "emgeo_jax.cli", "plan", "--model", "Qwen2.5-7B"]
    cmd += ["--mesh", "fsdp=8", "--task", "generate", "--batch", str(batch), "--seq", str(seq)]
    cmd += ["--new_tokens", str(new), "--accelerator", "v5e"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
    found = re.search(r"v5e\s+([\d,]+) tokens/s", out.stdout)
    return float(found.group(1).replace(",", "")) if found else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=8, help="answers per cell")
    ap.add_argument("--batch", type=int, default=32, help="rows per generate call")
    ap.add_argument("--new", type=int, default=32, help="new tokens per answer")
    ap.add_argument("--layers", type=int, default=3, help="steered layers (x 4 scales)")
    ap.add_argument("--noplan", action="store_true", help="skip the emgeo plan prediction")
    args = ap.parse_args()

    import emgeo_jax
    from emgeo_jax.experiments.folder import Sampling, make_jobs
    from emgeo_jax.experiments.questions import read_prompts, shipped_questions_path

    lm = emgeo_jax.load("default")
    questions = read_prompts(shipped_questions_path())
    questions = [{k: v for k, v in q.items() if k != "samples"} for q in questions]
    jobs = make_jobs((questions * args.jobs)[: args.jobs], 1)  # one sample each
    assert len(jobs) == args.jobs
    cells = cells_of(lm, args.layers)
    base = Sampling(samples=1, max_new_tokens=args.new, temperature=1.0, batch_size=args.batch)
    tight = Sampling(samples=1, max_new_tokens=args.new, temperature=1.0, batch_size=args.jobs)
    modes = {"today": (base, False), "cell by cell, tight": (tight, False), "packed": (base, True)}
    peak = matmul_peak_flops()
    n_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree.leaves(lm.params))
    print(f"{len(cells)} cells x {args.jobs} answers x {args.new} new tokens, batch {args.batch}")
    results, rows = {}, {}
    for name, (sampling, packed) in modes.items():
        run_mode(lm, cells[:1], jobs, sampling, packed=False)  # compile the batch shape
        seconds, rows[name] = run_mode(lm, cells, jobs, sampling, packed)
        results[name] = seconds
    new_tokens = len(cells) * args.jobs * args.new
    print(f"{'mode':<22} {'seconds':>8} {'answers/s':>10} {'packed x':>9} {'of peak':>8}")
    for name, seconds in results.items():
        frac = 2 * n_params * new_tokens / seconds / peak
        ratio = seconds / results["packed"]
        answers = len(cells) * args.jobs / seconds
        print(f"{name:<22} {seconds:8.2f} {answers:10.2f} {ratio:9.2f} {frac:8.1%}")
    equal = all(rows[m] == rows["packed"] for m in rows)
    print(f"rows equal across modes: {equal}; load average {os.getloadavg()[0]:.2f}")
    if not args.noplan:
        slow, fast = (plan_tokens_per_s(b, 64, args.new) for b in (args.jobs, args.batch))
        if slow and fast:
            print(
                f"emgeo plan, Qwen2.5-7B on v5e-8 (fsdp=8): batch {args.jobs} {slow:,.0f} tok/s, "
                f"batch {args.batch} {fast:,.0f} tok/s: packed {fast / slow:.1f}x faster "
                "than cell by cell for the same tokens"
            )


if __name__ == "__main__":
    main()
