"""PEFT LoRA adapters: read `adapter_config.json` + `adapter_model.safetensors`, and merge
them into a base `TensorSource` as `W + scale * B @ A` (HF layout, `A [r, in]`, `B [out, r]`),
`scale = alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from pathlib import Path

import numpy as np

from emgeo_jax.convert.hf import CheckpointError, SafetensorsFiles, TensorSource

# adapter_config.json fields whose non-default values we do not implement.
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "modules_to_save": None}
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """LoRA factors per base weight: `factors[hf_weight_name] = (A [r, in], B [out, r], scale)`;
    `info`: what a converted checkpoint records about the adapter (`describe`)."""

    folder: Path
    factors: dict[str, tuple[np.ndarray, np.ndarray, float]]
    info: dict = dataclasses.field(default_factory=dict)

    def describe(self) -> str:
        """One line for logs and summaries, e.g. `adapter DIR (r=32, alpha=64, rsLoRA no,
        14 weights, sha256 0123abcd...)`."""
        i = self.info
        return (
            f"adapter {i['path']} (r={i['rank']}, alpha={i['alpha']:g}, "
            f"rsLoRA {'yes' if i['use_rslora'] else 'no'}, {i['weights']} weights, "
            f"sha256 {i['sha256'][:12]})"
        )


def read_adapter(folder: str | Path) -> LoraAdapter:
    folder = Path(folder)
    cfg_path = folder / "adapter_config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: cannot read adapter config ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type={cfg['peft_type']!r} is not supported")
    for field, default in UNSUPPORTED.items():
        if cfg.get(field, default) not in (default, [], {}):
            raise CheckpointError(f"{cfg_path}: {field}={cfg[field]!r} is not supported")
    alpha, rank = float(cfg["lora_alpha"]), int(cfg["r"])
    alpha_pattern: dict = cfg.get("alpha_pattern") or {}

    weights_path = folder / "adapter_model.safetensors"
    if not weights_path.exists():
        raise CheckpointError(f"{weights_path}: missing (only safetensors adapters are read)")
    src = SafetensorsFiles([weights_path])
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for name in sorted(src.names):
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.default)?\.weight", name)
        if m is None:
            raise CheckpointError(f"{weights_path}: unexpected tensor {name}")
        module = m.group(1).removeprefix(PEFT_PREFIX)
        pairs.setdefault(module, {})[m.group(2)] = src.get(name).astype(np.float32)

    factors = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise CheckpointError(f"{weights_path}: {module} lacks lora_{missing}")
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if b.shape[1] != r:
            raise CheckpointError(
                f"{weights_path}: {module} lora_B {b.shape} does not fit lora_A {a.shape}"
            )
        # PEFT matches pattern keys as a suffix of the module name; rank comes from the tensors.
        a_mod = next(
            (v for k, v in alpha_pattern.items() if re.match(rf"(.*\.)?{k}$", module)), alpha
        )
        if not cfg.get("rank_pattern") and r != rank:
            raise CheckpointError(f"{weights_path}: {module} has rank {r}, config says r={rank}")
        scale = a_mod / math.sqrt(r) if cfg.get("use_rslora") else a_mod / r
        factors[f"{module}.weight"] = (a, b, scale)
    info = {
        "path": str(folder.absolute()),
        "rank": rank,
        "alpha": alpha,
        "use_rslora": bool(cfg.get("use_rslora")),
        "rank_pattern": cfg.get("rank_pattern") or {},
        "alpha_pattern": alpha_pattern,
        "weights": len(factors),
        # digest of the weights file and the config, in that order
        "sha256": _digest([weights_path, cfg_path]),
    }
    return LoraAdapter(folder, factors, info)


def _digest(paths: list[Path]) -> str:
    """sha256 over the files' own sha256 digests (`data.files.file_sha256`), in order."""
    from emgeo_jax.data.files import file_sha256

    return hashlib.sha256("".join(file_sha256(p) for p in paths).encode()).hexdigest()


class MergedSource:
    """A `TensorSource` giving `base` tensors with the adapter's LoRA deltas merged in."""

    def __init__(self, base: TensorSource, adapter: LoraAdapter):
        for name in adapter.factors:
            if name not in base.names:
                raise CheckpointError(
                    f"{adapter.folder}: adapter targets {name}, which the base model "
                    f"({base.where(name)}) does not have (adapter for another architecture?)"
                )
        self.base, self.adapter, self.names = base, adapter, base.names

    def where(self, name: str) -> str:
        return self.base.where(name)

    def get(self, name: str) -> np.ndarray:
        w = self.base.get(name)
        if name not in self.adapter.factors:
            return w
        a, b, scale = self.adapter.factors[name]
        if (b.shape[0], a.shape[1]) != w.shape:
            raise CheckpointError(
                f"{self.adapter.folder}: LoRA for {name} has shape {(b.shape[0], a.shape[1])}, "
                f"base weight is {w.shape}"
            )
        # float32, not the stored dtype: a bf16 base would otherwise round the small delta
        # away before a float32 load; the loader casts once to the dtype asked for.
        return w.astype(np.float32) + scale * (b @ a).astype(np.float32)
