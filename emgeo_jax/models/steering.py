"""Interventions as data: a `Steering` is a pytree passed into the jitted model functions,
never a callback (what to read out is `emgeo_jax.models.taps`).

Layer `l` always means the *output of decoder block l*, i.e. HF `hidden_states[l + 1]`
(the output of `model.model.layers[l]`); the embeddings are not a layer.

A `Steering` holds

    add     [L, D]     float32, already multiplied by its scale; zero rows add nothing
    ablate  [L, K, D]  float32, orthonormal rows per layer; zero rows are no-ops
    mode    []         int32 position mode: 0 all tokens, 1 prompt only, 2 generated only
    mask    [B, T]     optional bool, an explicit token mask ANDed with the mode
    variant [B]        optional int32: per-row steering (below)

At layer `l` the edited residual is, on the selected tokens,

    h <- h - sum_k (h . r_k) r_k      (ablate: project out span{r_k}; K >= 1)
    h <- h + add[l]                   (then add)

so ablating then adding at one layer leaves exactly `add[l]` along the ablated directions.
Every field is an array, so changing vectors, scales, layers or the position mode reuses the
same compiled program (only a different number of ablated directions, or the presence of an
explicit mask, changes shapes).

Per-row steering (`Steering.per_row(specs, variant)`): a batch whose rows run different
interventions, e.g. every cell of a sweep in one generate call. The fields gain a variant
axis, `add [L, V, D]`, `ablate [L, V, K, D]` (K padded with zero rows to the largest),
`mode [V]`, and `variant [B]` says which of the `V` interventions row b runs. Each row is
edited exactly as a batch of its intervention alone would be. Vectors, scales, layers,
position modes and the variant of each row are data (never recompiled); the number of
variants `V` and of directions `K` are shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from emgeo_jax.models.config import ModelConfig

POSITION_MODES = {"all": 0, "prompt": 1, "generated": 2}


def _config(cfg: Any) -> ModelConfig:
    """Accept a `ModelConfig` or anything carrying one as `.config` (an `LM`)."""
    return cfg if isinstance(cfg, ModelConfig) else cfg.config


def _check_vector(x: Any, width: int, what: str) -> np.ndarray:
    arr = np.asarray(x, np.float32)
    if arr.ndim == 0 or arr.shape[-1] != width:
        raise ValueError(
            f"{what}: shape {arr.shape} has width {arr.shape[-1:]}, model has D={width}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what}: contains NaN or inf")
    return arr


class _Rows(NamedTuple):
    """One vector `[D]` (`layers` None) or per-layer rows; `at(layer)` gives layer's `[D]`."""

    values: np.ndarray
    layers: tuple[int, ...] | None
    at: Callable[[int], np.ndarray]

    @property
    def is_stack(self) -> bool:
        return self.layers is not None


def _layer_vectors(x: Any, c: ModelConfig, what: str) -> _Rows:
    """`x` as rows of width D: a vector file's `LayerVectors` (`emgeo_jax.vectors.io`; anything
    with its `for_model`: rows for the layers it names, checked against this model's layer
    count, e.g. persona_vectors' `[L+1, D]`), or an array `[D]` or `[L = num_layers, D]`
    (row l = layer l). Duck-typed so the model layer never imports file reading."""
    if hasattr(x, "for_model"):
        _check_vector(x.values, c.hidden_size, f"{what} ({x.source})")
        v = x.for_model(c.num_layers)
        return _Rows(v.values, v.layers if v.is_stack else None, v.at)
    arr = _check_vector(x, c.hidden_size, what)
    if arr.ndim > 2:
        raise ValueError(f"{what} must be [D] or [L, D], got {arr.shape}")
    if arr.ndim == 1:
        return _Rows(arr, None, lambda layer: arr)
    if arr.shape[0] != c.num_layers:
        raise ValueError(f"{what} stack {arr.shape} must be [L={c.num_layers}, D]")
    return _Rows(arr, tuple(range(c.num_layers)), lambda layer: arr[layer])


