"""Reading and writing SAE folders: dictionary_learning and SAELens.

dictionary_learning (e.g. Arditi's Qwen2.5-7B-Instruct SAEs,
`resid_post_layer_{L}/trainer_{i}/`): `config.json` (`trainer.dict_class`, `trainer.k`,
`trainer.activation_dim`, `trainer.dict_size`, `trainer.layer`, `trainer.lm_name`) and
`ae.pt`, a torch state dict:

    BatchTopKSAE, AutoEncoderTopK   encoder.weight [F, D], encoder.bias [F],
                                    decoder.weight [D, F], b_dec [D], k [], threshold []
    JumpReluAutoEncoder             W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D],
                                    threshold [F]   (b_dec NOT subtracted from the input)
    AutoEncoder (standard ReLU)     encoder.weight, encoder.bias, decoder.weight, bias [D]

`ae.pt` is read once with `torch.load(weights_only=True)` (which refuses pickled objects
other than tensors and plain containers) and written beside it as `ae.safetensors`, whose
metadata records the sha256 of the `ae.pt` bytes; later loads use it (and need no torch)
only while that hash matches, so a replaced `ae.pt` is re-read whatever its timestamps.

SAELens: `cfg.json` (`d_in`, `d_sae`, `architecture` in standard/jumprelu/topk, `k`,
`hook_name`, `apply_b_dec_to_input`, `normalize_activations`; hook and model fields may sit
under `metadata`) and `sae_weights.safetensors` (`W_enc [D, F]`, `b_enc`, `W_dec [F, D]`,
`b_dec`, `threshold [F]` for jumprelu). Configurations read exactly:

- v5 `activation_fn_str` (or `activation_fn`): `relu`; `tanh-relu` = tanh(relu(pre));
  `topk` with `activation_fn_kwargs.k` (the v5 spelling of a TopK SAE);
- v5 `finetuning_scaling_factor: true` with the tensor `finetuning_scaling_factor [F]`:
  decode = (f * s) @ W_dec + b_dec, folded here into W_dec's rows (encode is unaffected);
- v6.14+ TopK `rescale_acts_by_decoder_norm: true`: pre-activations times |W_dec_i| before
  the top k, decode (f / |W_dec_i|) @ W_dec; folded here into W_enc, b_enc and W_dec
  (exact; `save_inference_model` writes unit decoder rows, for which it is a no-op);
- refused with the field named: `normalize_activations` other than none, `hook_head_index`,
  `reshape_activations`, other architectures and activation functions.

Hook points map to our layer convention (layer l = output of block l = HF hidden_states[l+1]):
`blocks.l.hook_resid_post`, `model.layers.l`, `resid_post_layer_l` -> l;
`blocks.l.hook_resid_pre` -> l - 1. Anything else is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from emgeo_jax.data.files import file_sha256
from emgeo_jax.runs import atomic_path, read_safetensors, write_json_atomic
from emgeo_jax.vectors.sae.model import SAE, SAEError, check_fits, make_sae

DL_CLASSES = {
    "BatchTopKSAE": "batchtopk",
    "AutoEncoderTopK": "topk",
    "JumpReluAutoEncoder": "jumprelu",
    "AutoEncoder": "relu",
}
SAELENS_ARCHS = {"standard": "relu", "jumprelu": "jumprelu", "topk": "topk"}
SAELENS_CFG, SAELENS_WEIGHTS = "cfg.json", "sae_weights.safetensors"
SOURCE_SHA256 = "source_sha256"  # metadata of a converted ae.safetensors: sha256 of its ae.pt

_HOOKS = (
    (re.compile(r"blocks\.(\d+)\.hook_resid_post"), 0),
    (re.compile(r"blocks\.(\d+)\.hook_resid_pre"), -1),
    (re.compile(r"(?:model\.)?layers\.(\d+)"), 0),
    (re.compile(r"resid_post_layer_(\d+)"), 0),
)


def hook_to_layer(hook: str, where: str) -> int:
    """Our layer index for a hook-point name (see module docstring); `where` names the file."""
    for pattern, shift in _HOOKS:
        m = pattern.fullmatch(hook)
        if m:
            layer = int(m.group(1)) + shift
            if layer < 0:
                raise SAEError(f"{where}: hook {hook!r} reads the embeddings (not a layer)")
            return layer
    raise SAEError(
        f"{where}: unsupported hook point {hook!r}; only the residual stream is supported "
        "(blocks.L.hook_resid_post, blocks.L.hook_resid_pre, model.layers.L, resid_post_layer_L)"
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise SAEError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise SAEError(f"{path}: not valid JSON ({e})") from e


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    return read_safetensors(path, SAEError)[0]


def read_torch_state_dict(path: Path) -> dict[str, np.ndarray]:
    """Tensors of a torch `.pt` state dict as float32 numpy, via `weights_only=True` (never
    executing pickled code), converted once to `<stem>.safetensors` beside it if the folder
    is writable. The converted file records the sha256 of the `.pt` bytes it came from and
    is used only while they match, so a replaced `.pt` is picked up whatever its timestamps
    (`cp -p`, `rsync -a`, `tar x` keep old ones); a match needs no torch."""
    converted = path.with_suffix(".safetensors")
    digest = file_sha256(path)
    if converted.exists():
        from safetensors import safe_open

        try:
            with safe_open(str(converted), framework="numpy") as f:
                recorded = (f.metadata() or {}).get(SOURCE_SHA256)
        except Exception:  # unreadable or truncated cache: convert again
            recorded = None
        if recorded == digest:
            return _read_safetensors(converted)
    try:
        import torch
    except ImportError as e:
        raise SAEError(
            f"{path}: reading a .pt file needs PyTorch once (it is then converted to "
            f"{converted.name}); install torch or convert the file elsewhere"
        ) from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise SAEError(
            f"{path}: refused by torch.load(weights_only=True): it holds something other than "
            f"tensors ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from e
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SAEError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    arrays = {str(k): v.detach().float().contiguous().numpy() for k, v in obj.items()}
    try:
        from safetensors.numpy import save_file

        with atomic_path(converted) as tmp:
            save_file(arrays, str(tmp), metadata={SOURCE_SHA256: digest})
    except OSError:
        pass  # read-only folder: convert again next time
    return arrays


def _need(tensors: dict[str, np.ndarray], key: str, where: Path) -> np.ndarray:
    if key not in tensors:
        raise SAEError(f"{where}: missing tensor {key!r} (have {sorted(tensors)})")
    return tensors[key]


def load_dictionary_learning(folder: str | Path) -> SAE:
    """An `SAE` from a dictionary_learning trainer folder (`config.json` + `ae.pt`)."""
    folder = Path(folder)
    cfg_path = folder / "config.json"
    trainer = _read_json(cfg_path).get("trainer")
    if not isinstance(trainer, dict):
        raise SAEError(f"{cfg_path}: missing the 'trainer' section")
    dict_class = trainer.get("dict_class")
    if dict_class not in DL_CLASSES:
        raise SAEError(
            f"{cfg_path}: trainer.dict_class={dict_class!r} is not supported; "
            f"supported: {sorted(DL_CLASSES)}"
        )
    arch = DL_CLASSES[dict_class]
    pt = folder / "ae.pt"
    st = folder / "ae.safetensors"
    where = pt if pt.exists() else st
    if pt.exists():
        t = read_torch_state_dict(pt)
    elif st.exists():
        t = _read_safetensors(st)
    else:
        raise SAEError(f"{folder}: no ae.pt or ae.safetensors")
    if arch == "jumprelu":
        w_enc, b_enc = _need(t, "W_enc", where), _need(t, "b_enc", where)
        w_dec, b_dec = _need(t, "W_dec", where), _need(t, "b_dec", where)
        threshold = _need(t, "threshold", where)
    else:
        w_enc = _need(t, "encoder.weight", where).T
        b_enc = _need(t, "encoder.bias", where)
        w_dec = _need(t, "decoder.weight", where).T
        b_dec = _need(t, "bias" if arch == "relu" else "b_dec", where)
        threshold = t.get("threshold") if arch == "batchtopk" else None
    d, f = trainer.get("activation_dim"), trainer.get("dict_size")
    if (d, f) != tuple(w_enc.shape):
        raise SAEError(
            f"{cfg_path}: trainer.activation_dim/dict_size = {d}/{f} but {where.name} holds "
            f"a {w_enc.shape[0]} x {w_enc.shape[1]} dictionary"
        )
    k = 0
    if arch in ("topk", "batchtopk"):
        k = int(_need(t, "k", where)) if "k" in t else int(trainer.get("k", 0))
        if trainer.get("k") is not None and int(trainer["k"]) != k:
            raise SAEError(f"{cfg_path}: trainer.k={trainer['k']} but {where.name} has k={k}")
    if arch == "batchtopk":
        if threshold is None or float(np.max(threshold)) < 0:
            raise SAEError(
                f"{where}: BatchTopK 'threshold' is missing or negative (never calibrated); "
                "the inference rule needs it"
            )
    layer = _dl_layer(folder, trainer, cfg_path)
    return make_sae(
        w_enc,
        b_enc,
        w_dec,
        b_dec,
        threshold,
        architecture=arch,
        k=k,
        apply_b_dec_to_input=arch != "jumprelu",
        layer=layer,
        source=str(folder),
    )


def _dl_layer(folder: Path, trainer: dict[str, Any], cfg_path: Path) -> int | None:
    """Layer from `trainer.submodule_name` / the `resid_post_layer_L` folder / `trainer.layer`,
    which must agree when several are present."""
    found: dict[str, int] = {}
    sub = trainer.get("submodule_name")
    if sub:
        found["trainer.submodule_name"] = hook_to_layer(str(sub), str(cfg_path))
    for part in (folder.name, folder.parent.name):
        if part.startswith("resid_post_layer_"):
            found[f"folder {part}"] = hook_to_layer(part, str(folder))
    if trainer.get("layer") is not None:
        found["trainer.layer"] = int(trainer["layer"])
    if len(set(found.values())) > 1:
        raise SAEError(f"{cfg_path}: inconsistent layers {found}")
    return next(iter(found.values()), None)


def load_saelens(folder: str | Path) -> SAE:
    """An `SAE` from a SAELens folder (`cfg.json` + `sae_weights.safetensors`), exact for
    every configuration SAELens v3-v6 writes that reads the plain residual stream (see the
    module docstring); anything else is refused naming the field."""
    folder = Path(folder)
    cfg_path = folder / SAELENS_CFG
    cfg = _read_json(cfg_path)
    meta = cfg.get("metadata") or {}
    arch_name = cfg.get("architecture", "standard")
    act = cfg.get("activation_fn_str", cfg.get("activation_fn")) or "relu"
    act_kwargs = cfg.get("activation_fn_kwargs") or {}
    if arch_name == "standard" and act == "topk":
        arch_name = "topk"  # SAELens v5: TopK is the standard architecture's activation
    if arch_name not in SAELENS_ARCHS:
        raise SAEError(
            f"{cfg_path}: architecture={arch_name!r} is not supported; "
            f"supported: {sorted(SAELENS_ARCHS)}"
        )
    if act not in ("relu", "tanh-relu", "topk"):
        raise SAEError(
            f"{cfg_path}: activation_fn_str={act!r} is not supported (relu, tanh-relu, topk)"
        )
    tanh = act == "tanh-relu"
    if tanh and arch_name not in ("standard", "jumprelu"):
        raise SAEError(f"{cfg_path}: activation_fn_str='tanh-relu' with architecture {arch_name}")
    norm = cfg.get("normalize_activations") or "none"
    if norm != "none":
        raise SAEError(
            f"{cfg_path}: normalize_activations={norm!r} is not supported (only 'none': the "
            "SAE must read raw residual activations)"
        )
    if cfg.get("hook_head_index") is not None:
        raise SAEError(f"{cfg_path}: hook_head_index is set; only full residual SAEs supported")
    reshape = cfg.get("reshape_activations") or "none"
    if reshape != "none":
        raise SAEError(f"{cfg_path}: reshape_activations={reshape!r}; only 'none' is supported")
    weights_path = folder / SAELENS_WEIGHTS
    t = _read_safetensors(weights_path)
    arch = SAELENS_ARCHS[arch_name]
    w_enc = _need(t, "W_enc", weights_path).astype(np.float32)
    if (cfg.get("d_in"), cfg.get("d_sae")) != tuple(w_enc.shape):
        raise SAEError(
            f"{cfg_path}: d_in/d_sae = {cfg.get('d_in')}/{cfg.get('d_sae')} but "
            f"{SAELENS_WEIGHTS} holds W_enc of shape {w_enc.shape}"
        )
    b_enc = _need(t, "b_enc", weights_path).astype(np.float32)
    w_dec = _need(t, "W_dec", weights_path).astype(np.float32)
    k = 0
    if arch == "topk":
        k = cfg.get("k") or act_kwargs.get("k")
        if not k:
            raise SAEError(f"{cfg_path}: topk architecture without 'k'")
    if cfg.get("finetuning_scaling_factor"):
        # v5: decode = (f * finetuning_scaling_factor) @ W_dec + b_dec; encode unaffected.
        scale = _need(t, "finetuning_scaling_factor", weights_path).astype(np.float32)
        if scale.shape != (w_dec.shape[0],):
            raise SAEError(
                f"{weights_path}: finetuning_scaling_factor has shape {scale.shape}, "
                f"expected ({w_dec.shape[0]},)"
            )
        w_dec = w_dec * scale[:, None]
    if cfg.get("rescale_acts_by_decoder_norm"):
        if arch != "topk":
            raise SAEError(
                f"{cfg_path}: rescale_acts_by_decoder_norm=true is only defined for topk "
                f"SAEs in SAELens, not {arch_name}"
            )
        # v6.14+: pre = (x' @ W_enc + b_enc) * |W_dec_i|, decode = (f / |W_dec_i|) @ W_dec.
        # Folding |W_dec_i| into W_enc, b_enc and W_dec gives the same encode and decode.
        norms = np.linalg.norm(w_dec.astype(np.float64), axis=1)
        if not np.all(norms > 0):
            raise SAEError(
                f"{weights_path}: rescale_acts_by_decoder_norm with zero decoder rows "
                f"{np.flatnonzero(norms == 0)[:5].tolist()}"
            )
        w_enc = (w_enc * norms[None, :]).astype(np.float32)
        b_enc = (b_enc * norms).astype(np.float32)
        w_dec = (w_dec / norms[:, None]).astype(np.float32)
    hook = cfg.get("hook_name") or meta.get("hook_name")
    return make_sae(
        w_enc,
        b_enc,
        w_dec,
        _need(t, "b_dec", weights_path),
        _need(t, "threshold", weights_path) if arch == "jumprelu" else None,
        architecture=arch,
        k=int(k),
        apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
        layer=hook_to_layer(hook, str(cfg_path)) if hook else None,
        source=str(folder),
        tanh=tanh,
    )


def load_sae(path: str | Path, d_model: int | None = None, layer: int | None = None) -> SAE:
    """Load an SAE folder of either format (or an `ae.pt` path), and if `d_model` / `layer`
    are given, check that it fits that model and layer (`SAEError` otherwise)."""
    path = Path(path)
    folder = path.parent if path.is_file() else path
    if (folder / SAELENS_CFG).exists():
        sae = load_saelens(folder)
    elif (folder / "config.json").exists():
        sae = load_dictionary_learning(folder)
    else:
        raise SAEError(
            f"{path}: not an SAE folder (no {SAELENS_CFG} for SAELens, no config.json for "
            "dictionary_learning)"
        )
    if d_model is not None:
        check_fits(sae, d_model, layer)
    return sae


def save_saelens(sae: SAE, folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write `sae` as a SAELens folder. batchtopk is saved as SAELens does for inference:
    architecture `jumprelu` with its (scalar) threshold per feature, which encodes
    identically (threshold >= 0); the training k is kept in `metadata`."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk", "batchtopk": "jumprelu"}
    tensors = {name: np.asarray(getattr(sae, name), np.float32) for name in ("W_enc", "b_enc")}
    tensors |= {name: np.asarray(getattr(sae, name), np.float32) for name in ("W_dec", "b_dec")}
    if arch[sae.architecture] == "jumprelu":
        tensors["threshold"] = np.asarray(sae.threshold, np.float32)
    hook = None if sae.layer is None else f"blocks.{sae.layer}.hook_resid_post"
    meta = {"hook_name": hook, "trained_architecture": sae.architecture, **(extra or {})}
    cfg: dict[str, Any] = {
        "architecture": arch[sae.architecture],
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input,
        "normalize_activations": "none",
        "hook_name": hook,
        "metadata": meta,
    }
    if sae.architecture == "topk":
        cfg["k"] = sae.k
    if sae.tanh:
        cfg["activation_fn_str"] = "tanh-relu"
    if sae.architecture in ("topk", "batchtopk"):
        meta["k"] = sae.k
    tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    with atomic_path(folder / SAELENS_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    write_json_atomic(folder / SAELENS_CFG, cfg, indent=2)
    return folder


def save_feature_directions(
    path: str | Path,
    sae: SAE,
    features,
    metadata: dict[str, Any] | None = None,
    scores=None,
) -> Path:
    """Write the decoder rows of `features` as a vector file for steering and geometry:
    safetensors with `feature_directions [K, D]` (unit rows, no `b_dec`), `features [K]`,
    `decoder_norms [K]` (to steer at the feature's own scale) and optional `scores [K]`;
    JSON metadata under the `emgeo` key (layer, method "sae", sae source, ...), the same
    convention as `emgeo_jax.vectors.io`. Written atomically; the parent folder is created."""
    from emgeo_jax.runs import save_safetensors_atomic

    idx = np.asarray(features, np.int64).reshape(-1)
    rows = np.asarray(sae.W_dec, np.float32)[idx]
    norms = np.linalg.norm(rows, axis=1)
    tensors = {
        "feature_directions": np.ascontiguousarray(rows / norms[:, None]),
        "features": idx,
        "decoder_norms": norms.astype(np.float32),
    }
    if scores is not None:
        tensors["scores"] = np.asarray(scores, np.float32).reshape(-1)
    meta = {"method": "sae", "layer": sae.layer, "sae": sae.source, **(metadata or {})}
    path = Path(path)
    save_safetensors_atomic(path, tensors, meta)
    return path
