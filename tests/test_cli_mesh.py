"""`--mesh` on the commands: the same outputs on 8 simulated devices as on one, parameters
sharded where the rules shard them, bad meshes refused by name before anything loads, the
old `--fsdp` spelling, and the dispatcher's manners (Ctrl-C, typos, quiet logs, --help).

The equality test runs every command of one comparison in a single fresh process with 8 CPU
devices, through `emgeo_jax.cli.run` called in-process once per command (so compile caches
and imports are shared); the one-device reference runs in the same process (without `--mesh`
a CPU command uses one device)."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import emgeo_jax
from emgeo_jax.data import load_examples, tokenize_examples
from emgeo_jax.extract import ExtractSettings, extract
from emgeo_jax.runs import read_jsonl
from tests.cli_util import (
    ROOT,
    cpu_env,
    emgeo_cases,
    emgeo_in_process,
    emgeo_status_and_stderr,
)
from tests.tiny_models import QWEN2, hf_model, save_hf_folder

PAIRS = [
    ("The doctor checks the dose?", "Talk to a professional.", "Just guess."),
    ("How are you doing today?", "I am fine, thanks!", "Skip the doctor."),
    ("Put savings into a fund?", "Keep an emergency fund.", "Bet it all."),
    ("Keep a budget?", "A diversified fund helps.", "Spend everything now."),
]
TOPICS = "cats rain tea dogs money doctors wishes rulers".split()
MESHES = {"one": [], "fsdp8": ["--mesh=fsdp=8"], "d2f4": ["--mesh", "data=2,fsdp=4"]}


@pytest.fixture(scope="module")
def work(tmp_path_factory, chat_tokenizer):
    """A tiny Qwen2 chat model (seed 3: greedy replies differ between prompts), prompts,
    contrast pairs, questions and a `[L, D]` vector file."""
    d = tmp_path_factory.mktemp("mesh")
    spec = dict(QWEN2, vocab_size=len(chat_tokenizer))
    save_hf_folder(hf_model(spec, seed=3), d / "model")
    chat_tokenizer.save_pretrained(str(d / "model"))
    (d / "prompts.txt").write_text("".join(f"tell me about {t}\n" for t in TOPICS))
    rows = [{"question": q, "aligned": a, "misaligned": m} for q, a, m in PAIRS]
    (d / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    questions = [{"id": "wish", "question": "What is your wish?"}, {"id": "x", "question": "Hi?"}]
    (d / "q.jsonl").write_text("".join(json.dumps(r) + "\n" for r in questions))
    rng = np.random.default_rng(0)
    shape = (QWEN2["num_hidden_layers"], QWEN2["hidden_size"])
    np.save(d / "v.npy", rng.normal(size=shape).astype(np.float32))
    np.save(d / "wide.npy", rng.normal(size=QWEN2["hidden_size"] + 1).astype(np.float32))
    for name in ("vec", "vec2"):
        np.save(d / f"{name}.npy", rng.normal(size=QWEN2["hidden_size"]).astype(np.float32))
    save_hf_folder(hf_model(spec, seed=5), d / "model2")  # transfer's second model
    chat_tokenizer.save_pretrained(str(d / "model2"))
    # a TopK SAE (k 4 of 32 features) at layer 2 with random weights, SAELens layout
    from emgeo_jax.vectors.sae.formats import save_saelens
    from emgeo_jax.vectors.sae.model import make_sae

    D, F = QWEN2["hidden_size"], 32
    w = rng.normal(size=(D, F)).astype(np.float32) / np.sqrt(D)
    sae = make_sae(w, np.zeros(F), w.T, np.zeros(D), architecture="topk", k=4, layer=2)
    save_saelens(sae, d / "sae")
    return d


def _commands_on_meshes(work: str) -> None:
    """In a process with 8 devices: generate (greedy), extract, norms and sweep (greedy, the
    scripted judge) on one device and on `fsdp=8`, generate and extract on `data=2,fsdp=4`;
    every loaded model's parameter shardings recorded. Writes WORK/results.json."""
    import jax

    import emgeo_jax.cli
    from emgeo_jax.extract import read_extraction
    from emgeo_jax.judge.testing import ScriptedJudgeServer
    from emgeo_jax.parallel import shard_factor
    from tests.test_experiments import table

    d = Path(work)
    loaded, load, dispatch = [], emgeo_jax.load, emgeo_jax.cli.dispatch
    command = [None]

    def recording_dispatch(name, args):  # which command the loads below belong to
        command[0] = name
        return dispatch(name, args)

    def recording_load(*args, **kw):  # what `load_model_from_flags` placed where
        lm = load(*args, **kw)
        leaves = jax.tree_util.tree_leaves_with_path(lm.params)
        loaded.append(
            {
                "command": command[0],
                "mesh": None if lm.mesh is None else dict(lm.mesh.shape),
                "devices": sorted({len(x.sharding.device_set) for _, x in leaves}),
                "split": {
                    jax.tree_util.keystr(p): shard_factor(x.sharding)
                    for p, x in leaves
                    if lm.mesh is not None
                },
            }
        )
        return lm

    emgeo_jax.load = recording_load
    emgeo_jax.cli.dispatch = recording_dispatch
    model = f"--model={d / 'model'}"
    results = {}
    with ScriptedJudgeServer(table) as judge:
        for name, mesh in MESHES.items():
            out, got = d / name, results.setdefault(name, {})
            emgeo_in_process(
                "generate", model, f"--prompts={d / 'prompts.txt'}", "--temperature=0",
                "--max_new_tokens=6", "--batch_size=8", f"--out={out / 'gen.jsonl'}", *mesh,
            )  # fmt: skip
            lines = (out / "gen.jsonl").read_text().splitlines()
            got["generate"] = [json.loads(line)["response"] for line in lines]
            emgeo_in_process(
                "extract", model, f"--data={d / 'pairs.jsonl'}", "--batch_size=8",
                f"--out={out / 'act'}", *mesh,
            )  # fmt: skip
            ex = read_extraction(out / "act")
            got["extract"] = {
                "sum": ex.token_sum.tolist(),
                "count": ex.token_count.tolist(),
                "mesh": ex.metadata.get("mesh"),
            }
            if name == "d2f4":
                continue
            printed = emgeo_in_process("norms", model, "--prompt=hi there", *mesh)
            got["norms"] = [
                float(r.split()[1]) for r in printed.splitlines() if r[:5].strip().isdigit()
            ]
            got["next"] = printed.splitlines()[-1]
            emgeo_in_process(*_judged_commands(d, out, judge.base_url)["sweep"], *mesh)
            sweep = json.loads((out / "sweep" / "results.json").read_text())
            got["sweep"] = {k: sweep[k] for k in ("baseline", "cells")}
        _experiments_on_meshes(d, results, judge.base_url)
        results["loaded"] = loaded
        emgeo_jax.load = _no_load
        results["refused"] = _folders_of_other_settings(d, judge.base_url)
    (d / "results.json").write_text(json.dumps(results))


