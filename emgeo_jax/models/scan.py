"""The one layer scan every use of the model runs on: `scan_blocks`.

A call's blocks run as one `jax.lax.scan` over their stacked parameters: each step merges
one block (`nnx.merge`), runs it on the residual, writes its keys/values into the cache,
applies that layer's steering to its output and reduces the tapped sites. What differs
between uses is only the data given to it:

    LayerInputs   per layer, leading axis [L']: block index, block params, steering rows,
                  LoRA factors (what the scan slices)
    BlockContext  the same at every block: rotary tables, attention mask, cache write slot,
                  steered tokens, tap reduction
    RunOptions    static: attention implementation, query chunk, remat, residual sharding

The functions per use (`forward`, `prefill`, `decode_step`, `score_tree`, `resume_from`,
`train_forward` in `emgeo_jax.models.lm`) build these three and read the result.
Layer l = output of block l = HF `hidden_states[l + 1]`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx, struct

from emgeo_jax.models.attention import chunked_attention
from emgeo_jax.models.llama import LoraInput
from emgeo_jax.models.steering import Steering, apply_steering
from emgeo_jax.models.taps import TapReduction, Taps, reduce_block
from emgeo_jax.models.tpu_attention import attention


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How a call runs, not what it computes (static, hashable: part of the compiled program).

    `attention`: the attention implementation (`tpu_attention.IMPLEMENTATIONS`, resolved
    for the backend by `attention_implementation`): "xla" (`models.attention.attend`
    in query chunks), "splash" (the Pallas TPU kernel; interpret mode elsewhere) or "cudnn"
    (GPU). Kernels run where the mask is causal over a key mask (every call but
    `score_tree`'s tree attention, which stays on XLA); `mesh`: the mesh a kernel is split
    over (`shard_map`; the XLA path needs none). `query_chunk`: the XLA path attends at most
    this many queries at a time (bounds the float32 score memory; same result;
    `emgeo_jax.models.attention`). `remat`: recompute each block in the
    backward pass (`jax.checkpoint`, nothing saved: only the residual entering each block is
    kept, `[L, B, T, D]`). `resid_sharding`: pin the residual `[B, T, D]` at every block
    boundary (e.g. rows over `data x fsdp`), so the compiler gathers each layer's weights
    rather than splitting activations the way the weights are split."""

    query_chunk: int = 512
    remat: bool = False
    resid_sharding: jax.sharding.Sharding | None = None
    attention: str = "xla"
    mesh: jax.sharding.Mesh | None = None


DEFAULT_RUN = RunOptions()


class BlockContext(NamedTuple):
    """What every block of one call shares. `sin, cos [B, T, Dh/2]` float32 rotary tables;
    `mask [B, T, S]` bool (True = query may attend to key slot); `index []` int32 (the
    cache slot this call's first token is written to; 0 without a cache); `selected [B, T]`
    bool (the tokens steering edits; None without steering); `reduction` (the taps' pooled
    tokens); `key_mask [B, S]` (the slots holding real tokens when `mask` is exactly "causal
    from `index` over real slots", so an attention kernel can run; None for other masks);
    `variant [B]` (per-row steering: the intervention of each row; None when shared)."""

    sin: jax.Array
    cos: jax.Array
    mask: jax.Array
    index: jax.Array | int
    selected: jax.Array | None
    reduction: TapReduction
    key_mask: jax.Array | None = None
    variant: jax.Array | None = None

    def attend(self, options: RunOptions) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
        """`attend(q [B, T, H, Dh], k, v [B, K, S, Dh]) -> [B, T, H, Dh]` for this call: the
        kernel of `options.attention` where the mask allows, else XLA in query chunks."""
        if options.attention != "xla" and self.key_mask is not None:
            return functools.partial(
                attention,
                key_mask=self.key_mask,
                offset=self.index,
                implementation=options.attention,
                mesh=options.mesh,
            )
        return functools.partial(chunked_attention, mask=self.mask, chunk=options.query_chunk)


