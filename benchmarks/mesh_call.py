"""Host overhead of a generation call on a mesh: warm `generate_ids` calls of the tiny Llama
(`device.py`'s "tiny-llama": 8 prompts x 16 tokens, 4 new) on every device (`fsdp=N`), their
median wall time, and what each warm call lowers (`jax.monitoring`: it should be nothing;
before 2026-12-07 every call on a mesh compiled its KV-cache allocator again, which `emgeo
serve` on a mesh paid at every batch). The model is tiny, so the time is the host's work.

    JAX_NUM_CPU_DEVICES=8 python -m benchmarks.mesh_call [--repeats 15]
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks.common import recorded_lowerings, time_call
from benchmarks.device import resolve_model
from emgeo_jax.generate import generate_ids
from emgeo_jax.models.lm import LM, init_params
from emgeo_jax.parallel import make_mesh


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=15, help="timed calls (after one warm-up)")
    a = p.parse_args(argv)
    cfg = resolve_model("tiny-llama")
    mesh = make_mesh({"fsdp": jax.device_count()})
    lm = LM(cfg, *init_params(cfg, seed=1), source="tiny-llama").on_mesh(mesh)
    ids = np.random.default_rng(1).integers(3, cfg.vocab_size, (8, 16)).tolist()

    def call():
        return generate_ids(lm, ids, max_new_tokens=4, eos_ids=[], pad_multiple=16)

    call()  # compiles
    with recorded_lowerings() as lowered:
        seconds = time_call(call, a.repeats)
    row = {
        "devices": mesh.size,
        "median_ms": 1000 * seconds,
        "lowered_per_warm_call": len(lowered) / (a.repeats + 1),
        "lowered": sorted(set(lowered)),
    }
    print(
        f"generate_ids on fsdp={mesh.size}, tiny Llama, 8 x 16 tokens, 4 new: "
        f"{row['median_ms']:.1f} ms a warm call (median of {a.repeats}); "
        f"{row['lowered_per_warm_call']:g} programs lowered per warm call {row['lowered']}"
    )
    return row


if __name__ == "__main__":
    main()
