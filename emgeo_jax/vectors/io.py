"""Vector and activation files: one reader and one writer that every part of emgeo_jax shares.

Formats read by `load_vectors`:

- our vector file: safetensors with tensors such as `direction` `[D]` or `directions` `[L, D]`,
  and metadata stored in the safetensors `__metadata__` as one JSON string under the key
  `"emgeo"` (model, layers, method, pooling, counts, dtype, ...). With several tensors the
  caller picks one with `key`.
- `.npy` arrays `[D]` or `[L, D]`.
- PyTorch `.pt` / `.pth`, read with `torch.load(weights_only=True)` (never unpickling
  arbitrary objects) and only if torch is importable, holding
  - a tensor `[D]` or `[R, D]` (persona_vectors' `{trait}_response_avg_diff.pt` etc. are
    `[L+1, D]` stacks indexed like HF `hidden_states`: see "Layers of the rows");
  - a dict of tensors (pick one with `key`);
  - model-organisms-for-EM (MO4EM) layouts: a list of `[D]` tensors, one per layer (row i =
    layer i); a dict `{"layer_i": [D]}` (layer i = output of `model.model.layers[i]`, their
    forward hooks); nested `{"answer": {"layer_i": [D]}, "question": {...}}` or a dict of
    lists `{"answer": [[D], ...], ...}` (pick `answer` / `question` with `key`).

`load_activations` reads per-example pooled activations: safetensors with `pooled` `[N, L, D]`
and `label` `[N]` (1 = misaligned, 0 = aligned).

Layers of the rows. Layer l is the output of decoder block l (HF `hidden_states[l + 1]`). A
file may hold only some layers (`emgeo extract --layers 12,16` -> `[2, D]` stacks): row i of
a stack (axis 1 of `pooled`) is for layer `layers[i]` of the metadata `layers`; a file
without that metadata has rows 0..L-1 for layers 0..L-1. A stack with no emgeo metadata at
all (a plain tensor from PyTorch or numpy, a list) is *implicit*: its rows are checked
against the model's layer count L when one is known (`LayerVectors.for_model`, called by
every steering and ablation path, or `load_layer_vectors(..., num_layers=L)`): `[L, D]` is
layers 0..L-1; `[L+1, D]` is persona_vectors' layout, HF `hidden_states` order (row 0 =
embeddings, dropped; row l+1 = layer l), said on stderr; any other row count is refused
naming the shape and these layouts. A stack of L+1 rows is never taken as layers 0..L.
Without a layer count (geometry, transfer) an implicit stack is read as layers 0..R-1 with a
warning. Every reader looks a real layer up with `row_of` (through `LayerVectors.at`,
`load_vectors(..., layer=)` or `load_activations(..., layer=)`), which refuses a layer the
file does not hold, naming the file and the layers it holds. A `[D]` vector is valid at any
layer.

Every error names the file and the tensor or field at fault.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from emgeo_jax import runs
from emgeo_jax.runs import METADATA_KEY as METADATA_KEY  # re-exported: its old home

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # implicit stacks already warned about in `LayerVectors.at`
_LAYER_KEY = re.compile(r"(?:model\.)?layers?[._]?(\d+)")


class VectorFileError(ValueError):
    """A vector or activation file that cannot be read as asked (names file and field)."""


def row_layers(n_rows: int, metadata: Mapping[str, Any], source: str | Path) -> tuple[int, ...]:
    """The layer of each of a file's `n_rows` layer rows: its metadata `layers` (distinct
    non-negative ints, one per row), or `0..n_rows-1` when the metadata has none."""
    layers = metadata.get("layers")
    if layers is None:
        return tuple(range(n_rows))
    ok = isinstance(layers, list) and all(
        isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in layers
    )
    if not ok or len(layers) != n_rows or len(set(layers)) != n_rows:
        raise VectorFileError(
            f"{source}: metadata 'layers' {layers!r} must list the layer of each of its "
            f"{n_rows} rows (distinct integers >= 0)"
        )
    return tuple(layers)


def row_of(layers: Sequence[int], layer: int, source: str | Path) -> int:
    """The row holding real layer `layer` (output of block `layer`) in a file whose rows are
    for `layers`; a VectorFileError naming `source` and its layers if it has no such row."""
    if isinstance(layer, bool) or int(layer) != layer or int(layer) not in layers:
        raise VectorFileError(f"{source}: no row for layer {layer}; it holds layers {list(layers)}")
    return list(layers).index(int(layer))


@dataclasses.dataclass(frozen=True, eq=False)
class LayerVectors:
    """One direction `[D]` (valid at every layer) or a per-layer stack `[L, D]` with the real
    layer of each row: row i is for the output of block `layers[i]`.

    values: float32 `[D]` or `[L, D]`, finite.
    layers: the layer of each row of a stack (None for `[D]`).
    source: the file (or "array"), named in errors.
    implicit: True for a stack whose rows no metadata names (a plain tensor or a list): its
      rows are provisionally layers 0..R-1 until `for_model` checks them against the model.
    layout: which of the accepted layouts the rows were read as (said in messages).
    """

    values: np.ndarray
    layers: tuple[int, ...] | None
    source: str = "array"
    implicit: bool = False
    layout: str = "array"

    def __post_init__(self) -> None:
        v = self.values
        if v.ndim not in (1, 2) or v.size == 0:
            raise VectorFileError(f"{self.source}: shape {v.shape}; expected [D] or [L, D]")
        if (self.layers is None) != (v.ndim == 1) or (
            self.layers is not None and len(self.layers) != v.shape[0]
        ):
            raise VectorFileError(
                f"{self.source}: layers {self.layers} do not match the rows of {v.shape}"
            )

    @classmethod
    def of(cls, v: Any, source: str = "array") -> LayerVectors:
        """`v` itself if a `LayerVectors`, else an array `[D]` or `[L, D]` whose rows are
        layers `0..L-1`."""
        if isinstance(v, LayerVectors):
            return v
        arr = np.asarray(v, np.float32)
        return cls(arr, tuple(range(arr.shape[0])) if arr.ndim == 2 else None, source)

    @property
    def width(self) -> int:
        """D."""
        return int(self.values.shape[-1])

    @property
    def is_stack(self) -> bool:
        return self.values.ndim == 2

    def for_model(self, num_layers: int) -> LayerVectors:
        """These vectors with their rows resolved for a model of `num_layers` decoder blocks.

        Only an implicit stack `[R, D]` changes: R == L is layers 0..L-1; R == L + 1 is
        persona_vectors' `hidden_states` order (row 0 = embeddings, dropped; row l+1 = layer
        l; logged as a warning); any other R is refused naming the shape and the layouts."""
        if not (self.is_stack and self.implicit):
            return self
        rows = self.values.shape[0]
        if rows == num_layers:
            return dataclasses.replace(self, implicit=False, layout=f"plain [{rows}, D]")
        if rows == num_layers + 1:
            log.warning(
                "%s: [%d, %d] read as persona_vectors' layout for a %d-layer model (HF "
                "hidden_states order): row 0 = embeddings (dropped), row l+1 = layer l "
                "(output of block l)",
                self.source,
                rows,
                self.width,
                num_layers,
            )
            return dataclasses.replace(
                self,
                values=self.values[1:],
                layers=tuple(range(num_layers)),
                implicit=False,
                layout=f"persona_vectors [{rows}, D] (row 0 = embeddings dropped)",
            )
        raise VectorFileError(
            f"{self.source}: a stack of shape {tuple(self.values.shape)} ({self.layout}) "
            f"without layer metadata does not fit a {num_layers}-layer model; accepted: "
            f"[{num_layers}, D] (rows = layers 0..{num_layers - 1}), persona_vectors' "
            f"[{num_layers + 1}, D] (row 0 = embeddings, row l+1 = layer l), a [D] vector, "
            "MO4EM's {'layer_i': [D]} dicts, or our safetensors whose metadata 'layers' "
            "names each row"
        )

    def at(self, layer: int) -> np.ndarray:
        """The vector `[D]` for `layer`: the vector itself, or the stack's row for that real
        layer (refused, naming the file and its layers, if the stack has none)."""
        if not self.is_stack:
            return self.values
        if self.implicit and self.source not in _WARNED:
            _WARNED.add(self.source)
            log.warning(
                "%s: [%d, D] without layer metadata read as layers 0..%d with no model layer "
                "count to check it against (a persona_vectors [L+1, D] file would be one layer "
                "off: give the model's layer count, num_layers=)",
                self.source,
                self.values.shape[0],
                self.values.shape[0] - 1,
            )
        return self.values[row_of(self.layers, layer, self.source)]


def save_vectors(path: str | Path, tensors: dict[str, Any], metadata: dict[str, Any]) -> None:
    """Write `tensors` (name -> array) atomically to a safetensors file with `metadata` as JSON
    under "emgeo" (`emgeo_jax.runs.save_safetensors_atomic`).

    Arrays are stored in their own dtype (contiguous copies); the metadata must be JSON-able.
    """
    if not tensors:
        raise VectorFileError(f"{path}: no tensors to save")
    runs.save_safetensors_atomic(path, tensors, metadata)


def _read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    return runs.read_safetensors(path, VectorFileError)


def parse_metadata(raw: Mapping[str, str] | None, path: str | Path) -> dict[str, Any]:
    """Our metadata (the JSON under "emgeo") from a safetensors header's `__metadata__`
    (`safe_open(...).metadata()`); {} when absent."""
    return runs.parse_metadata(raw, path, VectorFileError)


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One candidate vector set of a file: values, the layers its names give (None: none),
    and the layout it was read as."""

    values: np.ndarray
    layers: tuple[int, ...] | None
    layout: str


