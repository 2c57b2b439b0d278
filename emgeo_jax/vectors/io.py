"""Vector and activation files: one reader and one writer that every part of emgeo_jax shares.

Formats read by `load_vectors`:

- our vector file: safetensors with tensors such as `direction` `[D]` or `directions` `[L, D]`
  (row l = output of decoder block l = HF `hidden_states[l + 1]`), and metadata stored in the
  safetensors `__metadata__` as one JSON string under the key `"emgeo"` (model, layers, method,
  pooling, counts, dtype, ...). With several tensors the caller picks one with `key`.
- `.npy` arrays `[D]` or `[L, D]`.
- PyTorch `.pt` holding a tensor or a dict of tensors, read with `torch.load(weights_only=True)`
  (never unpickling arbitrary objects) and only if torch is importable.

`load_activations` reads per-example pooled activations: safetensors with `pooled` `[N, L, D]`
and `label` `[N]` (1 = misaligned, 0 = aligned).

Every error names the file and the tensor or field at fault.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

METADATA_KEY = "emgeo"


class VectorFileError(ValueError):
    """A vector or activation file that cannot be read as asked (names file and field)."""


def save_vectors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Write `tensors` (name -> array) to a safetensors file with `metadata` as JSON under "emgeo".

    Arrays are stored in their own dtype (contiguous copies); the metadata must be JSON-able.
    """
    from safetensors.numpy import save_file

    arrays = {name: np.ascontiguousarray(np.asarray(t)) for name, t in tensors.items()}
    if not arrays:
        raise VectorFileError(f"{path}: no tensors to save")
    save_file(arrays, str(path), metadata={METADATA_KEY: json.dumps(metadata)})


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            raw_meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise VectorFileError(f"{path}: not a readable safetensors file ({e})") from e
    metadata: dict[str, Any] = {}
    if METADATA_KEY in raw_meta:
        try:
            metadata = json.loads(raw_meta[METADATA_KEY])
        except json.JSONDecodeError as e:
            raise VectorFileError(f"{path}: metadata field '{METADATA_KEY}' is not JSON") from e
    return tensors, metadata


def _read_torch(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as e:
        raise VectorFileError(
            f"{path}: reading .pt files needs PyTorch, which is not installed"
        ) from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise VectorFileError(f"{path}: torch.load(weights_only=True) failed ({e})") from e
    if isinstance(obj, torch.Tensor):
        return {"tensor": obj.detach().float().numpy()}
    if isinstance(obj, dict):
        out = {
            str(k): v.detach().float().numpy()
            for k, v in obj.items()
            if isinstance(v, torch.Tensor)
        }
        if out:
            return out
    raise VectorFileError(
        f"{path}: expected a tensor or a dict of tensors, got {type(obj).__name__}"
    )


def _read_any(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if not path.is_file():
        raise VectorFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except Exception as e:
            raise VectorFileError(f"{path}: not a readable .npy array ({e})") from e
        return {"array": arr}, {}
    if suffix in (".pt", ".pth"):
        return _read_torch(path), {}
    raise VectorFileError(f"{path}: unknown vector file type '{suffix}' (.safetensors, .npy, .pt)")


def _pick(path: Path, tensors: dict[str, np.ndarray], key: str | None) -> tuple[str, np.ndarray]:
    if key is not None:
        if key not in tensors:
            raise VectorFileError(f"{path}: no tensor '{key}' (has {sorted(tensors)})")
        return key, tensors[key]
    if len(tensors) != 1:
        raise VectorFileError(f"{path}: holds tensors {sorted(tensors)}; choose one with key=")
    return next(iter(tensors.items()))


def load_vectors(
    path: str | Path, layer: int | None = None, key: str | None = None
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one direction `[D]` or a per-layer stack `[L, D]` as float32.

    With `layer`, a stack is reduced to its row `layer` (output of block `layer`; negative
    indices count from the end) and a `[D]` vector is returned as is only if `layer` is None.
    Returns the array and the file's metadata (plus "tensor" and "path").
    """
    path = Path(path)
    tensors, metadata = _read_any(path)
    name, arr = _pick(path, tensors, key)
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise VectorFileError(
            f"{path}: tensor '{name}' has shape {arr.shape}; expected [D] or [L, D]"
        )
    if not np.all(np.isfinite(arr)):
        raise VectorFileError(f"{path}: tensor '{name}' contains NaN or inf")
    if layer is not None:
        if arr.ndim == 1:
            raise VectorFileError(f"{path}: tensor '{name}' is one vector [D]; layer={layer} given")
        if not -arr.shape[0] <= layer < arr.shape[0]:
            raise VectorFileError(
                f"{path}: tensor '{name}' has {arr.shape[0]} layers; layer={layer} is out of range"
            )
        arr = arr[layer]
    return arr, {**metadata, "tensor": name, "path": str(path)}


def load_activations(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read per-example pooled activations: `pooled` `[N, L, D]` float32, `label` `[N]` int.

    Labels are 1 = misaligned, 0 = aligned; both classes must be present.
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise VectorFileError(f"{path}: activations must be a .safetensors file")
    tensors, metadata = _read_any(path)
    for field in ("pooled", "label"):
        if field not in tensors:
            raise VectorFileError(f"{path}: missing tensor '{field}' (has {sorted(tensors)})")
    pooled = np.asarray(tensors["pooled"], dtype=np.float32)
    label = np.asarray(tensors["label"])
    if pooled.ndim != 3:
        raise VectorFileError(
            f"{path}: tensor 'pooled' has shape {pooled.shape}; expected [N, L, D]"
        )
    if label.shape != (pooled.shape[0],):
        raise VectorFileError(
            f"{path}: tensor 'label' has shape {label.shape}; expected [{pooled.shape[0]}]"
        )
    if not np.isin(label, (0, 1)).all():
        raise VectorFileError(
            f"{path}: tensor 'label' must hold only 0 (aligned) and 1 (misaligned)"
        )
    if len(np.unique(label)) < 2:
        raise VectorFileError(
            f"{path}: tensor 'label' has a single class; need aligned and misaligned"
        )
    return pooled, label.astype(np.int64), {**metadata, "path": str(path)}
