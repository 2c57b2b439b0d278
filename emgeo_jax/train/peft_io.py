"""PEFT interop: write a LoRA as an HF PEFT adapter folder, and read any PEFT LoRA adapter
(through `emgeo_jax.convert.peft.read_adapter`, the reader the model loader merges with).

Names come from the parameter table `emgeo_jax.models.params.PARAMS`; PEFT prefixes them with
`base_model.model.` and replaces `.weight` with `.lora_A.weight` / `.lora_B.weight`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from emgeo_jax.convert.hf import CheckpointError
from emgeo_jax.convert.peft import PEFT_PREFIX, LoraAdapter, read_adapter
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.params import LORA_PARAMS
from emgeo_jax.runs import atomic_path, write_json_atomic
from emgeo_jax.train.lora import PEFT_MODULES, TARGETS, Lora, LoraSpec, kernel_shape


def hf_weight_name(target: str, layer: int) -> str:
    """HF name of the base weight an adapter on `target` at block `layer` modifies."""
    return LORA_PARAMS[target].hf.format(l=layer)


def export_peft(
    lora: Lora, spec: LoraSpec, folder: str | Path, base_model: str = "", dropout: float = 0.0
) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (fp32) that `peft` loads with
    `PeftModel.from_pretrained(hf_model, folder)`."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for target in spec.targets:
        a, b = (np.asarray(lora[target][k], np.float32) for k in ("a", "b"))
        for i, layer in enumerate(spec.layers):
            stem = PEFT_PREFIX + hf_weight_name(target, layer).removesuffix(".weight")
            tensors[f"{stem}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{stem}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    with atomic_path(folder / "adapter_model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "use_rslora": spec.rslora,
        "target_modules": [PEFT_MODULES[t] for t in spec.targets],
        "layers_to_transform": list(spec.layers),
        "layers_pattern": "layers",
        "lora_dropout": dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    write_json_atomic(folder / "adapter_config.json", config, indent=2)
    return folder


def lora_from_adapter(adapter: LoraAdapter, cfg: ModelConfig) -> tuple[LoraSpec, Lora]:
    """An adapter read by `read_adapter` as `(spec, lora)` with exactly the same deltas.

    Modules may differ in rank, scale and layers (PEFT `rank_pattern` / `alpha_pattern`,
    per-module layer sets): the spec takes the largest rank, the union of layers and the
    first module's scale; smaller ranks are zero-padded, other scales are folded into `b`,
    and layers a module lacks get zero factors, all of which leave `scale * a @ b` unchanged."""
    inverse = {}
    for target, row in LORA_PARAMS.items():
        for layer in range(cfg.num_layers):
            inverse[row.hf.format(l=layer)] = (target, layer)
    found: dict[tuple[str, int], tuple[np.ndarray, np.ndarray, float]] = {}
    for name, factors in adapter.factors.items():
        if name not in inverse:
            raise CheckpointError(
                f"{adapter.folder}: adapter targets {name}, which is not a LoRA target of a "
                f"{cfg.num_layers}-layer model (targets: {sorted(PEFT_MODULES.values())})"
            )
        found[inverse[name]] = factors
    if not found:
        raise CheckpointError(f"{adapter.folder}: adapter holds no LoRA factors")
    targets = tuple(t for t in TARGETS if any(k[0] == t for k in found))
    layers = tuple(sorted({k[1] for k in found}))
    rank = max(a.shape[0] for a, _, _ in found.values())
    scale = next(iter(found.values()))[2]
    spec = LoraSpec(rank=rank, alpha=scale * rank, targets=targets, layers=layers)
    lora: Lora = {}
    for target in targets:
        fan_in, fan_out = kernel_shape(cfg, target)
        a_all = np.zeros((len(layers), fan_in, rank), np.float32)
        b_all = np.zeros((len(layers), rank, fan_out), np.float32)
        for i, layer in enumerate(layers):
            if (target, layer) not in found:
                continue
            a, b, s = found[(target, layer)]
            if a.shape[1] != fan_in or b.shape[0] != fan_out:
                raise CheckpointError(
                    f"{adapter.folder}: {hf_weight_name(target, layer)} LoRA has shape "
                    f"{(b.shape[0], a.shape[1])}, the model's weight is {(fan_out, fan_in)}"
                )
            r = a.shape[0]
            a_all[i, :, :r] = a.T
            b_all[i, :r, :] = b.T * (s / spec.scale)
        lora[target] = {"a": a_all, "b": b_all}
    return spec, lora


def import_peft(folder: str | Path, cfg: ModelConfig) -> tuple[LoraSpec, Lora]:
    """Read a PEFT LoRA adapter folder as `(spec, lora)` (see `lora_from_adapter`)."""
    return lora_from_adapter(read_adapter(folder), cfg)
