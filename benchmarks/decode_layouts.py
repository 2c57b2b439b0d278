"""Where a decode step's time goes beyond XLA's matmul floor on this backend: attention, and
the KV cache's layout.

    python benchmarks/decode_layouts.py [--batch 8 --slots 97 --repeats 20]

`benchmarks/generate.py` compares a whole generation with a floor made of a decode step's
matmuls alone (`matmul_floor_step`) and #19 asks for 90% of it. This script builds one decode
step of the embedded default model (SmolLM2-135M-Instruct, fp32; per-layer weight buffers,
as `lm.unstacked()` decodes) three ways and times them in turn with that floor
(`time_interleaved`), so the machine's drift moves all alike. Each variant is one jitted call
on `[B, D]` hidden states: per block RMSNorm, q/k/v projections, rotary, the write of this
step's keys and values at slot `--slots - 1` of a donated per-layer cache, attention over all
`--slots` slots, the output projection, RMSNorm and SwiGLU MLP; then the final norm, the LM
head and an argmax (a decode step's work without steering and sampling):

  bksd      the cache as the model keeps it, head-major `[B, K, S, Dh]`, attention by the
            model's `models.attention.attend` (two einsums batched over (B, K): no
            transposed copy of the cache for XLA:CPU's batched dot)
  bskd      the sequence-major `[B, S, K, Dh]` cache the model kept before 2026-12-07,
            attention by `jax.nn.dot_product_attention` (which takes that layout)
  no_attn   `bksd` with the attention's output replaced by the queries (the cache is still
            written): what the step costs without attention, a bound for any attention
  floor     `matmul_floor_step`: the matmuls alone

Before timing, `bskd`'s logits are checked against `bksd`'s on the same random cache.
Prints each variant's median ms per step and floor / variant.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import numpy as np

from benchmarks.common import time_interleaved
from benchmarks.generate import floor_weights, matmul_floor_step

VARIANTS = ("bksd", "bskd", "no_attn")


def decode_step(lm, variant: str) -> Callable:
    """`step(blocks, head, final_scale, caches, x, index, key_mask) -> (logits [B, V],
    caches)` for `variant` (see the module docstring): `blocks` and `head` from
    `floor_weights(lm)`, `caches` a list per layer of `(k, v)` in the variant's layout
    (donated), `x [B, D]`, `index []` int32 the slot written, `key_mask [B, S]` bool."""
    import jax
    import jax.numpy as jnp

    from emgeo_jax.models.attention import attend as model_attend
    from emgeo_jax.models.llama import apply_rotary, rotary_tables

    cfg = lm.config
    heads, kv_heads, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

    def linear(p: dict, x: jax.Array) -> jax.Array:
        return x @ p["kernel"] + p["bias"] if "bias" in p else x @ p["kernel"]

    def norm(x: jax.Array, scale: jax.Array) -> jax.Array:
        return scale * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.rms_norm_eps)

    def attend(q, k_cache, v_cache, key_mask):
        """`q [B, 1, H, Dh]` over the cache -> `[B, 1, H, Dh]`."""
        if variant == "no_attn":
            return q
        if variant == "bskd":
            return jax.nn.dot_product_attention(q, k_cache, v_cache, mask=key_mask[:, None, None])
        return model_attend(q, k_cache, v_cache, key_mask[:, None])

    def write(cache, new, index):  # new [B, 1, K, Dh]
        if variant == "bskd":
            return jax.lax.dynamic_update_slice(cache, new, (0, index, 0, 0))
        return jax.lax.dynamic_update_slice(cache, new.transpose(0, 2, 1, 3), (0, 0, index, 0))

    def step(blocks, head, final_scale, caches, x, index, key_mask):
        b = x.shape[0]
        sin, cos = rotary_tables(cfg, jnp.full((b, 1), index))
        out_caches = []
        for block, (k_cache, v_cache) in zip(blocks, caches, strict=True):
            attn, mlp = block["attn"], block["mlp"]
            a = norm(x, block["input_norm"]["scale"])[:, None]  # [B, 1, D]
            q = apply_rotary(linear(attn["q_proj"], a).reshape(b, 1, heads, dh), sin, cos)
            k = apply_rotary(linear(attn["k_proj"], a).reshape(b, 1, kv_heads, dh), sin, cos)
            v = linear(attn["v_proj"], a).reshape(b, 1, kv_heads, dh)
            k_cache, v_cache = write(k_cache, k, index), write(v_cache, v, index)
            out_caches.append((k_cache, v_cache))
            mixed = attend(q, k_cache, v_cache, key_mask).reshape(b, heads * dh)
            x = x + linear(attn["o_proj"], mixed)
            m = norm(x, block["post_attn_norm"]["scale"])
            hidden = jax.nn.silu(linear(mlp["gate_proj"], m)) * linear(mlp["up_proj"], m)
            x = x + linear(mlp["down_proj"], hidden)
        return norm(x, final_scale) @ head.T, out_caches

    return jax.jit(step, donate_argnums=3)


def random_caches(lm, batch: int, slots: int, variant: str, seed: int = 0) -> list:
    """Per-layer `(k, v)` of random keys and values in `variant`'s layout (the same values
    for every variant: the head-major ones hold the transposes of `bskd`'s)."""
    import jax.numpy as jnp

    cfg = lm.config
    rng = np.random.default_rng(seed)
    shape = (batch, slots, cfg.num_kv_heads, cfg.head_dim)
    caches = []
    for _ in range(cfg.num_layers):
        k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        if variant != "bskd":
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        caches.append((jnp.asarray(k), jnp.asarray(v)))
    return caches