def _layer_index(key: Any) -> int | None:
    """The layer a dict key names (`layer_12`, `layers.12`, `model.layers.12`, 12), else None."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key if key >= 0 else None
    m = _LAYER_KEY.fullmatch(str(key))
    return int(m.group(1)) if m else None


def _torch_entry(value: Any, torch: Any, where: str) -> _Entry | None:
    """A tensor, a list of `[D]` tensors (one per layer) or a `{"layer_i": [D]}` dict as an
    `_Entry`; None for anything else (ints, strings, other containers are not vectors)."""
    if isinstance(value, torch.Tensor):
        return _Entry(value.detach().float().numpy(), None, "tensor")
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(v, torch.Tensor) and v.ndim == 1 for v in value):
            stack = np.stack([v.detach().float().numpy() for v in value])
            return _Entry(stack, None, f"list of {len(value)} [D] tensors")
        return None
    if isinstance(value, dict) and value:
        idx = {k: _layer_index(k) for k in value}
        if any(i is None for i in idx.values()):
            return None
        if not all(isinstance(v, torch.Tensor) and v.ndim == 1 for v in value.values()):
            raise VectorFileError(f"{where}: every 'layer_i' entry must be a [D] tensor")
        if len(set(idx.values())) != len(idx):
            raise VectorFileError(f"{where}: keys {list(value)} name a layer twice")
        order = sorted(value, key=lambda k: idx[k])
        stack = np.stack([value[k].detach().float().numpy() for k in order])
        return _Entry(stack, tuple(idx[k] for k in order), "MO4EM {'layer_i': [D]} dict")
    return None


def _read_torch_entries(path: Path) -> dict[str, _Entry]:
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
    whole = _torch_entry(obj, torch, str(path))
    if whole is not None:
        name = "tensor" if isinstance(obj, torch.Tensor) else "layers"
        return {name: whole}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            entry = _torch_entry(v, torch, f"{path} [{k!r}]")
            if entry is not None:
                out[str(k)] = entry
        if out:
            return out
    raise VectorFileError(
        f"{path}: expected a tensor, a dict of tensors, a list of [D] tensors or MO4EM's "
        f"{{'layer_i': [D]}} (possibly under 'answer'/'question'); got {type(obj).__name__}"
    )


def read_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """All tensors of a `.safetensors`, `.npy` or `.pt` file and our metadata ({} if none);
    errors name the file."""
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
        return {k: e.values for k, e in _read_torch_entries(path).items()}, {}
    raise VectorFileError(f"{path}: unknown vector file type '{suffix}' (.safetensors, .npy, .pt)")


def _pick(path: Path, entries: Mapping[str, Any], key: str | None) -> tuple[str, Any]:
    if key is not None:
        if key not in entries:
            raise VectorFileError(f"{path}: no tensor '{key}' (has {sorted(entries)})")
        return key, entries[key]
    if len(entries) != 1:
        raise VectorFileError(
            f"{path}: holds {sorted(entries)}; choose one with key= (--key on the command line)"
        )
    return next(iter(entries.items()))


def _entries(path: Path) -> tuple[dict[str, _Entry], dict[str, Any]]:
    """The file's candidate vector sets and our metadata ({} if none)."""
    if path.suffix.lower() in (".pt", ".pth") and path.is_file():
        return _read_torch_entries(path), {}
    tensors, metadata = read_tensors(path)
    kind = "safetensors" if path.suffix.lower() == ".safetensors" else "array"
    return {k: _Entry(np.asarray(v), None, kind) for k, v in tensors.items()}, metadata


