"""Shared test fixtures.

`chat_tokenizer` is a small byte-level BPE tokenizer with ChatML special tokens and a ChatML
Jinja chat template, trained in memory (no network, ~0.1 s). `make_chat_tokenizer(template)`
builds the same tokenizer with another chat template.

The session shares one JAX persistent compilation cache (a fresh temporary folder, removed at
the end), exported through the environment so the CLI subprocesses and the multi-process
launches use it too: the suite compiles the same tiny programs in many processes, and reading a
compiled program back is much cheaper than compiling it. A cache set by the caller
(`JAX_COMPILATION_CACHE_DIR`) is used as given and kept.

The session also compiles with LLVM's optimisation off (`cli_util.UNOPTIMISED` added to
`XLA_FLAGS`, inherited by every subprocess; `cli_util.cpu_env` keeps it): most test files
compile many tiny programs and run each briefly, and LLVM's passes are most of that compile
time. Serial, on 2 cores: `test_train.py` 94 -> 69 s, `test_plan.py` 99 -> 68 s (level 1 gains
nothing: 98 and 83 s). The price is paid by the files that run SmolLM2 for long, whose
unoptimised code runs ~4x slower (`test_generate_default.py` 73 -> 106 s, the quick demo ~160
-> 226 s), and a loading child's host memory grows (0.57 -> 0.65 GB), so those two subprocesses
run at the default level (`cli_util.optimised_env`). The whole suite: 25-27 min, from 29-32.
Codegen optimisation changes no result beyond rounding, and every comparison has a tolerance
or compares programs compiled alike. A level set by the caller in `XLA_FLAGS` is kept;
benchmarks, run outside pytest, never see this (the `--tiny` run in
`test_device_benchmark.py` does: its figures only show that it runs).

The suite runs on two worker processes (pytest-xdist; `addopts` in pyproject.toml), each test
file on one worker (`--dist loadfile`: a module's fixtures are built once). The longest files
(`LONG_FILES`) are collected first so that they start first and the workers finish together,
instead of one running a long file alone at the end. The order changes nothing else.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import pytest

from tests.cli_util import UNOPTIMISED

_SESSION_CACHE: str | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _SESSION_CACHE
    flags = os.environ.get("XLA_FLAGS", "")
    if "--xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {UNOPTIMISED}".strip()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    _SESSION_CACHE = tempfile.mkdtemp(prefix="emgeo-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    # cache every program, however small or quick to compile (the suite's are all small)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# The files that take longest under two workers (1.3-8.5 minutes each on 2 cores, measured on
# 2026-12-07 with `--durations=0`), longest first.
LONG_FILES = (
    "test_cli_mesh.py",
    "test_demo.py",
    "test_dose_response.py",
    "test_generate_default.py",
    "test_judge_local.py",
    "test_mesh_library.py",
    "test_extract.py",
    "test_train.py",
    "test_plan.py",
    "test_serve_multiprocess.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable


def pytest_unconfigure(config: pytest.Config) -> None:
    if _SESSION_CACHE is not None:
        shutil.rmtree(_SESSION_CACHE, ignore_errors=True)


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


@pytest.fixture(scope="session")
def tiny_chat_llama(chat_tokenizer):
    """A tiny random Llama (`tests.tiny_models.LLAMA`, seed 1) as an `LM` with the chat
    tokenizer: experiments that template prompts, without a model folder."""
    from emgeo_jax.models.config import ModelConfig
    from emgeo_jax.models.lm import LM, init_params
    from tests.tiny_models import LLAMA

    spec = {**LLAMA, "vocab_size": len(chat_tokenizer), "architectures": ["LlamaForCausalLM"]}
    cfg = ModelConfig.from_hf(spec)
    graphdef, params = init_params(cfg, seed=1)
    return LM(cfg, graphdef, params, tokenizer=chat_tokenizer, source="tiny")


# --- the embedded default model (SmolLM2-135M-Instruct GGUF), loaded once per session -----


@pytest.fixture(scope="session")
def default_gguf():
    """Our reader of the default GGUF file (metadata parsed once, tensors read lazily)."""
    from emgeo_jax.convert.gguf import default_gguf_path, read_gguf

    return read_gguf(default_gguf_path())


@pytest.fixture(scope="session")
def default_lm(default_gguf):
    """The default model as our `LM` (fp32), with the tokenizer built from the GGUF."""
    from emgeo_jax.convert.gguf_tokenizer import build_tokenizer
    from emgeo_jax.convert.load import from_tensors
    from emgeo_jax.models.config import ModelConfig

    cfg = ModelConfig.from_hf(default_gguf.hf_config, source=str(default_gguf.path))
    return from_tensors(
        cfg, default_gguf, tokenizer=build_tokenizer(default_gguf), source="default"
    )


@pytest.fixture(scope="session")
def hf_default():
    """transformers' own GGUF load of the default model (PyTorch, fp32, eager attention)."""
    import torch
    from transformers import AutoModelForCausalLM

    from emgeo_jax.convert.gguf import default_gguf_path

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, torch_dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()
