"""One process of a multi-process sweep and LoRA training, each interrupted and resumed (run by
launch/local.sh; see tests/test_multiprocess_experiments.py).

    python tests/multiprocess_experiments.py TOKENIZER_DIR OUT_DIR

Every process builds the tiny chat Llama of tests/test_mesh_library.py, places it on a mesh
spanning all processes' devices (`fsdp` = every device, so batch rows are split over the
processes and padded where the mesh does not divide them) and calls the library API:

- `run_sweep` into OUT_DIR/sweep, killed (on every process) right after its steered cell's
  generations were written, then run again to the end; the scripted judge listens on each
  process, only process 0's is asked;
- `train` into OUT_DIR/train, stopped after `STOP_AFTER` steps, then run again to the end.

Process 0 writes every file; `emgeo_jax.hosts` keeps the processes agreeing on what is done.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

SWEEP = dict(layers=[1], scales=[4.0], model="tiny", monitor=(1, "md"))
KILL_AT = ("md__L1__s4", "generated")
STOP_AFTER = 2


class Killed(Exception):
    pass


def train_config():
    from tests.test_train_mesh import TC

    # batch 5: padded to the mesh's rows; a checkpoint every 2 steps, so resuming after 2
    # restores step 2
    return dataclasses.replace(TC, steps=4, batch_size=5, checkpoint_every=2, lora_dropout=0.1)


def sweep(lm, out: Path, server, on_stage=None) -> dict:
    import numpy as np

    from emgeo_jax.experiments.sweep import run_sweep
    from emgeo_jax.judge.client import JudgeConfig
    from tests.test_mesh_library import QUESTIONS, SAMPLING

    rng = np.random.default_rng(0)
    v = {"md": rng.normal(size=(lm.config.num_layers, lm.config.hidden_size)).astype(np.float32)}
    judge = JudgeConfig(base_url=server.base_url, model="scripted")
    return run_sweep(
        lm, v, QUESTIONS, sampling=SAMPLING, judge=judge, out_dir=out, on_stage=on_stage, **SWEEP
    )


def train_lora(lm, out: Path, stop_after: int | None = None):
    from emgeo_jax.train.run import train
    from tests.test_train_mesh import SPEC, _examples

    examples = _examples(lm.config.vocab_size)
    return train(lm, examples, SPEC, train_config(), out, stop_after=stop_after, log=print)


def main(tok_dir: Path, out: Path) -> None:
    import jax
    from transformers import PreTrainedTokenizerFast

    from emgeo_jax.hosts import barrier
    from emgeo_jax.judge.testing import ScriptedJudgeServer
    from emgeo_jax.parallel import make_mesh
    from tests.test_experiments import table
    from tests.test_mesh_library import tiny_chat_lm

    barrier("test_start")  # the first collective while the processes are in step
    assert jax.process_count() == 2
    lm = tiny_chat_lm(PreTrainedTokenizerFast.from_pretrained(tok_dir))
    lm = lm.on_mesh(make_mesh({"fsdp": jax.device_count()}))

    def kill(name, stage):
        if (name, stage) == KILL_AT:
            raise Killed

    with ScriptedJudgeServer(table) as server:
        try:
            sweep(lm, out / "sweep", server, on_stage=kill)
            raise AssertionError("the sweep was not interrupted")
        except Killed:
            pass
        first = len(server.requests)
        sweep(lm, out / "sweep", server)
        requests = len(server.requests)
    if jax.process_index() == 0:
        assert 0 < first < requests, (first, requests)  # resumed, judged the rest
    else:
        assert requests == 0, requests  # only process 0 calls the judge
    train_lora(lm, out / "train", stop_after=STOP_AFTER)
    train_lora(lm, out / "train")
    print("done", jax.process_index())


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from emgeo_jax.parallel import initialize_distributed

    initialize_distributed()  # before any device is touched
    main(Path(sys.argv[1]), Path(sys.argv[2]))
