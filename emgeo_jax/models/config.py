"""`ModelConfig`: the one description of a Llama / Qwen2 decoder, read from an HF `config.json`.

Axis conventions used throughout emgeo_jax:

    B  batch             T  sequence (tokens)        D  hidden size (d_model)
    L  decoder layers    V  vocabulary               F  MLP intermediate size
    H  query heads       K  key/value heads (GQA)    Dh head dimension
    S  KV-cache length

Layer indexing follows HF `hidden_states`: layer `l` is the *output* of decoder block `l`,
i.e. `hidden_states[l + 1]`; `hidden_states[0]` (the embeddings) is never called a layer.

Anything in a config that this implementation does not compute exactly is refused with a
`ConfigError` naming the field and value, never silently approximated.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class ConfigError(ValueError):
    """A config field we do not implement, or a malformed config file."""


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 frequency-dependent rope scaling (`rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    rope_scaling: RopeScaling | None = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def q_per_kv(self) -> int:
        """Query heads sharing one key/value head (GQA group size)."""
        return self.num_heads // self.num_kv_heads

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        d = json.loads(text)
        rs = d.pop("rope_scaling", None)
        return cls(**d, rope_scaling=RopeScaling(**rs) if rs else None)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from the dict of an HF `config.json`; `source` names the file in errors."""

        def need(field):
            if field not in hf:
                raise ConfigError(f"{source}: required field '{field}' is missing")
            return hf[field]

        def refuse(field, value, why="not implemented"):
            raise ConfigError(f"{source}: {field}={value!r} is {why}")

        model_type = need("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            refuse("model_type", model_type, f"not supported (supported: {SUPPORTED_MODEL_TYPES})")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            refuse("hidden_act", act)
        if hf.get("mlp_bias", False):
            refuse("mlp_bias", True)
        if hf.get("use_sliding_window", False):
            refuse("use_sliding_window", True)
        if hf.get("pretraining_tp", 1) not in (1, None):
            refuse("pretraining_tp", hf["pretraining_tp"])

        num_heads = need("num_attention_heads")
        hidden = need("hidden_size")
        head_dim = hf.get("head_dim") or hidden // num_heads
        attention_bias = bool(hf.get("attention_bias", False))
        # Qwen2 always has q/k/v biases (no o bias); Llama's `attention_bias` adds all four.
        qkv_bias = model_type == "qwen2" or attention_bias
        o_bias = model_type == "llama" and attention_bias

        # transformers >= 5 nests rope settings in `rope_parameters`; older files use
        # `rope_theta` + `rope_scaling`. Accept both.
        rope = dict(hf.get("rope_parameters") or {})
        rope.update(hf.get("rope_scaling") or {})
        rope_theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        scaling = None
        if rope_type == "llama3":
            try:
                scaling = RopeScaling(
                    factor=float(rope["factor"]),
                    low_freq_factor=float(rope["low_freq_factor"]),
                    high_freq_factor=float(rope["high_freq_factor"]),
                    original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
                )
            except KeyError as e:
                raise ConfigError(f"{source}: rope_scaling (llama3) lacks field {e}") from None
        elif rope_type != "default":
            refuse("rope_scaling.rope_type", rope_type)

        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            rope_scaling=scaling,
        )

    @classmethod
    def from_hf_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            hf = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: cannot read config: {e}") from None
        return cls.from_hf(hf, source=str(path))


def rope_inv_freq(cfg: ModelConfig) -> list[float]:
    """Inverse rotary frequencies `[Dh/2]`, with Llama-3 scaling when configured.

    Computed in float64 on the host (as a Python list) so that fp32 and bf16 models share
    identical frequencies with transformers.
    """
    half = cfg.head_dim // 2
    inv = [1.0 / (cfg.rope_theta ** (2 * i / cfg.head_dim)) for i in range(half)]
    s = cfg.rope_scaling
    if s is None:
        return inv
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen > low_wavelen:
            out.append(f / s.factor)
        elif wavelen < high_wavelen:
            out.append(f)
        else:
            smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
                s.high_freq_factor - s.low_freq_factor
            )
            out.append((1 - smooth) * f / s.factor + smooth * f)
    return out
