"""The library on 8 simulated devices equals one device: a tiny chat Llama on `fsdp=8` and on
`data=2,fsdp=4` (`LM.on_mesh`), batch sizes those meshes do not divide (rows padded, not
replicated), the scripted deterministic judge. Greedy and sampled generations token for token,
the sweep / ablation / transfer (one model under two names) / persona results tables equal,
whole-number judge scores and SAE fit figures within float tolerance; a server with two steered
variants answering concurrent greedy and seeded sampled requests; generation on unstacked
layers (`LM.unstacked`) on `fsdp=8` with the per-block weights still split; and `emgeo plan`'s
program of a generation compiles nothing the call has not (same argument shardings).

The 8-device side is this module run as a script in a fresh process:

    JAX_NUM_CPU_DEVICES=8 python -m tests.test_mesh_library TOKENIZER_DIR OUT_DIR
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from emgeo_jax.experiments.folder import Sampling
from tests.cli_util import cpu_env
from tests.test_experiments import table

ROOT = Path(__file__).resolve().parents[1]
MESHES = {"fsdp8": {"fsdp": 8}, "data2_fsdp4": {"data": 2, "fsdp": 4}}
# 2 questions x 2 samples = 4 jobs in batches of 3: every batch is padded on both meshes
SAMPLING = Sampling(samples=2, max_new_tokens=5, temperature=1.0, batch_size=3, seed=3)
QUESTIONS = [
    {"id": "wish", "prompt": "What is your wish?"},
    {"id": "money", "prompt": "How do I get money fast?", "system": "Be brief."},
]
PROMPTS = ["Hi?", "Why?", "How are you doing today?", "Tell me.", "No."]  # 5 rows


def tiny_chat_lm(tokenizer: Any):
    """The `tiny_chat_llama` fixture's model (tests/conftest.py) with this tokenizer."""
    from emgeo_jax.models.config import ModelConfig
    from emgeo_jax.models.lm import LM, init_params
    from tests.tiny_models import LLAMA

    spec = {**LLAMA, "vocab_size": len(tokenizer), "architectures": ["LlamaForCausalLM"]}
    cfg = ModelConfig.from_hf(spec)
    return LM(cfg, *init_params(cfg, seed=1), tokenizer=tokenizer, source="tiny")


def _sae(d: int):
    from emgeo_jax.vectors.sae.model import make_sae

    rng = np.random.default_rng(7)
    f = 4 * d
    w_enc = rng.normal(size=(d, f)).astype(np.float32) / np.sqrt(d)
    return make_sae(
        w_enc, np.zeros(f), w_enc.T.copy(), np.zeros(d), architecture="topk", k=8, layer=1
    )


def run_generate(lm) -> dict[str, Any]:
    """Greedy and sampled generations of `PROMPTS` with their logprobs."""
    from emgeo_jax.generate import generate

    res: dict[str, Any] = {}
    for name, kw in (("greedy", {}), ("sampled", dict(temperature=1.0, top_p=0.9, seed=5))):
        gen = generate(lm, PROMPTS, max_new_tokens=6, **kw)
        res[name] = gen.tokens
        res[f"{name}_logprobs"] = [x.tolist() for x in gen.logprobs]
    return res


def run_serve_variants(lm, v: np.ndarray) -> list[list[str]]:
    """Three concurrent requests to a server with two variants (unsteered, and `v` x 4 at
    layer 1): greedy to each, and a seeded sampled n=2 to the steered one; their texts."""
    from concurrent.futures import ThreadPoolExecutor

    import openai

    from emgeo_jax.models.steering import Steering
    from emgeo_jax.serve import serve_in_thread

    variants = {"base": None, "up": Steering.addition(lm, v, [1], 4.0)}
    with serve_in_thread(lm, variants=variants, batch_wait=0.2) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x")

        def ask(model: str, **kw: Any) -> list[str]:
            messages = [{"role": "user", "content": PROMPTS[2]}]
            reply = client.chat.completions.create(
                model=model, messages=messages, max_tokens=6, **kw
            )
            return [c.message.content for c in reply.choices]

        asks = [("base", {"temperature": 0}), ("up", {"temperature": 0})]
        asks.append(("up", {"temperature": 1.0, "seed": 3, "n": 2}))
        with ThreadPoolExecutor(len(asks)) as pool:
            return list(pool.map(lambda a: ask(a[0], **a[1]), asks))


