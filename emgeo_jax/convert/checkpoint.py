"""Orbax checkpoints of converted models: `checkpoints/NAME/`.

    NAME/params/      orbax (StandardCheckpointer) of the pure-dict parameter tree
    NAME/config.json  our `ModelConfig` as JSON
    NAME/meta.json    dtype and where the model came from (and the PEFT adapter merged in at
                      convert time: path, rank, alpha, rsLoRA, patterns, sha256)
    NAME/tokenizer/   `save_pretrained` tokenizer files (chat template included)
    NAME/COMPLETE     written last

Everything is written to `NAME.partial-<pid>/` and renamed into place at the end
(`emgeo_jax.runs.atomic_folder`), so an interrupted conversion never leaves a folder that looks
complete.

`convert_streaming` writes a checkpoint straight from HF tensors one parameter at a time
(orbax partial saves of one pytree), so the host holds at most one stacked parameter
`[L, ...]` plus one layer's tensor (or one global tensor), and gives
freed memory back to the OS after each write: a 70B model converts on a host with far less
memory than the model (bound measured by `benchmarks/convert_memory.py`). Both writers
produce the same format; `load_checkpoint` restores either onto a mesh.
"""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp
from flax import nnx

from emgeo_jax.convert.hf import CheckpointError, TensorSource, params_from_source
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import LM, abstract_model, resolve_dtype
from emgeo_jax.parallel import default_sharding, param_shardings
from emgeo_jax.runs import atomic_folder

COMPLETE = "COMPLETE"


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE).exists()


def save_checkpoint(lm: LM, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write `lm` to `folder` atomically (see module docstring). Returns the folder."""

    def write_params(params_dir: Path) -> None:
        ocp.save(params_dir, nnx.to_pure_dict(lm.params))

    meta = {"dtype": np.dtype(lm.dtype).name, "source": str(lm.source)}
    return _write(folder, lm.config, meta, lm.tokenizer, write_params, overwrite)


def convert_streaming(
    cfg: ModelConfig,
    src: TensorSource,
    folder: str | Path,
    *,
    dtype: str = "float32",
    tokenizer=None,
    source: str = "",
    overwrite: bool = False,
) -> Path:
    """Write a checkpoint of `cfg` from the HF-named tensors of `src`, one parameter at a time
    (at most one stacked parameter on the host). Returns the folder."""
    dt = resolve_dtype(dtype)

    def write_params(params_dir: Path) -> None:
        def save_one(path: tuple[str, ...], host_array: np.ndarray):
            tree: dict = {}
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = host_array
            ocp.partial.save(params_dir, tree)
            result = jax.ShapeDtypeStruct(host_array.shape, host_array.dtype)
            del tree, node
            release_freed_memory()
            return result

        abstract = nnx.to_pure_dict(abstract_model(cfg, dt)[1])
        # each array is written synchronously and then dropped: orbax need not copy it first
        no_copy = ocp.options.MemoryOptions(deepcopy_host_arrays=False)
        with ocp.Context(memory_options=no_copy):
            params_from_source(abstract, src, dtype=dt, place=save_one)
            ocp.partial.finalize(params_dir)

    meta = {"dtype": np.dtype(dt).name, "source": str(source)}
    adapter = getattr(src, "adapter", None)  # a `peft.MergedSource`: say what was merged in
    if adapter is not None:
        meta["adapter"] = adapter.info
    return _write(folder, cfg, meta, tokenizer, write_params, overwrite)


def release_freed_memory() -> None:
    """Hand memory freed by Python back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Arrays of a few MB are carved from the malloc heap once glibc has raised its mmap
    threshold, and a freed heap is not returned by itself: without this, peak RSS of a
    conversion grows with every parameter written even though only one is alive."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _write(folder, cfg: ModelConfig, meta: dict, tokenizer, write_params, overwrite) -> Path:
    folder = Path(folder).absolute()
    with atomic_folder(folder, overwrite) as tmp:
        write_params(tmp / "params")
        (tmp / "config.json").write_text(cfg.to_json())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp / "tokenizer"))
        (tmp / COMPLETE).write_text("ok\n")
    return folder


def load_checkpoint(folder: str | Path, *, dtype=None, mesh=None) -> LM:
    """Restore a checkpoint written by `save_checkpoint`. With a `mesh`, every parameter is
    restored directly into its target sharding (no full copy on one device)."""
    folder = Path(folder).absolute()
    if not is_checkpoint(folder):
        raise CheckpointError(f"{folder}: not a complete emgeo checkpoint (no {COMPLETE} file)")
    cfg = ModelConfig.from_json((folder / "config.json").read_text())
    meta = json.loads((folder / "meta.json").read_text())
    dtype = resolve_dtype(dtype or meta["dtype"])
    graphdef, abstract = abstract_model(cfg, dtype)
    pure = nnx.to_pure_dict(abstract)
    if mesh is None:
        shardings = jax.tree.map(lambda _: default_sharding(), pure)
    else:
        shardings = param_shardings(mesh, pure)
    target = jax.tree.map(
        lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), pure, shardings
    )
    nnx.replace_by_pure_dict(abstract, ocp.load(folder / "params", target))
    return LM(cfg, graphdef, abstract, _load_tokenizer(folder / "tokenizer"), mesh, str(folder))


def _load_tokenizer(folder: Path):
    if not folder.exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
