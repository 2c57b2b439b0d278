"""Where generation keeps its arrays on a mesh (`Layout`), and placing padded prompts there.

On a mesh (`lm.mesh`, set by `emgeo_jax.load(..., mesh=...)`), prompts and the KV cache are
split over the batch (`parallel.ACTIVATION_AXES` "tokens", "kv_cache") and the residual is
pinned: the prefill's rows over `data x fsdp` with each layer's weights all-gathered, a decode
step's `D` over `fsdp` so the weights stay in place (see the `emgeo_jax.parallel` docstring).
Single-device runs are left unconstrained (layout None).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import KVCache, init_cache
from emgeo_jax.models.lm import LM
from emgeo_jax.parallel import activation_sharding


class Layout(NamedTuple):
    """Where generation keeps its arrays on a mesh: `tokens` for `ids, mask [B, T]`, `cache`
    (a `KVCache` of shardings: `k, v [L, B, K, S, Dh]` by the "kv_cache" rule, or per layer
    for unstacked layers, `mask [B, S]`,
    `index` replicated), and the residual pins of `prefill` (`[B, T, D]`, "hidden") and of
    each `decode` step (`[B, 1, D]`, "step_hidden")."""

    tokens: NamedSharding
    cache: KVCache
    prefill_resid: NamedSharding
    decode_resid: NamedSharding


def generation_layout(
    mesh: Mesh,
    cfg: ModelConfig,
    batch: int,
    prompt_len: int,
    cache_len: int,
    *,
    per_layer: bool = False,
) -> Layout:
    """The `Layout` of `batch` prompts of `prompt_len` tokens with `cache_len` cache slots
    (`per_layer`: one cache buffer per layer, each split as a layer of the stacked one)."""
    kv = (cfg.num_layers, batch, cfg.num_kv_heads, cache_len, cfg.head_dim)
    kv_sharding = activation_sharding(mesh, "kv_cache", kv)
    if per_layer:
        layer_sharding = NamedSharding(mesh, PartitionSpec(*kv_sharding.spec[1:]))
        kv_sharding = (layer_sharding,) * cfg.num_layers
    cache = KVCache(
        k=kv_sharding,
        v=kv_sharding,
        mask=activation_sharding(mesh, "cache_mask", (batch, cache_len)),
        index=NamedSharding(mesh, PartitionSpec()),
    )
    d = cfg.hidden_size
    return Layout(
        tokens=activation_sharding(mesh, "tokens", (batch, prompt_len)),
        cache=cache,
        prefill_resid=activation_sharding(mesh, "hidden", (batch, prompt_len, d)),
        decode_resid=activation_sharding(mesh, "step_hidden", (batch, 1, d)),
    )


def place_prompts(
    lm: LM, ids: np.ndarray, mask: np.ndarray, cache_len: int
) -> tuple[jax.Array, jax.Array, KVCache, Layout | None]:
    """Padded prompts `ids, mask [B, T]` and an empty `KVCache` of `cache_len` slots, placed
    for `lm`: without `lm.mesh` (or on a one-device mesh) as they are (layout None); on
    `lm.mesh` by `generation_layout` (returned), the cache allocated where it stays. Every
    process passes the same prompts; `B` must be a multiple of `lm.batch_multiple`
    (`prompts.pad_prompts`)."""
    cfg = lm.config
    per_layer = not lm.scan_layers
    make_cache = functools.partial(
        init_cache, cfg, len(ids), cache_len, lm.dtype, per_layer=per_layer
    )
    mesh = lm.mesh
    if mesh is None or mesh.size == 1:
        return jnp.asarray(ids), jnp.asarray(mask), make_cache(), None
    if len(ids) % lm.batch_multiple:
        raise ValueError(
            f"{len(ids)} prompt rows on a mesh splitting rows {lm.batch_multiple} ways; "
            "pad them with `pad_prompts` first"
        )
    layout = generation_layout(mesh, cfg, *ids.shape, cache_len, per_layer=per_layer)
    ids, mask = (
        jax.make_array_from_callback(x.shape, layout.tokens, lambda i, x=x: x[i])
        for x in (ids, mask)
    )
    return ids, mask, jax.jit(make_cache, out_shardings=layout.cache)(), layout
