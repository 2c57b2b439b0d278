"""Loading onto a mesh: peak host RSS and bytes per device of `emgeo_jax.load(SOURCE,
mesh=fsdp=8)` on simulated CPU devices, for synthetic checkpoints of real widths.

    python benchmarks/load_memory.py --shape qwen2.5-7b --layers 2 --source hf
    python benchmarks/load_memory.py --shape llama-3.1-70b --layers 1 --source orbax

The HF folder is random tensors in the HF layout (`benchmarks/convert_memory.py`), in the
checkpoint's dtype; `--source orbax` converts it first (`convert_streaming`) and restores
that. The load runs in a child process simulating the mesh's devices; it prints

- bytes per device (`sum(shard.data.nbytes)` over the device's shards), against the bound
  `(params - replicated) / devices + replicated`: every matrix and norm scale is split
  over `fsdp` (its `embed` side); on `fsdp=8` only Qwen2's q/k/v biases (split over
  `tensor`) are replicated;
- peak host RSS (VmHWM) above the child's RSS once JAX is up. Simulated devices keep their
  buffers in host memory, so that includes the whole model (1/8 on each of 8 "devices");
  what a real accelerator host pays is the rest, the *host overhead*, bounded by
  `1.5 x the largest HF tensor + 0.75 GB` (one tensor read at a time plus one converted
  device slice of it; 0.75 GB for compilation and allocator slack: 2 layers of Qwen2.5-7B
  widths measured 0.50-0.72 GB of overhead over 10 loads on 2026-12-07, where 1.5 tensors
  are 0.20 GB).

Measured (bf16, `fsdp=8`, 8 simulated devices on 2 busy CPU cores):

    --shape qwen2.5-7b --layers 2: 3.11 GB model, 0.389 GB on every device (= 1/8);
        peak RSS 4.73 GB, host overhead 1.37 GB (bound 2.13 GB; largest tensor 1.09 GB)
    --shape llama-3.1-70b --layers 1: 5.91 GB model, 0.739 GB on every device (= 1/8);
        peak RSS 8.59 GB, host overhead 2.43 GB (bound 3.65 GB; largest tensor 2.10 GB)

The overhead follows the largest tensor (the `[V, D]` embedding / LM head), not the depth,
since stacked parameters are read one layer at a time; full-depth models are expected to
load with the same overhead (not measured here: their files do not fit this machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.convert_memory import hf_config, measure, write_synthetic  # noqa: E402
from emgeo_jax.hosts import simulated_cpu_env  # noqa: E402

GB = 1e9
SLACK = 0.75e9  # compilation of the placement programs, allocator and import slack

CHILD = """
import json, sys
import jax, numpy as np
import emgeo_jax
from emgeo_jax.parallel import make_mesh
def status(key):  # this process image's figures (ru_maxrss would include the parent's)
    line = next(l for l in open("/proc/self/status") if l.startswith(key))
    return int(line.split()[1]) * 1024
mesh = make_mesh(json.loads(sys.argv[2]))
jax.block_until_ready(jax.device_put(np.zeros(8), jax.sharding.NamedSharding(
    mesh, jax.sharding.PartitionSpec())))  # backend up before the baseline
base = status("VmHWM")
lm = emgeo_jax.load(sys.argv[1], mesh=mesh, dtype=sys.argv[3])
jax.block_until_ready(lm.params)
peak = status("VmHWM")
per_device = {str(d): 0 for d in mesh.devices.flat}
params = replicated = 0
for x in jax.tree.leaves(lm.params):
    params += x.nbytes
    replicated += x.nbytes if x.sharding.is_fully_replicated else 0
    for s in x.addressable_shards:
        per_device[str(s.device)] += s.data.nbytes
print(json.dumps(dict(base_rss=base, peak_rss=peak, params=params, replicated=replicated,
                      per_device=per_device, devices=mesh.size)))
