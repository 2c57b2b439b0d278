"""HF checkpoint -> our parameter pytree, driven by the one parameter table
(`emgeo_jax.models.params.PARAMS`: path -> HF name, `{l}` = block index).

Every source (an HF safetensors folder, a GGUF file, a base model with a PEFT adapter merged
in) is a `TensorSource`: it knows which HF tensor names it holds and returns each one as a
host numpy array in the HF layout (`weight [out, in]`). `params_from_source` then fills our
NNX parameter tree (`kernel [in, out]`, layers stacked on a leading `[L]` axis) tensor by
tensor, so at most one extra tensor is ever held beside the result.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import ml_dtypes
import numpy as np

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.params import BY_PATH, leaves


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model config."""


# Tensors a checkpoint may carry that the model recomputes or does not use.
IGNORED = ("rotary_emb.inv_freq",)


class TensorSource(Protocol):
    """HF-named tensors, read one at a time as host arrays in the HF layout."""

    names: frozenset[str]

    def get(self, name: str) -> np.ndarray: ...

    def where(self, name: str) -> str:
        """The file holding `name`, for error messages."""
        ...


class SafetensorsFiles:
    """Tensors in one or more safetensors files, read lazily; bf16 is kept as bf16.

    Each read memory-maps just that tensor's bytes, copies them into one numpy array and
    unmaps them again, so the pages of tensors already read do not stay resident and no
    intermediate copy (framework array, then numpy) is made: host memory holds the tensors in
    use, not the files."""

    def __init__(self, paths: list[Path]):
        self._file_of: dict[str, Path] = {}
        for path in paths:
            with _open(path) as handle:
                for key in handle.keys():
                    self._file_of[key] = path
        self.names = frozenset(self._file_of)
        self._default_file = paths[0]

    @classmethod
    def hf_folder(cls, folder: str | Path) -> SafetensorsFiles:
        """An HF model folder: `model.safetensors`, or the shards listed in
        `model.safetensors.index.json`."""
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if not index.exists():
            if not (folder / "model.safetensors").exists():
                raise CheckpointError(f"{folder}: no model.safetensors or {index.name}")
            return cls([folder / "model.safetensors"])
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: malformed index ({e})") from None
        src = cls([folder / f for f in sorted(set(weight_map.values()))])
        for name, file in weight_map.items():
            if src._file_of.get(name) != folder / file:
                raise CheckpointError(f"{index}: tensor {name} is not in {file}")
        return src

    def where(self, name: str) -> str:
        return str(self._file_of.get(name, self._default_file))

    def get(self, name: str) -> np.ndarray:
        try:
            path = self._file_of[name]
            header, data_start = _header(path)
            entry = header[name]
            dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:  # rare dtypes: let safetensors decode them
                cpu = jax.local_devices(backend="cpu")[0]  # this process's own (multi-host safe)
                with _open(path) as handle, jax.default_device(cpu):
                    return np.asarray(handle.get_tensor(name))
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
                raise ValueError(f"data_offsets {begin}..{end} do not fit shape {shape}")
            view = np.memmap(path, dtype, "r", offset=data_start + begin, shape=shape)
            out = np.array(view)  # one copy; the map is released when `view` goes
            del view
            return out
        except Exception as e:
            raise CheckpointError(f"{self.where(name)}: cannot read tensor {name} ({e})") from None


SAFETENSORS_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": ml_dtypes.bfloat16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's JSON header (name -> {dtype, shape, data_offsets}, offsets
    relative to the data) and where the data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def _open(path: Path):
    """A safetensors handle; framework="flax" reads bfloat16 (numpy cannot) onto host CPU."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="flax")
    except Exception as e:  # safetensors raises its own error types for bad headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def hf_layout_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF shape of a (per-layer) parameter of our shape: kernels are transposed."""
    return tuple(reversed(shape)) if path[-1] == "kernel" else tuple(shape)