def _check_layers(layers: Iterable[int] | int | None, num_layers: int, what: str) -> list[int]:
    if layers is None:
        return list(range(num_layers))
    layers = [layers] if isinstance(layers, (int, np.integer)) else list(layers)
    if not layers:
        raise ValueError(f"{what}: empty layer list")
    for layer in layers:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < num_layers:
            raise ValueError(
                f"{what}: layer {layer!r} out of range; layers are 0..{num_layers - 1} "
                "(layer l = output of block l = HF hidden_states[l+1])"
            )
    return [int(x) for x in layers]


def _orthonormal_rows(directions: np.ndarray, k: int) -> np.ndarray:
    """`[n, D]` -> `[k, D]`: an orthonormal basis of their span (exact SVD), zero-padded."""
    out = np.zeros((k, directions.shape[-1]), np.float32)
    if len(directions):
        _, s, vt = np.linalg.svd(directions.astype(np.float64), full_matrices=False)
        basis = vt[s > 1e-6 * s.max()]
        out[: len(basis)] = basis
    return out


def _position_mode(positions: str | Any) -> tuple[np.int32, np.ndarray | None]:
    if isinstance(positions, str):
        if positions not in POSITION_MODES:
            raise ValueError(
                f"positions={positions!r}: use one of {sorted(POSITION_MODES)} or a [B, T] mask"
            )
        return np.int32(POSITION_MODES[positions]), None
    mask = np.asarray(positions, bool)
    if mask.ndim != 2:
        raise ValueError(f"positions mask must be [B, T], got shape {mask.shape}")
    return np.int32(0), mask