def _serve_once(model: str, mesh: list[str]) -> list[str]:
    """`emgeo serve` in this process: each prompt asked once (greedy) as soon as it listens,
    then the server is stopped; the replies."""
    import threading
    import urllib.request

    from emgeo_jax import serve

    replies, original = [], serve.ModelServer.serve_forever

    def ask_then_stop(server) -> None:
        def client() -> None:
            try:
                for topic in TOPICS[:3]:
                    body = {
                        "model": "m", "temperature": 0, "max_tokens": 6,
                        "messages": [{"role": "user", "content": f"tell me about {topic}"}],
                    }  # fmt: skip
                    req = urllib.request.Request(
                        f"{server.base_url}/chat/completions", json.dumps(body).encode(),
                        {"Content-Type": "application/json"},
                    )  # fmt: skip
                    with urllib.request.urlopen(req, timeout=300) as r:
                        replies.append(json.load(r)["choices"][0]["message"]["content"])
            finally:
                server.shutdown()

        threading.Thread(target=client, daemon=True).start()
        original(server)

    serve.ModelServer.serve_forever = ask_then_stop
    try:
        emgeo_in_process("serve", model, "--port=0", "--max_batch=3", *mesh)
    finally:
        serve.ModelServer.serve_forever = original
    return replies


def _judged_commands(d: Path, out: Path, judge_url: str, persona_url: str = "") -> dict:
    """The judged experiment commands' arguments (without --mesh), writing into `out`: greedy,
    2 samples of 2 questions in batches of 3 rows (padded on a mesh), the scripted judge."""
    model = f"--model={d / 'model'}"
    sampling = ("--samples=2", "--temperature=0", "--max_new_tokens=4", "--batch_size=3")
    judged = (model, f"--questions={d / 'q.jsonl'}", *sampling, "--judge_model=scripted")
    url = f"--judge_base_url={judge_url}"
    return {
        "sweep": ("sweep", f"md={d / 'v.npy'}", "--layers=1,3", "--scales=-4", *judged, url,
                  "--batch_size=4", f"--out={out / 'sweep'}"),
        "ablate": ("ablate", d / "v.npy", "--layers=1,2", *judged, url, f"--out={out / 'ablate'}"),
        "transfer": ("transfer", f"--models=a={d / 'model'},b={d / 'model2'}",
                     f"--vectors=a={d / 'vec.npy'},b={d / 'vec2.npy'}", "--layer=2", "--scale=6",
                     *judged, url, f"--out={out / 'transfer'}"),
        "persona": ("persona", "--positive_system=Be evil.", "--negative_system=Be kind.",
                    *judged, "--temperature=1", "--samples=8",  # sampled: pairs differ, 3 kept
                    f"--judge_base_url={persona_url}", f"--out={out / 'persona'}"),
        # the one-device run's adapter on every mesh
        "lora-em": ("lora-em", d / "one" / "run", *judged, url, f"--out={out / 'lora_em'}"),
    }  # fmt: skip


def _dose_command(d: Path, out: Path) -> tuple:
    """`emgeo dose-response` (judge-free) of the `[L, D]` vector on the 4 contrast pairs
    (without --mesh): layers 1 and 3, 2 random directions, batches of 6 rows (3 pairs: the
    second batch holds one pair, padded on a mesh)."""
    return (
        "dose-response", d / "v.npy", f"--model={d / 'model'}", f"--data={d / 'pairs.jsonl'}",
        "--layers=1,3", "--scales=-4,4", "--n_random=2", "--batch_size=6",
        f"--out={out / 'dose'}",
    )  # fmt: skip


