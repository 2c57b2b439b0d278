"""LoRA as data vs HF peft + transformers (PyTorch, fp32) on tiny random models: exported
adapters give the same logits, the LoRA loss has the same gradients, and import inverts export."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from emgeo_jax.convert.hf import CheckpointError
from emgeo_jax.convert.load import load
from emgeo_jax.models.lm import forward
from emgeo_jax.train.lora import LoraSpec, apply_lora, init_lora
from emgeo_jax.train.peft_io import export_peft, import_peft
from emgeo_jax.train.scalars import adapter_names, lora_scalars
from emgeo_jax.train.sft import lora_loss
from tests.tiny_models import LLAMA, QWEN2, hf_model, padded_batch, save_hf_folder

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")


def random_lora(cfg, spec, seed=0):
    """PEFT init for `a`, and a random nonzero `b` (PEFT's zero `b` would hide mistakes)."""
    lora = init_lora(cfg, spec, jax.random.key(seed))
    keys = jax.random.split(jax.random.key(seed + 1), len(spec.targets))
    for k, t in zip(keys, spec.targets, strict=True):
        lora[t]["b"] = 0.05 * jax.random.normal(k, lora[t]["b"].shape)
    return lora


@pytest.fixture(scope="module", params=[("llama", LLAMA), ("qwen2", QWEN2)], ids=lambda p: p[0])
def tiny(request, tmp_path_factory):
    folder = save_hf_folder(hf_model(request.param[1]), tmp_path_factory.mktemp("hf"))
    return load(folder), folder


SPECS = [
    LoraSpec(rank=4, alpha=8.0, targets=("q", "k", "v", "o", "gate", "up", "down"), layers=(0, 2)),
    LoraSpec(rank=1, alpha=16.0, targets=("down",), layers=(1,), rslora=True),
]


def test_export_matches_peft_logits_and_grads(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    lm, folder = tiny
    spec = SPECS[0] if lm.config.model_type == "llama" else SPECS[1]
    lora = random_lora(lm.config, spec)
    adapter = export_peft(lora, spec, tmp_path / "adapter", base_model=str(folder))
    base = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base.float().eval(), str(adapter), is_trainable=True)

    ids, mask = padded_batch(lm.config.vocab_size, [9, 12], seed=3)
    right_ids, right_mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()  # right padding
    positions = np.maximum(np.cumsum(right_mask, -1) - 1, 0).astype(np.int32)
    answer = right_mask.astype(bool) & (positions >= 5)
    batch = {
        "input_ids": jnp.asarray(right_ids),
        "attention_mask": jnp.asarray(right_mask),
        "positions": jnp.asarray(positions),
        "answer_mask": jnp.asarray(answer),
    }
    ours = lm.forward(right_ids, right_mask, positions, return_residual=False).logits
    params = apply_lora(lm.params, lora, spec)
    logits = forward(lm.graphdef, params, batch["input_ids"], batch["positions"], right_mask)
    out = model(
        input_ids=torch.tensor(right_ids, dtype=torch.long),
        attention_mask=torch.tensor(right_mask, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
    )
    valid = right_mask.astype(bool)
    ref = out.logits.detach().numpy()
    np.testing.assert_allclose(np.asarray(logits.logits)[valid], ref[valid], atol=2e-4)
    assert np.abs(np.asarray(ours)[valid] - ref[valid]).max() > 1e-3  # the adapter matters

    # loss on answer tokens only, and its gradients, against torch autograd through peft
    (loss, aux), grads = jax.value_and_grad(lora_loss, has_aux=True)(
        lora, lm.graphdef, lm.params, batch, spec
    )
    logp = torch.log_softmax(out.logits[:, :-1], -1)
    tgt = torch.tensor(right_ids[:, 1:], dtype=torch.long)
    w = torch.tensor(answer[:, 1:], dtype=torch.float32)
    ref_loss = -(logp.gather(-1, tgt[..., None])[..., 0] * w).sum() / w.sum()
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    named = dict(model.named_parameters())
    for t in spec.targets:
        for i, layer in enumerate(spec.layers):
            stem = [n for n in named if f"layers.{layer}." in n and f".{_module(t)}.lora_A" in n]
            (a_name,) = stem
            ga = named[a_name].grad.numpy().T
            gb = named[a_name.replace("lora_A", "lora_B")].grad.numpy().T
            np.testing.assert_allclose(np.asarray(grads[t]["a"][i]), ga, atol=1e-5, rtol=1e-3)
            np.testing.assert_allclose(np.asarray(grads[t]["b"][i]), gb, atol=1e-5, rtol=1e-3)

    # import inverts export, and read_adapter's merge path (load(adapter=)) agrees too
    spec2, lora2 = import_peft(adapter, lm.config)
    assert (spec2.targets, spec2.layers, spec2.rank) == (spec.targets, spec.layers, spec.rank)
    d1 = apply_lora(lm.params, lora, spec)
    d2 = apply_lora(lm.params, lora2, spec2)
    for x, y in zip(jax.tree.leaves(d1), jax.tree.leaves(d2), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)
    merged_lm = load(folder, adapter=adapter)
    for x, y in zip(jax.tree.leaves(d1), jax.tree.leaves(merged_lm.params), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def _module(t: str) -> str:
    from emgeo_jax.train.lora import PEFT_MODULES

    return PEFT_MODULES[t]


def test_import_mixed_ranks_and_scales(tiny, tmp_path):
    """rank_pattern/alpha_pattern adapters (different rank and scale per module, different
    layers per module) import exactly: zero-padding and scale folding keep every delta."""
    from safetensors.numpy import save_file

    lm, _ = tiny
    cfg = lm.config
    rng = np.random.default_rng(0)
    d, f = cfg.hidden_size, cfg.intermediate_size
    stem = "base_model.model.model.layers.{l}.mlp.{m}"
    t = {
        f"{stem.format(l=0, m='down_proj')}.lora_A.weight": rng.normal(size=(2, f)),
        f"{stem.format(l=0, m='down_proj')}.lora_B.weight": rng.normal(size=(d, 2)),
        f"{stem.format(l=1, m='up_proj')}.lora_A.weight": rng.normal(size=(4, d)),
        f"{stem.format(l=1, m='up_proj')}.lora_B.weight": rng.normal(size=(f, 4)),
    }
    save_file(
        {k: v.astype(np.float32) for k, v in t.items()}, str(tmp_path / "adapter_model.safetensors")
    )
    config = {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "rank_pattern": {"down_proj": 2},
        "alpha_pattern": {"down_proj": 6},
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    spec, lora = import_peft(tmp_path, cfg)
    assert spec.targets == ("up", "down") and spec.layers == (0, 1) and spec.rank == 4
    merged = apply_lora(lm.params, lora, spec)
    down = np.asarray(merged["layers"]["mlp"]["down_proj"]["kernel"][...])
    up = np.asarray(merged["layers"]["mlp"]["up_proj"]["kernel"][...])
    base_down = np.asarray(lm.params["layers"]["mlp"]["down_proj"]["kernel"][...])
    base_up = np.asarray(lm.params["layers"]["mlp"]["up_proj"]["kernel"][...])
    a0, b0 = (t[f"{stem.format(l=0, m='down_proj')}.lora_{x}.weight"] for x in "AB")
    a1, b1 = (t[f"{stem.format(l=1, m='up_proj')}.lora_{x}.weight"] for x in "AB")
    np.testing.assert_allclose(down[0] - base_down[0], (6 / 2 * b0 @ a0).T, atol=1e-4)
    np.testing.assert_allclose(up[1] - base_up[1], (8 / 4 * b1 @ a1).T, atol=1e-4)
    np.testing.assert_array_equal(down[1], base_down[1])
    np.testing.assert_array_equal(up[0], base_up[0])


def test_import_refuses_foreign_target(tiny, tmp_path):
    from safetensors.numpy import save_file

    lm, _ = tiny
    name = "base_model.model.model.layers.99.mlp.down_proj.lora_{}.weight"
    save_file(
        {
            name.format("A"): np.zeros((1, 4), np.float32),
            name.format("B"): np.zeros((4, 1), np.float32),
        },
        str(tmp_path / "adapter_model.safetensors"),
    )
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 1, "lora_alpha": 1}))
    with pytest.raises(CheckpointError, match="layers.99.mlp.down_proj"):
        import_peft(tmp_path, lm.config)


def test_scalars_match_peft_lora_a_outputs(tiny, tmp_path):
    """Our recomputed module inputs times `a` equal what peft's `lora_A` sees, on every token."""
    from transformers import AutoModelForCausalLM

    lm, folder = tiny
    spec = LoraSpec(rank=2, alpha=3.0, targets=("q", "gate", "down"), layers=(0, 2))
    lora = random_lora(lm.config, spec, seed=5)
    adapter = export_peft(lora, spec, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base.float().eval(), str(adapter))
    seen = {}
    hooks = []
    for name, module in model.named_modules():
        if name.endswith("lora_A.default"):
            key = "layers." + name.split(".layers.", 1)[1].removesuffix(".lora_A.default")
            hook = functools.partial(_record, seen, key)
            hooks.append(module.register_forward_hook(hook))
    ids, mask = padded_batch(lm.config.vocab_size, [7, 11], seed=4)
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
    with torch.no_grad():
        model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            position_ids=torch.tensor(positions, dtype=torch.long),
        )
    for h in hooks:
        h.remove()
    batch = {"input_ids": ids, "positions": positions, "attention_mask": mask}
    ours = np.asarray(lora_scalars(lm.graphdef, lm.params, lora, spec, batch))
    names = adapter_names(spec)
    assert ours.shape == (2, 11, len(names))
    valid = mask.astype(bool)
    for t in spec.targets:
        for layer in spec.layers:
            module = ("self_attn." if t == "q" else "mlp.") + _module(t)
            ref = spec.scale * seen[f"layers.{layer}.{module}"]
            cols = [i for i, n in enumerate(names) if n.startswith(f"layers.{layer}.{_module(t)}")]
            np.testing.assert_allclose(ours[..., cols][valid], ref[valid], atol=1e-4, rtol=1e-4)


def _record(store, key, module, args, output):
    store[key] = output.detach().numpy()