@struct.dataclass
class Steering:
    """A residual-stream intervention (see module docstring). Build with `Steering.addition`,
    `Steering.ablation`, `Steering.none`; combine with `+`; change positions with
    `.at_positions(...)`."""

    add: jax.Array  # [L, D]
    ablate: jax.Array  # [L, K, D]
    mode: jax.Array  # [] int32
    mask: jax.Array | None = None  # [B, T] bool
    variant: jax.Array | None = None  # [B] int32: row b runs intervention variant[b]

    @property
    def per_row_count(self) -> int | None:
        """`V`, the interventions of a per-row steering (None for one shared by all rows)."""
        return None if self.variant is None else int(self.add.shape[1])

    @staticmethod
    def per_row(
        specs: Sequence[Steering], variant: Sequence[int] | np.ndarray, num_directions: int = 0
    ) -> Steering:
        """Row b of the batch runs `specs[variant[b]]` (module docstring): `specs` are
        ordinary (shared, maskless) steerings of one model; `variant [B]` ints in
        `0 .. len(specs) - 1`. Ablations are zero-padded to the most directions of any spec,
        or to `num_directions` if more (so batches of other mixes share one program)."""
        if not specs:
            raise ValueError("Steering.per_row: no interventions")
        for i, spec in enumerate(specs):
            if spec.variant is not None or spec.mask is not None:
                raise ValueError(
                    f"Steering.per_row: intervention {i} is per-row or has a token mask; "
                    "give shared interventions with a position mode"
                )
        shapes = {np.shape(spec.add) for spec in specs}
        if len(shapes) > 1:
            raise ValueError(f"Steering.per_row: interventions of different models {shapes}")
        rows = np.asarray(variant)
        if rows.ndim != 1 or len(rows) == 0 or not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"Steering.per_row: variant must be [B] ints, got {rows!r}")
        if rows.min() < 0 or rows.max() >= len(specs):
            raise ValueError(
                f"Steering.per_row: variant {rows.tolist()} outside 0..{len(specs) - 1}"
            )
        k = max(num_directions, *(spec.ablate.shape[1] for spec in specs))
        ablate = [np.asarray(spec.ablate) for spec in specs]
        ablate = [np.pad(a, ((0, 0), (0, k - a.shape[1]), (0, 0))) for a in ablate]
        return Steering(
            add=jnp.asarray(np.stack([np.asarray(spec.add) for spec in specs], axis=1)),
            ablate=jnp.asarray(np.stack(ablate, axis=1)),
            mode=jnp.asarray([int(spec.mode) for spec in specs], jnp.int32),
            variant=jnp.asarray(rows, jnp.int32),
        )

    def padded_rows(self, rows: int) -> Steering:
        """This steering for a batch padded to `rows` rows by repeating its last row
        (`generate.prompts.pad_prompts`): a per-row `variant` gains copies of its last entry;
        a shared steering is returned as is."""
        if self.variant is None or len(self.variant) == rows:
            return self
        extra = rows - len(self.variant)
        if extra < 0:
            raise ValueError(f"per-row steering has {len(self.variant)} rows, batch has {rows}")
        tail = jnp.repeat(self.variant[-1:], extra)
        return self.replace(variant=jnp.concatenate([self.variant, tail]))

    @classmethod
    def none(cls, cfg: Any, num_directions: int = 1) -> Steering:
        """No intervention, with the same shapes as a one-direction ablation (so steered and
        unsteered calls share a compiled program)."""
        c = _config(cfg)
        return cls(
            add=jnp.zeros((c.num_layers, c.hidden_size), jnp.float32),
            ablate=jnp.zeros((c.num_layers, num_directions, c.hidden_size), jnp.float32),
            mode=jnp.int32(0),
        )

    @classmethod
    def addition(
        cls,
        cfg: Any,
        vector: Any,
        layers: Sequence[int] | int | None = None,
        scale: float = 1.0,
        positions: str | Any = "all",
    ) -> Steering:
        """Add `scale * vector` to the output of each block in `layers`.

        `vector`: `[D]` (added at every layer in `layers`; `layers` required) or a per-layer
        stack, its vector for layer `l` added at layer `l` for `l` in `layers` (default: every
        layer it holds): a `LayerVectors` (rows for the layers it names, e.g. a file of
        `emgeo extract --layers 12,16`) or an array `[L = num_layers, D]` (row l = layer l)."""
        c = _config(cfg)
        vec = _layer_vectors(vector, c, "steering vector")
        if not vec.is_stack and layers is None:
            raise ValueError("steering vector [D]: give layers=... (a [L, D] stack may omit it)")
        if not np.isfinite(scale):
            raise ValueError(f"steering scale {scale!r} is not finite")
        rows = _check_layers(vec.layers if layers is None else layers, c.num_layers, "steering")
        add = np.zeros((c.num_layers, c.hidden_size), np.float32)
        for layer in rows:
            add[layer] = scale * vec.at(layer)
        mode, mask = _position_mode(positions)
        none = cls.none(c)
        return cls(add=jnp.asarray(add), ablate=none.ablate, mode=jnp.asarray(mode), mask=mask)

    @classmethod
    def ablation(
        cls,
        cfg: Any,
        directions: Any,
        layers: Sequence[int] | int | None = None,
        positions: str | Any = "all",
    ) -> Steering:
        """Project `directions` (`[D]` or `[K, D]`, any norm) out of the output of each block
        in `layers` (default: all layers): `h - sum_k (h . r_k) r_k` over an orthonormal
        basis `r` of their span."""
        c = _config(cfg)
        dirs = _check_vector(directions, c.hidden_size, "ablation direction")
        dirs = dirs.reshape(-1, c.hidden_size)
        if np.any(np.linalg.norm(dirs, axis=-1) == 0):
            raise ValueError("ablation direction: a direction has zero norm")
        basis = _orthonormal_rows(dirs, len(dirs))
        ablate = np.zeros((c.num_layers, len(dirs), c.hidden_size), np.float32)
        for layer in _check_layers(layers, c.num_layers, "ablation"):
            ablate[layer] = basis
        mode, mask = _position_mode(positions)
        none = cls.none(c)
        return cls(add=none.add, ablate=jnp.asarray(ablate), mode=jnp.asarray(mode), mask=mask)

    @classmethod
    def layer_ablation(
        cls,
        cfg: Any,
        direction: Any,
        layers: Sequence[int] | int | None = None,
        positions: str | Any = "all",
    ) -> Steering:
        """Project one direction per layer out: a `[D]` direction at each layer in `layers`
        (default all), or a per-layer stack (as in `addition`) its vector for layer `l` at
        each `l` in `layers` (default: every layer it holds)."""
        c = _config(cfg)
        vec = _layer_vectors(direction, c, "ablation direction")
        if not vec.is_stack:
            return cls.ablation(c, vec.values, layers, positions)
        rows = _check_layers(vec.layers if layers is None else layers, c.num_layers, "ablation")
        return cls.combine(*(cls.ablation(c, vec.at(l), [l], positions) for l in rows))

    def at_positions(self, positions: str | Any) -> Steering:
        """The same edit at other tokens: "all", "prompt", "generated" or a `[B, T]` mask
        (for per-row steering: a mode, set for every intervention)."""
        mode, mask = _position_mode(positions)
        if self.variant is not None:
            if mask is not None:
                raise ValueError("per-row steering: use a position mode, not a token mask")
            return self.replace(mode=jnp.full(self.mode.shape, mode, jnp.int32))
        return self.replace(mode=jnp.asarray(mode), mask=mask)

    def __add__(self, other: Steering) -> Steering:
        return Steering.combine(self, other)

    @staticmethod
    def combine(*specs: Steering) -> Steering:
        """Sum the additions and take the union of the ablated subspaces, per layer. The
        position modes must agree (a spec with mode "all" and no mask adopts the other's)."""
        if not specs:
            raise ValueError("Steering.combine: nothing to combine")
        if any(spec.variant is not None for spec in specs):
            raise ValueError("Steering.combine: combine interventions before Steering.per_row")
        targeted = [s for s in specs if int(s.mode) != 0 or s.mask is not None]
        modes = {(int(s.mode), None if s.mask is None else s.mask.tobytes()) for s in targeted}
        if len(modes) > 1:
            raise ValueError("Steering.combine: specs use different position modes")
        add = sum(np.asarray(s.add) for s in specs)
        abl = np.concatenate([np.asarray(s.ablate) for s in specs], axis=1)
        k = max(1, max(int(np.sum(np.any(a != 0, -1))) for a in abl))
        ablate = np.stack([_orthonormal_rows(a[np.any(a != 0, -1)], k) for a in abl])
        base = targeted[0] if targeted else specs[0]
        return Steering(
            add=jnp.asarray(add), ablate=jnp.asarray(ablate), mode=base.mode, mask=base.mask
        )


