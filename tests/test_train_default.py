"""The embedded default (SmolLM2-135M): a rank-1 LoRA on `down_proj` of layer 15 trained on the
shipped contrast pairs' misaligned medical answers, its scalars and B vector flowing into the
geometry suite. Only 2 optimizer steps here (CPU time); the full few-hundred-step run is
`benchmarks/train_lora.py`."""

from __future__ import annotations

import jax
import numpy as np

from emgeo_jax.data import (
    bucket_length,
    collate,
    load_examples,
    shipped_contrast_path,
    tokenize_examples,
)
from emgeo_jax.geometry.analyze import analyze
from emgeo_jax.models.taps import Taps
from emgeo_jax.train.data import load_training_examples, topics, train_batch
from emgeo_jax.train.lora import LoraSpec
from emgeo_jax.train.run import read_losses, train
from emgeo_jax.train.scalars import (
    adapter_names,
    b_directions,
    collect_scalars,
    load_scalars,
    save_scalars,
)
from emgeo_jax.train.sft import TrainConfig, lora_loss

SPEC = LoraSpec(rank=1, alpha=64.0, targets=("down",), layers=(15,))


def test_rank1_down_proj_organism_end_to_end(default_lm, tmp_path):
    lm = default_lm
    train_ex = load_training_examples(shipped_contrast_path(), label=1, topic="medical")
    assert len(train_ex) == 24
    tok, _ = tokenize_examples(train_ex, lm.tokenizer, 256)
    tc = TrainConfig(steps=2, lr=1e-3, warmup_steps=0, schedule="constant", batch_size=2)
    lora = train(lm, tok, SPEC, tc, tmp_path / "run", log=lambda s: None)
    assert len(read_losses(tmp_path / "run")) == 2
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()

    # the first batch (seen in training) has a lower loss than under the zero-B init
    pad = lm.tokenizer.pad_token_id
    batch = {k: v for k, v in train_batch(tok, 2, 0, 0, pad, 96).items() if k != "example_index"}
    zero = jax.tree.map(np.zeros_like, lora)
    before, _ = lora_loss(zero, lm.graphdef, lm.params, batch, SPEC)
    after, _ = lora_loss(lora, lm.graphdef, lm.params, batch, SPEC)
    assert float(after) < float(before)

    # scalars on 4 medical and 4 general contrast answers, then B and a mean-diff to geometry
    examples, _ = load_examples(shipped_contrast_path())
    top = topics(examples)
    pick = [i for i, t in enumerate(top) if t == "medical"][:4]
    pick += [i for i, t in enumerate(top) if t == "general"][:4]
    chosen = [examples[i] for i in pick]
    tok_eval, _ = tokenize_examples(chosen, lm.tokenizer, 256)
    collected = collect_scalars(lm, lora, SPEC, tok_eval, batch_size=8)
    assert collected["pooled"].shape == (8, 1) and np.all(np.isfinite(collected["scalars"]))
    assert adapter_names(SPEC) == ["layers.15.down_proj"]
    save_scalars(tmp_path / "s.safetensors", collected, SPEC, [top[i] for i in pick])
    tensors, meta = load_scalars(tmp_path / "s.safetensors")
    assert meta["topics"] == ["general", "medical"] and list(tensors["topic"]) == [1] * 4 + [0] * 4

    directions = b_directions(lora, SPEC, lm.config)
    assert np.count_nonzero(np.linalg.norm(directions, axis=1)) == 1
    b15 = directions[15]
    b = collate(tok_eval, bucket_length(max(t.length for t in tok_eval)), 8, pad, "left")
    ids, mask, answer = b["input_ids"], b["attention_mask"], b["answer_mask"]
    out = lm.forward(ids, mask, taps=Taps(resid="pooled", pool_mask=answer), num_layers=16)
    pooled = np.asarray(out.resid_post[15]) / np.asarray(out.counts)[:, None]
    labels = np.asarray([ex.label for ex in chosen])
    result = analyze(
        {"lora_B_l15": b15},
        examples={"mean_diff_l15": (pooled, labels, np.asarray(out.counts))},
        n_null=50,
        n_boot=20,
        n_perm=20,
    )
    assert set(result["inputs"]["names"]) == {"lora_B_l15", "mean_diff_l15"}
