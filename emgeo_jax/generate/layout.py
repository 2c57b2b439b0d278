"""Where generation keeps its arrays on a mesh (`Layout`), and placing padded prompts there.

On a mesh (`lm.mesh`, set by `emgeo_jax.load(..., mesh=...)`), prompts and the KV cache are
split over the batch (`parallel.ACTIVATION_AXES` "tokens", "kv_cache") and the residual is
pinned: the prefill's rows over `data x fsdp` with each layer's weights all-gathered, a decode
step's `D` over `fsdp` so the weights stay in place (see the `emgeo_jax.parallel` docstring).
Every other argument of `prefill`, `decode` and `score_trie` is placed too (`place_replicated`,
`place_decode_args`): rows split like the prompts, small host-made arrays (steering, sampling,
trie) on every device. The calls then run exactly the programs `emgeo plan` compiles from the
same `Layout` (a plan's executable is the call's: on a chip it compiles once). A model loaded
without a mesh is left unconstrained (layout None); on a one-device mesh nothing is pinned.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import KVCache, cache_shapes, init_cache
from emgeo_jax.models.lm import LM
from emgeo_jax.parallel import activation_sharding, move_to, sharded_zeros


class Layout(NamedTuple):
    """Where generation keeps its arrays on a mesh: `tokens` for `ids, mask [B, T]`, `cache`
    (a `KVCache` of shardings: `k, v [L, B, K, S, Dh]` by the "kv_cache" rule, or per layer
    for unstacked layers, `mask [B, S]`, `index` replicated), the residual pins of `prefill`
    (`[B, T, D]`, "hidden") and of each `decode` step (`[B, 1, D]`, "step_hidden"; both None
    on a one-device mesh), `rows` for per-row results `[B, ...]` (split like the prompts) and
    `replicated` for what every device holds whole."""

    tokens: NamedSharding
    cache: KVCache
    prefill_resid: NamedSharding | None
    decode_resid: NamedSharding | None
    rows: NamedSharding
    replicated: NamedSharding


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
    pinned = mesh.size > 1  # one device: nothing to pin
    tokens = activation_sharding(mesh, "tokens", (batch, prompt_len))
    prefill_resid = activation_sharding(mesh, "hidden", (batch, prompt_len, d))
    decode_resid = activation_sharding(mesh, "step_hidden", (batch, 1, d))
    return Layout(
        tokens=tokens,
        cache=cache,
        prefill_resid=prefill_resid if pinned else None,
        decode_resid=decode_resid if pinned else None,
        rows=NamedSharding(mesh, PartitionSpec(tokens.spec[0] if tokens.spec else None)),
        replicated=NamedSharding(mesh, PartitionSpec()),
    )


def _from_host(x, sharding: NamedSharding) -> jax.Array:
    """A global array split by `sharding` holding `x`, a value every process holds whole;
    `x` stays valid. An array already on the mesh, or any device array on one process, goes
    device to device (`move_to`); otherwise each process places its devices' part from its
    host copy."""
    if isinstance(x, jax.Array) and (jax.process_count() == 1 or not x.is_fully_addressable):
        return move_to(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])


def place_replicated(layout: Layout | None, tree):
    """`tree`'s small host-made arrays (steering, sampling, a trie: the same on every process)
    on every device of `layout`'s mesh; `tree` as it is without a layout."""
    if layout is None:
        return tree
    return jax.tree.map(lambda x: _from_host(x, layout.replicated), tree)


def place_prompts(
    lm: LM, ids: np.ndarray, mask: np.ndarray, cache_len: int
) -> tuple[jax.Array, jax.Array, KVCache, Layout | None]:
    """Padded prompts `ids, mask [B, T]` and an empty `KVCache` of `cache_len` slots, placed
    for `lm`: without `lm.mesh` as they are (layout None); on `lm.mesh` (one device or
    more) by `generation_layout` (returned), the cache allocated where it stays. Every
    process passes the same prompts; `B` must be a multiple of `lm.batch_multiple`
    (`prompts.pad_prompts`)."""
    cfg = lm.config
    per_layer = not lm.scan_layers
    mesh = lm.mesh
    if mesh is None:
        cache = init_cache(cfg, len(ids), cache_len, lm.dtype, per_layer=per_layer)
        return jnp.asarray(ids), jnp.asarray(mask), cache, None
    if len(ids) % lm.batch_multiple:
        raise ValueError(
            f"{len(ids)} prompt rows on a mesh splitting rows {lm.batch_multiple} ways; "
            "pad them with `pad_prompts` first"
        )
    layout = generation_layout(mesh, cfg, *ids.shape, cache_len, per_layer=per_layer)
    ids, mask = (_from_host(x, layout.tokens) for x in (ids, mask))
    shapes = cache_shapes(cfg, len(ids), cache_len, lm.dtype, per_layer=per_layer)
    return ids, mask, sharded_zeros(shapes, layout.cache), layout
