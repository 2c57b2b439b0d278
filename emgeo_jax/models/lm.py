"""`LM`: a loaded model (config, graphdef, params, tokenizer) and its pure jitted forward.

The model is split once into `(graphdef, params)`; `forward(graphdef, params, ...)` is a
pure function under `jax.jit` that merges them inside (the flax performance-guide
pattern), so params are an ordinary pytree that can be sharded, donated or differentiated.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import (
    ForwardOutput,
    KVCache,
    LoraInput,
    Transformer,
    default_positions,
)
from emgeo_jax.parallel import param_sharding
from emgeo_jax.steer import Steering, Taps

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
    A parameter already so placed is kept as is (a model loaded onto `mesh` is never copied);
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
                return x
            if one_process or not x.is_fully_addressable:
                return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    placed = jax.tree_util.tree_map_with_path(put, pure)
    out = jax.tree.map(lambda x: x, params)
    nnx.replace_by_pure_dict(out, placed)
    return out


@functools.partial(
    jax.jit,
    static_argnames=(
        "graphdef",
        "num_layers",
        "return_logits",
        "start_layer",
        "remat",
        "resid_sharding",
    ),
)
def forward(
    graphdef: nnx.GraphDef,
    params: nnx.State,
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
    """The pure forward pass (see `Transformer.__call__`). `input_ids, positions,
    attention_mask, is_generated: [B, T]`. `steering`, `taps` and `cache` are pytrees of
    arrays: changing their values never recompiles. `num_layers` (static) stops after that
    many blocks and then skips the LM head (extraction). `resid_in [B, T, D]` with
    `start_layer` (static) resumes from the residual entering that block (edit a layer's
    output, then run the rest). `lora`: unmerged adapters applied inside the scan
    (training; see `LoraInput`). `remat`, `resid_sharding` (static): training memory, see
    `Transformer.__call__`."""
    model = nnx.merge(graphdef, params)
    return model(
        input_ids,
        positions,
        attention_mask,
        steering=steering,
        taps=taps,
        cache=cache,
        is_generated=is_generated,
        num_layers=num_layers,
        return_logits=return_logits,
        resid_in=resid_in,
        start_layer=start_layer,
        lora=lora,
        attend=attend,
        remat=remat,
        resid_sharding=resid_sharding,
    )


@dataclasses.dataclass
class LM:
    """A loaded model. `params` is an `nnx.State` pytree (possibly sharded over `mesh`).

    `mesh` is the one source of truth for placement: when set, `params` live on it by the
    `emgeo_jax.parallel` rules (`emgeo_jax.load(..., mesh=...)` restores them there), and
    generation, extraction, scoring and training split their batch rows over its
    `data x fsdp` axes (`place_rows`), padding batches those axes do not divide. Without a
    mesh everything runs where the params are (one device)."""

    config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Any = None
    mesh: jax.sharding.Mesh | None = None
    source: str = ""

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
        (see `Transformer.__call__`)."""
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
        return forward(
            self.graphdef,
            self.params,
            input_ids,
            jnp.asarray(positions, jnp.int32),
            attention_mask,
            steering=steering,
            taps=taps,
            is_generated=is_generated,
            num_layers=num_layers,
            return_logits=return_logits,
            resid_in=None if resid_in is None else jnp.asarray(resid_in),
            start_layer=start_layer,
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
