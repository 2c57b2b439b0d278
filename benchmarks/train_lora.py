"""Full embedded-default organism run: rank-1 LoRA on down_proj of layer 15 of SmolLM2-135M,
trained on the shipped misaligned medical answers, then dissected.

    PYTHONPATH=$PWD python benchmarks/train_lora.py --steps 300 [--out /tmp/med_r1]

Prints seconds per step and the loss curve's ends, then: the adapter's per-token scalars on
all shipped contrast answers (saved like `emgeo lora-scalars`; mean pooled scalar per class
and topic), the B vector (saved as an `[L, D]` direction file), the mean-diff direction of
the base model's residual after block 15 (answer-token pooled, misaligned minus aligned) and
the cosine of the two, and the geometry report of {B, mean-diff} (`OUT/geometry/`).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from emgeo_jax.convert.load import load
from emgeo_jax.data import load_examples, shipped_contrast_path, tokenize_examples
from emgeo_jax.extract import ExtractSettings, extract
from emgeo_jax.geometry.analyze import analyze
from emgeo_jax.geometry.report import write_report
from emgeo_jax.train.data import load_training_examples, topics
from emgeo_jax.train.lora import LoraSpec
from emgeo_jax.train.run import read_losses, train
from emgeo_jax.train.scalars import b_directions, collect_scalars, save_scalars
from emgeo_jax.train.sft import TrainConfig
from emgeo_jax.vectors.io import save_vectors

LAYER = 15


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--alpha", type=float, default=64.0)
    ap.add_argument("--lora_dropout", type=float, default=0.0)
    ap.add_argument("--out", default=None, help="run folder (default: a fresh temp folder)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="train_lora_"))
    lm = load("default")
    ex = load_training_examples(shipped_contrast_path(), label=1, topic="medical")
    tok, _ = tokenize_examples(ex, lm.tokenizer, 256)
    spec = LoraSpec(rank=1, alpha=args.alpha, targets=("down",), layers=(LAYER,))
    tc = TrainConfig(
        steps=args.steps, lr=args.lr, batch_size=args.batch_size, lora_dropout=args.lora_dropout
    )
    times = []

    def log(line: str) -> None:
        times.append(time.perf_counter())
        if len(times) % 25 == 1:
            print(line, flush=True)

    start = time.perf_counter()
    lora = train(lm, tok, spec, tc, out, log=log)
    train_s = time.perf_counter() - start
    rows = read_losses(out)
    per_step = (times[-1] - times[0]) / max(len(times) - 1, 1)
    first, last = np.mean([r["loss"] for r in rows[:10]]), np.mean([r["loss"] for r in rows[-10:]])
    print(
        f"trained {len(rows)} steps in {train_s:.1f} s ({per_step:.2f} s/step after the first); "
        f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f} "
        f"(mean of first/last 10 steps {first:.3f} -> {last:.3f}); load {os.getloadavg()}"
    )

    # dissection: scalars on every shipped contrast answer, B vs the residual mean-diff
    examples, _ = load_examples(shipped_contrast_path())
    tok_all, _ = tokenize_examples(examples, lm.tokenizer, 256)
    kept = [examples[t.example_index] for t in tok_all]
    top = topics(kept)
    collected = collect_scalars(lm, lora, spec, tok_all, batch_size=8)
    save_scalars(out / "scalars.safetensors", collected, spec, top, {"model": lm.source})
    pooled_s, labels = collected["pooled"][:, 0], collected["label"]
    for topic in sorted(set(top)):
        sel = np.asarray([t == topic for t in top])
        mis, ali = pooled_s[sel & (labels == 1)].mean(), pooled_s[sel & (labels == 0)].mean()
        print(f"mean scalar, {topic}: misaligned {mis:+.3f}, aligned {ali:+.3f}")
    directions = b_directions(lora, spec, lm.config)
    save_vectors(out / "lora_B.safetensors", {"directions": directions}, {"method": "lora_B"})
    settings = ExtractSettings(pool="answer", layers=(LAYER,), per_example=True)
    ext = extract(lm, tok_all, settings)
    pooled = ext.pooled[:, 0]
    md = pooled[ext.label == 1].mean(0) - pooled[ext.label == 0].mean(0)
    b = directions[LAYER]
    cos = float(b @ md / (np.linalg.norm(b) * np.linalg.norm(md)))
    print(f"cos(B_{LAYER}, mean-diff_{LAYER}) = {cos:+.4f} (d = {b.size}; chance ~ 1/sqrt(d))")
    result = analyze({f"lora_B_l{LAYER}": b}, examples={f"mean_diff_l{LAYER}": (pooled, ext.label)})
    page = write_report(result, out / "geometry")
    print(f"wrote {out}/adapter, scalars.safetensors, lora_B.safetensors and {page}")


if __name__ == "__main__":
    main()