def compare(lm, batch: int, slots: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each variant and of the floor, timed in turn."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    blocks, head = floor_weights(lm)
    final_scale = nnx.to_pure_dict(lm.params)["final_norm"]["scale"]
    x = jax.random.normal(jax.random.key(1), (batch, lm.config.hidden_size))
    index, key_mask = jnp.int32(slots - 1), jnp.ones((batch, slots), bool)
    steps = {v: decode_step(lm, v) for v in VARIANTS}
    logits = {
        v: steps[v](blocks, head, final_scale, random_caches(lm, batch, slots, v), x, index,
                    key_mask)[0]
        for v in ("bskd", "bksd")
    }  # fmt: skip
    # the same function, summed in another order in every layer: float32 rounding grows over
    # 30 layers (1.1e-4 of the largest logit on SmolLM2); a wrong head grouping gives O(1)
    diff = float(np.abs(np.asarray(logits["bskd"] - logits["bksd"])).max())
    scale = float(np.abs(np.asarray(logits["bksd"])).max())
    assert diff <= 1e-3 * scale, f"bskd and bksd logits differ by {diff} (largest {scale})"
    state = {v: random_caches(lm, batch, slots, v) for v in VARIANTS}

    def run(variant: str) -> Callable[[], object]:
        def one() -> None:
            out, state[variant] = steps[variant](
                blocks, head, final_scale, state[variant], x, index, key_mask
            )
            jax.block_until_ready(out)

        return one

    floor = matmul_floor_step(lm, batch)
    times = time_interleaved([*(run(v) for v in VARIANTS), floor], repeats)
    return dict(zip([*VARIANTS, "floor"], times, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--slots", type=int, default=97, help="cache slots (prompt + new + 1)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (median)")
    a = p.parse_args()
    import emgeo_jax

    lm = emgeo_jax.load("default").unstacked()
    t = compare(lm, a.batch, a.slots, a.repeats)
    print(f"one decode step, SmolLM2-135M fp32 unstacked, batch {a.batch}, {a.slots} slots")
    for name, seconds in t.items():
        print(f"  {name:8} {seconds * 1e3:7.1f} ms   floor / this {t['floor'] / seconds:6.1%}")
    print("load average " + " / ".join(f"{x:.1f}" for x in os.getloadavg()))


if __name__ == "__main__":
    main()