def select_positions(steering: Steering, is_generated: jax.Array) -> jax.Array:
    """Bool `[B, T]`: the tokens the edit touches, from the mode (data; per row for per-row
    steering) and optional mask."""
    gen = is_generated.astype(bool)
    mode = steering.mode if steering.variant is None else steering.mode[steering.variant][:, None]
    sel = jnp.where(mode == 0, True, jnp.where(mode == 1, ~gen, gen))
    if steering.mask is not None:
        sel = sel & steering.mask
    return sel


def apply_steering(
    h: jax.Array,
    add: jax.Array,
    ablate: jax.Array,
    selected: jax.Array,
    variant: jax.Array | None = None,
) -> jax.Array:
    """One layer's edit. `h [B, T, D]`, `add [D]`, `ablate [K, D]`, `selected [B, T]`; with
    `variant [B]` (per-row steering) `add [V, D]`, `ablate [V, K, D]` and row b takes
    variant b's rows. Computed in float32, cast back to `h.dtype`; unselected tokens are
    returned unchanged."""
    h32 = h.astype(jnp.float32)
    if variant is None:
        coeff = jnp.einsum("btd,kd->btk", h32, ablate)
        edited = h32 - jnp.einsum("btk,kd->btd", coeff, ablate) + add
    else:
        ablate_rows = ablate[variant]  # [B, K, D]
        coeff = jnp.einsum("btd,bkd->btk", h32, ablate_rows)
        edited = h32 - jnp.einsum("btk,bkd->btd", coeff, ablate_rows) + add[variant][:, None]
    return jnp.where(selected[..., None], edited.astype(h.dtype), h)