def load_layer_vectors(
    path: str | Path, key: str | None = None, num_layers: int | None = None
) -> LayerVectors:
    """Read one direction `[D]` or a per-layer stack `[L, D]` (float32) with the real layer of
    each row (see the module docstring). With `num_layers` (the model's L), an implicit
    stack is resolved at once (`LayerVectors.for_model`); otherwise steering resolves it."""
    vectors = _load(Path(path), key)[0]
    return vectors if num_layers is None else vectors.for_model(num_layers)


def _load(path: Path, key: str | None) -> tuple[LayerVectors, dict[str, Any]]:
    entries, metadata = _entries(path)
    name, entry = _pick(path, entries, key)
    arr = np.asarray(entry.values, dtype=np.float32)
    if arr.ndim not in (1, 2) or arr.size == 0:
        raise VectorFileError(
            f"{path}: tensor '{name}' has shape {arr.shape}; expected [D] or [L, D]"
        )
    if not np.all(np.isfinite(arr)):
        raise VectorFileError(f"{path}: tensor '{name}' contains NaN or inf")
    implicit = False
    if arr.ndim == 1:
        layers = None
    elif entry.layers is not None:
        layers = entry.layers
    else:
        layers = row_layers(arr.shape[0], metadata, path)
        implicit = not metadata  # no emgeo metadata at all: a raw tensor from elsewhere
    layout = entry.layout if not metadata.get("layers") else "emgeo metadata 'layers'"
    meta = {**metadata, "tensor": name, "path": str(path), "layout": layout}
    return LayerVectors(arr, layers, str(path), implicit, layout), meta


