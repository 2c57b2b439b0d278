"""`LM`: a loaded model (config, graphdef, params, tokenizer) and its pure jitted forward.

The model is split once into `(graphdef, params)`; `forward(graphdef, params, ...)` is a
pure function under `jax.jit` that merges them inside (the flax performance-guide
pattern), so params are an ordinary pytree that can be sharded, donated or differentiated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import (
    KVCache,
    LoraInput,
    Transformer,
    default_positions,
    rotary_tables,
)
from emgeo_jax.models.scan import (
    DEFAULT_RUN,
    BlockContext,
    LayerInputs,
    RunOptions,
    scan_blocks,
)
from emgeo_jax.models.steering import Steering, select_positions
from emgeo_jax.models.taps import TapReduction, Taps
from emgeo_jax.parallel import move_to, param_sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
BATCH_AXES = ("data", "fsdp")  # the mesh axes rows are split over (parallel.MESH_RULES["batch"])


def batch_multiple(mesh: jax.sharding.Mesh | None) -> int:
    """How many pieces a mesh cuts a batch's rows into (`data x fsdp`; 1 without a mesh)."""
    if mesh is None:
        return 1
    return int(np.prod([mesh.shape.get(a, 1) for a in BATCH_AXES]))


def pad_rows(
    batch: dict[str, np.ndarray], multiple: int, blank: Sequence[str] = ()
) -> dict[str, np.ndarray]:
    """`batch` (`{name: [B, ...]}`) with rows added until `B` is a multiple of `multiple`:
    copies of the last row (valid inputs, so no NaN from an all-padding row), with the arrays
    named in `blank` zeroed in the added rows (`answer_mask`, so they add nothing to a
    loss). Callers drop the added rows' outputs (`out[:B]`). On a mesh this replaces
    replicating a batch that `data x fsdp` does not divide."""
    b = len(next(iter(batch.values())))
    extra = -b % multiple
    if not extra:
        return dict(batch)
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        tail = np.repeat(v[-1:], extra, axis=0)
        if k in blank:
            tail = np.zeros_like(tail)
        out[k] = np.concatenate([v, tail])
    return out


