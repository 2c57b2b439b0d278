"""LoRA as data on top of frozen params.

A LoRA is a `LoraSpec` (static: rank, alpha, rsLoRA, target modules, layers) and a pytree of
fp32 factors, one entry per target module::

    lora[target] = {"a": [n, in, r], "b": [n, r, out]}     n = len(spec.layers)

in the Flax kernel layout (`kernel [in, out]`), row `i` belonging to decoder block
`spec.layers[i]`. `apply_lora(params, lora, spec)` returns the params with
`kernel[l] + scale * a[i] @ b[i]` at the targeted kernels of the stacked `layers` subtree
(inference, export, scalars). The delta is computed in fp32 and cast to the kernel dtype
(with bf16 params, deltas below the bf16 resolution of the weight are rounded away).

`lora_input(lora, spec, L, rate, key)` keeps the factors separate instead: a
`emgeo_jax.models.llama.LoraInput` that the forward applies inside the layer scan as
`module(x) + scale * dropout(x) @ a @ b`. Training uses it: PEFT's `lora_dropout` acts on the
adapter's input only, which a merged kernel cannot express; the adapter term stays in fp32
even with bf16 params (a merged bf16 kernel would round a small delta away); and the
backward pass never forms a full-size `[in, out]` gradient per adapted kernel.

HF PEFT stores the same factors as `lora_A.weight [r, in]` (= `a[i].T`) and
`lora_B.weight [out, r]` (= `b[i].T`), `scale = alpha / r` (rsLoRA: `alpha / sqrt(r)`).
Initialisation follows PEFT: `a` Kaiming-uniform (bound `1 / sqrt(in)`), `b` zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import LoraInput
from emgeo_jax.models.params import LORA_PARAMS

# target short name -> path of its kernel inside the stacked `layers` subtree, and the PEFT
# `target_modules` names (the HF module names) <-> our short names: views of the one
# parameter table (`emgeo_jax.models.params.PARAMS`)
TARGETS: dict[str, tuple[str, ...]] = {t: p.path[1:] for t, p in LORA_PARAMS.items()}
PEFT_MODULES = {t: p.module for t, p in LORA_PARAMS.items()}
FROM_PEFT_MODULE = {v: k for k, v in PEFT_MODULES.items()}

Lora = dict[str, dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Static description of a LoRA.

    rank: r. alpha: LoRA alpha. rslora: scale `alpha / sqrt(r)` instead of `alpha / r`.
    targets: short module names (keys of `TARGETS`: q, k, v, o, gate, up, down).
    layers: decoder blocks carrying adapters (sorted, distinct).
    """

    rank: int
    alpha: float
    targets: tuple[str, ...]
    layers: tuple[int, ...]
    rslora: bool = False

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        bad = [t for t in self.targets if t not in TARGETS]
        if bad or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: use some of {list(TARGETS)}")
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"LoRA layers {list(self.layers)} must be distinct and sorted")
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def check(self, cfg: ModelConfig) -> None:
        """Raise ValueError if a layer is outside the model."""
        if self.layers[0] < 0 or self.layers[-1] >= cfg.num_layers:
            raise ValueError(
                f"LoRA layers {list(self.layers)}: the model has blocks 0..{cfg.num_layers - 1}"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LoraSpec:
        return cls(**{**d, "targets": tuple(d["targets"]), "layers": tuple(d["layers"])})


def parse_targets(text: str | Sequence[str]) -> tuple[str, ...]:
    """ "q,k,v,o,gate,up,down" or "all" (also accepts HF names such as "down_proj")."""
    items = text.split(",") if isinstance(text, str) else list(text)
    items = [s.strip() for s in items if s.strip()]
    if items == ["all"]:
        return tuple(TARGETS)
    return tuple(FROM_PEFT_MODULE.get(s, s) for s in items)


def kernel_shape(cfg: ModelConfig, target: str) -> tuple[int, int]:
    """`(in, out)` of one layer's kernel for `target`."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q": (d, q),
        "k": (d, kv),
        "v": (d, kv),
        "o": (q, d),
        "gate": (d, f),
        "up": (d, f),
        "down": (f, d),
    }[target]


def init_lora(cfg: ModelConfig, spec: LoraSpec, key: jax.Array) -> Lora:
    """PEFT's initialisation: `a ~ U(-1/sqrt(in), 1/sqrt(in))`, `b = 0` (fp32)."""
    spec.check(cfg)
    n, out = len(spec.layers), {}
    for target, k in zip(spec.targets, jax.random.split(key, len(spec.targets)), strict=True):
        fan_in, fan_out = kernel_shape(cfg, target)
        bound = 1.0 / math.sqrt(fan_in)
        out[target] = {
            "a": jax.random.uniform(k, (n, fan_in, spec.rank), jnp.float32, -bound, bound),
            "b": jnp.zeros((n, spec.rank, fan_out), jnp.float32),
        }
    return out


def lora_delta(lora: Lora, spec: LoraSpec, target: str) -> jax.Array:
    """`[n, in, out]` fp32: `scale * a @ b` per adapted layer."""
    f = lora[target]
    return spec.scale * jnp.einsum("nir,nro->nio", f["a"], f["b"])


def apply_lora(params, lora: Lora, spec: LoraSpec):
    """`params` (an `nnx.State` or pure dict) with every targeted kernel replaced by
    `kernel.at[layers].add(scale * a @ b)`; other leaves are returned as they are."""
    by_path = {TARGETS[t]: t for t in spec.targets}

    def edit(path, x):
        keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
        if keys[:1] != ("layers",) or keys[1:] not in by_path:
            return x
        delta = lora_delta(lora, spec, by_path[keys[1:]])
        # static per-layer slice updates: no scatter, and only the adapted rows go to fp32
        for i, layer in enumerate(spec.layers):
            row = (x[layer].astype(jnp.float32) + delta[i]).astype(x.dtype)
            x = jax.lax.dynamic_update_index_in_dim(x, row, layer, 0)
        return x

    return jax.tree_util.tree_map_with_path(edit, params)


def lora_input(
    lora: Lora,
    spec: LoraSpec,
    num_layers: int,
    rate: float = 0.0,
    key: jax.Array | None = None,
) -> LoraInput:
    """The unmerged form of `lora` for the forward's `lora=` argument: factors scattered to
    `[L, in, r]` / `[L, r, out]` (zero rows for blocks without an adapter), `b` times the
    scale, keyed by HF module name; `rate` > 0 applies dropout to the adapter inputs with
    masks derived from `key` (see `LoraInput`)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {rate}")
    if rate > 0 and key is None:
        raise ValueError("LoRA dropout > 0 needs a PRNG key")
    rows = jnp.asarray(spec.layers)
    factors = {}
    for t in spec.targets:
        a, b = lora[t]["a"], spec.scale * lora[t]["b"]
        factors[PEFT_MODULES[t]] = {
            name: jnp.zeros((num_layers, *x.shape[1:]), x.dtype).at[rows].set(x)
            for name, x in (("a", a), ("b", b))
        }
    return LoraInput(factors, key, float(rate))
