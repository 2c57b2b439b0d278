"""Tiny random HF models written to disk as real HF folders (transformers + torch, fp32).

Every parameter, biases and norm scales included, is drawn at random so that a wrong
mapping or a missing bias cannot hide behind a zero or a one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

LLAMA = dict(
    model_type="llama",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    # wavelengths 6..20000 tokens straddle both llama3 thresholds (16 and 64)
    rope_scaling=dict(
        rope_type="llama3",
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=64,
    ),
)

QWEN2 = dict(
    model_type="qwen2",
    vocab_size=128,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=5,
    num_attention_heads=6,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    max_position_embeddings=256,
    tie_word_embeddings=True,
    use_sliding_window=False,
)


def hf_model(spec: dict, seed: int = 0):
    """A transformers model (eager attention, fp32) with every parameter randomised."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    return model.eval()


def save_hf_folder(model, folder: Path, max_shard_size: str | None = None) -> Path:
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), safe_serialization=True, **kw)
    return folder


def padded_batch(vocab: int, lengths: list[int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded random token batch: `input_ids, attention_mask [B, max(lengths)]`."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    ids = np.zeros((len(lengths), t), np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for i, n in enumerate(lengths):
        ids[i, t - n :] = rng.integers(1, vocab, n)
        mask[i, t - n :] = 1
    return ids, mask


def hf_forward(model, ids: np.ndarray, mask: np.ndarray):
    """transformers logits `[B, T, V]` and block outputs `[L, B, T, D]` (float32 whatever the
    model dtype), with positions that count real tokens (as generation does), read by forward
    hooks on `model.layers[l]`."""
    import torch

    outs = []

    def record(module, args, output):
        outs.append((output[0] if isinstance(output, tuple) else output).float())

    hooks = [layer.register_forward_hook(record) for layer in model.model.layers]
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
    try:
        with torch.no_grad():
            res = model(
                input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                position_ids=torch.tensor(positions, dtype=torch.long),
                output_hidden_states=True,
            )
    finally:
        for h in hooks:
            h.remove()
    resid = np.stack([o.numpy() for o in outs])
    return res.logits.float().numpy(), resid, [h.float().numpy() for h in res.hidden_states]
