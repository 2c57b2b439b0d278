"""One process of a multi-process forward (run by launch/local.sh; see tests/test_scale.py).

    python tests/multiprocess_forward.py OUT_DIR

Every process builds the same tiny random model, takes its own rows of the batch, and runs
the jitted forward on a mesh spanning all processes' devices (parameters split over
`fsdp x tensor`, batch over `data x fsdp`). Process 0 writes the gathered logits and
residual stream to OUT_DIR.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import default_positions
from emgeo_jax.models.lm import forward, init_params
from emgeo_jax.models.taps import Taps
from emgeo_jax.parallel import (
    batch_sharding,
    initialize_distributed,
    make_mesh,
    param_sharding,
)
from tests.tiny_models import LLAMA, padded_batch

BATCH_LENGTHS = [8, 5, 8, 3, 8, 6, 2, 7]


def main(out: Path) -> None:
    cfg = ModelConfig.from_hf(LLAMA)
    graphdef, host_params = init_params(cfg, seed=1)
    mesh = make_mesh({"fsdp": 2, "tensor": 2})
    assert jax.process_count() > 1 and mesh.size == jax.device_count()

    def put(path, x):
        sharding = param_sharding(mesh, tuple(str(k.key) for k in path), x.shape)
        host = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: host[idx])

    params = jax.tree_util.tree_map_with_path(put, nnx.to_pure_dict(host_params))
    nnx.replace_by_pure_dict(host_params, params)
    ids, mask = padded_batch(cfg.vocab_size, BATCH_LENGTHS, seed=2)
    pos = np.asarray(default_positions(mask))
    rows = len(BATCH_LENGTHS) // jax.process_count()
    mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
    sharding = batch_sharding(mesh, 2)
    ids, pos, mask = (
        jax.make_array_from_process_local_data(sharding, a[mine]) for a in (ids, pos, mask)
    )
    result = forward(graphdef, host_params, ids, pos, mask, taps=Taps(resid="full"))
    logits, resid = multihost_utils.process_allgather(
        (result.logits, result.resid_post), tiled=True
    )
    if jax.process_index() == 0:
        np.save(out / "logits.npy", np.asarray(logits))
        np.save(out / "resid.npy", np.asarray(resid))


if __name__ == "__main__":
    initialize_distributed()  # before any device is touched
    main(Path(sys.argv[1]))
