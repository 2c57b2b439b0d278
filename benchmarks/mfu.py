"""MFU of extraction (pooled forward) and of generation on whatever device runs it,
comparable with MaxText's published 45-65%: MFU = model FLOPs / seconds / peak FLOP/s.

    python -m benchmarks.mfu [--model SmolLM2-135M|Qwen2.5-7B|...] [--batch 8 --seq 256]
                             [--new_tokens 32]

Model FLOPs are counted from the config (`model_flops`: 2 x tokens x matmul weights + the
attention products over the keys each token sees), as MaxText and PaLM count them. XLA's
cost analysis is printed beside it for the forward: it counts the body of the layer `scan`
once, so `emgeo plan` compiles one block alone and adds it `L - 1` more times (on XLA:CPU
its decode figures also count elementwise work such as the bf16 -> f32 weight upcasts, so
the config count is the comparable one). Peak: the accelerator table of `emgeo_jax.plan`
when the device kind is recognised (TPU v4/v5e/v5p/v6e, A100/H100), else this machine's
measured matmul peak (CPU), which is said in the output. Weights are random (no download):
MFU does not depend on them.

Generation runs `emgeo_jax.generate.generate_ids` (prefill + `lax.while_loop` decode) on
`B` prompts of `T` tokens; its decode MFU uses the time of `N` new tokens minus that of one
(prefill + first token), so it is the steady-state decode step.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx

from benchmarks.common import matmul_peak_flops, time_call
from emgeo_jax.generate import generate_ids
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import LM, batch_multiple, init_params, pad_rows
from emgeo_jax.parallel import make_mesh, param_shardings
from emgeo_jax.plan import accelerator_of, compile_program, make_plan, resolve_model


def peak_flops(dtype: str) -> tuple[float, str]:
    kind = jax.devices()[0].device_kind
    acc = accelerator_of(kind)
    if acc is not None:
        return acc.bf16_flops, f"{acc.name} bf16 peak ({acc.source})"
    return matmul_peak_flops(dtype=dtype), f"measured {dtype} matmul peak of {kind}"


def model_flops(cfg: ModelConfig, tokens: int, keys: float, lm_head: bool = True) -> float:
    """Forward FLOPs of `tokens` tokens that each attend to `keys` keys (on average):
    2 per multiply-add of every block matmul (and the LM head), plus QK^T and PV."""
    d, f, dh = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_block = d * dh * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * f
    weights = cfg.num_layers * per_block + (d * cfg.vocab_size if lm_head else 0)
    attention = 4 * cfg.num_layers * keys * cfg.num_heads * dh
    return tokens * (2.0 * weights + attention)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="SmolLM2-135M")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--new_tokens", type=int, default=32)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on accelerators, else float32")
    a = p.parse_args()
    dtype = a.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    cfg = resolve_model(a.model)
    mesh = make_mesh({"fsdp": jax.device_count()})
    peak, peak_name = peak_flops(dtype)
    peak_all = peak * mesh.size
    print(f"{a.model}, {dtype}, {mesh.size} device(s); peak {peak_name}: "
          f"{peak / 1e12:.3f} TFLOP/s per device")  # fmt: skip
    graphdef, params = init_params(cfg, seed=0, dtype=dtype)
    pure = nnx.to_pure_dict(params)
    nnx.replace_by_pure_dict(params, jax.device_put(pure, param_shardings(mesh, pure)))

    # extraction: the pooled forward `emgeo plan --task extract` compiles
    # (compiled once, for a batch the mesh does not divide padded as the commands pad; the
    # plan reads the executable this benchmark runs)
    compiled = compile_program(cfg, mesh, "extract", a.batch, a.seq, dtype)
    plan = make_plan(
        cfg, mesh, "extract", a.batch, a.seq, dtype, model_name=a.model, compiled=compiled
    )
    run, abstract = compiled.parts[0], compiled.program.parts[0].args
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (a.batch, a.seq)).astype(np.int32)
    pos = np.broadcast_to(np.arange(a.seq, dtype=np.int32), ids.shape)
    host = {  # every token pooled, half the rows of each class
        "input_ids": ids,
        "positions": pos,
        "attention_mask": np.ones_like(ids),
        "pool_mask": np.ones(ids.shape, bool),
        "label": (np.arange(a.batch) % 2).astype(np.int32),
        "example_index": np.arange(a.batch, dtype=np.int32),
    }
    if set(host) != set(abstract[1]):
        raise SystemExit(f"extract step takes {sorted(abstract[1])}; benchmark has {sorted(host)}")
    host = pad_rows(host, batch_multiple(mesh))
    inputs = {k: jax.device_put(v, abstract[1][k].sharding) for k, v in host.items()}
    seconds = time_call(lambda: jax.block_until_ready(run(params, inputs)), repeats=5)
    flops = model_flops(cfg, a.batch * a.seq, a.seq, lm_head=False)  # full T x T scores
    xla = plan.flops_per_device * plan.devices
    print(f"extract (pooled forward, no LM head), batch {a.batch} x {a.seq}: "
          f"{a.batch * a.seq / seconds:,.0f} tokens/s, {seconds * 1e3:.1f} ms per call "
          f"(compiled in {compiled.seconds:.1f} s)")  # fmt: skip
    print(
        f"  MFU {flops / seconds / peak_all:.1%}  (config {flops / 1e12:.3f} TFLOP per call; "
        f"XLA cost analysis x layers {xla / 1e12:.3f} TFLOP, MFU {xla / seconds / peak_all:.1%})"
    )

    # generation: generate_ids as users run it (greedy, no EOS: every row runs N steps)
    lm = LM(cfg, graphdef, params, mesh=mesh)
    prompts = [list(r) for r in ids]
    n = a.new_tokens

    def gen(new: int):
        return generate_ids(lm, prompts, max_new_tokens=new, eos_ids=[], pad_multiple=a.seq)

    t_full = time_call(lambda: gen(n), repeats=3)
    t_one = time_call(lambda: gen(1), repeats=3)
    slots = a.seq + n + 1  # attention runs over the whole preallocated cache
    prefill = model_flops(cfg, a.batch * a.seq, slots)
    step = model_flops(cfg, a.batch, slots)
    total = prefill + n * step
    decode_s = max(t_full - t_one, 1e-9)
    print(f"generate, {a.batch} prompts x {a.seq} tokens + {n} new: {t_full:.2f} s per call, "
          f"{a.batch * n / t_full:,.1f} generated tokens/s")  # fmt: skip
    print(f"  MFU whole call {total / t_full / peak_all:.1%}  ({total / 1e12:.3f} TFLOP); "
          f"prefill + first token {t_one:.2f} s, MFU {(prefill + step) / t_one / peak_all:.1%}; "
          f"decode {decode_s / (n - 1) * 1e3:.1f} ms per step, MFU "
          f"{(n - 1) * step / decode_s / peak_all:.2%}")  # fmt: skip


if __name__ == "__main__":
    main()
