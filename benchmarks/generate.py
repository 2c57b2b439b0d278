"""Steered generation: ours vs transformers `generate` with a forward hook, one run.

    python benchmarks/generate.py [--batch 8 --prompt 32 --new 64 --repeats 5]

On the embedded default (SmolLM2-135M-Instruct, fp32). Random 32-token prompts, 64 new
tokens per row (EOS disabled so every row runs the full length), a random steering vector
added at the middle layer at all positions. Greedy and sampled (temperature 1, top_p 0.9).
Ours: `generate_ids` (jitted prefill + while_loop decode with a KV cache), the median of
`--repeats` timed calls after a first (compiling) one, on both layer layouts (`LAYOUTS`).
transformers: one call per mode, as `model.generate` with a forward hook on
`model.layers[L//2]`, eager attention, torch threads = cores (it has nothing to compile).
Each side runs in its own process. Reports new tokens/s, the ratio, the fraction of the
roofline: min over two bounds on new tokens/s, compute (2 x params FLOPs per token at the
measured matmul peak) and weight bandwidth (all weights read once per decode step at the
measured memory bandwidth), and the load average. It also reports a floor that does not
depend on our program: the prefill as measured plus, for every later step, only the time
XLA's kernels take for that step's matmuls (`matmul_floor_step`): the best any decode loop
built from them could do here; "of floor" is that floor's time over ours. This machine's
speed drifts by a third within minutes, so the floor is timed right after every timed call
of ours (a prefill alone, then the floor step 5 times) and "of floor" is the median of those
per-call ratios, not a ratio of two medians taken minutes apart.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np

from benchmarks.common import emit, matmul_peak_flops, run_side, time_call

SCALE = 4.0
# The two layer layouts generation runs on: "scan" (stacked `[L, ...]` weights, one
# `lax.scan`: each decode step slices every layer's weights out of the stack) and
# "unstacked" (`LM.unstacked()`: one buffer per layer, read in place).
LAYOUTS = ("scan", "unstacked")


def memory_bandwidth(nbytes: int = 512 * 2**20) -> float:
    """Measured bytes/s of a jitted sum over a large float32 array (one read)."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((nbytes // 4,), jnp.float32)
    f = jax.jit(jnp.sum)
    f(x).block_until_ready()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        f(x).block_until_ready()
        times.append(time.perf_counter() - t)
    return nbytes / sorted(times)[2]