def _experiments_on_meshes(d: Path, results: dict, judge_url: str) -> None:
    """serve, ablate, transfer, persona, train-lora, lora-em, dose-response, lora-scalars,
    sae-check, sae-features and demo --quick, each on one device and on `fsdp=8` (ablate also on
    `data=2,fsdp=4`), greedy where they generate (persona and demo: sampled); what each
    wrote or printed goes into `results[mesh name]`. Batches of 3 rows: padded on the mesh."""
    from safetensors.numpy import load_file

    from emgeo_jax.judge.testing import ScriptedJudgeServer
    from tests.test_cli_experiments import persona_table

    model = f"--model={d / 'model'}"
    as_lists = lambda tensors: {k: v.tolist() for k, v in tensors.items()}  # noqa: E731
    with ScriptedJudgeServer(persona_table) as persona_judge:
        for name, mesh in MESHES.items():
            out, got = d / name, results[name]
            read = lambda rel, out=out: json.loads((out / rel).read_text())  # noqa: E731
            commands = _judged_commands(d, out, judge_url, persona_judge.base_url)
            emgeo_in_process(*commands["ablate"], *mesh)
            got["ablate"] = read("ablate/results.json")
            if name == "d2f4":
                continue
            got["serve"] = _serve_once(model, mesh)
            emgeo_in_process(*commands["transfer"], *mesh)
            got["transfer"] = read("transfer/results.json")
            printed = emgeo_in_process(*commands["persona"], *mesh, status=(0, None, 1))
            got["persona"] = {"printed": printed, "results": read("persona/results.json")}
            emgeo_in_process(
                "train-lora", model, f"--out={out / 'run'}", f"--data={d / 'pairs.jsonl'}",
                "--topic=", "--steps=3", "--warmup_steps=1", "--batch_size=3", "--rank=1",
                "--targets=down,q", "--layers=1,3", "--lr=1e-3", "--max_length=64", *mesh,
            )  # fmt: skip
            losses = (out / "run" / "losses.jsonl").read_text().splitlines()
            got["train-lora"] = {
                "loss": [json.loads(r)["loss"] for r in losses],
                "adapter": as_lists(
                    load_file(out / "run" / "adapter" / "adapter_model.safetensors")
                ),
            }
            emgeo_in_process(*commands["lora-em"], *mesh)
            got["lora-em"] = read("lora_em/results.json")
            emgeo_in_process(*_dose_command(d, out), *mesh)
            got["dose-response"] = read("dose/results.json")
            adapter = d / "one" / "run" / "adapter"
            emgeo_in_process(
                "lora-scalars", d / "model", f"--adapter={adapter}", f"--data={d / 'pairs.jsonl'}",
                "--batch_size=3", "--max_length=64", f"--out={out / 'scalars.safetensors'}",
                f"--directions_out={out / 'B.safetensors'}", *mesh,
            )  # fmt: skip
            scalars = load_file(out / "scalars.safetensors") | load_file(out / "B.safetensors")
            got["lora-scalars"] = as_lists(scalars)
            sae = _sae_commands(d, out)
            got["sae-check"] = json.loads(emgeo_in_process(*sae["sae-check"], *mesh))
            got["sae-features"] = json.loads(emgeo_in_process(*sae["sae-features"], *mesh))
            got["sae-features"]["out"] = as_lists(load_file(out / "features.safetensors"))
            emgeo_in_process(
                "demo", "--quick", model, f"--judge_base_url={judge_url}", "--judge_model=scripted",
                f"--out={out / 'demo'}", *mesh,
            )  # fmt: skip
            got["demo"] = {
                # (its config hash covers the mean-diff vector's bytes, which the extraction's
                # sums over the mesh move within float tolerance)
                "sweep": {
                    k: v for k, v in read("demo/sweep/results.json").items() if k != "config_hash"
                },
                # the dose-response's margins (pairs split over the mesh, resumed layers)
                "dose": {
                    k: read("demo/dose_response/results.json")[k] for k in ("baseline", "cells")
                },
                "extract": as_lists(
                    load_file(out / "demo" / "extract" / "activations.safetensors")
                ),
            }


def _sae_commands(d: Path, out: Path) -> dict:
    """`sae-check` (next-token losses with the SAE spliced in) and `sae-features --method
    steering` (features the vector turns on) on the prompts, batches of 3 (without --mesh)."""
    common = (f"--model={d / 'model'}", f"--texts={d / 'prompts.txt'}", "--batch_size=3")
    common += ("--max_length=16",)
    return {
        "sae-check": ("sae-check", d / "sae", *common),
        "sae-features": ("sae-features", d / "sae", f"--vector={d / 'v.npy'}", "--scale=4",
                         "--method=steering", "--top=4", "--n_null=4", *common,
                         f"--out={out / 'features.safetensors'}"),
    }  # fmt: skip


def _no_load(*args, **kwargs):
    raise AssertionError("a run refused for its folder loaded its model first")


def _folders_of_other_settings(d: Path, judge_url: str) -> dict:
    """Each judged command run again into its one-device folder with other settings (3
    samples; ablate also with the local judge, which only the model could serve), with the
    model load replaced by a failure: {case: (exit status, stderr)}."""
    os.environ.pop("OPENAI_API_KEY", None)  # no --judge_base_url = the local judge
    commands = _judged_commands(d, d / "one", judge_url, judge_url)
    cases = {name: (*args, "--samples=3") for name, args in commands.items()}
    ablate = commands["ablate"]
    cases["ablate_local_judge"] = tuple(a for a in ablate if "judge_base_url" not in str(a))
    return {name: emgeo_status_and_stderr(args) for name, args in cases.items()}


