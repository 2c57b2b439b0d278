"""Full embedded-default organism run: rank-1 LoRA on down_proj of layer 15 of SmolLM2-135M,
trained on the shipped misaligned medical answers; prints seconds per step and the loss curve.

    python benchmarks/train_lora.py --steps 300 --out /tmp/med_r1
"""

from __future__ import annotations

import argparse
import time

from emgeo_jax.convert.load import load
from emgeo_jax.data import shipped_contrast_path, tokenize_examples
from emgeo_jax.train.data import load_training_examples
from emgeo_jax.train.lora import LoraSpec
from emgeo_jax.train.run import read_losses, train
from emgeo_jax.train.sft import TrainConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch_size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--alpha", type=float, default=64.0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    lm = load("default")
    ex = load_training_examples(shipped_contrast_path(), label=1, topic="medical")
    tok, _ = tokenize_examples(ex, lm.tokenizer, 256)
    spec = LoraSpec(rank=1, alpha=args.alpha, targets=("down",), layers=(15,))
    tc = TrainConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size)
    times = []

    def log(line: str) -> None:
        times.append(time.perf_counter())
        print(line, flush=True)

    start = time.perf_counter()
    train(lm, tok, spec, tc, args.out, log=log)
    rows = read_losses(args.out)
    per_step = (times[-1] - times[0]) / max(len(times) - 1, 1)
    print(
        f"total {time.perf_counter() - start:.1f} s; {per_step:.2f} s/step after the first; "
        f"loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}"
    )


if __name__ == "__main__":
    main()