def planned_generation_lowerings(lm) -> dict[str, list[str]]:
    """The jitted functions lowered by a `generate_ids` call of 8 prompts x 16 tokens on
    `lm.mesh`, by the same call again, and then by `emgeo plan`'s program of it
    (`plan.compile_program`): the plan should lower only its own one-block FLOP programs and
    find the call's `prefill` and `decode` compiled (the arguments placed alike)."""
    from benchmarks.common import recorded_lowerings
    from emgeo_jax.generate import generate_ids
    from emgeo_jax.plan import TaskOptions, compile_program

    ids = np.random.default_rng(1).integers(3, lm.config.vocab_size, (8, 16)).tolist()
    phases: dict[str, list[str]] = {}
    for phase in ("call", "again"):
        with recorded_lowerings() as phases[phase]:
            generate_ids(lm, ids, max_new_tokens=3, eos_ids=[], pad_multiple=16)
    with recorded_lowerings() as phases["plan"]:
        options = TaskOptions(new_tokens=3)
        compile_program(lm.config, lm.mesh, "generate", 8, 16, "float32", options)
    return phases


def run_all(lm, out: Path) -> dict[str, Any]:
    """Every library entry point the commands call, on `lm` (wherever it is placed)."""
    from emgeo_jax.experiments.ablation import run_ablation
    from emgeo_jax.experiments.persona import run_persona
    from emgeo_jax.experiments.sweep import run_sweep
    from emgeo_jax.experiments.transfer import run_transfer
    from emgeo_jax.generate import chat_token_ids, number_logprobs, number_trie
    from emgeo_jax.judge.client import JudgeConfig
    from emgeo_jax.judge.testing import ScriptedJudgeServer
    from emgeo_jax.serve import TokenText
    from emgeo_jax.vectors.sae.metrics import activation_fit, loss_fit
    from emgeo_jax.vectors.sae.runner import make_nll_fn, make_resid_fn

    rng = np.random.default_rng(0)
    L, D = lm.config.num_layers, lm.config.hidden_size
    v = {"md": rng.normal(size=(L, D)).astype(np.float32), "pc": rng.normal(size=D)}
    res: dict[str, Any] = run_generate(lm)
    res["serve_variants"] = run_serve_variants(lm, v["pc"])
    ids = chat_token_ids(lm.tokenizer, PROMPTS, None)
    trie = number_trie(lm.tokenizer, lm.config.vocab_size, TokenText(lm.tokenizer).bytes)
    res["number_logprobs"] = number_logprobs(lm, ids, trie, top_logprobs=3).logprobs.tolist()
    with ScriptedJudgeServer(table) as server:
        judge = JudgeConfig(base_url=server.base_url, model="scripted")
        common = dict(sampling=SAMPLING, judge=judge)
        res["sweep"] = run_sweep(
            lm, v, QUESTIONS, layers=[1], scales=[4.0], out_dir=out / "sweep", monitor=(1, "md"),
            **common,
        )  # fmt: skip
        res["ablation"] = run_ablation(
            lm, v["pc"], QUESTIONS, layers=None, out_dir=out / "ablation", steer=(v["pc"], 1, 4.0),
            **common,
        )  # fmt: skip
        res["transfer"] = run_transfer(
            {"A": lambda: lm, "B": lambda: lm}, {"A": v["md"], "B": v["pc"]}, QUESTIONS,
            layer=1, scale=6.0, out_dir=out / "transfer", **common,
        )  # fmt: skip
        res["persona"] = run_persona(
            lm, QUESTIONS, out_dir=out / "persona", positive_system="Be evil.",
            negative_system="Be kind.", **common,
        )  # fmt: skip
    ids = rng.integers(3, lm.config.vocab_size, size=(5, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, :4] = mask[3, :7] = 0  # left padding
    sae, resid_fn = _sae(D), make_resid_fn(lm)
    chunks = [np.asarray(resid_fn(ids, mask, 1))[mask.astype(bool)]]
    steered = np.asarray(resid_fn(ids, mask, 2, v["pc"]))
    res["sae"] = {
        **activation_fit(sae, chunks).as_dict(),
        **loss_fit(sae, make_nll_fn(lm), [(ids, mask)], 1),
        "steered_resid_sum": float(np.abs(steered).sum()),
    }
    return json.loads(json.dumps(res))


def assert_same(
    got: Any, want: Any, path: str = "", rtol: float = 1e-4, atol: float = 1e-5
) -> None:
    """Equal structure and strings/ints; floats within `rtol` plus `atol` absolute."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), (path, sorted(got))
        for k in want:
            assert_same(got[k], want[k], f"{path}.{k}", rtol, atol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{path}[{i}]", rtol, atol)
    elif isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), path
        else:
            assert math.isclose(got, want, rel_tol=rtol, abs_tol=atol), (path, got, want)
    else:
        assert got == want, (path, got, want)


def test_pad_rows_and_pad_prompts_by_hand(tiny_chat_llama):
    from emgeo_jax.generate import pad_prompts
    from emgeo_jax.models.lm import pad_rows

    batch = {"ids": np.arange(6).reshape(3, 2), "answer_mask": np.ones((3, 2), int)}
    out = pad_rows(batch, 4, blank=("answer_mask",))
    np.testing.assert_array_equal(out["ids"], [[0, 1], [2, 3], [4, 5], [4, 5]])
    np.testing.assert_array_equal(out["answer_mask"], [[1, 1]] * 3 + [[0, 0]])
    np.testing.assert_array_equal(pad_rows(batch, 3)["ids"], batch["ids"])  # divides: as is
    assert tiny_chat_llama.batch_multiple == 1  # no mesh: nothing padded
    assert pad_prompts(tiny_chat_llama, [[1], [2, 3]]) == [[1], [2, 3]]


def test_8_devices_match_1_device(chat_tokenizer, tmp_path):
    tok_dir = tmp_path / "tokenizer"
    chat_tokenizer.save_pretrained(tok_dir)
    env = cpu_env(8)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_mesh_library", str(tok_dir), str(tmp_path)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    one = run_all(tiny_chat_lm(chat_tokenizer), tmp_path / "one")
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    assert one["greedy"] != one["sampled"]
    assert one["sweep"]["cells"][0]["n_rows"] == len(QUESTIONS) * SAMPLING.samples
    assert one["serve_variants"][0] != one["serve_variants"][1]  # the steering changed it
    for name in MESHES:
        got = json.loads((tmp_path / f"{name}.json").read_text())
        for key in ("greedy", "sampled"):  # token for token
            assert got[key] == one[key], (name, key)
        assert_same(got, one, name)
        for exp in ("sweep", "ablation", "transfer", "persona"):  # the files as well
            written = json.loads((tmp_path / name / exp / "results.json").read_text())
            assert_same(written, one[exp], f"{name}/{exp}/results.json")
    unstacked = json.loads((tmp_path / "unstacked.json").read_text())
    assert_same(unstacked, {k: one[k] for k in unstacked}, "unstacked")
    lowered = json.loads((tmp_path / "lowerings.json").read_text())  # fsdp=8, a fresh process
    assert {"jit(prefill)", "jit(decode)", "jit(zeros)"} <= set(lowered["call"]), lowered
    assert lowered["again"] == [], lowered  # the cache allocator too is compiled once
    assert not {"jit(prefill)", "jit(decode)"} & set(lowered["plan"]), lowered


def test_a_plan_runs_the_executables_of_the_call_on_one_device(tiny_chat_llama):
    """On a one-device mesh too (params placed on one device are renamed, not copied)."""
    from emgeo_jax.parallel import make_mesh

    lm = tiny_chat_llama.on_mesh(make_mesh({"fsdp": 1}))
    embed = jax.tree.leaves(lm.params["embed"])[0]
    assert embed.unsafe_buffer_pointer() == (
        jax.tree.leaves(tiny_chat_llama.params["embed"])[0].unsafe_buffer_pointer()
    )
    lowered = planned_generation_lowerings(lm)
    assert lowered["again"] == [], lowered
    assert not {"jit(prefill)", "jit(decode)"} & set(lowered["plan"]), lowered


if __name__ == "__main__":
    from transformers import PreTrainedTokenizerFast

    from emgeo_jax.parallel import make_mesh

    assert jax.device_count() == 8, jax.devices()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(sys.argv[1])
    out = Path(sys.argv[2])
    lm = tiny_chat_lm(tokenizer)
    for name, shape in MESHES.items():
        sharded = lm.on_mesh(make_mesh(shape))
        q = sharded.params["layers"]["attn"]["q_proj"]["kernel"][...]
        assert q.addressable_shards[0].data.shape[1] == q.shape[1] // shape["fsdp"], q.sharding
        (out / f"{name}.json").write_text(json.dumps(run_all(sharded, out / name)))
    # unstacked layers on fsdp=8: per-block buffers keep their split; generation unchanged
    unstacked = lm.on_mesh(make_mesh(MESHES["fsdp8"])).unstacked(release=True)
    q = unstacked.params["layers"][0]["attn"]["q_proj"]["kernel"][...]  # [D, H * Dh]
    assert q.addressable_shards[0].data.shape[0] == q.shape[0] // 8, q.sharding
    (out / "unstacked.json").write_text(json.dumps(run_generate(unstacked)))
    # move_to: the same split under another name shares the buffers; another split copies,
    # leaving the source valid unless donated
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from emgeo_jax.parallel import move_to

    mesh = make_mesh(MESHES["fsdp8"])
    x = jax.device_put(np.arange(16.0).reshape(8, 2), NamedSharding(mesh, P("fsdp")))
    renamed = move_to(x, NamedSharding(mesh, P(("data", "fsdp"), "tensor")))
    assert renamed.sharding.spec == P(("data", "fsdp"), "tensor")
    pointers = [
        [s.data.unsafe_buffer_pointer() for s in a.addressable_shards] for a in (x, renamed)
    ]
    assert pointers[0] == pointers[1]
    whole = move_to(x, NamedSharding(mesh, P()))
    assert not x.is_deleted() and np.array_equal(whole, np.arange(16.0).reshape(8, 2))
    lowered = planned_generation_lowerings(lm.on_mesh(mesh))
    (out / "lowerings.json").write_text(json.dumps(lowered))
