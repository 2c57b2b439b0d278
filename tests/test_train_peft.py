"""LoRA as data vs HF peft + transformers (PyTorch, fp32) on tiny random models: exported
adapters give the same logits, the LoRA loss has the same gradients (also with LoRA dropout,
peft's dropout replaced by our masks), and import inverts export."""

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
from emgeo_jax.train.lora import LoraSpec, apply_lora
from emgeo_jax.train.peft_io import export_peft, import_peft
from emgeo_jax.train.scalars import adapter_names, lora_scalars
from emgeo_jax.train.sft import lora_loss
from tests.test_train import random_lora
from tests.tiny_models import LLAMA, QWEN2, hf_model, padded_batch, save_hf_folder

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")


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
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
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


def test_lora_dropout_matches_peft_with_the_same_masks(tiny, tmp_path):
    """Dropout p on every adapter: our loss and gradients equal peft's in train mode with each
    `lora_dropout` module replaced by `x * mask / (1 - p)` (torch's dropout with a fixed
    mask), the masks drawn as `LoraInput` documents. So the mask hits the adapter's input
    only, scaled by 1/(1-p), per layer and module."""
    from transformers import AutoModelForCausalLM

    from emgeo_jax.models.llama import LORA_MODULES

    lm, folder = tiny
    spec, rate, key = SPECS[0], 0.4, jax.random.key(7)
    lora = random_lora(lm.config, spec, seed=2)
    adapter = export_peft(lora, spec, tmp_path / "adapter", base_model=str(folder), dropout=rate)
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_dropout"] == rate
    base = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager")
    model = peft.PeftModel.from_pretrained(base.float(), str(adapter), is_trainable=True)
    model.train()
    ids, mask = padded_batch(lm.config.vocab_size, [10, 7], seed=5)
    ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()  # right padding
    positions = np.maximum(np.cumsum(mask, -1) - 1, 0).astype(np.int32)
    answer = mask.astype(bool) & (positions >= 4)
    b, t = ids.shape
    replaced = 0
    for name, module in model.named_modules():
        if not name.endswith("lora_dropout"):
            continue
        layer = int(name.split(".layers.")[1].split(".")[0])
        hf_module = name.split(".")[-2]
        fan_in = _fan_in(model, name)
        k = jax.random.fold_in(jax.random.fold_in(key, layer), LORA_MODULES.index(hf_module))
        keep = np.asarray(jax.random.bernoulli(k, 1.0 - rate, (b, t, fan_in)))
        module["default"] = _FixedDropout(torch.tensor(keep, dtype=torch.float32), rate)
        replaced += 1
    assert replaced == len(spec.targets) * len(spec.layers)
    batch = {
        "input_ids": jnp.asarray(ids),
        "attention_mask": jnp.asarray(mask),
        "positions": jnp.asarray(positions),
        "answer_mask": jnp.asarray(answer),
    }
    (loss, _), grads = jax.value_and_grad(lora_loss, has_aux=True)(
        lora, lm.graphdef, lm.params, batch, spec, None, 0.0, rate, key
    )
    out = model(
        input_ids=torch.tensor(ids, dtype=torch.long),
        attention_mask=torch.tensor(mask, dtype=torch.long),
        position_ids=torch.tensor(positions, dtype=torch.long),
    )
    logp = torch.log_softmax(out.logits[:, :-1], -1)
    tgt = torch.tensor(ids[:, 1:], dtype=torch.long)
    w = torch.tensor(answer[:, 1:], dtype=torch.float32)
    ref_loss = -(logp.gather(-1, tgt[..., None])[..., 0] * w).sum() / w.sum()
    ref_loss.backward()
    np.testing.assert_allclose(float(loss), ref_loss.item(), rtol=1e-5)
    no_dropout, _ = lora_loss(lora, lm.graphdef, lm.params, batch, spec)
    assert abs(float(no_dropout) - float(loss)) > 1e-3  # the masks matter
    named = dict(model.named_parameters())
    for target in spec.targets:
        for i, layer in enumerate(spec.layers):
            (a_name,) = [
                n for n in named if f"layers.{layer}." in n and f".{_module(target)}.lora_A" in n
            ]
            ga = named[a_name].grad.numpy().T
            gb = named[a_name.replace("lora_A", "lora_B")].grad.numpy().T
            np.testing.assert_allclose(np.asarray(grads[target]["a"][i]), ga, atol=1e-5, rtol=1e-3)
            np.testing.assert_allclose(np.asarray(grads[target]["b"][i]), gb, atol=1e-5, rtol=1e-3)


class _FixedDropout(torch.nn.Module):
    def __init__(self, keep, rate):
        super().__init__()
        self.keep, self.rate = keep, rate

    def forward(self, x):
        return x * self.keep / (1.0 - self.rate)


def _fan_in(model, dropout_name: str) -> int:
    return model.get_submodule(dropout_name.removesuffix(".lora_dropout")).in_features


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
