"""LoRA training on 8 simulated CPU devices (batch over `data x fsdp`, params split over `fsdp`)
gives the loss curve and LoRA of one device, LoRA dropout included (its masks do not depend
on the sharding), also with a batch size (5) that `data x fsdp` does not divide (rows padded
with empty answer masks).

The 8-device run is this module run as a script in a fresh process:

    JAX_NUM_CPU_DEVICES=8 python -m tests.test_train_mesh OUT_DIR
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from emgeo_jax.data import TokenizedExample
from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.lm import LM, init_params
from emgeo_jax.train.lora import LoraSpec
from emgeo_jax.train.run import read_losses, train
from emgeo_jax.train.sft import TrainConfig
from tests.cli_util import cpu_env
from tests.tiny_models import LLAMA

ROOT = Path(__file__).resolve().parents[1]
SPEC = LoraSpec(rank=4, alpha=8.0, targets=("q", "o", "up", "down"), layers=(0, 2))
TC = TrainConfig(
    steps=5, lr=1e-2, warmup_steps=1, batch_size=8, grad_accum=2, lora_dropout=0.2, seed=3
)


def _examples(vocab: int) -> list[TokenizedExample]:
    rng = np.random.default_rng(0)
    out = []
    for i, n in enumerate([12, 9, 15, 11, 14, 8, 13, 10, 12, 9, 16, 11]):
        ids = rng.integers(3, vocab, size=n).astype(np.int32)
        out.append(TokenizedExample(ids, 4, n, 1, i, f"synthetic:{i}"))
    return out


ODD = dataclasses.replace(TC, batch_size=5, steps=3)


def _run(out: Path, mesh_shape: dict[str, int] | None, tc: TrainConfig = TC) -> None:
    from emgeo_jax.parallel import make_mesh

    cfg = ModelConfig.from_hf(LLAMA)
    graphdef, params = init_params(cfg, seed=1)
    lm = LM(cfg, graphdef, params, None, None, "tiny")
    if mesh_shape is not None:
        lm = lm.on_mesh(make_mesh(mesh_shape))
    lora = train(lm, _examples(cfg.vocab_size), SPEC, tc, out, log=lambda s: None)
    np.savez(out / "lora.npz", *[np.asarray(x) for x in jax.tree.leaves(lora)])


def test_8_devices_match_1_device(tmp_path):
    env = cpu_env(8)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.test_train_mesh", str(tmp_path / "eight")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _run(tmp_path / "one", None)
    _run(tmp_path / "one_odd", None, ODD)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    for one_dir, eight_dir, tc in (("one", "eight", TC), ("one_odd", "eight_odd", ODD)):
        one, eight = read_losses(tmp_path / one_dir), read_losses(tmp_path / eight_dir)
        assert [r["step"] for r in eight] == list(range(tc.steps))
        for key in ("loss", "grad_norm", "tokens"):
            np.testing.assert_allclose(
                [r[key] for r in eight], [r[key] for r in one], rtol=2e-4, err_msg=key
            )
        a = np.load(tmp_path / one_dir / "lora.npz")
        b = np.load(tmp_path / eight_dir / "lora.npz")
        for k in a.files:
            np.testing.assert_allclose(b[k], a[k], atol=1e-5, rtol=1e-3)
    one = read_losses(tmp_path / "one")
    assert one[-1]["loss"] < one[0]["loss"] - 0.05  # it trains


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    _run(Path(sys.argv[1]), {"data": 2, "fsdp": 4})
    _run(Path(sys.argv[1]).with_name("eight_odd"), {"fsdp": 8}, ODD)