def resolve_dtype(dtype: Any) -> Any:
    """`"float32"`/`"bfloat16"` (or a jnp dtype) -> jnp dtype."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} not supported; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    return dtype


def abstract_model(cfg: ModelConfig, dtype: Any = "float32") -> tuple[nnx.GraphDef, nnx.State]:
    """`(graphdef, abstract params)` without allocating weights (leaves: ShapeDtypeStruct)."""
    dt = resolve_dtype(dtype)
    model = nnx.eval_shape(lambda: Transformer(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def init_params(
    cfg: ModelConfig, seed: int = 0, dtype: Any = "float32"
) -> tuple[nnx.GraphDef, nnx.State]:
    """A randomly initialised model (tests, benchmarks, `emgeo plan`)."""
    dt = resolve_dtype(dtype)
    return nnx.split(Transformer(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(seed)))


def place_params(params: nnx.State, mesh: jax.sharding.Mesh) -> nnx.State:
    """`params` laid out on `mesh` by the partition rules (replicated on a pure `data` mesh).
    A parameter already so placed is kept (renamed by `move_to` if only its sharding's name
    differs, e.g. one device's array on a one-device mesh: a model is never copied);
    device arrays of this process move device to device (`jax.device_put`). Only host arrays,
    or a single process's copy joining a mesh across processes (each process must then hold
    the same full parameters), go through the host."""
    pure = nnx.to_pure_dict(params)
    one_process = jax.process_count() == 1

    def put(key_path, x):
        path = tuple(str(getattr(k, "key", k)) for k in key_path)
        sharding = param_sharding(mesh, path, x.shape)
        if isinstance(x, jax.Array):
            if x.sharding.is_equivalent_to(sharding, x.ndim):
                return move_to(x, sharding)  # renamed, not copied
            if one_process or not x.is_fully_addressable:
                return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    placed = jax.tree_util.tree_map_with_path(put, pure)
    out = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(out, placed)
    return out


def unstack_layers(
    graphdef: nnx.GraphDef, params: nnx.State, *, release: bool = False
) -> tuple[nnx.GraphDef, nnx.State]:
    """`(graphdef, params)` of the same model with unstacked layers (`Transformer(...,
    scan_layers=False)`): each stacked `[L, ...]` parameter split into `L` per-block buffers
    on the devices (and shardings, minus the layer axis) it is on. `release`: delete each
    stacked array once split (the caller must own `params`), so at most one parameter is
    held twice during the conversion and no second copy of the model is kept."""
    model = nnx.merge(graphdef, params)
    if not model.scan_layers:
        return graphdef, params
    cfg, dt = model.config, model.embed.embedding[...].dtype
    del model
    unstacked = nnx.eval_shape(
        lambda: Transformer(cfg, dtype=dt, param_dtype=dt, scan_layers=False, rngs=nnx.Rngs(0))
    )
    new_graphdef, new_params = nnx.split(unstacked)
    pure = nnx.to_pure_dict(params)
    out = {key: value for key, value in pure.items() if key != "layers"}
    out["layers"] = {i: {} for i in range(cfg.num_layers)}

    def split(key_path, stacked):
        path = [getattr(k, "key", k) for k in key_path]
        for i in range(cfg.num_layers):
            node = out["layers"][i]
            for name in path[:-1]:
                node = node.setdefault(name, {})
            node[path[-1]] = stacked[i]
        if release and isinstance(stacked, jax.Array):
            stacked.delete()

    jax.tree_util.tree_map_with_path(split, pure["layers"])
    nnx.replace_by_pure_dict(new_params, out)
    return new_graphdef, new_params


class ForwardOutput(NamedTuple):
    """What a model function returns; fields not asked for are None.

    `logits [B, T, V]` float32 (None when not computed). The tapped sites
    (`emgeo_jax.models.taps`: `resid_post`, `attn_out`, `mlp_out`, `attn_in`, `mlp_in`,
    `mlp_hidden`), per the `Taps` kind: `[L', B, T, W]` ("full"), float32 masked sums
    `[L', B, W]` ("pooled") or `[L', B, W]` at the last pooled token ("last"), for the `L'`
    blocks run (row i = layer start + i; `resid_post[l]` = HF `hidden_states[l + 1]`).
    `counts [B]`: tokens pooled per row (with "pooled" taps). `cache`: the updated
    `KVCache`."""

    logits: jax.Array | None
    resid_post: jax.Array | None = None
    attn_out: jax.Array | None = None
    mlp_out: jax.Array | None = None
    counts: jax.Array | None = None
    cache: KVCache | None = None
    attn_in: jax.Array | None = None
    mlp_in: jax.Array | None = None
    mlp_hidden: jax.Array | None = None


def causal_mask(attention_mask: jax.Array) -> jax.Array:
    """`[B, T, T]` bool: query t may attend to key s <= t when s is a real token
    (`attention_mask [B, T]`, 1 = token)."""
    t = attention_mask.shape[1]
    return jnp.tril(jnp.ones((t, t), bool))[None] & attention_mask.astype(bool)[:, None, :]


def cache_mask(cache: KVCache, attention_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For `T` new tokens (`attention_mask [B, T]`) written at slots `cache.index ..`:
    `(mask [B, T, S], key_mask [B, S])`: each new token attends to every earlier real slot
    and itself, and the cache's slot mask with the new tokens in it."""
    t = attention_mask.shape[1]
    key_mask = jax.lax.dynamic_update_slice(
        cache.mask, attention_mask.astype(jnp.int32), (0, cache.index)
    )
    slots = jnp.arange(cache.mask.shape[1])
    causal = slots[None, :] <= (cache.index + jnp.arange(t))[:, None]
    return causal[None] & key_mask.astype(bool)[:, None, :], key_mask