def floor_weights(lm) -> tuple[list[dict], object]:
    """`lm`'s blocks as a list of per-block parameter dicts (each weight its own buffer: a
    stacked model's layers are copied out once) and the LM head `[V, D]` (the embedding when
    tied)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    pure = nnx.to_pure_dict(lm.params)
    layers = pure["layers"]
    num_layers = lm.config.num_layers
    if 0 in layers:  # unstacked already
        blocks = [layers[i] for i in range(num_layers)]
    else:
        blocks = [jax.tree.map(lambda x, i=i: jnp.array(x[i]), layers) for i in range(num_layers)]
    head = pure["lm_head"]["kernel"].T if "lm_head" in pure else pure["embed"]["embedding"]
    return blocks, head


def matmul_floor_step(lm, batch: int) -> Callable[[], object]:
    """A call running the matmuls of one decode step with XLA's own kernels and nothing else,
    in their data dependencies: per block `q, k, v = x @ Wq, x @ Wk, x @ Wv`, `x += q @ Wo`,
    `x += (x @ Wgate * x @ Wup) @ Wdown` (each block's kernels as separate buffers, so
    nothing is sliced out of a stack), then the LM head, on a `[batch, D]` input in one
    jitted call. Attention, norms, rotary, steering and sampling are left out, so no decode
    step built from these kernels can take less. (Independent matmuls of different blocks
    could overlap on the cores; a decode step cannot overlap them, so neither does this.)"""
    import jax

    blocks, head = floor_weights(lm)
    x = jax.random.normal(jax.random.key(0), (batch, lm.config.hidden_size))

    @jax.jit
    def step(blocks, head, x):
        kv = []
        for block in blocks:
            attn, mlp = block["attn"], block["mlp"]
            q = x @ attn["q_proj"]["kernel"]
            kv += [x @ attn["k_proj"]["kernel"], x @ attn["v_proj"]["kernel"]]
            x = x + q @ attn["o_proj"]["kernel"]
            hidden = (x @ mlp["gate_proj"]["kernel"]) * (x @ mlp["up_proj"]["kernel"])
            x = x + hidden @ mlp["down_proj"]["kernel"]
        return x @ head.T, kv

    return lambda: jax.block_until_ready(step(blocks, head, x))


def setup(batch: int, prompt: int, d: int, vocab: int):
    rng = np.random.default_rng(0)
    return rng.integers(100, vocab, (batch, prompt)), rng.normal(size=d).astype(np.float32)


def ours(batch: int, prompt: int, new: int, repeats: int) -> dict:
    import jax

    import emgeo_jax
    from emgeo_jax.generate import generate_ids, prefill_prompts
    from emgeo_jax.models.steering import Steering

    lm = emgeo_jax.load("default")
    cfg = lm.config
    ids, v = setup(batch, prompt, cfg.hidden_size, cfg.vocab_size)
    steer = Steering.addition(lm, v, layers=[cfg.num_layers // 2], scale=SCALE)
    out = dict(side="ours", params=lm.param_count())
    floor_step = matmul_floor_step(lm, batch)
    floor_steps, prefills = [], []

    def prefill(model) -> None:
        """The program a call of `new` tokens runs first, alone: same padding, same cache
        (a one-token call would allocate `new - 1` fewer slots and compile its own)."""
        pre = prefill_prompts(model, ids.tolist(), steer, max_new_tokens=new)
        jax.block_until_ready((pre.cache, pre.logits, pre.position))

    def floor_now(model) -> float:
        """The floor's seconds for one call of `new` tokens, timed now: a prefill alone, then
        the median of 5 floor steps (after a warm-up one) for each of the `new - 1` later
        steps."""
        start = time.perf_counter()
        prefill(model)
        prefills.append(time.perf_counter() - start)
        floor_steps.append(time_call(floor_step, repeats=5))
        return prefills[-1] + (new - 1) * floor_steps[-1]

    for layout in LAYOUTS:
        model = lm if layout == "scan" else lm.unstacked()
        for name, kw in (
            ("greedy", dict(temperature=0.0)),
            ("sampled", dict(temperature=1.0, top_p=0.9)),
        ):

            def call(seed=0, kw=kw, model=model):
                g = generate_ids(
                    model, ids.tolist(), steer, max_new_tokens=new, eos_ids=[], seed=seed, **kw
                )
                assert all(len(t) == new for t in g.tokens)
                return g

            start = time.perf_counter()
            call()
            out[f"{layout}_{name}_first_s"] = time.perf_counter() - start
            prefill(model)  # compile the layout's prefill alone
            times, of_floor = [], []
            for seed in range(repeats):
                start = time.perf_counter()
                call(seed)
                times.append(time.perf_counter() - start)
                of_floor.append(floor_now(model) / times[-1])
            out[f"{layout}_{name}_s"] = float(np.median(times))
            out[f"{layout}_{name}_of_floor"] = float(np.median(of_floor))
    out.update(
        peak_flops=matmul_peak_flops(),
        bandwidth=memory_bandwidth(),
        floor_step_s=float(np.median(floor_steps)),
        prefill_s=float(np.median(prefills)),
    )
    return out


def transformers_side(batch: int, prompt: int, new: int, repeats: int) -> dict:
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
    cfg = model.config
    ids, v = setup(batch, prompt, cfg.hidden_size, cfg.vocab_size)
    add = torch.tensor(SCALE * v)

    def hook(module, args, output):
        if isinstance(output, tuple):
            return (output[0] + add, *output[1:])
        return output + add

    model.model.layers[cfg.num_hidden_layers // 2].register_forward_hook(hook)
    ids = torch.tensor(ids)
    out = dict(side="transformers")
    for name, kw in (
        ("greedy", dict(do_sample=False)),
        ("sampled", dict(do_sample=True, temperature=1.0, top_p=0.9)),
    ):
        with torch.no_grad():
            start = time.perf_counter()
            res = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=new,
                min_new_tokens=new,
                pad_token_id=0,
                top_k=None,
                **kw,
            )
            out[f"{name}_s"] = time.perf_counter() - start
        assert res.shape[1] == prompt + new
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["ours", "transformers"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="timed calls of ours (median)")
    a = p.parse_args()
    if a.side:
        side = ours if a.side == "ours" else transformers_side
        emit(side(a.batch, a.prompt, a.new, a.repeats))
        return
    args = ("--batch", str(a.batch), "--prompt", str(a.prompt), "--new", str(a.new))
    args += ("--repeats", str(a.repeats))
    o = run_side(__file__, "ours", *args)
    t = run_side(__file__, "transformers", *args)
    n = a.batch * a.new
    compute = o["peak_flops"] / (2 * o["params"])  # tokens/s
    bandwidth = a.batch * o["bandwidth"] / (4 * o["params"])  # fp32 weights per step
    roof = min(compute, bandwidth)
    print(
        f"steered generation, SmolLM2-135M fp32, batch {a.batch}, {a.prompt}-token prompts, "
        f"{a.new} new tokens, layer L//2 add x{SCALE}"
    )
    # The best a decode loop built from XLA's kernels can do: the prefill as measured, then
    # every later step costing only its matmuls (medians over the run; "of floor" compares
    # each timed call with the floor timed right after it).
    floor_s = o["prefill_s"] + (a.new - 1) * o["floor_step_s"]
    print(
        f"{'':20} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'roofline':>9} "
        f"{'of floor':>9} {'first s':>8}"
    )
    for layout in LAYOUTS:
        for name in ("greedy", "sampled"):
            ours_tps, hf_tps = n / o[f"{layout}_{name}_s"], n / t[f"{name}_s"]
            print(
                f"{name + ' ' + layout:20} {ours_tps:11.0f} {hf_tps:9.0f} "
                f"{ours_tps / hf_tps:5.1f}x {ours_tps / roof:9.1%} "
                f"{o[f'{layout}_{name}_of_floor']:9.1%} {o[f'{layout}_{name}_first_s']:8.1f}"
            )
    floor_rate = 4 * o["params"] / o["floor_step_s"]
    print(
        f"XLA kernel floor: matmuls alone {o['floor_step_s'] * 1e3:.1f} ms/step (weights "
        f"streamed at {floor_rate / 1e9:.1f} GB/s), prefill {o['prefill_s']:.2f} s: at most "
        f"{n / floor_s:.0f} new tok/s, {t['greedy_s'] / floor_s:.1f}x transformers' greedy"
    )
    print(
        f"roofline {roof:.0f} new tok/s = min(compute {compute:.0f}: matmul peak "
        f"{o['peak_flops'] / 1e9:.1f} GFLOP/s, weight bandwidth {bandwidth:.0f}: "
        f"{o['bandwidth'] / 1e9:.1f} GB/s); load average at the end "
        + " / ".join(f"{x:.1f}" for x in os.getloadavg())
    )


if __name__ == "__main__":
    main()
