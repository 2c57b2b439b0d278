"""Answer-token mean extraction at every layer: ours vs transformers with forward hooks.

    python benchmarks/extract.py [--pairs 256 --batch 8 --first_k 4,15] [--sweep]

On the embedded default (SmolLM2-135M-Instruct, fp32), the shipped contrast pairs cycled to
`--pairs` pairs (2 examples each). Ours: `emgeo_jax.extract.extract` (pooled taps on device,
batches bucketed to fixed shapes), timed after a warm-up run that compiles each bucket;
also with only the first k layers (`--first_k`). transformers: the reference code's method,
forward hooks on `model.model.layers[l]` summing the answer tokens of right-padded batches
of the same size, eager attention, torch threads = cores. Each side runs in its own process
(peak RSS is its own). Reports tokens/s (real tokens), the ratio and peak RSS.

Memory against sequence length x layers (always printed): XLA's compiled memory analysis
(temporaries + outputs, parameters excluded) of our pooled extraction step at T = 128, 512,
2048 (batch `--batch`, SmolLM2 shapes, no weights loaded) next to the same forward returning
every layer's residual stream `[L, B, T, D]`, which is what `output_hidden_states` keeps.
With `--sweep`, also the measured peak RSS of ours and of transformers with
`output_hidden_states=True` (random tokens, 2 batches, each run in its own process) at two
sequence lengths, above the RSS right after loading the model.
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np

from benchmarks.common import emit, peak_rss_mb, run_side

MEMORY_LENGTHS = (128, 512, 2048)
SWEEP_LENGTHS = (128, 1024)
MB = 2**20


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


def memory_table(batch: int) -> dict:
    """Compiled temporaries + outputs (MB) of our extraction step and of the full-taps forward."""
    import jax
    import jax.numpy as jnp

    from emgeo_jax.convert.gguf import default_gguf_path, read_gguf
    from emgeo_jax.extract import _jitted_step
    from emgeo_jax.models.config import ModelConfig
    from emgeo_jax.models.lm import forward
    from emgeo_jax.models.taps import Taps
    from emgeo_jax.parallel import make_mesh
    from emgeo_jax.plan import sharded_abstract_params

    cfg = ModelConfig.from_hf(read_gguf(default_gguf_path()).hf_config)
    mesh = make_mesh()
    graphdef, params, _ = sharded_abstract_params(cfg, mesh, jnp.float32)
    layers = tuple(range(cfg.num_layers))

    def full_taps(params, ids, pos, mask):
        out = forward(
            graphdef, params, ids, pos, mask, taps=Taps(resid="full"), return_logits=False
        )
        return out.resid_post

    def used(compiled) -> float:
        stats = compiled.memory_analysis()
        return (stats.temp_size_in_bytes + stats.output_size_in_bytes) / MB

    rows = {}
    for t in MEMORY_LENGTHS:
        tokens = jax.ShapeDtypeStruct((batch, t), jnp.int32)
        inputs = dict.fromkeys(("input_ids", "positions", "attention_mask"), tokens)
        inputs["pool_mask"] = jax.ShapeDtypeStruct((batch, t), jnp.bool_)
        inputs["label"] = inputs["example_index"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
        ours = _jitted_step(graphdef, layers, False, mesh).lower(params, inputs).compile()
        full = jax.jit(full_taps).lower(params, tokens, tokens, tokens).compile()
        rows[t] = {
            "ours": used(ours),
            "full": used(full),
            "stack": cfg.num_layers * batch * t * cfg.hidden_size * 4 / MB,
        }
    return {"side": "memory", "layers": cfg.num_layers, "rows": rows}


def _reset_peak_rss() -> None:
    """Make the kernel's peak RSS (VmHWM) start again from the current RSS (Linux)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _rss_mb(field: str) -> float:
    """`VmRSS` (current) or `VmHWM` (peak since the last reset) of this process, in MB."""
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _random_rows(vocab: int, batch: int, length: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (2 * batch, length), dtype=np.int64)


def sweep_side(side: str, batch: int, length: int) -> dict:
    """Peak RSS above the loaded model of one extraction over 2 batches of random tokens
    (loading's own peak excluded by resetting the peak after it)."""
    if side == "ours":
        import emgeo_jax
        from emgeo_jax.data import TokenizedExample
        from emgeo_jax.extract import ExtractSettings, extract

        lm = emgeo_jax.load("default")
        ids = _random_rows(lm.config.vocab_size, batch, length)
        base = _rss_mb("VmRSS")
        _reset_peak_rss()
        examples = [
            TokenizedExample(row.astype(np.int32), length // 2, length, i % 2, i, f"random:{i}")
            for i, row in enumerate(ids)
        ]
        extract(lm, examples, ExtractSettings(batch_size=batch, buckets=(length,)))
    else:
        import torch
        from transformers import AutoModelForCausalLM

        from emgeo_jax.convert.gguf import default_gguf_path

        torch.set_num_threads(os.cpu_count())
        path = default_gguf_path()
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        ids = torch.tensor(_random_rows(model.config.vocab_size, batch, length))
        base = _rss_mb("VmRSS")
        _reset_peak_rss()
        mask = torch.zeros(batch, length)
        mask[:, length // 2 :] = 1
        for rows in ids.split(batch):
            with torch.no_grad():
                hidden = model.model(input_ids=rows, output_hidden_states=True).hidden_states
            _ = [torch.einsum("btd,bt->bd", h, mask) for h in hidden[1:]]
            del hidden
    return {"side": side, "length": length, "base_mb": base, "peak_mb": _rss_mb("VmHWM")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--side", choices=["ours", "transformers", "memory", "sweep"])
    p.add_argument("--sweep", action="store_true", help="also measure RSS at two lengths")
    p.add_argument("--sweep_side", choices=["ours", "transformers"], default="ours")
    p.add_argument("--length", type=int, default=128)
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
    if a.side == "memory":
        emit(memory_table(a.batch))
        return
    if a.side == "sweep":
        emit(sweep_side(a.sweep_side, a.batch, a.length))
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
    m = run_side(__file__, "memory", "--batch", str(a.batch))
    print(
        f"\ncompiled memory, temporaries + outputs (MB), batch {a.batch}, {m['layers']} layers, "
        "parameters excluded"
    )
    print(f"{'T':>6} {'ours (pooled)':>14} {'all layers [L,B,T,D]':>21} {'of which the stack':>19}")
    for t, row in m["rows"].items():
        print(f"{t:>6} {row['ours']:14.0f} {row['full']:21.0f} {row['stack']:19.0f}")
    if not a.sweep:
        return
    print(f"\nmeasured peak RSS above the loaded model (MB), batch {a.batch}, 2 batches")
    print(f"{'T':>6} {'ours':>8} {'transformers output_hidden_states':>34}")
    for t in SWEEP_LENGTHS:
        got = {
            side: run_side(
                __file__, "sweep", "--sweep_side", side, "--batch", str(a.batch), "--length", str(t)
            )
            for side in ("ours", "transformers")
        }
        grow = {k: v["peak_mb"] - v["base_mb"] for k, v in got.items()}
        print(f"{t:>6} {grow['ours']:8.0f} {grow['transformers']:34.0f}")


if __name__ == "__main__":
    main()
