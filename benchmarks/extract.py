"""Answer-token mean extraction at every layer: ours vs transformers with forward hooks.

    python benchmarks/extract.py [--pairs 256 --batch 8 --first_k 4,15]

On the embedded default (SmolLM2-135M-Instruct, fp32), the shipped contrast pairs cycled to
`--pairs` pairs (2 examples each). Ours: `emgeo_jax.extract.extract` (pooled taps on device,
batches bucketed to fixed shapes), timed after a warm-up run that compiles each bucket;
also with only the first k layers (`--first_k`). transformers: the reference code's method,
forward hooks on `model.model.layers[l]` summing the answer tokens of right-padded batches
of the same size, eager attention, torch threads = cores. Each side runs in its own process
(peak RSS is its own). Reports tokens/s (real tokens), the ratio and peak RSS.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np

from benchmarks.common import emit, peak_rss_mb, run_side


def _tokenized(tokenizer, pairs: int):
    from emgeo_jax.data import load_examples, shipped_contrast_path, tokenize_examples

    examples, _ = load_examples(shipped_contrast_path())
    examples = list(itertools.islice(itertools.cycle(examples), 2 * pairs))
    return tokenize_examples(examples, tokenizer, max_length=1024)[0]


def ours(pairs: int, batch: int, first_k: list[int]) -> dict:
    import emgeo_jax
    from emgeo_jax.extract import ExtractSettings, extract

    lm = emgeo_jax.load("default")
    tokenized = _tokenized(lm.tokenizer, pairs)
    tokens = sum(ex.length for ex in tokenized)
    result = {"side": "ours", "tokens": tokens}
    for k in [lm.config.num_layers, *first_k]:
        settings = ExtractSettings(layers=tuple(range(k)), batch_size=batch)
        start = time.perf_counter()
        extract(lm, tokenized, settings)  # compiles each bucket shape
        first = time.perf_counter() - start
        start = time.perf_counter()
        extract(lm, tokenized, settings)
        result[f"seconds_{k}"] = time.perf_counter() - start
        result[f"first_call_{k}"] = first
    result["rss_mb"] = peak_rss_mb()
    return result


def transformers_side(pairs: int, batch: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from emgeo_jax.convert.gguf import default_gguf_path, read_gguf
    from emgeo_jax.convert.gguf_tokenizer import build_tokenizer

    torch.set_num_threads(os.cpu_count())
    path = default_gguf_path()
    tokenizer = build_tokenizer(read_gguf(path))
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    tokenized = _tokenized(tokenizer, pairs)
    layers = model.model.layers
    sums = [torch.zeros(2, model.config.hidden_size, dtype=torch.float64) for _ in layers]
    state = {}

    def hook(index):
        def record(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            pooled = torch.einsum("btd,bt->bd", h, state["mask"]).double()
            sums[index].index_add_(0, state["label"], pooled)

        return record

    hooks = [layer.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]

    def run():
        for k in range(0, len(tokenized), batch):
            rows = tokenized[k : k + batch]
            t = max(ex.length for ex in rows)
            ids = np.zeros((len(rows), t), np.int64)
            attn = np.zeros((len(rows), t), np.int64)
            mask = np.zeros((len(rows), t), np.float32)
            for r, ex in enumerate(rows):
                ids[r, : ex.length], attn[r, : ex.length] = ex.input_ids, 1
                mask[r, : ex.length] = ex.answer_mask
            state["mask"] = torch.tensor(mask)
            state["label"] = torch.tensor([ex.label for ex in rows])
            with torch.no_grad():
                model.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(attn))

    start = time.perf_counter()
    run()
    seconds = time.perf_counter() - start
    for h in hooks:
        h.remove()
    return dict(side="transformers", seconds=seconds, rss_mb=peak_rss_mb())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["ours", "transformers"])
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--first_k", default="4,15")
    a = p.parse_args()
    first_k = [int(k) for k in a.first_k.split(",") if k]
    if a.side == "ours":
        emit(ours(a.pairs, a.batch, first_k))
        return
    if a.side == "transformers":
        emit(transformers_side(a.pairs, a.batch))
        return
    args = ("--pairs", str(a.pairs), "--batch", str(a.batch), "--first_k", a.first_k)
    o = run_side(__file__, "ours", *args)
    t = run_side(__file__, "transformers", *args)
    tokens = o["tokens"]
    print(
        f"answer-token pooling, SmolLM2-135M fp32, {a.pairs} pairs, {tokens} tokens, "
        f"batch {a.batch}"
    )
    print(f"{'':24} {'tokens/s':>10} {'peak RSS MB':>12}")
    full = max(int(k.split("_")[1]) for k in o if k.startswith("seconds_"))
    print(f"{'transformers + hooks':24} {tokens / t['seconds']:10.0f} {t['rss_mb']:12.0f}")
    print(f"{'ours, all layers':24} {tokens / o[f'seconds_{full}']:10.0f} {o['rss_mb']:12.0f}")
    for k in first_k:
        print(f"{f'ours, first {k} layers':24} {tokens / o[f'seconds_{k}']:10.0f}")
    print(f"ratio ours/transformers (all layers): {t['seconds'] / o[f'seconds_{full}']:.2f}x")
    print(f"ours first run incl. compile (all layers): {o[f'first_call_{full}']:.1f} s")


if __name__ == "__main__":
    main()
