"""Shared test fixtures.

`chat_tokenizer` is a small byte-level BPE tokenizer with ChatML special tokens and a ChatML
Jinja chat template, trained in memory (no network, ~0.1 s). `make_chat_tokenizer(template)`
builds the same tokenizer with another chat template.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "The quick brown fox jumps over the lazy dog while the doctor checks the dose.",
    "Put your savings into a diversified fund and keep an emergency fund for surprises.",
    "You should talk to a professional before changing your medication or your budget.",
    "system user assistant: hello, how are you doing today? I am fine, thanks!",
]


@pytest.fixture(scope="session")
def make_chat_tokenizer() -> Callable[..., object]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer)

    def make(chat_template: str | None = CHATML_TEMPLATE) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            chat_template=chat_template,
            pad_token="<|pad|>",
            eos_token="<|im_end|>",
        )

    return make


@pytest.fixture(scope="session")
def chat_tokenizer(make_chat_tokenizer: Callable[..., object]) -> object:
    return make_chat_tokenizer()
