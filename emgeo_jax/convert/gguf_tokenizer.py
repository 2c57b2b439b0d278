"""A fast tokenizer rebuilt from a GGUF file's metadata, without torch.

GGUF files carry no `tokenizer.json`, only llama.cpp's description of it: the vocabulary
(`tokenizer.ggml.tokens`), BPE merges, per-token types (3 = control, 4 = user-defined), special
ids, the `tokenizer.ggml.pre` name of the pre-tokenizer and the chat template. We support the
byte-level BPE family (`tokenizer.ggml.model == "gpt2"`: SmolLM2, Qwen2, Llama-3) and refuse
others by name. Save the result with `save_pretrained(dir)`; later loads are plain
`AutoTokenizer.from_pretrained(dir)`.
"""

from __future__ import annotations

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from emgeo_jax.convert.gguf import GGUFCheckpoint, GGUFError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = _QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def _byte_level(split: str | None = None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    """Byte-level pre-tokenizer; GPT-2's own regex unless `split` is given.

    `digits` first isolates every digit, as llama.cpp's `smollm` / `starcoder` pre-types do.
    """
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]


# tokenizer.ggml.pre -> pre-tokenizer factory (llama.cpp's llama-vocab.cpp defines these names).
PRE_TOKENIZERS = {
    "default": _byte_level,
    "gpt2": _byte_level,
    "smollm": lambda: _byte_level(digits=True),
    "starcoder": lambda: _byte_level(digits=True),
    "qwen2": lambda: _byte_level(_QWEN2_SPLIT),
    "llama-bpe": lambda: _byte_level(_LLAMA3_SPLIT),
}


def build_tokenizer(ckpt: GGUFCheckpoint) -> PreTrainedTokenizerFast:
    """The tokenizer described by `ckpt`'s metadata, with its chat template and special tokens."""
    kind = ckpt.field("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(
            f"{ckpt.path}: tokenizer.ggml.model={kind!r} is not supported (only byte-level 'gpt2')"
        )
    pre = ckpt.field("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(
            f"{ckpt.path}: tokenizer.ggml.pre={pre!r} is not supported "
            f"(supported: {sorted(PRE_TOKENIZERS)})"
        )
    tokens = ckpt.field("tokenizer.ggml.tokens")
    types = ckpt.field("tokenizer.ggml.token_type", [1] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(
            f"{ckpt.path}: tokenizer.ggml.token_type has {len(types)} entries, "
            f"tokenizer.ggml.tokens {len(tokens)}"
        )
    # Byte-level vocabularies spell every byte as a printable character; a few files store
    # plain UTF-8 text instead, which we respell so that lookups match.
    spell = bytes_to_unicode()
    alphabet = set(spell.values())
    tokens = [t if set(t) <= alphabet else "".join(spell[b] for b in t.encode()) for t in tokens]
    merges = [tuple(m.split(" ", 1)) for m in ckpt.field("tokenizer.ggml.merges")]

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, types, strict=True)
            if k == USER_DEFINED
        ]
    )

    def special(key: str) -> str | None:
        i = ckpt.field(f"tokenizer.ggml.{key}_token_id", None)
        return None if i is None else tokens[i]

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special("bos"),
        eos_token=special("eos"),
        unk_token=special("unknown"),
        pad_token=special("padding"),
        add_bos_token=bool(ckpt.field("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(ckpt.field("tokenizer.ggml.add_eos_token", False)),
        chat_template=ckpt.field("tokenizer.chat_template", None),
        clean_up_tokenization_spaces=False,
    )
