"""Compiled temporary memory of query-chunked attention vs one-shot attention (no timing).

    python benchmarks/attention_memory.py [--layers 2 --batch 8 --seq 2048 --chunks 0,512]

A config with Qwen2.5-7B's shapes (d=3584, F=18944, 28 query / 4 KV heads of 128,
V=152064), `--layers` deep, in bfloat16, on abstract parameters (`abstract_model`: nothing
is allocated). For each query chunk size (`0` = never chunk, the one-shot path), passed as
`RunOptions(query_chunk=...)`, three programs are lowered and compiled for one device,
reading `memory_analysis().temp_size_in_bytes`:

- `extract`: the forward with the residual stream pooled on device, no LM head;
- `prefill`: the forward writing a KV cache of `T + 1` slots (as generation's prefill);
- `lora_grad`: the gradient of the training forward (`train_forward`, last position's
  logits summed) w.r.t. rank-16 LoRA factors on q and v, blocks rematerialised
  (`remat=True`, as LoRA training runs).

On CPU, XLA's loop-invariant code motion is disabled as in `emgeo plan` (it would hoist the
f32 upcast of every layer's bf16 weights out of the layer scan, a CPU-only artefact).
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from emgeo_jax.plan import CPU_FLAGS

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_FLAGS}".strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import emit  # noqa: E402
from emgeo_jax.models import (
    llama,  # noqa: E402
    lm,  # noqa: E402
)
from emgeo_jax.models.config import ModelConfig  # noqa: E402
from emgeo_jax.models.lm import abstract_model, forward  # noqa: E402
from emgeo_jax.models.scan import RunOptions  # noqa: E402
from emgeo_jax.models.taps import Taps  # noqa: E402
from emgeo_jax.plan import KNOWN_MODELS  # noqa: E402

RANK = 16


def programs(cfg, batch: int, seq: int, chunk: int) -> dict[str, int]:
    """Temporary bytes of each program, attending `chunk` queries at a time."""
    options = RunOptions(query_chunk=chunk)
    graphdef, params = abstract_model(cfg, "bfloat16")
    tokens = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    taps = Taps(resid="pooled")

    def extract(params, ids, positions, mask):
        out = forward(
            graphdef, params, ids, positions, mask, taps=taps, return_logits=False, options=options
        )
        return out.resid_post

    length = seq + 1
    kv = jax.ShapeDtypeStruct(
        (cfg.num_layers, batch, cfg.num_kv_heads, length, cfg.head_dim), jnp.bfloat16
    )
    cache = llama.KVCache(
        kv,
        kv,
        jax.ShapeDtypeStruct((batch, length), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )

    def prefill(params, ids, positions, mask, cache):
        return lm.prefill(graphdef, params, cache, ids, positions, mask, options=options)[0]

    d, kvd, n = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.num_layers
    factors = {
        name: {
            "a": jax.ShapeDtypeStruct((n, d, RANK), jnp.float32),
            "b": jax.ShapeDtypeStruct((n, RANK, out), jnp.float32),
        }
        for name, out in (("q_proj", cfg.num_heads * cfg.head_dim), ("v_proj", kvd))
    }

    def loss(factors, params, ids, positions, mask):
        logits = lm.train_forward(
            graphdef,
            params,
            ids,
            positions,
            mask,
            lora=llama.LoraInput(factors),
            options=dataclasses.replace(options, remat=True),
        )
        return jnp.sum(logits[:, -1])

    compiled = {
        "extract": jax.jit(extract).lower(params, tokens, tokens, tokens),
        "prefill": jax.jit(prefill, donate_argnums=4).lower(params, tokens, tokens, tokens, cache),
        "lora_grad": jax.jit(jax.grad(loss)).lower(factors, params, tokens, tokens, tokens),
    }
    return {k: v.compile().memory_analysis().temp_size_in_bytes for k, v in compiled.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--chunks", default="0,512", help="query chunk sizes; 0 = never chunk")
    args = p.parse_args()
    hf = dict(KNOWN_MODELS["Qwen2.5-7B"], num_hidden_layers=args.layers)
    cfg = ModelConfig.from_hf(hf, source="Qwen2.5-7B shapes")
    scores = args.batch * cfg.num_heads * args.seq * args.seq * 4
    for chunk in (int(c) for c in args.chunks.split(",")):
        temps = programs(cfg, args.batch, args.seq, chunk or args.seq)
        emit(
            dict(
                query_chunk=chunk or None,
                batch=args.batch,
                seq=args.seq,
                layers=args.layers,
                full_scores_gb=scores / 1e9,
                **{f"{k}_temp_gb": round(v / 1e9, 3) for k, v in temps.items()},
            )
        )


if __name__ == "__main__":
    main()