def split_blocks(model: Transformer) -> tuple[nnx.GraphDef, Any]:
    """`(block graphdef, block params)`: the stacked block's params (`[L, ...]` leaves), or
    for unstacked layers a list of the `L` blocks' own params (they share one graphdef)."""
    if model.scan_layers:
        return nnx.split(model.layers)
    block_def = nnx.split(model.layers[0])[0]
    return block_def, [nnx.split(block)[1] for block in model.layers]


def _run(
    model: Transformer,
    h: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    pool_mask: jax.Array,
    *,
    steering: Steering | None,
    taps: Taps | None,
    is_generated: jax.Array | None,
    options: RunOptions,
    index: jax.Array | int = 0,
    kv: tuple[jax.Array, jax.Array] | None = None,
    lora: LoraInput | None = None,
    start: int = 0,
    stop: int | None = None,
    key_mask: jax.Array | None = None,
) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None, ForwardOutput]:
    """Blocks `start .. stop-1` of `model` on the residual `h [B, T, D]` (`scan_blocks`):
    returns `(h, kv, ForwardOutput without logits or cache)`. `key_mask [B, S]`: given when
    `mask` is causal from `index` over those slots (attention kernels may run)."""
    taps = Taps() if taps is None else taps
    pool = pool_mask if taps.pool_mask is None else taps.pool_mask
    selected = None
    if steering is not None:
        gen = jnp.zeros(h.shape[:2], bool) if is_generated is None else is_generated
        selected = select_positions(steering, gen)
    sin, cos = rotary_tables(model.config, positions)
    variant = None if steering is None else steering.variant
    ctx = BlockContext(sin, cos, mask, index, selected, TapReduction.of(pool), key_mask, variant)
    block_def, block_params = split_blocks(model)
    xs = LayerInputs.of(block_params, steering, lora, start, stop)
    h, kv, tapped = scan_blocks(block_def, xs, h, ctx, taps=taps, options=options, kv=kv, lora=lora)
    counts = jnp.sum(ctx.reduction.weights, axis=1) if taps.pools else None
    return h, kv, ForwardOutput(None, counts=counts, **tapped)


def _num_layers(cfg: ModelConfig, num_layers: int | None) -> int:
    n = cfg.num_layers if num_layers is None else num_layers
    if not 1 <= n <= cfg.num_layers:
        raise ValueError(f"num_layers={n}: the model has {cfg.num_layers} blocks")
    return n


@functools.partial(jax.jit, static_argnames=("graphdef", "num_layers", "return_logits", "options"))
def forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    input_ids: jax.Array,
    positions: jax.Array,
    attention_mask: jax.Array,
    *,
    steering: Steering | None = None,
    taps: Taps | None = None,
    is_generated: jax.Array | None = None,
    num_layers: int | None = None,
    return_logits: bool = True,
    options: RunOptions = DEFAULT_RUN,
) -> ForwardOutput:
    """Logits and taps of whole sequences. `input_ids, positions, attention_mask,
    is_generated: [B, T]` (mask: 1 = real token; `is_generated`: the tokens steering's
    "prompt"/"generated" modes treat as generated, default none). `steering` edits the
    output of each block; `taps` picks sites to read (default none). `num_layers` (static)
    runs only the first blocks and then no LM head (extraction); `return_logits=False` skips
    the head too. `steering` and `taps` are data: changing them never recompiles."""
    model = nnx.merge(graphdef, params)
    n = _num_layers(model.config, num_layers)
    h, _, out = _run(
        model,
        model.embed(input_ids),
        positions,
        causal_mask(attention_mask),
        attention_mask,
        steering=steering,
        taps=taps,
        is_generated=is_generated,
        options=options,
        stop=n,
        key_mask=attention_mask,
    )
    logits = model.head(h) if return_logits and n == model.config.num_layers else None
    return out._replace(logits=logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "layer", "options"))
