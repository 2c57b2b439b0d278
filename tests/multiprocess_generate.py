"""One process of a multi-process steered generation (run by launch/local.sh; see
tests/test_scale.py).

    python tests/multiprocess_generate.py OUT_DIR

Every process builds the same tiny random model, places its parameters on a mesh spanning
all processes' devices (split over `fsdp x tensor`) and runs `emgeo_jax.generate.generate_ids`
unchanged: greedy and sampled, with an additive steering vector. Process 0 writes the
generated tokens and their logprobs to OUT_DIR/generation.npz.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from emgeo_jax.generate import generate_ids
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import LM, init_params
from emgeo_jax.models.steering import Steering
from emgeo_jax.parallel import initialize_distributed, make_mesh, param_sharding
from tests.tiny_models import LLAMA

PROMPTS = [[5, 17, 33, 2], [9, 4], [60, 61, 62, 63, 64, 65], [7]]
NEW_TOKENS = 6
STEER_LAYER, STEER_SCALE = 1, 4.0


def run(lm: LM) -> dict[str, np.ndarray]:
    """Greedy and sampled (temperature 1, top_p 0.9, seed 3) generations, steered at
    `STEER_LAYER` by a fixed random unit vector: tokens and logprobs `[B, NEW_TOKENS]`."""
    vector = np.random.default_rng(4).standard_normal(lm.config.hidden_size)
    steering = Steering.addition(
        lm, vector / np.linalg.norm(vector), layers=[STEER_LAYER], scale=STEER_SCALE
    )
    out = {}
    for name, kw in (("greedy", {}), ("sampled", dict(temperature=1.0, top_p=0.9, seed=3))):
        gen = generate_ids(
            lm, PROMPTS, steering, max_new_tokens=NEW_TOKENS, eos_ids=[], pad_multiple=8, **kw
        )
        out[f"{name}_tokens"] = np.asarray(gen.tokens)
        out[f"{name}_logprobs"] = np.stack(gen.logprobs)
    return out


def tiny_lm(mesh=None) -> LM:
    cfg = ModelConfig.from_hf(LLAMA)
    graphdef, params = init_params(cfg, seed=1)
    if mesh is not None:

        def put(path, x):
            sharding = param_sharding(mesh, tuple(str(k.key) for k in path), x.shape)
            host = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda idx: host[idx])

        pure = jax.tree_util.tree_map_with_path(put, nnx.to_pure_dict(params))
        nnx.replace_by_pure_dict(params, pure)
    return LM(cfg, graphdef, params, mesh=mesh)


def main(out: Path) -> None:
    mesh = make_mesh({"fsdp": 2, "tensor": 2})
    assert jax.process_count() > 1 and mesh.size == jax.device_count()
    result = run(tiny_lm(mesh))
    if jax.process_index() == 0:
        np.savez(out / "generation.npz", **result)


if __name__ == "__main__":
    initialize_distributed()  # before any device is touched
    main(Path(sys.argv[1]))
