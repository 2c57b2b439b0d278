"""Peak host memory of `emgeo convert` (streaming, one parameter at a time) on a synthetic
HF checkpoint: random tensors in the HF layout, one safetensors shard per layer.

    python benchmarks/convert_memory.py --shape qwen2.5-7b --layers 4 --dtype bfloat16

`--shape qwen2.5-7b` keeps Qwen2.5-7B's widths (d=3584, F=18944, 28/4 heads, V=152064;
`llama-3.1-70b`: d=8192, F=28672, 64/8 heads, V=128256, no biases);
`--layers` trims the depth so the files stay a few GB. The conversion runs in a child
process; its peak RSS (VmHWM) is reported next to the model size, the largest parameter,
and its RSS right after imports. Files are deleted afterwards.

Bound (measured, 4 layers bf16, 4.04 GB model): peak RSS 2.46 GB with 0.25 GB after
imports, i.e. peak - imports = 2.2 GB = 2 x the largest parameter (the 1.09 GB LM head read
from the file, and its transposed copy), 55% of the model; before the streaming fixes
(safetensors read through jax arrays, orbax's defensive copy, freed heap not returned)
it was 6.08 GB, 150% of the model. The bound scales with the largest parameter, not
the depth: for all 28 layers of Qwen2.5-7B (15.2 GB) that is a stacked MLP kernel of 3.8 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "qwen2.5-7b": dict(
        hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064,
    ),
    "llama-3.1-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_attention_heads=64,
        num_key_value_heads=8, vocab_size=128256, model_type="llama",
    ),
    "small": dict(
        hidden_size=1024, intermediate_size=2816, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=16000,
    ),
}  # fmt: skip


def hf_config(shape: str, layers: int, **overrides) -> dict:
    """HF config.json of `shape` (Qwen2 family unless the shape says otherwise; Qwen2 has
    q/k/v biases) trimmed to `layers` blocks; `overrides` replace fields (e.g. vocab_size)."""
    return {
        "model_type": "qwen2",
        **SHAPES[shape],
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1e6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        **overrides,
    }


def write_synthetic(folder: Path, cfg: dict, dtype: str) -> int:
    """HF folder with random tensors, one shard per layer (+ one for the rest). Returns bytes."""
    import ml_dtypes
    from safetensors.numpy import save_file

    np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.float32
    rng = np.random.default_rng(0)
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    dh = d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * dh, cfg["num_key_value_heads"] * dh

    def rand(*shape):  # in row blocks, so no float32 copy of a whole large tensor is made
        out = np.empty(shape, np_dtype)
        rows = max(1, 2**26 // math.prod(shape[1:]))
        for i in range(0, shape[0], rows):
            block = out[i : i + rows]
            block[...] = rng.standard_normal(block.shape, np.float32)
        return out

    folder.mkdir(parents=True)
    weight_map, total = {}, 0

    def shard(name: str, tensors: dict) -> None:
        nonlocal total
        save_file(tensors, str(folder / name))
        weight_map.update(dict.fromkeys(tensors, name))
        total += sum(t.nbytes for t in tensors.values())

    shard(
        "rest.safetensors", {"model.embed_tokens.weight": rand(v, d), "model.norm.weight": rand(d)}
    )
    shard("head.safetensors", {"lm_head.weight": rand(v, d)})  # one [V, D] in memory at a time
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors = {
            p + "input_layernorm.weight": rand(d),
            p + "post_attention_layernorm.weight": rand(d),
            p + "self_attn.q_proj.weight": rand(q, d),
            p + "self_attn.k_proj.weight": rand(kv, d),
            p + "self_attn.v_proj.weight": rand(kv, d),
            p + "self_attn.o_proj.weight": rand(d, q),
            p + "mlp.gate_proj.weight": rand(f, d),
            p + "mlp.up_proj.weight": rand(f, d),
            p + "mlp.down_proj.weight": rand(d, f),
        }
        if cfg["model_type"] == "qwen2":
            tensors[p + "self_attn.q_proj.bias"] = rand(q)
            tensors[p + "self_attn.k_proj.bias"] = rand(kv)
            tensors[p + "self_attn.v_proj.bias"] = rand(kv)
        shard(f"layer-{layer:03d}.safetensors", tensors)
    (folder / "config.json").write_text(json.dumps(cfg))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def largest_parameter_bytes(cfg: dict, itemsize: int) -> int:
    """The largest parameter the converter holds at once: a stacked MLP kernel `[L, D, F]`
    or the embedding / LM head `[V, D]`."""
    d, f, v, layers = (cfg[k] for k in ("hidden_size", "intermediate_size", "vocab_size",
                                         "num_hidden_layers"))  # fmt: skip
    return max(layers * d * f, v * d) * itemsize


CHILD = """
import json, sys, time
from emgeo_jax.convert.checkpoint import convert_streaming
from emgeo_jax.convert.load import open_source
def hwm():  # peak RSS of this process image (ru_maxrss would include the parent's, pre-exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
base = hwm()
start = time.perf_counter()
cfg, src, _ = open_source(sys.argv[1])
convert_streaming(cfg, src, sys.argv[2], dtype=sys.argv[3])
peak = hwm()
print(json.dumps(dict(base_rss=base, peak_rss=peak, seconds=time.perf_counter() - start)))
"""


def measure(folder: Path, out: Path, dtype: str) -> dict:
    """Convert `folder` -> `out` in a child process; its RSS figures in bytes."""
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(out), dtype],
        check=True, capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--workdir", default=None, help="where to write the files (default: tmp)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="convert_memory_", dir=a.workdir))
    try:
        cfg = hf_config(a.shape, a.layers)
        start = time.perf_counter()
        size = write_synthetic(work / "hf", cfg, a.dtype)
        print(f"wrote {size / 1e9:.2f} GB synthetic {a.shape} x {a.layers} layers "
              f"({a.dtype}) in {time.perf_counter() - start:.0f} s")  # fmt: skip
        r = measure(work / "hf", work / "ckpt", a.dtype)
        itemsize = 2 if a.dtype == "bfloat16" else 4
        gb = 1e9
        print(f"conversion: {r['seconds']:.0f} s; peak RSS {r['peak_rss'] / gb:.2f} GB "
              f"(after imports {r['base_rss'] / gb:.2f} GB); model {size / gb:.2f} GB; "
              f"largest parameter {largest_parameter_bytes(cfg, itemsize) / gb:.2f} GB; "
              f"peak - imports = {(r['peak_rss'] - r['base_rss']) / size:.0%} "
              "of the model")  # fmt: skip
        print(f"this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