@struct.dataclass
class LayerInputs:
    """The scan's per-layer inputs, each stacked on a leading `[L']` axis (the blocks run).

    `layer [L']` int32: the block's index in the model (cache slices and LoRA dropout keys
    use it); `params`: the blocks' parameters; `add [L', D]`, `ablate [L', K, D]` (per-row
    steering: `[L', V, D]`, `[L', V, K, D]`): the steering rows (None without steering);
    `lora`: `LoraInput.factors` sliced the same way (None without LoRA)."""

    layer: jax.Array
    params: Any
    add: jax.Array | None = None
    ablate: jax.Array | None = None
    lora: dict[str, dict[str, jax.Array]] | None = None

    @classmethod
    def of(
        cls,
        block_params: Any,
        steering: Steering | None = None,
        lora: LoraInput | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> LayerInputs | list[LayerInputs]:
        """Blocks `start .. stop-1` (static; default all) of `block_params` with their rows
        of `steering` and `lora`. Stacked params (`[L, ...]` leaves) give one `LayerInputs`
        stacked on `[L']` (for the scan); unstacked ones (a sequence of `L` per-block
        params) give a list of per-block `LayerInputs` whose `layer` is a Python int (for
        the unrolled loop; each block's weights are its own buffers, nothing is sliced)."""
        unstacked = isinstance(block_params, (list, tuple))
        num_layers = len(block_params) if unstacked else jax.tree.leaves(block_params)[0].shape[0]
        stop = num_layers if stop is None else stop
        add = None if steering is None else steering.add
        ablate = None if steering is None else steering.ablate
        factors = None if lora is None else lora.factors
        if unstacked:
            return [
                cls(
                    layer=i,
                    params=block_params[i],
                    add=None if add is None else add[i],
                    ablate=None if ablate is None else ablate[i],
                    lora=None if factors is None else jax.tree.map(lambda x, i=i: x[i], factors),
                )
                for i in range(start, stop)
            ]
        xs = cls(
            layer=jnp.arange(num_layers, dtype=jnp.int32),
            params=block_params,
            add=add,
            ablate=ablate,
            lora=factors,
        )
        if (start, stop) == (0, num_layers):
            return xs
        return jax.tree.map(lambda x: x[start:stop], xs)


def scan_blocks(
    block_def: nnx.GraphDef,
    xs: LayerInputs | list[LayerInputs],
    h: jax.Array,
    ctx: BlockContext,
    *,
    taps: Taps,
    options: RunOptions,
    kv: tuple[Any, Any] | None = None,
    lora: LoraInput | None = None,
) -> tuple[jax.Array, tuple[Any, Any] | None, dict[str, jax.Array]]:
    """Run the blocks of `xs` in order on the residual `h [B, T, D]`.

    `xs` stacked (`LayerInputs.of` stacked params): one `jax.lax.scan`; a list (unstacked
    params): the same block step unrolled, one block after another. `kv = (k, v)`: the cache
    of all layers (indexed by `xs.layer`), each `[L, B, K, S, Dh]` or, for unstacked
    layers, a tuple of `L` per-layer `[B, K, S, Dh]` buffers; this call's keys and values
    are written at slots `ctx.index ..`. `lora`: its dropout `key`/`rate` (the factors come
    sliced in `xs.lora`). Returns `(h, kv, tapped)`: the last block's output, the updated
    `kv` (None without) and `{site: [L', ...]}` for the sites `taps` reads
    (`emgeo_jax.models.taps`)."""

    def pin(x: jax.Array) -> jax.Array:
        if options.resid_sharding is None:
            return x
        return jax.lax.with_sharding_constraint(x, options.resid_sharding)

    def run_block(carry, x: LayerInputs):
        h, kv_all = carry
        h = pin(h)
        kv = None if kv_all is None else (kv_all[0][x.layer], kv_all[1][x.layer])
        lora_l = None
        if lora is not None:
            key = None if lora.rate == 0 else jax.random.fold_in(lora.key, x.layer)
            lora_l = LoraInput(x.lora, key, lora.rate)
        block = nnx.merge(block_def, x.params)
        out, kv = block(h, ctx.sin, ctx.cos, attend, kv, ctx.index, lora_l)
        if kv_all is not None:
            kv_all = tuple(_write_layer(a, c, x.layer) for a, c in zip(kv_all, kv, strict=True))
        if x.add is not None:
            steered = apply_steering(out.resid_post, x.add, x.ablate, ctx.selected, ctx.variant)
            out = out._replace(resid_post=steered)
        return (out.resid_post, kv_all), reduce_block(out, taps, ctx.reduction)

    attend = ctx.attend(options)
    if options.remat:
        policy = jax.checkpoint_policies.nothing_saveable
        run_block = jax.checkpoint(run_block, policy=policy, prevent_cse=False)
    carry = (pin(h), kv)
    if isinstance(xs, list):
        tapped = []
        for x in xs:
            carry, tapped_l = run_block(carry, x)
            tapped.append(tapped_l)
        tapped = jax.tree.map(lambda *rows: jnp.stack(rows), *tapped) if tapped else {}
    else:
        if kv is not None and isinstance(kv[0], tuple):
            raise ValueError("a per-layer KV cache runs with unstacked layers only")
        carry, tapped = jax.lax.scan(run_block, carry, xs)
    h, kv = carry
    return pin(h), kv, tapped


def _write_layer(cache: Any, layer_kv: jax.Array, layer: jax.Array | int) -> Any:
    """`cache` (`[L, B, K, S, Dh]` or a tuple of `L` per-layer buffers) with layer `layer`'s
    entry replaced by `layer_kv [B, K, S, Dh]` (per-layer: the tuple entry itself, which
    XLA updates in place; stacked: a dynamic update of the slice)."""
    if isinstance(cache, tuple):
        return (*cache[:layer], layer_kv, *cache[layer + 1 :])
    return jax.lax.dynamic_update_index_in_dim(cache, layer_kv, layer, 0)
