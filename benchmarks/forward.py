"""Forward pass with every layer's residual stream: ours vs transformers, one run.

    python benchmarks/forward.py [--batch 8 --seq 128]

On the embedded default (SmolLM2-135M-Instruct). Ours: the jitted forward returning
`resid_post [L, B, T, D]` and logits. transformers: `output_hidden_states=True`, eager
attention, torch threads = cores. Each side runs in its own process (peak RSS is its own).
Reports tokens/s, the ratio, first-call compile time, peak RSS and the fraction of this
machine's measured fp32 matmul peak (matmul FLOPs counted from the config).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from benchmarks.common import emit, matmul_peak_flops, peak_rss_mb, run_side, time_call


def forward_flops(cfg, batch: int, seq: int) -> float:
    """Matmul FLOPs of one forward: 2 x tokens x (block + LM-head weights) plus the T x T
    attention products. Counted by hand because XLA's cost analysis counts a scan body once,
    not L times."""
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_block = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f
    weights = cfg.num_layers * per_block + d * cfg.vocab_size
    attention = 4 * cfg.num_layers * batch * seq * seq * cfg.num_heads * dh
    return 2.0 * batch * seq * weights + attention


def ours(batch: int, seq: int) -> dict:
    import jax
    import jax.numpy as jnp

    import emgeo_jax
    from emgeo_jax.models.llama import default_positions
    from emgeo_jax.models.lm import forward
    from emgeo_jax.models.taps import Taps

    lm = emgeo_jax.load("default")
    ids = jnp.asarray(
        np.random.default_rng(0).integers(0, lm.config.vocab_size, (batch, seq)), jnp.int32
    )
    mask = jnp.ones_like(ids)
    pos = default_positions(mask)

    def call():
        out = forward(lm.graphdef, lm.params, ids, pos, mask, taps=Taps(resid="full"))
        return jax.block_until_ready(out)

    start = time.perf_counter()
    call()
    compile_s = time.perf_counter() - start
    t = time_call(call, repeats=5)
    flops = forward_flops(lm.config, batch, seq)
    return dict(
        side="ours",
        seconds=t,
        compile_s=compile_s,
        flops=flops,
        peak_flops=matmul_peak_flops(),
        rss_mb=peak_rss_mb(),
    )


def transformers_side(batch: int, seq: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from emgeo_jax.convert.gguf import default_gguf_path

    torch.set_num_threads(os.cpu_count())
    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent),
        gguf_file=path.name,
        torch_dtype=torch.float32,
        attn_implementation="eager",
    ).eval()
    ids = torch.tensor(np.random.default_rng(0).integers(0, model.config.vocab_size, (batch, seq)))

    def call():
        with torch.no_grad():
            return model(input_ids=ids, output_hidden_states=True)

    t = time_call(call, repeats=5)
    return dict(side="transformers", seconds=t, rss_mb=peak_rss_mb())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["ours", "transformers"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    a = p.parse_args()
    if a.side:
        emit((ours if a.side == "ours" else transformers_side)(a.batch, a.seq))
        return
    args = ("--batch", str(a.batch), "--seq", str(a.seq))
    o = run_side(__file__, "ours", *args)
    t = run_side(__file__, "transformers", *args)
    tokens = a.batch * a.seq
    print(f"forward + all-layer residuals, SmolLM2-135M fp32, batch {a.batch} x {a.seq} tokens")
    print(f"{'':14} {'tokens/s':>10} {'peak RSS MB':>12}")
    print(f"{'ours (JAX)':14} {tokens / o['seconds']:10.0f} {o['rss_mb']:12.0f}")
    print(f"{'transformers':14} {tokens / t['seconds']:10.0f} {t['rss_mb']:12.0f}")
    print(f"ratio ours/transformers: {t['seconds'] / o['seconds']:.2f}x")
    print(f"first call (trace + compile + run): {o['compile_s']:.1f} s")
    frac = o["flops"] / o["seconds"] / o["peak_flops"]
    print(
        f"ours: {o['flops'] / o['seconds'] / 1e9:.1f} GFLOP/s = {frac:.0%} of measured fp32 "
        f"matmul peak ({o['peak_flops'] / 1e9:.1f} GFLOP/s)"
    )


if __name__ == "__main__":
    main()
