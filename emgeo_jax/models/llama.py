"""The Llama / Qwen2 decoder in Flax NNX, with its layers stacked and run by one `lax.scan`.

Both families are the same network: token embedding, `L` pre-norm decoder blocks
(RMSNorm -> rotary GQA attention -> residual add, RMSNorm -> SwiGLU MLP -> residual add),
a final RMSNorm and an LM head (tied to the embedding or not). They differ only in config:
Qwen2 has q/k/v biases; Llama-3 has frequency-scaled rope. Axis names are those of
`emgeo_jax.models.config` (B, T, D, L, H, K, Dh, F, V).

Weights use the Flax layout `kernel [in, out]`; `emgeo_jax.convert.hf` maps HF names to
these paths. The stacked layer parameters carry a leading `[L]` axis.

The residual stream "after block l" (`resid_post[l]`) is HF `hidden_states[l + 1]`.

Numerics (`dtype`, the compute dtype, e.g. bfloat16 as on accelerators): parameters, the
residual stream, projections, the KV cache and the MLP are in `dtype`; the RMSNorm statistics,
rotary embedding, attention scores and softmax, steering edits, pooled taps and the logits are
float32 (matmuls feeding them accumulate in float32 via `preferred_element_type`). With
`dtype=float32` all of these are simply float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from emgeo_jax.models.config import ModelConfig, rope_inv_freq
from emgeo_jax.models.params import LORA_MODULES
from emgeo_jax.steer import Steering, Taps, apply_steering, reduce_tap, select_positions


class RMSNorm(nnx.Module):
    """RMSNorm computed in fp32 and cast back before the scale, as transformers does."""

    def __init__(self, dim: int, eps: float, *, param_dtype, rngs: nnx.Rngs):
        del rngs
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)


def rotary_tables(cfg: ModelConfig, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
    """`sin, cos` of shape `[B, T, Dh/2]` (fp32) for integer `positions [B, T]`."""
    inv_freq = jnp.asarray(rope_inv_freq(cfg), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array:
    """Rotate `x [B, T, heads, Dh]` in the HF "rotate_half" layout (first/second half pairs)."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


@struct.dataclass
class LoraInput:
    """Unmerged LoRA factors, applied inside the layer scan (training, LoRA dropout).

    `factors[module] = {"a": [L, in, r], "b": [L, r, out]}` (float32) for some of
    `LORA_MODULES`, zero rows for blocks without an adapter, `b` already multiplied by the
    LoRA scale. At block `l` the module's output gains `dropout(x) @ a[l] @ b[l]` (float32,
    cast to the output dtype), `x [B, T, in]` its input: PEFT's `lora_dropout`, zeroing each
    element of the adapter's input (never the base path's) with probability `rate` and
    scaling the rest by `1 / (1 - rate)`; the mask is `jax.random.bernoulli(k, 1 - rate,
    x.shape)` with `k = fold_in(fold_in(key, l), LORA_MODULES.index(module))`. `rate` is
    static; with `rate = 0`, `key` is unused. Inside the scan the same class holds one
    block's factors and `fold_in(key, l)`."""

    factors: dict[str, dict[str, jax.Array]]
    key: jax.Array | None = None
    rate: float = struct.field(pytree_node=False, default=0.0)

    def project(self, module: nnx.Linear, x: jax.Array, name: str) -> jax.Array:
        """`module(x)` plus this block's adapter on `name` (if any)."""
        y = module(x)
        if name not in self.factors:
            return y
        h = x.astype(jnp.float32)
        if self.rate > 0:
            key = jax.random.fold_in(self.key, LORA_MODULES.index(name))
            keep = jax.random.bernoulli(key, 1.0 - self.rate, h.shape)
            h = jnp.where(keep, h / (1.0 - self.rate), 0.0)
        f = self.factors[name]
        return y + ((h @ f["a"]) @ f["b"]).astype(y.dtype)


