"""Orbax checkpoints of converted models: `checkpoints/NAME/`.

    NAME/params/      orbax (StandardCheckpointer) of the pure-dict parameter tree
    NAME/config.json  our `ModelConfig` as JSON
    NAME/meta.json    dtype and where the model came from
    NAME/tokenizer/   `save_pretrained` tokenizer files (chat template included)
    NAME/COMPLETE     written last

Everything is written to `NAME.partial-<pid>/` and renamed into place at the end, so an
interrupted conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from emgeo_jax.convert.hf import CheckpointError
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import LM, abstract_model, resolve_dtype
from emgeo_jax.parallel import param_sharding

COMPLETE = "COMPLETE"


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / COMPLETE).exists()


def save_checkpoint(lm: LM, folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write `lm` to `folder` atomically (see module docstring). Returns the folder."""
    folder = Path(folder).absolute()
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp / "params", nnx.to_pure_dict(lm.params))
    ckptr.wait_until_finished()
    (tmp / "config.json").write_text(lm.config.to_json())
    meta = {"dtype": np.dtype(lm.dtype).name, "source": str(lm.source)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if lm.tokenizer is not None:
        lm.tokenizer.save_pretrained(str(tmp / "tokenizer"))
    (tmp / COMPLETE).write_text("ok\n")
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
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
    target = _with_shardings(nnx.to_pure_dict(abstract), mesh)
    pure = ocp.StandardCheckpointer().restore(folder / "params", target)
    nnx.replace_by_pure_dict(abstract, pure)
    return LM(cfg, graphdef, abstract, _load_tokenizer(folder / "tokenizer"), mesh, str(folder))


def _with_shardings(tree: dict, mesh, prefix: tuple[str, ...] = ()) -> dict:
    out = {}
    for key, leaf in tree.items():
        path = (*prefix, str(key))
        if isinstance(leaf, dict):
            out[key] = _with_shardings(leaf, mesh, path)
        else:
            sharding = (
                param_sharding(mesh, path, leaf.shape)
                if mesh is not None
                else jax.sharding.SingleDeviceSharding(jax.devices()[0])
            )
            out[key] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)
    return out


def _load_tokenizer(folder: Path):
    if not folder.exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))