"""


def largest_tensor_bytes(cfg: dict, itemsize: int) -> int:
    """The largest tensor the loader reads at once: the embedding / LM head `[V, D]` or one
    layer's MLP matrix `[F, D]` (stacked parameters are read one layer at a time)."""
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    return max(v * d, f * d) * itemsize


def host_bound(cfg: dict, itemsize: int) -> float:
    return 1.5 * largest_tensor_bytes(cfg, itemsize) + SLACK


def per_device_bound(r: dict) -> float:
    return (r["params"] - r["replicated"]) / r["devices"] + r["replicated"]


def measure_load(source: Path, mesh: dict[str, int], dtype: str) -> dict:
    """Load `source` onto a mesh of `mesh` sizes in a child process with that many simulated
    CPU devices; its figures in bytes (see CHILD)."""
    import math

    devices = math.prod(mesh.values())
    env = simulated_cpu_env(devices)
    res = subprocess.run(
        [sys.executable, "-c", CHILD, str(source), json.dumps(mesh), dtype],
        check=True, capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    return json.loads(res.stdout.strip().splitlines()[-1])


def report(r: dict, cfg: dict, itemsize: int) -> str:
    worst = max(r["per_device"].values())
    overhead = r["peak_rss"] - r["base_rss"] - r["params"]
    return "\n".join(
        [
            f"model {r['params'] / GB:.2f} GB ({r['replicated'] / GB:.4f} GB replicated) on "
            f"{r['devices']} devices",
            f"per device: max {worst / GB:.3f} GB, min {min(r['per_device'].values()) / GB:.3f}"
            f" GB; bound (params - replicated) / {r['devices']} + replicated = "
            f"{per_device_bound(r) / GB:.3f} GB",
            f"peak host RSS {r['peak_rss'] / GB:.2f} GB, {r['base_rss'] / GB:.2f} GB once JAX is"
            f" up; the simulated devices hold {r['params'] / GB:.2f} GB of it",
            f"host overhead (peak - base - device buffers) {overhead / GB:.2f} GB; bound 1.5 x "
            f"largest tensor ({largest_tensor_bytes(cfg, itemsize) / GB:.2f} GB) + "
            f"{SLACK / GB:.1f} GB = {host_bound(cfg, itemsize) / GB:.2f} GB",
        ]
    )


def main() -> None:
    from benchmarks.convert_memory import SHAPES

    p = argparse.ArgumentParser()
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--source", choices=["hf", "orbax"], default="hf")
    p.add_argument("--fsdp", type=int, default=8, help="mesh: fsdp=N")
    p.add_argument("--workdir", default=None, help="where to write the files (default: tmp)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="load_memory_", dir=a.workdir))
    try:
        cfg = hf_config(a.shape, a.layers)
        start = time.perf_counter()
        size = write_synthetic(work / "hf", cfg, a.dtype)
        print(f"wrote {size / GB:.2f} GB synthetic {a.shape} x {a.layers} layers ({a.dtype}) "
              f"in {time.perf_counter() - start:.0f} s")  # fmt: skip
        source = work / "hf"
        if a.source == "orbax":
            measure(work / "hf", work / "ckpt", a.dtype)
            shutil.rmtree(work / "hf")
            source = work / "ckpt"
        start = time.perf_counter()
        r = measure_load(source, {"fsdp": a.fsdp}, a.dtype)
        print(f"load of the {a.source} source onto fsdp={a.fsdp}: "
              f"{time.perf_counter() - start:.0f} s")  # fmt: skip
        itemsize = 2 if a.dtype == "bfloat16" else 4
        print(report(r, cfg, itemsize))
        ok = max(r["per_device"].values()) <= per_device_bound(r) and (
            r["peak_rss"] - r["base_rss"] - r["params"] <= host_bound(cfg, itemsize)
        )
        print("within bounds" if ok else "OUT OF BOUNDS")
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