def source_tensors(
    abstract_params: dict, src: TensorSource
) -> Iterator[tuple[tuple[str, ...], Any, Iterator[np.ndarray]]]:
    """For each leaf of a pure-dict parameter tree (leaves: `jax.ShapeDtypeStruct`), in tree
    order: `(path, leaf, tensors)`, where `tensors` yields the parameter's HF tensors in *our*
    layout (`kernel [in, out]`): one per layer, in layer order, for the stacked `layers`
    subtree (`leaf.shape = [L, ...]`, each tensor `leaf.shape[1:]`), a single one for a global
    parameter. Each tensor is read from `src` only when `tensors` is advanced and is a view in
    the stored dtype (a kernel is the transposed view of the HF array), so a consumer that
    converts it piece by piece never holds a second whole copy.

    Raises `CheckpointError` naming the file and tensor for a missing tensor or a tensor of
    the wrong shape (when that tensor is reached)."""

    def fetch(name: str, path: tuple[str, ...], shape: tuple[int, ...]) -> np.ndarray:
        if name not in src.names:
            raise CheckpointError(f"{src.where(name)}: missing tensor {name}")
        t = src.get(name)
        expected = hf_layout_shape(path, shape)
        if tuple(t.shape) != expected:
            raise CheckpointError(
                f"{src.where(name)}: tensor {name} has shape {tuple(t.shape)}, expected {expected}"
            )
        return t.T if path[-1] == "kernel" else t

    # generators, so that no tensor stays referenced here once it has been handed out
    def layers(path: tuple[str, ...], hf: str, leaf) -> Iterator[np.ndarray]:
        for layer in range(leaf.shape[0]):
            yield fetch(hf.format(l=layer), path, tuple(leaf.shape[1:]))

    def one(path: tuple[str, ...], hf: str, leaf) -> Iterator[np.ndarray]:
        yield fetch(hf, path, tuple(leaf.shape))

    for path, leaf in leaves(abstract_params):
        row = BY_PATH.get(path)
        if row is None:
            raise CheckpointError(f"no HF name for parameter {'/'.join(path)}")
        yield path, leaf, (layers if row.layered else one)(path, row.hf, leaf)


def params_from_source(
    abstract_params: dict,
    src: TensorSource,
    *,
    dtype=np.float32,
    place: Callable[[tuple[str, ...], np.ndarray], Any] = lambda path, x: x,
) -> dict:
    """Fill a pure-dict parameter tree (leaves: `jax.ShapeDtypeStruct`, e.g. from
    `nnx.to_pure_dict` of an abstract model) with host arrays of `dtype` read from `src`
    (`source_tensors`), stacked on the host: `place(path, host_array)` runs on each finished
    parameter (e.g. an orbax partial save) so its host copy can be freed before the next one
    is read. The loader places straight onto devices instead (`convert.load.from_tensors`).

    Raises `CheckpointError` naming the file and tensor for a missing tensor or a tensor of
    the wrong shape."""
    out: dict = {}
    for path, leaf, tensors in source_tensors(abstract_params, src):
        if path[0] == "layers":
            value = np.empty(leaf.shape, dtype=dtype)
            for layer in range(leaf.shape[0]):  # no name keeps the last layer alive
                value[layer] = next(tensors)
        else:
            # contiguous, so that the HF tensor can be freed as soon as this returns
            value = np.ascontiguousarray(next(tensors), dtype=dtype)
        _set(out, path, place(path, value))
    return out


def unused_tensors(abstract_params: dict, src: TensorSource, cfg: ModelConfig) -> list[str]:
    """HF tensors in `src` that the model does not read (a tied `lm_head.weight` is fine)."""
    used = set()
    for path, leaf in leaves(abstract_params):
        row = BY_PATH[path]
        layers = range(leaf.shape[0]) if row.layered else [0]
        used |= {row.hf.format(l=i) for i in layers}
    if cfg.tie_word_embeddings:
        used.add(BY_PATH[("lm_head", "kernel")].hf)
    return sorted(n for n in src.names - used if not n.endswith(IGNORED))


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
