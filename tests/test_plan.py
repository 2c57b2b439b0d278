"""`emgeo plan` on full-size shapes over simulated meshes of 8 and 64 CPU devices.

Every compiler figure is checked against a hand count from the HF config numbers alone
(parameter bytes per device, FLOPs per token), not against emgeo_jax's own bookkeeping."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from emgeo_jax.plan import (
    ACCELERATORS,
    KNOWN_MODELS,
    Plan,
    format_plan,
    parse_mesh,
    resolve_model,
    simulated_env,
)

ROOT = Path(__file__).resolve().parents[1]
BF16 = 2


def hand_counts(hf: dict, fsdp: int, tensor: int) -> dict:
    """Parameter elements per layer, and bytes per device when every matrix is split over
    fsdp*tensor, norm scales over fsdp, biases over tensor (the documented rules)."""
    d, f, layers = hf["hidden_size"], hf["intermediate_size"], hf["num_hidden_layers"]
    h, k, v = hf["num_attention_heads"], hf["num_key_value_heads"], hf["vocab_size"]
    dh = d // h
    per_layer = d * h * dh * 2 + d * k * dh * 2 + 3 * d * f  # q, o, k, v, gate/up/down
    biases = layers * (h * dh + 2 * k * dh) if hf["model_type"] == "qwen2" else 0
    norms = (2 * layers + 1) * d
    matrices = layers * per_layer + 2 * v * d  # + embedding and (untied) LM head
    resident = (matrices * BF16) / (fsdp * tensor) + norms * BF16 / fsdp + biases * BF16 / tensor
    read = resident - v * d * BF16 / (fsdp * tensor) - d * BF16 / fsdp  # no LM head, final norm
    return dict(per_layer=per_layer, resident=resident, read=read, dh=dh, h=h, layers=layers)


def hand_flops_per_token(hf: dict, seq: int) -> float:
    """2 FLOPs per multiply-add: all block matmuls, plus scores and mixing over all T keys."""
    c = hand_counts(hf, 1, 1)
    return c["layers"] * (2 * c["per_layer"] + 4 * seq * c["h"] * c["dh"])


def check_against_hand(plan: dict, model: str, mesh: str, batch: int, seq: int) -> None:
    shape = parse_mesh(mesh)
    fsdp, tensor, data = shape.get("fsdp", 1), shape.get("tensor", 1), shape.get("data", 1)
    hf = KNOWN_MODELS[model]
    hand = hand_counts(hf, fsdp, tensor)
    assert plan["devices"] == fsdp * tensor * data
    assert plan["params_hand"] == pytest.approx(hand["resident"], rel=0.01)
    tokens = 3 * batch * seq * 4 / (fsdp * data)  # ids, positions, mask: int32 [B, T]
    assert plan["arguments"] == pytest.approx(hand["read"] + tokens, rel=0.05)
    assert plan["flops_per_token"] == pytest.approx(hand_flops_per_token(hf, seq), rel=0.05)
    assert 0 < plan["temporaries"] < 4 * hand["resident"] and plan["outputs"] > 0


def test_cli_plans_qwen_7b_on_8_simulated_devices():
    cmd = [sys.executable, "-m", "emgeo_jax.cli", "plan", "--model", "Qwen2.5-7B-Instruct"]
    cmd += ["--mesh", "fsdp=8", "--batch", "8", "--seq", "256", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    check_against_hand(json.loads(out[out.index("{") :]), "Qwen2.5-7B", "fsdp=8", 8, 256)


LLAMA_70B = [("fsdp=8", 8, 256), ("data=2,fsdp=8,tensor=4", 16, 256)]  # 8 and 64 devices


@pytest.fixture(scope="module")
def llama_70b_plans() -> list[dict]:
    """Both 70B plans from one process simulating 64 devices (the 8-device mesh uses 8)."""
    script = textwrap.dedent(
        f"""
        import dataclasses, json, math, jax
        from emgeo_jax.parallel import make_mesh
        from emgeo_jax.plan import make_plan, parse_mesh, resolve_model
        cfg = resolve_model("Llama-3.1-70B")
        out = []
        for mesh, batch, seq in {LLAMA_70B!r}:
            shape = parse_mesh(mesh)
            devices = jax.devices()[: math.prod(shape.values())]
            plan = make_plan(cfg, make_mesh(shape, devices), "extract", batch, seq)
            out.append(dict(dataclasses.asdict(plan), flops_per_token=plan.flops_per_token))
        print(json.dumps(out))
        """
    )
    res = subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=simulated_env(64),
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("i", range(len(LLAMA_70B)))
def test_llama_70b_plans_match_hand_counts(llama_70b_plans, i):
    check_against_hand(llama_70b_plans[i], "Llama-3.1-70B", *LLAMA_70B[i])


def test_70b_on_eight_v5e_chips_does_not_fit_and_names_the_largest_term(llama_70b_plans):
    plan = Plan(**{k: v for k, v in llama_70b_plans[0].items() if k != "flops_per_token"})
    v5e, v5p = ACCELERATORS["v5e"], ACCELERATORS["v5p"]
    # 70.6e9 params * 2 bytes / 8 devices = 17.6 GB of parameters alone > 16 GiB of HBM
    assert plan.params_hand > v5e.hbm_bytes and not plan.fits(v5e)
    assert plan.fits(v5p) and plan.tokens_per_second(v5p, 0.4) > 0
    text = format_plan(plan, [v5e, v5p], 0.4)
    assert "v5e       does not fit" in text and "largest term params 17.6 GB" in text
    assert "does not fit" not in text.splitlines()[-1]


def test_tokens_per_second_is_mfu_times_peak_over_flops_when_compute_bound(llama_70b_plans):
    plan = Plan(**{k: v for k, v in llama_70b_plans[1].items() if k != "flops_per_token"})
    acc = ACCELERATORS["v5p"]
    expected = 0.4 * acc.bf16_flops * plan.devices / plan.flops_per_token
    assert plan.tokens_per_second(acc, 0.4) == pytest.approx(expected, rel=1e-9)


def test_accelerator_table_names_its_sources():
    for acc in ACCELERATORS.values():
        assert acc.source and acc.bf16_flops > 1e14 and acc.hbm_bytes > 1e10


def test_bad_mesh_and_model_are_refused_by_name():
    with pytest.raises(ValueError, match="data=4,fsdp=8"):
        parse_mesh("data:4")
    with pytest.raises(ValueError, match="--model Nope-1B"):
        resolve_model("Nope-1B")
