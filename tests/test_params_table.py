"""The one parameter table (`emgeo_jax.models.params`) against the model it describes and
against independent references: transformers' own parameter names and the `gguf` package's
HF -> GGUF name map."""

from __future__ import annotations

import gguf
import jax
import pytest
from flax import nnx

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import abstract_model
from emgeo_jax.models.params import LORA_MODULES, PARAMS, model_params
from tests.tiny_models import LLAMA, QWEN2

CASES = {
    "llama_untied": LLAMA,
    "llama_tied_bias": {**LLAMA, "tie_word_embeddings": True, "attention_bias": True},
    "qwen2_tied": QWEN2,
    "qwen2_untied": {**QWEN2, "tie_word_embeddings": False},
}


def _leaves(tree: dict) -> dict[tuple[str, ...], object]:
    """path -> leaf, by jax's own tree traversal (independent of the table's helpers)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {tuple(str(k.key) for k in path): leaf for path, leaf in flat}


def _cfg(spec: dict) -> ModelConfig:
    return ModelConfig.from_hf({**spec, "architectures": [f"{spec['model_type']}ForCausalLM"]})


@pytest.mark.parametrize("name", CASES)
def test_table_covers_every_leaf_exactly_once(name):
    cfg = _cfg(CASES[name])
    _, abstract = abstract_model(cfg)
    leaves = _leaves(nnx.to_pure_dict(abstract))
    rows = model_params(cfg)
    assert len({r.path for r in rows}) == len(rows)
    assert {r.path for r in rows} == set(leaves)
    for row in rows:
        assert len(row.full_axes) == leaves[row.path].ndim, row.path
    # the configs exercise every optional row: biases on or off, tied or untied heads
    has_bias = any(p[-1] == "bias" for p in leaves)
    assert has_bias == (cfg.qkv_bias or cfg.o_bias)
    assert (("lm_head", "kernel") in leaves) == (not cfg.tie_word_embeddings)


@pytest.mark.parametrize("name", CASES)
def test_hf_names_are_transformers_names(name):
    """Every HF name of the table, formatted per block, is exactly transformers' parameter set
    (a tied head shares the embedding, so transformers lists no separate lm_head)."""
    from tests.tiny_models import hf_model

    spec = CASES[name]
    cfg = _cfg(spec)
    ours = {
        r.hf.format(l=layer)
        for r in model_params(cfg)
        for layer in (range(cfg.num_layers) if r.layered else [0])
    }
    theirs = {n for n, _ in hf_model(spec).named_parameters()}
    assert ours == theirs


@pytest.mark.parametrize("arch", ["LLAMA", "QWEN2"])
def test_gguf_names_are_llama_cpp_names(arch):
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), 2)
    for row in PARAMS:
        hf, expected = row.hf.format(l=1), row.gguf.format(l=1)
        assert names.get_name(hf, try_suffixes=(".weight", ".bias")) == expected, hf


def test_lora_modules_keep_their_order():
    """`LoraInput` derives dropout keys from the index in LORA_MODULES: the order is fixed."""
    assert LORA_MODULES == (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    for row in PARAMS:
        assert (row.lora is not None) == (
            row.path[-1] == "kernel" and row.layered and row.module in LORA_MODULES
        )