def resume_from(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    resid: jax.Array,
    layer: int,
    positions: jax.Array,
    attention_mask: jax.Array,
    *,
    steering: Steering | None = None,
    taps: Taps | None = None,
    is_generated: jax.Array | None = None,
    options: RunOptions = DEFAULT_RUN,
) -> ForwardOutput:
    """Continue a forward pass from `resid [B, T, D]`, the residual entering block `layer`
    (static; `resid_post[layer - 1]`, or the embeddings for 0): blocks `layer .. L-1` and
    the LM head. Taps cover those blocks only (row i = layer `layer + i`); `layer = L` runs
    only the head. For editing one layer's output and reading the effect downstream."""
    model = nnx.merge(graphdef, params)
    if not 0 <= layer <= model.config.num_layers:
        raise ValueError(f"layer={layer} outside 0..num_layers={model.config.num_layers}")
    want = (*attention_mask.shape, model.config.hidden_size)
    if resid.shape != want:
        raise ValueError(f"resid {resid.shape} is not [B, T, D]={want}")
    h, _, out = _run(
        model,
        resid.astype(model.embed.dtype),
        positions,
        causal_mask(attention_mask),
        attention_mask,
        steering=steering,
        taps=taps,
        is_generated=is_generated,
        options=options,
        start=layer,
        key_mask=attention_mask,
    )
    return out._replace(logits=model.head(h))


def train_forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    input_ids: jax.Array,
    positions: jax.Array,
    attention_mask: jax.Array,
    *,
    lora: LoraInput | None = None,
    steering: Steering | None = None,
    is_generated: jax.Array | None = None,
    options: RunOptions = DEFAULT_RUN,
) -> jax.Array:
    """Logits `[B, T, V]` for a training loss (pure, differentiable; jit the caller): as
    `forward`, with unmerged LoRA adapters applied inside the scan (`LoraInput`, with its
    dropout) and the memory options of `options` (`remat`, `resid_sharding`)."""
    model = nnx.merge(graphdef, params)
    h, _, _ = _run(
        model,
        model.embed(input_ids),
        positions,
        causal_mask(attention_mask),
        attention_mask,
        steering=steering,
        taps=None,
        is_generated=is_generated,
        options=options,
        lora=lora,
        key_mask=attention_mask,
    )
    return model.head(h)


def prefill(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    input_ids: jax.Array,
    positions: jax.Array,
    attention_mask: jax.Array,
    *,
    steering: Steering | None = None,
    is_generated: jax.Array | None = None,
    options: RunOptions = DEFAULT_RUN,
) -> tuple[KVCache, jax.Array]:
    """Write left-padded prompts `input_ids, positions, attention_mask [B, T]` into `cache`
    at slots `cache.index ..`. Returns `(cache, logits [B, V])`: the updated cache and the
    float32 logits after each row's last token (the next token's distribution). Pure; jit
    the caller (`emgeo_jax.generate.loop`)."""
    model = nnx.merge(graphdef, params)
    mask, key_mask = cache_mask(cache, attention_mask)
    h, kv, _ = _run(
        model,
        model.embed(input_ids),
        positions,
        mask,
        attention_mask,
        steering=steering,
        taps=None,
        is_generated=is_generated,
        options=options,
        index=cache.index,
        kv=(cache.k, cache.v),
        key_mask=key_mask,
    )
    cache = KVCache(*kv, mask=key_mask, index=cache.index + input_ids.shape[1])
    return cache, model.head(h[:, -1:])[:, 0]