def load_vectors(
    path: str | Path,
    layer: int | None = None,
    key: str | None = None,
    num_layers: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one direction `[D]` or a per-layer stack `[L, D]` as float32.

    With `layer` (a real layer, output of block `layer`), a stack is reduced to the row for
    that layer (`row_of`: refused if the file does not hold it) and a `[D]` vector is returned
    as is. `num_layers` (the model's L) resolves an implicit stack first (see
    `LayerVectors.for_model`). Returns the array and the file's metadata (plus "tensor",
    "path", "layout"; for a stack, "layers" = the layer of each row).
    """
    vectors, meta = _load(Path(path), key)
    if num_layers is not None:
        vectors = vectors.for_model(num_layers)
        meta["layout"] = vectors.layout
    if vectors.is_stack:
        meta["layers"] = list(vectors.layers)
    return (vectors.values if layer is None else vectors.at(layer)), meta


def load_activations(
    path: str | Path, layer: int | None = None
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read per-example pooled activations: `pooled` `[N, L, D]` float32, `label` `[N]` int.

    Labels are 1 = misaligned, 0 = aligned; both classes must be present. The metadata's
    "layers" is the layer of each of the L rows (see the module docstring); with `layer`,
    `pooled` is that real layer's rows `[N, D]` (refused if the file does not hold it).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise VectorFileError(f"{path}: activations must be a .safetensors file")
    tensors, metadata = read_tensors(path)
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
    layers = row_layers(pooled.shape[1], metadata, path)
    if layer is not None:
        pooled = pooled[:, row_of(layers, layer, path)]
    return pooled, label.astype(np.int64), {**metadata, "layers": list(layers), "path": str(path)}