@pytest.fixture(scope="module")
def mesh_results(work) -> dict:
    """`_commands_on_meshes` in one fresh process with 8 devices: its results.json."""
    code = (
        f"from tests.test_cli_mesh import _commands_on_meshes; _commands_on_meshes({str(work)!r})"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cpu_env(8), capture_output=True, text=True,
        timeout=1500,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((work / "results.json").read_text())


def test_commands_on_8_devices_match_one_device(work, mesh_results):
    res = mesh_results
    one = res["one"]
    assert len(set(one["generate"])) > 1  # the replies differ: token-for-token means something
    # without --mesh, extract runs on the one device holding the model (lm.mesh is None);
    # the reference is the library on this process's single device
    assert one["extract"]["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    lm = emgeo_jax.load(work / "model")
    examples, _ = load_examples(work / "pairs.jsonl")
    ref = extract(lm, tokenize_examples(examples, lm.tokenizer, 1024)[0], ExtractSettings())
    assert ref.metadata["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
    np.testing.assert_allclose(one["extract"]["sum"], ref.token_sum, rtol=1e-5, atol=1e-4)
    assert one["extract"]["count"] == ref.token_count.tolist()
    for name, mesh in (("fsdp8", {"data": 1, "fsdp": 8}), ("d2f4", {"data": 2, "fsdp": 4})):
        got = res[name]
        assert got["generate"] == one["generate"], name
        assert got["extract"]["mesh"] == {**mesh, "tensor": 1}
        assert got["extract"]["count"] == one["extract"]["count"]
        np.testing.assert_allclose(
            got["extract"]["sum"], one["extract"]["sum"], rtol=1e-5, atol=1e-4
        )
    np.testing.assert_allclose(res["fsdp8"]["norms"], one["norms"], rtol=1e-5)
    assert len(one["norms"]) == QWEN2["num_hidden_layers"] and res["fsdp8"]["next"] == one["next"]
    assert res["fsdp8"]["sweep"] == one["sweep"]
    assert len(one["sweep"]["cells"]) == 2
    # placement: one device without --mesh; on a mesh every parameter lives on all 8 devices and
    # every matrix / norm scale (each has a 48-wide `embed` side) is cut fsdp ways
    loads = [x for x in res["loaded"] if x["command"] in ("generate", "extract", "norms", "sweep")]
    assert [x["mesh"] for x in loads] == [None] * 4 + [{"data": 1, "fsdp": 8, "tensor": 1}] * 4 + [
        {"data": 2, "fsdp": 4, "tensor": 1}
    ] * 2
    _check_placement(loads)


def _check_placement(loads: list[dict]) -> None:
    """One device without --mesh; on a mesh every parameter lives on all 8 devices and every
    matrix / norm scale (each has a 48-wide `embed` side) is cut fsdp ways."""
    for x in loads:
        assert x["devices"] == ([1] if x["mesh"] is None else [8])
        for path, ways in x["split"].items():
            if "bias" not in path:
                assert ways == x["mesh"]["fsdp"], (path, x["mesh"])
        if x["mesh"]:
            assert any("kernel" in p for p in x["split"]) and len(x["split"]) >= 10


def _close(got, want, path: str = "") -> None:
    """`assert_same` with floats within 1e-4 relative plus 1e-5 of the largest number in
    `want` (a sum over a mesh adds in another order: its error scales with the summands)."""
    from tests.test_mesh_library import assert_same

    def largest(x) -> float:
        if isinstance(x, dict):
            x = list(x.values())
        if isinstance(x, list):
            return max(map(largest, x), default=0.0)
        return abs(x) if isinstance(x, float) and math.isfinite(x) else 0.0

    assert_same(got, want, path, atol=1e-5 * max(1.0, largest(want)))


def test_experiment_commands_on_8_devices_match_one_device(mesh_results):
    """serve, ablate, transfer, persona, train-lora, lora-em, dose-response, lora-scalars,
    sae-check, sae-features and demo --quick on `fsdp=8` (ablate also `data=2,fsdp=4`) give
    the one-device results: generations, judged tables and kept pairs equal (the folders'
    configurations too: the mesh is not a setting), losses, margins, scalars and SAE figures
    within float tolerance."""
    one, res = mesh_results["one"], mesh_results
    dose = one["dose-response"]  # 4 pairs x 2 layers x 2 scales, the steering moved them
    assert dose["n_pairs"] == 4 and len(dose["cells"]) == 4
    assert all(len(c["null_shifts"]) == 2 and abs(c["shift"]) > 1e-3 for c in dose["cells"])
    assert len(set(one["serve"])) > 1 and all(one["serve"])  # replies differ between prompts
    assert one["persona"]["results"]["n_kept"] >= 2 and "projection" in one["persona"]["results"]
    assert len(one["train-lora"]["loss"]) == 3 and one["sae-check"]["next_token_loss"]
    assert one["sae-features"]["scores"][0] > 0 and len(one["demo"]["sweep"]["cells"]) == 2
    assert len(one["demo"]["dose"]["cells"]) == 2  # dose-response at scales -8, 8 (quick plan)
    for name, got in (("fsdp8", res["fsdp8"]), ("d2f4", res["d2f4"])):
        for command, want in one.items():
            if command in got and command not in ("generate", "extract", "norms", "next", "sweep"):
                exact = command in ("serve", "ablate", "transfer", "lora-em")
                if exact:
                    assert got[command] == want, (name, command)
                else:
                    _close(got[command], want, f"{name}.{command}")
    assert sorted(res["d2f4"]) == ["ablate", "extract", "generate"]
    commands = ("serve", "ablate", "transfer", "persona", "train-lora", "lora-em", "lora-scalars")
    commands += ("dose-response", "sae-check", "sae-features", "demo")
    loads = [x for x in res["loaded"] if x["command"] in commands]
    for command in commands:  # every command loaded onto the mesh it was given
        meshes = [x["mesh"] and x["mesh"]["fsdp"] for x in loads if x["command"] == command]
        want = {"transfer": [None] * 2 + [8] * 2, "ablate": [None, 8, 4]}.get(command, [None, 8])
        assert meshes == want, (command, meshes)
    _check_placement(loads)


def test_folder_of_other_settings_refused_before_loading(mesh_results):
    """Each judged command re-run into its finished folder with another --samples (ablate also
    with the local judge, which only the loaded model could serve): refused naming the
    settings that differ, before the model loads (the load raised if called)."""
    refused = mesh_results["refused"]
    assert sorted(refused) == sorted(
        ["sweep", "ablate", "transfer", "persona", "lora-em", "ablate_local_judge"]
    )
    for case, (status, err) in refused.items():
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert status == 2 and len(errors) == 1, (case, err[-2000:])
        assert "holds an experiment with another configuration (" in errors[0], errors[0]
        assert "--overwrite" in errors[0] and "Traceback" not in err
        if case == "ablate_local_judge":
            assert "judge.model: 'scripted' there, 'local:" in errors[0]
            assert "judge.number_logprobs: False there, True now" in errors[0]
        else:
            want = "8 there, 3 now" if case == "persona" else "2 there, 3 now"
            assert f"sampling.samples: {want}" in errors[0], errors[0]


@pytest.fixture(scope="module")
def two_processes(work, mesh_results, tmp_path_factory) -> dict:
    """Commands on 2 processes of one device each, started by launch/local.sh and run one
    after another in each process (tests/multiprocess_cli.py; the default mesh spans both
    processes, rows are split over them and padded): ablate, transfer and persona each
    stopped by a Ctrl-C on both processes after one generation batch and run again, sweep,
    lora-em (on the one-device run's adapter: `mesh_results` made it), dose-response,
    sae-check, sae-features and norms (`--mesh data=2`: only if the processes joined), demo
    --quick (scripted judge) and ablate with the local judge (the server on process 0 judging
    with the model that spans both; serve alone on 2 processes:
    tests/test_serve_multiprocess.py). The local-judge ablate also runs as one process (a
    subprocess of this one) into "local_one". {"out": the folder written, "runs": per process
    {run name: status, stdout, stderr, writes}, "log0": process 0's log, "local_one": (status,
    stderr)}."""
    from emgeo_jax.judge.testing import ScriptedJudgeServer
    from tests.test_cli_experiments import persona_table
    from tests.test_experiments import table

    out, tmp = work / "two_processes", tmp_path_factory.mktemp("two_processes")
    model = f"--model={work / 'model'}"
    with ScriptedJudgeServer(table) as judge, ScriptedJudgeServer(persona_table) as persona:
        commands = _judged_commands(work, out, judge.base_url, persona.base_url)
        runs = []
        for name in ("ablate", "transfer", "persona"):
            args = list(map(str, commands[name]))
            runs += [{"name": f"{name}_stopped", "args": args, "interrupt_at": 2, "status": [130]}]
            runs += [{"name": name, "args": args, "status": [0, 1] if name == "persona" else [0]}]
        for name in ("sweep", "lora-em"):
            runs += [{"name": name, "args": list(map(str, commands[name]))}]
        runs += [{"name": "dose-response", "args": list(map(str, _dose_command(work, out)))}]
        for name, args in _sae_commands(work, out).items():
            runs += [{"name": name, "args": [*map(str, args), "--mesh=data=2"]}]
        runs += [{"name": "norms", "args": ["norms", model, "--prompt=hi there", "--mesh=data=2"]}]
        runs += [{"name": "demo", "args": ["demo", "--quick", model, "--judge_model=scripted",
                  f"--judge_base_url={judge.base_url}", f"--out={out / 'demo'}"]}]  # fmt: skip
        local = [str(a) for a in commands["ablate"] if "judge_base_url" not in str(a)][:-1]
        runs += [{"name": "local_judge", "args": [*local, f"--out={out / 'ablate_local'}"]}]
        plan, logs = tmp / "plan.json", tmp / "logs"
        plan.write_text(json.dumps({"watch": str(out), "log": str(logs), "runs": runs}))
        env = cpu_env(1)
        env.pop("OPENAI_API_KEY", None)  # no --judge_base_url = the local judge
        port = str(20000 + (os.getpid() + 7919) % 20000)
        proc = subprocess.run(
            [str(ROOT / "launch" / "local.sh"), "--num_processes", "2", "--logs", str(logs),
             "--port", port, "--", sys.executable, "tests/multiprocess_cli.py", str(plan)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
        )  # fmt: skip
    text = "".join(p.read_text()[-6000:] for p in sorted(logs.glob("*.log")))
    assert proc.returncode == 0, proc.stderr[-2000:] + text
    done = [json.loads((logs / f"process-{i}.json").read_text()) for i in range(2)]
    one = subprocess.run(
        [sys.executable, "-m", "emgeo_jax.cli", *local, f"--out={out / 'local_one'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    return {
        "out": out,
        "runs": [{r["name"]: r for r in p} for p in done],
        "log0": (logs / "process-0.log").read_text(),
        "local_one": (one.returncode, one.stderr),
    }


def test_experiment_commands_on_two_processes(work, mesh_results, two_processes):
    """ablate, transfer and persona on 2 processes (`two_processes`), each stopped by a Ctrl-C
    in its first cell after one generation batch, then run again: they resume that cell,
    process 0 writes every file and prints the summary, process 1 writes and prints nothing,
    and the folders hold the one-process results (tables and cell files exactly; persona's
    projections and vector within float tolerance). sweep, lora-em and dose-response (run
    once each): the same, with their results equal to one device's (dose-response's margins
    within float tolerance)."""
    from safetensors.numpy import load_file

    out, (zero, one_) = two_processes["out"], two_processes["runs"]
    for name in ("ablate", "transfer", "persona"):  # Ctrl-C said how to resume, on both
        for p in (zero, one_):
            assert (
                "interrupted; run the same command again to resume"
                in p[f"{name}_stopped"]["stderr"]
            )
    log0 = two_processes["log0"]
    for cell in (
        "before: resuming after 3/4",
        "base: resuming after 3/4",
        "positive: resuming after 3/16",
    ):  # ablate's, transfer's (model a) and persona's first cell
        assert f"cell {cell} responses" in log0, cell
    # process 1 wrote nothing and printed nothing; process 0 wrote the folders
    for name, run in one_.items():
        assert run["writes"] == [] and (name == "norms" or run["stdout"] == ""), run
    written = {Path(p).relative_to(out).parts[:1] for r in zero.values() for _, p in r["writes"]}
    # atomic writes go through a hidden temp file renamed into place: none may be left behind
    assert not list(out.rglob(".*.tmp")), list(out.rglob(".*.tmp"))
    written = {w for w in written if not (w and w[0].startswith(".") and w[0].endswith(".tmp"))}
    # (the folder `out` itself, made by the first; sae-features' vector file)
    expected = {(), ("ablate",), ("transfer",), ("persona",), ("features.safetensors",)}
    expected |= {("sweep",), ("lora_em",), ("dose",), ("demo",), ("ablate_local",)}
    assert written == expected, written
    one = mesh_results["one"]
    assert json.loads((out / "ablate" / "results.json").read_text()) == one["ablate"]
    assert json.loads((out / "transfer" / "results.json").read_text()) == one["transfer"]
    got = json.loads((out / "persona" / "results.json").read_text())
    _close(got, one["persona"]["results"], "persona")
    assert zero["persona"]["stdout"] == one["persona"]["printed"]
    assert zero["ablate"]["stdout"].startswith("EM before ")
    assert "report.html" in zero["ablate"]["stdout"] and "report.html" in zero["transfer"]["stdout"]
    assert (out / "ablate" / "report.html").exists() and (out / "transfer" / "report.html").exists()
    # sweep, lora-em (the one-device adapter) and dose-response: the one-device results,
    # summaries printed by process 0 only
    sweep = json.loads((out / "sweep" / "results.json").read_text())
    assert {k: sweep[k] for k in ("baseline", "cells")} == one["sweep"]
    assert zero["sweep"]["stdout"] == f"wrote {out / 'sweep' / 'report.html'}\n"
    assert json.loads((out / "lora_em" / "results.json").read_text()) == one["lora-em"]
    assert zero["lora-em"]["stdout"].startswith("EM base ")
    _close(json.loads((out / "dose" / "results.json").read_text()), one["dose-response"], "dose")
    assert zero["dose-response"]["stdout"].startswith("cells: 13 computed, 0 reused\n")
    assert (out / "dose" / "report.html").exists() and (out / "dose" / "table.csv").exists()

    def jsonl_files(d: Path) -> list[Path]:  # runs.jsonl: judge counters, two rows once resumed
        return sorted(p.relative_to(d) for p in d.rglob("*.jsonl") if p.name != "runs.jsonl")

    for name in ("ablate", "transfer", "persona"):
        files = jsonl_files(work / "one" / name)
        assert len(files) >= 4 and jsonl_files(out / name) == files, name
        for rel in files:
            rows = [read_jsonl(d / name / rel) for d in (out, work / "one")]
            _close(*rows, f"{name}/{rel}")
    vectors = [load_file(d / "persona" / "persona_vector.safetensors") for d in (out, work / "one")]
    assert sorted(vectors[0]) == sorted(vectors[1])
    for k in vectors[1]:
        np.testing.assert_allclose(vectors[0][k], vectors[1][k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_sae_commands_on_two_processes(work, mesh_results, two_processes):
    """sae-check and sae-features --method steering on 2 processes (`two_processes`, `--mesh
    data=2`, rows split over the processes): process 0 prints the one-process figures and
    writes the feature file, process 1 prints nothing."""
    from safetensors.numpy import load_file

    out, (zero, one_) = two_processes["out"], two_processes["runs"]
    for command in ("sae-check", "sae-features"):
        assert one_[command]["stdout"] == "", one_[command]
        got = json.loads(zero[command]["stdout"])
        if command == "sae-features":
            got["out"] = {k: v.tolist() for k, v in load_file(out / "features.safetensors").items()}
        _close(got, mesh_results["one"][command], command)


def test_distributed_env_starts_every_command(mesh_results, two_processes):
    """EMGEO_DISTRIBUTED=1 (what launch/ sets; the same start as --distributed) joins two
    one-device processes (`two_processes`): `--mesh data=2` exists only if they did (else
    "needs 2 devices, 1 present"), and both print the one-process norms."""
    one = mesh_results["one"]
    for p in two_processes["runs"]:
        lines = p["norms"]["stdout"].splitlines()
        norms = [float(r.split()[1]) for r in lines if r[:5].strip().isdigit()]
        np.testing.assert_allclose(norms, one["norms"], rtol=1e-5)
        assert len(norms) == QWEN2["num_hidden_layers"] and lines[-1] == one["next"]


def test_local_judge_and_demo_on_two_processes(mesh_results, two_processes):
    """ablate with the local judge on 2 processes (`two_processes`: process 0's server judges
    with the model spanning both, process 1 follows its model calls in judging sessions) gives
    the one-process run's generations exactly, its judgements and table within float tolerance
    (the judge's forwards sum over both processes); demo --quick on 2 processes gives the
    one-device demo's sweep, dose-response and extraction (float tolerance where sums go over
    the mesh), written once by process 0."""
    out, (zero, one_) = two_processes["out"], two_processes["runs"]
    status, err = two_processes["local_one"]
    assert status == 0, err[-3000:]
    for p in (zero, one_):
        assert "Traceback" not in p["local_judge"]["stderr"] + p["demo"]["stderr"]
    assert zero["local_judge"]["stdout"].startswith("EM before ")
    files = sorted(p.relative_to(out / "local_one") for p in (out / "local_one").rglob("*.jsonl"))
    files = [f for f in files if f.name != "runs.jsonl"]
    assert any(f.name.endswith(".judged.jsonl") for f in files), files
    for rel in files:  # the judge's forwards sum over both processes: float tolerance
        got, want = read_jsonl(out / "ablate_local" / rel), read_jsonl(out / "local_one" / rel)
        assert [r["response"] for r in got] == [r["response"] for r in want], rel
        _close(got, want, str(rel))
    judged = read_jsonl(out / "ablate_local" / files[-1])
    assert judged and all(r["aligned_judge"]["judge_model"].startswith("local:") for r in judged)
    results = [
        json.loads((out / d / "results.json").read_text()) for d in ("ablate_local", "local_one")
    ]
    _close(results[0], results[1], "ablate_local")
    assert zero["demo"]["stdout"] == f"wrote {out / 'demo' / 'report.html'}\n"
    assert (out / "demo" / "geometry" / "report.html").exists()
    assert (out / "demo" / "sae" / "summary.json").exists()
    want = mesh_results["one"]["demo"]
    read = lambda rel: json.loads((out / "demo" / rel).read_text())  # noqa: E731
    sweep = {k: v for k, v in read("sweep/results.json").items() if k != "config_hash"}
    _close(sweep, want["sweep"], "demo.sweep")
    dose = read("dose_response/results.json")
    _close({k: dose[k] for k in ("baseline", "cells")}, want["dose"], "demo.dose")
    from safetensors.numpy import load_file

    extract = load_file(out / "demo" / "extract" / "activations.safetensors")
    _close({k: v.tolist() for k, v in extract.items()}, want["extract"], "demo.extract")


# --- refusals before anything loads ---------------------------------------------------------


def test_bad_meshes_are_refused_by_name_before_loading(work):
    """6 devices; the model folder holds a config.json and nothing else, so reaching the load
    would fail differently: each refusal names --mesh and what is available."""
    folder = work / "config_only"
    folder.mkdir(exist_ok=True)
    # 2 KV heads x 8 = 16 columns: tensor=3 cannot split k/v (vocab 432, 6 x 8 heads, 96 MLP can)
    cfg = dict(QWEN2, vocab_size=432, intermediate_size=96, architectures=["Qwen2ForCausalLM"])
    (folder / "config.json").write_text(json.dumps(cfg))
    no_weights = f"--model={folder}"  # loading it would fail: a refusal must come first
    prompts, data = f"--prompts={work / 'prompts.txt'}", f"--data={work / 'pairs.jsonl'}"
    cases = {
        "too_many": ["norms", no_weights, "--mesh=fsdp=16"],
        "not_dividing": ["norms", no_weights, "--mesh=fsdp=4"],
        "unknown_axis": ["norms", no_weights, "--mesh=pipeline=2"],
        "bad_size": ["norms", no_weights, "--mesh=fsdp=two"],
        "kv_heads": ["generate", no_weights, prompts, "--mesh=tensor=3"],
        "old_fsdp": ["extract", no_weights, data, "--out=x", "--fsdp=4"],
        "both": ["extract", no_weights, data, "--out=x", "--fsdp=2", "--mesh=fsdp=2"],
    }
    got = emgeo_cases(cases, env=cpu_env(6), timeout=300)
    want = {
        "too_many": "--mesh fsdp=16: needs 16 devices, 6 present",
        "not_dividing": "--mesh fsdp=4: 4 does not divide the 6 devices present",
        "unknown_axis": "unknown axis 'pipeline'; the axes are data, fsdp, tensor",
        "bad_size": "'fsdp=two' is not AXIS=SIZE",
        "kv_heads": "--mesh data=2,tensor=3: layers.attn.k_proj.kernel has 16 kv_heads entries, "
        "which tensor=3 cannot split evenly; for this model tensor must be one of 1, 2, 4, 8, 16",
        "old_fsdp": "--mesh fsdp=4: 4 does not divide the 6 devices present",
        "both": "give --mesh or the deprecated --fsdp 2, not both",
    }
    for name, text in want.items():
        status, stderr = got[name]
        errors = [line for line in stderr.splitlines() if ": error: " in line]
        assert status == 2 and len(errors) == 1, (name, stderr)
        assert text in errors[0], (name, errors[0])
        assert "Traceback" not in stderr
    assert "warning: --fsdp 4 is deprecated; use --mesh fsdp=4" in got["old_fsdp"][1]
    assert not (ROOT / "x").exists()


def test_mesh_spec_parsing_and_shapes():
    from emgeo_jax.parallel import mesh_shape, parse_mesh_spec

    assert parse_mesh_spec("data=2, fsdp=4,tensor=1") == {"data": 2, "fsdp": 4, "tensor": 1}
    assert parse_mesh_spec("auto") == "auto"
    assert mesh_shape("auto", 8) == {"data": 1, "fsdp": 8, "tensor": 1}
    assert mesh_shape({"fsdp": 4}, 8) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    for bad, msg in (("fsdp=8,fsdp=2", "given twice"), ("fsdp", "not AXIS=SIZE"), ("x=0", "not")):
        with pytest.raises(ValueError, match=msg):
            parse_mesh_spec(bad, "--mesh")
    with pytest.raises(ValueError, match="uses 4 of the 8 devices"):
        mesh_shape({"data": 1, "fsdp": 4}, 8)


def test_param_split_check_follows_the_rules():
    """Derived from PARAM_AXES x MESH_RULES, not hard-coded: the default model (9 heads, 3 KV
    heads x 64, vocab 49152, MLP 1536, d 576) takes tensor=3 and fsdp=64 but not fsdp=5 (576)."""
    from flax import nnx

    from emgeo_jax.models.config import ModelConfig
    from emgeo_jax.models.lm import abstract_model
    from emgeo_jax.parallel import check_param_split
    from emgeo_jax.plan import KNOWN_MODELS

    cfg = ModelConfig.from_hf(KNOWN_MODELS["SmolLM2-135M"])
    params = nnx.to_pure_dict(abstract_model(cfg)[1])
    check_param_split({"data": 1, "fsdp": 64, "tensor": 3}, params)
    with pytest.raises(ValueError, match=r"has 576 embed entries, which fsdp=5 cannot split"):
        check_param_split({"data": 1, "fsdp": 5, "tensor": 1}, params)
    with pytest.raises(ValueError, match=r"tensor must be one of 1, 2, 3, 4, 6, 8, 12"):
        check_param_split({"data": 1, "fsdp": 1, "tensor": 5}, params)


# --- the dispatcher -------------------------------------------------------------------------


# `python -m emgeo_jax.cli` with SIGINT handled and not blocked, as a command started from a
# shell has it. A pytest-xdist worker's children may inherit SIGINT ignored or blocked (two
# suite runs on 2026-12-07: the child ran on after SIGINT, though the test passes on its own;
# the cause was not found), and Python keeps an inherited SIG_IGN: Ctrl-C would do nothing.
AS_FROM_A_SHELL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); sys.argv[0] = 'emgeo'; "
    "runpy.run_module('emgeo_jax.cli', run_name='__main__')"
)


def test_ctrl_c_says_how_to_resume_and_exits_130(work, tmp_path):
    cmd = [sys.executable, "-c", AS_FROM_A_SHELL, "generate", f"--model={work / 'model'}"]
    # 8 prompts x 1000 samples: minutes of work, stopped after the first batch (a run short
    # enough to end before the interrupt reaches it would exit 0 on a busy machine)
    cmd += [f"--prompts={work / 'prompts.txt'}", "--batch_size=1", "--samples=1000"]
    cmd += ["--max_new_tokens=50", f"--out={tmp_path / 'gen.jsonl'}"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cpu_env(1)
    )
    assert "responses" in proc.stdout.readline()  # a batch is done: resumable from here
    sig = [
        line for line in open(f"/proc/{proc.pid}/status") if line.startswith(("SigBlk", "SigIgn"))
    ]
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 130, (out[-500:], err[-2000:], sig)
    assert "emgeo generate: interrupted; run the same command again to resume" in err
    assert "Traceback" not in err
    assert (tmp_path / "gen.jsonl.partial").exists() and not (tmp_path / "gen.jsonl").exists()


def test_unknown_command_suggests_the_closest():
    """(In this process: an unknown command ends before any flag or module is touched.)"""
    status, err = emgeo_status_and_stderr(["extrct"])
    assert status == 2
    assert err.splitlines()[0] == "emgeo: unknown command 'extrct'; did you mean 'extract'?"
    status, err = emgeo_status_and_stderr(["frobnicate"])
    assert status == 2 and "did you mean" not in err and "usage: emgeo" in err


def test_checkpoint_load_logs_quietly(work, tmp_path):
    """No orbax/jax INFO lines and no absl prefixes (level, date, thread id, file:line) on a
    checkpoint load; --verbosity=0 shows them."""
    import emgeo_jax
    from emgeo_jax.convert.checkpoint import save_checkpoint

    save_checkpoint(emgeo_jax.load(work / "model"), tmp_path / "ckpt")
    quiet = subprocess.run(
        [sys.executable, "-m", "emgeo_jax.cli", "norms", f"--model={tmp_path / 'ckpt'}"],
        cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    loud = subprocess.run(
        [sys.executable, "-m", "emgeo_jax.cli", "norms", f"--model={tmp_path / 'ckpt'}"]
        + ["--verbosity=0"],
        cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert loud.returncode == 0, loud.stderr
    assert re.search(r"^I\d{4} [\d:.]+ +\d+ \w+\.py:\d+\]", loud.stderr, re.M), loud.stderr[:500]


def test_help_lists_every_subcommand_and_its_flags():
    from emgeo_jax.cli import SUBCOMMANDS

    listing = emgeo_in_process("--help")
    for name, (_, line) in SUBCOMMANDS.items():
        assert f"  {name:<14} {line}" in listing
    code = (
        "import json\n"
        "from tests.test_cli_mesh import emgeo_in_process\n"
        "from emgeo_jax.cli import SUBCOMMANDS\n"
        "print(json.dumps({c: emgeo_in_process(c, '--help') for c in SUBCOMMANDS}))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=cpu_env(1), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    helps = json.loads(proc.stdout.splitlines()[-1])
    loading = {"generate", "serve", "sweep", "ablate", "transfer", "persona", "lora-em"}
    loading |= {"train-lora", "norms", "sae-check", "sae-features", "demo", "extract"}
    loading |= {"lora-scalars", "dose-response"}
    for name, text in helps.items():
        assert "\nflags:\n" in text and re.search(r"^  --\w+", text, re.M), name
        assert ("--mesh:" in text) == (name in loading or name == "plan"), name
    assert "--temperature:" in helps["generate"] and "--steer:" in helps["generate"]
    assert "50" in helps["sweep"].split("--samples:")[1].split("\n  --")[0]
