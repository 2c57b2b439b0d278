"""Multi-process runs on localhost and the launch scripts (dry runs, shellcheck)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from emgeo_jax.models.config import ModelConfig
from emgeo_jax.models.llama import default_positions
from emgeo_jax.models.lm import forward, init_params
from emgeo_jax.models.taps import Taps
from tests.multiprocess_forward import BATCH_LENGTHS
from tests.tiny_models import LLAMA, padded_batch

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"


def sh(*args: str, **kw) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(args, check=True, capture_output=True, text=True, cwd=ROOT, env=env, **kw)
    return out.stdout


@pytest.mark.slow
def test_two_process_forward_equals_one_process(tmp_path):
    """2 processes x 2 CPU devices (gloo), params split over fsdp x tensor, batch over
    processes: logits and every layer's residual equal the single-process forward."""
    sh(
        str(LAUNCH / "local.sh"),
        "--num_processes", "2", "--devices_per_process", "2", "--logs", str(tmp_path / "logs"),
        "--port", str(20000 + os.getpid() % 20000),
        "--", "python", "tests/multiprocess_forward.py", str(tmp_path),
        timeout=300,
    )  # fmt: skip
    cfg = ModelConfig.from_hf(LLAMA)
    graphdef, params = init_params(cfg, seed=1)
    ids, mask = padded_batch(cfg.vocab_size, BATCH_LENGTHS, seed=2)
    one = forward(graphdef, params, ids, default_positions(mask), mask, taps=Taps(resid="full"))
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), one.logits, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "resid.npy"), one.resid_post, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_two_process_steered_generation_equals_one_process(tmp_path):
    """2 processes x 2 CPU devices (gloo), params split over fsdp x tensor: steered greedy
    and sampled generation give the same tokens and logprobs as one process."""
    from tests.multiprocess_generate import run, tiny_lm

    sh(
        str(LAUNCH / "local.sh"),
        "--num_processes", "2", "--devices_per_process", "2", "--logs", str(tmp_path / "logs"),
        "--port", str(20000 + (os.getpid() + 7919) % 20000),
        "--", "python", "tests/multiprocess_generate.py", str(tmp_path),
        timeout=300,
    )  # fmt: skip
    two = np.load(tmp_path / "generation.npz")
    one = run(tiny_lm())
    assert sorted(two.files) == sorted(one)
    for key, value in one.items():
        if key.endswith("tokens"):
            np.testing.assert_array_equal(two[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(two[key], value, atol=1e-5, rtol=0, err_msg=key)
    assert not np.array_equal(one["greedy_tokens"], one["sampled_tokens"])


def test_local_launcher_reports_a_failing_process(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as err:
        sh(str(LAUNCH / "local.sh"), "--logs", str(tmp_path), "--", "python", "-c", "exit(3)")
    assert "process 0 failed" in err.value.stderr


def test_tpu_dry_run_prints_the_exact_gcloud_commands():
    where = ["--project", "my-proj", "--zone", "us-central2-b", "--name", "em", "--dry_run"]
    create = sh(str(LAUNCH / "tpu.sh"), "create", *where, "--accelerator", "v4-32")
    assert create.strip() == (
        "+ gcloud compute tpus tpu-vm create em --project=my-proj --zone=us-central2-b "
        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base"
    )
    install = sh(str(LAUNCH / "tpu.sh"), "install", *where, "--repo", "https://x/e.git")
    assert install.startswith("+ gcloud compute tpus tpu-vm ssh em --project=my-proj")
    assert "--worker=all" in install and "git\\ clone\\ https://x/e.git" in install
    run = sh(
        str(LAUNCH / "tpu.sh"), "run", *where, "--accelerator", "v4-32", "--logs", "/tmp/x",
        "--", "emgeo", "plan", "--model", "Qwen2.5-7B",
    )  # fmt: skip
    lines = run.strip().splitlines()
    assert "--worker=all" in lines[0] and "EMGEO_DISTRIBUTED=1\\ emgeo\\ plan" in lines[0]
    scps = [line for line in lines if " scp " in line]
    assert [s.split("--worker=")[1] for s in scps] == ["0", "1", "2", "3"]  # v4-32: 4 hosts
    one_host = sh(str(LAUNCH / "tpu.sh"), "run", *where, "--accelerator", "v5litepod-8",
                  "--logs", "/tmp/x", "--", "emgeo", "plan")  # fmt: skip
    assert sum(" scp " in line for line in one_host.splitlines()) == 1


def test_slurm_dry_run_prints_the_batch_script_and_sbatch(tmp_path):
    out = sh(
        str(LAUNCH / "slurm.sh"), "--nodes", "4", "--gpus_per_node", "8", "--partition", "gpu",
        "--logs", str(tmp_path), "--dry_run", "--", "emgeo", "plan", "--model", "Llama-3.1-70B",
    )  # fmt: skip
    assert "#SBATCH --nodes=4" in out and "#SBATCH --gpus-per-node=8" in out
    assert "#SBATCH --partition=gpu" in out and "export EMGEO_DISTRIBUTED=1" in out
    assert "emgeo plan --model Llama-3.1-70B" in out
    assert out.strip().splitlines()[-1].startswith("+ sbatch " + str(tmp_path))


def test_scripts_refuse_missing_flags():
    for args in (["tpu.sh", "create", "--zone", "z"], ["slurm.sh", "--nodes", "2"]):
        res = subprocess.run([str(LAUNCH / args[0]), *args[1:]], capture_output=True, text=True)
        assert res.returncode == 2 and res.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_launch_scripts_are_shellcheck_clean():
    subprocess.run(["shellcheck", *sorted(map(str, LAUNCH.glob("*.sh")))], check=True)