def decode_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    tokens: jax.Array,
    positions: jax.Array,
    *,
    steering: Steering | None = None,
    taps: Taps | None = None,
    options: RunOptions = DEFAULT_RUN,
) -> ForwardOutput:
    """Feed one generated token per row, `tokens, positions [B]`, at slot `cache.index`.
    Returns logits `[B, 1, V]`, the taps (`T = 1`) and the updated cache. The tokens count
    as generated for steering's position modes. Pure; jit the caller."""
    model = nnx.merge(graphdef, params)
    ones = jnp.ones((tokens.shape[0], 1), jnp.int32)
    mask, key_mask = cache_mask(cache, ones)
    h, kv, out = _run(
        model,
        model.embed(tokens[:, None]),
        positions[:, None],
        mask,
        ones,
        steering=steering,
        taps=taps,
        is_generated=ones.astype(bool),
        options=options,
        index=cache.index,
        kv=(cache.k, cache.v),
        key_mask=key_mask,
    )
    cache = KVCache(*kv, mask=key_mask, index=cache.index + 1)
    return out._replace(logits=model.head(h), cache=cache)


def score_tree(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    node_ids: jax.Array,
    positions: jax.Array,
    ancestors: jax.Array,
    *,
    steering: Steering | None = None,
    options: RunOptions = DEFAULT_RUN,
) -> jax.Array:
    """Logits `[B, M, V]` of every node of a token tree in one pass (tree attention), after
    a prefilled prompt in `cache`. `node_ids, positions [B, M]`; `ancestors [B, M, M]` bool
    (`[i, j]` True when node j is node i or on its path from the root). Node 0 is the root
    (the prompt's last token); nodes at later positions count as generated for steering's
    position modes. Each node attends to the cached prompt and its own ancestors. The cache
    is not returned (branches must not see each other). Pure; jit the caller."""
    model = nnx.merge(graphdef, params)
    mask, _ = cache_mask(cache, jnp.ones(node_ids.shape, jnp.int32))
    own = jax.lax.dynamic_update_slice(
        jnp.ones(mask.shape, bool), ancestors.astype(bool), (0, 0, cache.index)
    )
    h, _, _ = _run(
        model,
        model.embed(node_ids),
        positions,
        mask & own,
        jnp.ones(node_ids.shape, jnp.int32),
        steering=steering,
        taps=None,
        is_generated=positions > positions[:, :1],
        options=options,
        index=cache.index,
        kv=(cache.k, cache.v),
    )
    return model.head(h)


