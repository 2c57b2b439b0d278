"""MFU of the extraction forward on whatever device runs it, comparable with MaxText's
published 45-65%: MFU = compiler FLOPs per call / seconds per call / peak FLOP/s.

    python -m benchmarks.mfu [--model SmolLM2-135M|Qwen2.5-7B|...] [--batch 8 --seq 512]

FLOPs come from the same compiled program as `emgeo plan` (XLA cost analysis, scan body
counted L times). Peak: the accelerator table of `emgeo_jax.plan` when the device kind is
recognised (TPU v4/v5e/v5p/v6e, A100/H100), else this machine's measured matmul peak (CPU),
which is said in the output. Weights are random (no download): MFU does not depend on them.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.common import matmul_peak_flops, time_call
from emgeo_jax.models.lm import init_params
from emgeo_jax.parallel import make_mesh, param_shardings
from emgeo_jax.plan import ACCELERATORS, TASKS, make_plan, resolve_model

# jax device_kind substrings -> accelerator table names
DEVICE_KINDS = {
    "TPU v4": "v4",
    "TPU v5 lite": "v5e",
    "TPU v5e": "v5e",
    "TPU v5p": "v5p",
    "TPU v6 lite": "v6e",
    "TPU v6e": "v6e",
    "A100": "a100-80g",
    "H100": "h100-80g",
}


def peak_flops(dtype: str) -> tuple[float, str]:
    kind = jax.devices()[0].device_kind
    for key, name in DEVICE_KINDS.items():
        if key in kind:
            return ACCELERATORS[name].bf16_flops, f"{name} bf16 peak ({ACCELERATORS[name].source})"
    return matmul_peak_flops(dtype=dtype), f"measured {dtype} matmul peak of {kind}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="SmolLM2-135M")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dtype", default=None, help="default: bfloat16 on accelerators, else float32")
    a = p.parse_args()
    dtype = a.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    cfg = resolve_model(a.model)
    mesh = make_mesh({"fsdp": jax.device_count()})
    plan = make_plan(cfg, mesh, "extract", a.batch, a.seq, dtype, model_name=a.model)
    program = TASKS["extract"](cfg, mesh, a.batch, a.seq, jnp.dtype(dtype))
    _, params = init_params(cfg, seed=0, dtype=dtype)
    pure = nnx.to_pure_dict(params)
    nnx.replace_by_pure_dict(params, jax.device_put(pure, param_shardings(mesh, pure)))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (a.batch, a.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(a.seq, dtype=np.int32), ids.shape)
    args = [
        jax.device_put(x, s.sharding)
        for x, s in zip((ids, pos, mask), program.args[1:], strict=True)
    ]
    start = time.perf_counter()
    jax.block_until_ready(program.fn(params, *args))
    first = time.perf_counter() - start
    seconds = time_call(lambda: jax.block_until_ready(program.fn(params, *args)), repeats=5)
    peak, peak_name = peak_flops(dtype)
    total_flops = plan.flops_per_device * plan.devices
    mfu = total_flops / seconds / (peak * plan.devices)
    print(f"{a.model} extract, batch {a.batch} x {a.seq}, {dtype}, {plan.devices} device(s)")
    print(f"{a.batch * a.seq / seconds:,.0f} tokens/s; {total_flops / 1e12:.3f} TFLOP per call; "
          f"{seconds * 1e3:.1f} ms per call (first call {first:.1f} s)")  # fmt: skip
    print(f"MFU {mfu:.1%} of {peak_name}: {peak / 1e12:.2f} TFLOP/s per device")


if __name__ == "__main__":
    main()