def _project(module: nnx.Linear, x: jax.Array, lora: LoraInput | None, name: str) -> jax.Array:
    return module(x) if lora is None else lora.project(module, x, name)


QUERY_CHUNK = 512
"""Queries per attention chunk (static). A call with more than `QUERY_CHUNK` queries computes
attention for `QUERY_CHUNK` of them at a time, each over all keys (its whole softmax row:
exact, not an approximation), so the float32 scores and probabilities are `[B, K, G, C, S]`
with `C = QUERY_CHUNK` instead of `[B, K, G, T, S]` (for a 7B model at `B = 8, T = S = 2048`
about 3.7 GB per layer instead of 0.9 GB). Shorter calls, every decode step among them, run
in one shot. Read when a model is built (`Attention.query_chunk`, part of the graphdef, so
jitted functions are compiled for the size they use)."""


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Grouped-query attention of `q [B, C, K, G, Dh]` over `k, v [B, S, K, Dh]` with
    `mask [B, C, S]` (True = may attend) -> `[B, C, K, G, Dh]`. Scores `[B, K, G, C, S]` are
    float32 (for bf16 `q, k`: accumulated and returned in float32, never rounded to bf16),
    masked to the float32 minimum (a fully masked row gets uniform weights, no NaN); the
    probabilities are cast to `v.dtype` before mixing the values."""
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * q.shape[-1] ** -0.5
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v)


def chunked_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, chunk: int
) -> jax.Array:
    """`_attend` (same shapes, `C = T`) computed `chunk` queries at a time when `T > chunk`.

    The queries and mask rows are padded to a multiple of `chunk` (padded rows are fully
    masked, their output dropped) and `jax.lax.map` runs one chunk per step against all `S`
    keys, so only one chunk's `[B, K, G, chunk, S]` scores exist at a time. Each step is a
    `jax.checkpoint`: the backward pass recomputes a chunk's probabilities instead of keeping
    all of them. `T <= chunk` is one `_attend` call, nothing else."""
    b, t = q.shape[:2]
    if t <= chunk:
        return _attend(q, k, v, mask)
    n = -(-t // chunk)
    pad = n * chunk - t
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, pad), (0, 0)))
    # [n, B, chunk, ...]: lax.map runs over the leading axis
    q_chunks = jnp.moveaxis(q.reshape(b, n, chunk, *q.shape[2:]), 1, 0)
    mask_chunks = jnp.moveaxis(mask.reshape(b, n, chunk, mask.shape[-1]), 1, 0)
    step = jax.checkpoint(lambda qm: _attend(qm[0], k, v, qm[1]), prevent_cse=False)
    out = jax.lax.map(step, (q_chunks, mask_chunks))  # [n, B, chunk, K, G, Dh]
    return jnp.moveaxis(out, 0, 1).reshape(b, n * chunk, *out.shape[3:])[:, :t]


class Attention(nnx.Module):
    """Rotary grouped-query attention: `H` query heads in `K` groups of `G = H / K`, each
    group sharing one key/value head. Queries are processed `query_chunk` at a time
    (`QUERY_CHUNK` when built; see `chunked_attention`) to bound the score memory."""

    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, h, k, dh = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(d, h * dh, use_bias=cfg.qkv_bias, **lin)
        self.k_proj = nnx.Linear(d, k * dh, use_bias=cfg.qkv_bias, **lin)
        self.v_proj = nnx.Linear(d, k * dh, use_bias=cfg.qkv_bias, **lin)
        self.o_proj = nnx.Linear(h * dh, d, use_bias=cfg.o_bias, **lin)
        self.num_heads, self.num_kv_heads, self.head_dim = h, k, dh
        self.query_chunk = QUERY_CHUNK

    def __call__(
        self,
        x: jax.Array,
        sin: jax.Array,
        cos: jax.Array,
        mask: jax.Array,
        kv: tuple[jax.Array, jax.Array] | None = None,
        index: jax.Array | int = 0,
        lora: LoraInput | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """`x [B, T, D]` -> `([B, T, D], kv)`. Without a cache, `mask [B, T, T]` (True = query
        may attend to key). With `kv = (k, v)`, each `[B, S, K, Dh]`, this call's keys and
        values are written at slots `index .. index+T-1`, attention runs over all `S` slots
        with `mask [B, T, S]`, and the updated `kv` is returned. `lora`: this block's
        unmerged adapters (`LoraInput`). More than `query_chunk` queries are attended in
        chunks (same result, less memory: `chunked_attention`)."""
        b, t, _ = x.shape
        k_heads, group, dh = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        q = _project(self.q_proj, x, lora, "q_proj").reshape(b, t, self.num_heads, dh)
        k = _project(self.k_proj, x, lora, "k_proj").reshape(b, t, k_heads, dh)
        q, k = apply_rotary(q, sin, cos), apply_rotary(k, sin, cos)
        v = _project(self.v_proj, x, lora, "v_proj").reshape(b, t, k_heads, dh)
        if kv is not None:
            start = (0, index, 0, 0)
            kv = tuple(
                jax.lax.dynamic_update_slice(c, n.astype(c.dtype), start)
                for c, n in zip(kv, (k, v), strict=True)
            )
            k, v = kv
        q = q.reshape(b, t, k_heads, group, dh)
        out = chunked_attention(q, k, v, mask, self.query_chunk)
        return _project(self.o_proj, out.reshape(b, t, self.num_heads * dh), lora, "o_proj"), kv


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        lin = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = nnx.Linear(d, f, **lin)
        self.up_proj = nnx.Linear(d, f, **lin)
        self.down_proj = nnx.Linear(f, d, **lin)

    def __call__(self, x: jax.Array, lora: LoraInput | None = None) -> jax.Array:
        gate = _project(self.gate_proj, x, lora, "gate_proj")
        h = jax.nn.silu(gate) * _project(self.up_proj, x, lora, "up_proj")
        return _project(self.down_proj, h, lora, "down_proj")


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, dtype=dtype, **kw)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, dtype=dtype, **kw)

    def __call__(self, x, sin, cos, mask, kv=None, index=0, lora=None):
        """`x [B, T, D]` -> `(output, attn_out, mlp_out, kv)`: the block output and the two
        terms it added to the residual stream (all `[B, T, D]`); `kv`, `lora` as in
        `Attention`."""
        attn, kv = self.attn(self.input_norm(x), sin, cos, mask, kv, index, lora)
        h = x + attn
        mlp = self.mlp(self.post_attn_norm(h), lora)
        return h + mlp, attn, mlp, kv


class KVCache(NamedTuple):
    """A preallocated key/value cache shared by all rows of a batch.

    `k, v [L, B, S, K, Dh]`; `mask [B, S]` int32 (1 = slot holds a real token);
    `index []` int32: the next slot to write (all rows advance together, left padding
    keeps prompts aligned)."""

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    """An empty cache for `batch` rows of `length` slots (prompt + new tokens)."""
    shape = (cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch, length), jnp.int32),
        index=jnp.int32(0),
    )


class ForwardOutput(NamedTuple):
    """What a forward call returns; fields not asked for are None.

    `logits [B, T, V]` float32 (None when `return_logits=False` or blocks were skipped).
    `resid_post`, `attn_out`, `mlp_out`: per the `Taps` kind, `[L', B, T, D]` ("full"),
    masked float32 sums `[L', B, D]` ("pooled") or `[L', B, D]` at the last pooled token
    ("last"), for the `L'` blocks run; `resid_post[l]` = HF `hidden_states[l + 1]`.
    `counts [B]`: tokens pooled per row (with "pooled" taps). `cache`: the updated `KVCache`."""

    logits: jax.Array | None
    resid_post: jax.Array | None
    attn_out: jax.Array | None = None
    mlp_out: jax.Array | None = None
    counts: jax.Array | None = None
    cache: KVCache | None = None


class Transformer(nnx.Module):
    """The whole decoder. `Transformer(cfg, rngs=...)` gives a randomly initialised model;
    converters build it abstractly (`nnx.eval_shape`) and fill in real weights."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.config = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs: nnx.Rngs) -> DecoderBlock:
            return DecoderBlock(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

        self.layers = stacked_blocks(rngs)
        self.final_norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs
        )
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else nnx.Linear(
                cfg.hidden_size,
                cfg.vocab_size,
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                preferred_element_type=jnp.float32,
                rngs=rngs,
            )
        )

    def logits(self, h: jax.Array) -> jax.Array:
        """The LM head on final-normed `h [B, T, D]` -> float32 logits `[B, T, V]`: the
        matmul reads `h` and the weights in the model dtype and accumulates and returns
        float32 (bf16 logits would be rounded to ~3 significant digits)."""
        if self.lm_head is not None:
            return self.lm_head(h)
        embedding = self.embed.embedding[...]
        h = h.astype(embedding.dtype)
        return jnp.dot(h, embedding.T, preferred_element_type=jnp.float32)

    def __call__(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        attention_mask: jax.Array,
        *,
        steering: Steering | None = None,
        taps: Taps | None = None,
        cache: KVCache | None = None,
        is_generated: jax.Array | None = None,
        num_layers: int | None = None,
        return_logits: bool = True,
        resid_in: jax.Array | None = None,
        start_layer: int = 0,
        lora: LoraInput | None = None,
        attend: jax.Array | None = None,
        remat: bool = False,
        resid_sharding: jax.sharding.Sharding | None = None,
    ) -> ForwardOutput:
        """Run the first `num_layers` blocks (default all) and, when all ran, the LM head.

        `input_ids, positions, attention_mask, is_generated: [B, T]` (mask: 1 = real token;
        `is_generated`: True for tokens the model produced, for steering position modes).
        `steering` edits the output of each block inside the scan (see `emgeo_jax.steer`).
        With `cache`, this call's tokens go to slots `cache.index ..` and attend to every
        earlier valid slot; the updated cache is returned. `lora` adds unmerged adapters
        inside the scan (see `LoraInput`). `attend [B, T, T]` (bool, optional) further
        restricts which of this call's own tokens each one sees (ANDed with the causal mask):
        tree attention, e.g. scoring several branching continuations in one call.

        Resuming: with `resid_in [B, T, D]` the scan starts from that residual instead of the
        token embedding, at block `start_layer` (static): blocks `start_layer .. n-1` run on
        `resid_in` = the residual entering block `start_layer` (`resid_post[start_layer-1]`,
        or the embeddings when 0), and taps cover those blocks only (`L' = n - start_layer`,
        row i = layer `start_layer + i`). `start_layer = n` runs no block (only the head).
        `input_ids` still give `B, T`; steering rows and cache slots stay absolute.

        Training memory (both static): `remat` recomputes each block in the backward pass
        (`jax.checkpoint`, `nothing_saveable`: only the residual entering each block is kept,
        `[L, B, T, D]`); `resid_sharding` pins the residual `[B, T, D]` at every block
        boundary (e.g. batch over `data x fsdp`), so the compiler gathers each layer's
        weights rather than splitting activations the way the weights are split."""
        cfg = self.config
        n = cfg.num_layers if num_layers is None else num_layers
        if not 1 <= n <= cfg.num_layers:
            raise ValueError(f"num_layers={n}: the model has {cfg.num_layers} blocks")
        b, t = input_ids.shape
        if start_layer and resid_in is None:
            raise ValueError(f"start_layer={start_layer} needs resid_in, the residual entering it")
        if not 0 <= start_layer <= n:
            raise ValueError(f"start_layer={start_layer} outside 0..num_layers={n}")
        if resid_in is not None and resid_in.shape != (b, t, cfg.hidden_size):
            raise ValueError(f"resid_in {resid_in.shape} is not [B, T, D]={b, t, cfg.hidden_size}")
        sin, cos = rotary_tables(cfg, positions)
        if cache is None:
            causal = jnp.tril(jnp.ones((t, t), bool))
            mask = causal[None] & attention_mask.astype(bool)[:, None, :]
            index = 0
        else:
            index = cache.index
            slots = jnp.arange(cache.mask.shape[1])
            key_mask = jax.lax.dynamic_update_slice(
                cache.mask, attention_mask.astype(jnp.int32), (0, index)
            )
            causal = slots[None, :] <= (index + jnp.arange(t))[:, None]
            mask = causal[None] & key_mask.astype(bool)[:, None, :]
        if attend is not None:
            own = jnp.ones(mask.shape, bool)
            own = jax.lax.dynamic_update_slice(own, attend.astype(bool), (0, 0, index))
            mask = mask & own
        if is_generated is None:
            is_generated = jnp.zeros((b, t), bool)
        taps = Taps() if taps is None else taps
        pool = attention_mask if taps.pool_mask is None else taps.pool_mask
        weights = pool.astype(jnp.float32)
        last = t - 1 - jnp.argmax(pool[:, ::-1].astype(bool), axis=1)
        selected = None if steering is None else select_positions(steering, is_generated)

        block_def, block_params = nnx.split(self.layers)
        xs = {"params": block_params, "layer": jnp.arange(cfg.num_layers)}
        if steering is not None:
            xs.update(add=steering.add, ablate=steering.ablate)
        if lora is not None:
            xs["lora"] = lora.factors
        if (start_layer, n) != (0, cfg.num_layers):
            xs = jax.tree.map(lambda x: x[start_layer:n], xs)

        def pin(h: jax.Array) -> jax.Array:
            return (
                h if resid_sharding is None else jax.lax.with_sharding_constraint(h, resid_sharding)
            )

        def run_block(carry, x):
            h, kv_all = carry
            h = pin(h)
            kv = None if kv_all is None else (kv_all[0][x["layer"]], kv_all[1][x["layer"]])
            lora_l = None
            if lora is not None:
                key = None if lora.rate == 0 else jax.random.fold_in(lora.key, x["layer"])
                lora_l = LoraInput(x["lora"], key, lora.rate)
            block = nnx.merge(block_def, x["params"])
            h, attn, mlp, kv = block(h, sin, cos, mask, kv, index, lora_l)
            if kv_all is not None:
                kv_all = tuple(
                    jax.lax.dynamic_update_index_in_dim(a, c, x["layer"], 0)
                    for a, c in zip(kv_all, kv, strict=True)
                )
            if steering is not None:
                h = apply_steering(h, x["add"], x["ablate"], selected)
            taps_out = tuple(
                reduce_tap(v, kind, weights, last)
                for v, kind in ((h, taps.resid), (attn, taps.attn), (mlp, taps.mlp))
            )
            return (h, kv_all), taps_out

        kv0 = None if cache is None else (cache.k, cache.v)
        h0 = self.embed(input_ids) if resid_in is None else resid_in.astype(self.embed.dtype)
        if remat:
            policy = jax.checkpoint_policies.nothing_saveable
            run_block = jax.checkpoint(run_block, policy=policy, prevent_cse=False)
        (h, kv_all), (resid, attn, mlp) = jax.lax.scan(run_block, (pin(h0), kv0), xs)
        h = pin(h)
        logits = None
        if return_logits and n == cfg.num_layers:
            h = self.final_norm(h)
            logits = self.logits(h)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(k=kv_all[0], v=kv_all[1], mask=key_mask, index=index + t)
        counts = jnp.sum(weights, axis=1) if "pooled" in (taps.resid, taps.attn, taps.mlp) else None
        return ForwardOutput(logits, resid, attn, mlp, counts, new_cache)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """Positions `[B, T]` that count real tokens only, so left padding does not shift rope."""
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)