@dataclasses.dataclass
class LM:
    """A loaded model. `params` is an `nnx.State` pytree (possibly sharded over `mesh`).

    `mesh` is the one source of truth for placement: when set, `params` live on it by the
    `emgeo_jax.parallel` rules (`emgeo_jax.load(..., mesh=...)` restores them there), and
    generation, extraction, scoring and training split their batch rows over its
    `data x fsdp` axes (`place_rows`), padding batches those axes do not divide. Without a
    mesh everything runs where the params are (one device). `attention`: the attention
    implementation every entry point runs (`RunOptions.attention`; `emgeo_jax.load(...,
    attention=...)` picks the backend's best by default)."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Any = None
    mesh: jax.sharding.Mesh | None = None
    source: str = ""
    attention: str = "xla"

    @property
    def scan_layers(self) -> bool:
        """True when the blocks' parameters are stacked `[L, ...]` (run by one scan); False
        after `unstacked()` (one buffer per block, run unrolled: decode reads weights in
        place)."""
        return "layers" in self.params and 0 not in self.params["layers"]

    def unstacked(self, *, release: bool = False) -> LM:
        """This model with unstacked layers (`unstack_layers`; `release`: free the stacked
        arrays, which this LM then no longer holds). Training needs the stacked layout; every
        inference function runs on both with the same results."""
        graphdef, params = unstack_layers(self.graphdef, self.params, release=release)
        return dataclasses.replace(self, graphdef=graphdef, params=params)

    def run_options(self, **fields: Any) -> RunOptions:
        """How this model's calls run: its attention implementation (`attention`, one of
        `tpu_attention.IMPLEMENTATIONS`; the splash kernel split over `mesh`) and `fields`
        (e.g. `resid_sharding`)."""
        mesh = self.mesh if self.attention == "splash" else None
        return RunOptions(attention=self.attention, mesh=mesh, **fields)

    @property
    def dtype(self):
        return jax.tree.leaves(self.params["embed"])[0].dtype

    def forward(
        self,
        input_ids,
        attention_mask=None,
        positions=None,
        *,
        steering: Steering | None = None,
        taps: Taps | None = None,
        is_generated=None,
        num_layers: int | None = None,
        return_residual: bool = True,
        return_logits: bool = True,
        resid_in=None,
        start_layer: int = 0,
    ) -> ForwardOutput:
        """Logits `[B, T, V]` and the residual stream after every block `[L, B, T, D]`
        (`resid_post[l]` = HF `hidden_states[l + 1]`). `attention_mask [B, T]`: 1 = token,
        0 = padding (default: all ones); `positions` default to counting real tokens, so
        left padding does not shift rotary positions. `taps` (a `Taps`) replaces the
        default of full residuals (`return_residual`); `steering` edits block outputs;
        `is_generated [B, T]` marks tokens that steering's "prompt"/"generated" modes
        treat as generated; `num_layers` runs only the first blocks (no logits then);
        `resid_in [B, T, D]` and `start_layer` resume from the residual entering that block
        (`resume_from`; `num_layers`, `return_logits` do not apply then)."""
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if positions is None:
            positions = default_positions(attention_mask)
        if taps is None and return_residual:
            taps = Taps(resid="full")
        if is_generated is not None:
            is_generated = jnp.asarray(is_generated, bool)
        positions = jnp.asarray(positions, jnp.int32)
        if resid_in is not None:
            return resume_from(
                self.graphdef,
                self.params,
                jnp.asarray(resid_in),
                start_layer,
                positions,
                attention_mask,
                steering=steering,
                taps=taps,
                is_generated=is_generated,
                options=self.run_options(),
            )
        if start_layer:
            raise ValueError(f"start_layer={start_layer} needs resid_in, the residual entering it")
        return forward(
            self.graphdef,
            self.params,
            input_ids,
            positions,
            attention_mask,
            steering=steering,
            taps=taps,
            is_generated=is_generated,
            num_layers=num_layers,
            return_logits=return_logits,
            options=self.run_options(),
        )

    @property
    def batch_multiple(self) -> int:
        """Rows of a batch on `mesh` come in multiples of this (`data x fsdp`; 1 without)."""
        return batch_multiple(self.mesh)

    def on_mesh(self, mesh: jax.sharding.Mesh) -> LM:
        """This model with its params moved onto `mesh` by the partition rules (device to
        device, `jax.device_put`; no host copy) and `mesh` set. Loading onto the mesh
        (`emgeo_jax.load(src, mesh=...)`) is the way for big models; this is for a model
        already in memory (tests, a second mesh)."""
        return dataclasses.replace(self, params=place_params(self.params, mesh), mesh=mesh)

    def place_rows(self, batch: dict[str, Any], blank: Sequence[str] = ()) -> tuple[dict, int]:
        """`({name: rows [B', ...]}, B)`: the batch padded to a multiple of `batch_multiple`
        (`pad_rows`, `blank` arrays zeroed in added rows) and, on a mesh, placed with rows
        over `data x fsdp` (each process transfers only the rows of its own devices; every
        process passes the same batch). Slice outputs `[:B]`. Without a mesh: `jnp` arrays."""
        b = len(next(iter(batch.values())))
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in batch.items()}, b
        from emgeo_jax.parallel import batch_sharding

        padded = pad_rows(batch, self.batch_multiple, blank)
        placed = {
            k: jax.make_array_from_callback(
                v.shape, batch_sharding(self.mesh, v.ndim), lambda i, v=v: v[i]
            )
            for k, v in padded.items()
        }
        return placed, b

    def param_count(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))
