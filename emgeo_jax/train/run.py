"""A resumable LoRA training run in one folder:

    OUT/run.json       the LoRA spec, training config, model source and steering digest
    OUT/ckpt/<step>/   orbax checkpoints of {lora, opt_state, step} every `checkpoint_every`
    OUT/losses.jsonl   one line per optimizer step: step, loss, nll, (kl,) grad_norm, lr, tokens
    OUT/loss.png       the loss curve
    OUT/adapter/       the final LoRA as an HF PEFT adapter

The data order is a pure function of (seed, batch index) (`emgeo_jax.train.data.batch_order`),
so a run restarted from its last checkpoint continues the same loss curve.

On `lm.mesh` each batch's rows are split over `data x fsdp` (a batch size those axes do not
divide gets rows added with an empty answer mask, which add nothing to the loss). On several
processes (a mesh spanning them) every process builds the same batch and transfers only its
devices' rows, the checkpoint manager saves collectively, and process 0 writes `run.json`,
`losses.jsonl`, the plot and the adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

from emgeo_jax.data import TokenizedExample, bucket_length
from emgeo_jax.hosts import barrier, broadcast_json, is_primary, put_global, to_host
from emgeo_jax.models.lm import LM
from emgeo_jax.models.steering import Steering
from emgeo_jax.parallel import lora_shardings
from emgeo_jax.runs import (
    SettingsMismatch,
    array_digest,
    mismatch,
    read_jsonl,
    read_settings,
    write_json_atomic,
    write_jsonl_atomic,
)
from emgeo_jax.train.data import train_batch
from emgeo_jax.train.lora import Lora, LoraSpec, init_lora
from emgeo_jax.train.peft_io import export_peft
from emgeo_jax.train.sft import TrainConfig, dropout_key, learning_rate, make_train_step

BATCH_KEYS = ("input_ids", "attention_mask", "positions", "answer_mask")


def _settings(spec: LoraSpec, tc: TrainConfig, source: str, steering: Steering | None) -> dict:
    """What `run.json` records: a resumed run must match it (steering by digest of its arrays)."""
    steer = None
    if steering is not None:
        fields = ("add", "ablate", "mode", "mask")
        steer = {
            k: array_digest(getattr(steering, k))
            for k in fields
            if getattr(steering, k) is not None
        }
    return {"lora": spec.to_dict(), "train": tc.__dict__, "source": source, "steering": steer}


def read_losses(out_dir: str | Path) -> list[dict]:
    """The logged steps of a run (`losses.jsonl`)."""
    path = Path(out_dir) / "losses.jsonl"
    return read_jsonl(path) if path.exists() else []


def plot_losses(rows: Sequence[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), layout="constrained")
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], label="loss")
    if rows and "kl" in rows[0]:
        ax.plot(steps, [r["kl"] for r in rows], label="KL to base")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("answer-token loss")
    ax.legend()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(
    lm: LM,
    tokenized: Sequence[TokenizedExample],
    spec: LoraSpec,
    tc: TrainConfig,
    out_dir: str | Path,
    *,
    steering: Steering | None = None,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
) -> Lora:
    """Train (or resume) a LoRA on `tokenized` and return it; see the module docstring.

    With `lm.mesh`, batches, activations and logits are sharded over the batch axes (`data`,
    `fsdp`), the LoRA and optimizer state by `parallel.lora_shardings`; params keep their own
    shardings. `steering` is applied in every forward pass
    (preventative steering / concept ablation). `stop_after` ends the call after that many
    optimizer steps in total (as if interrupted) without exporting the adapter."""
    if not lm.scan_layers:
        raise ValueError("training runs on stacked layers; train the model before `unstacked()`")
    out = Path(out_dir).absolute()
    settings = _settings(spec, tc, lm.source, steering)
    run_json = out / "run.json"
    clash = None
    if is_primary():
        old = read_settings(run_json)
        error = (
            None
            if old is None
            else mismatch(run_json, old, settings, what="a different run", hint="use a new --out")
        )
        if error is None:
            write_json_atomic(run_json, settings, indent=2)
        clash = None if error is None else str(error)
    clash = broadcast_json(clash)  # every process refuses, none waits for process 0
    if clash:
        raise SettingsMismatch(clash)
    if not tokenized:
        raise ValueError("no training examples")
    pad_id = lm.tokenizer.pad_token_id if lm.tokenizer is not None else 0
    if pad_id is None:
        pad_id = lm.tokenizer.eos_token_id
    length = bucket_length(max(ex.length for ex in tokenized), range(16, 1 << 16, 16))

    step_fn, optimizer = make_train_step(lm.graphdef, spec, tc, lm.mesh)
    lora = init_lora(lm.config, spec, jax.random.key(tc.seed))
    opt_state = optimizer.init(lora)
    if lm.mesh is not None:
        lora = put_global(lora, lora_shardings(lm.mesh, lora))
        opt_state = put_global(opt_state, lora_shardings(lm.mesh, opt_state))
    state = {"lora": lora, "opt_state": opt_state, "step": 0}
    options = ocp.CheckpointManagerOptions(max_to_keep=2, save_interval_steps=tc.checkpoint_every)
    with ocp.CheckpointManager(out / "ckpt", options=options) as manager:
        start = manager.latest_step()
        if start is not None:
            abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
            state = manager.restore(start, args=ocp.args.StandardRestore(abstract))
            if lm.mesh is not None:
                for k in ("lora", "opt_state"):
                    state[k] = put_global(state[k], lora_shardings(lm.mesh, state[k]))
            log(f"resumed {out} at step {start}")
        lora, opt_state, first = state["lora"], state["opt_state"], int(state["step"])
        rows = broadcast_json([r for r in read_losses(out) if r["step"] < first])
        schedule = learning_rate(tc)
        last = tc.steps if stop_after is None else min(tc.steps, stop_after)
        for step in range(first, last):
            micro = []
            for m in range(tc.grad_accum):
                index = step * tc.grad_accum + m
                batch = train_batch(tokenized, tc.batch_size, tc.seed, index, pad_id, length)
                batch, _ = lm.place_rows({k: batch[k] for k in BATCH_KEYS}, blank=("answer_mask",))
                key = dropout_key(tc.seed, index)
                lora, opt_state, metrics = step_fn(lora, opt_state, lm.params, batch, steering, key)
                micro.append(to_host(metrics))
            row = {"step": step, "lr": float(schedule(step))}
            for key in micro[0]:
                row[key] = float(np.mean([mm[key] for mm in micro]))
            row["tokens"] = float(sum(mm["tokens"] for mm in micro))
            rows.append(row)
            log(f"step {step}: loss {row['loss']:.4f} grad_norm {row['grad_norm']:.3g}")
            done = step + 1
            if manager.should_save(done) or done == last:
                # host copies: the device buffers are donated to the next step
                state = to_host({"lora": lora, "opt_state": opt_state, "step": done})
                manager.save(done, args=ocp.args.StandardSave(state), force=True)
            if is_primary():
                write_jsonl_atomic(out / "losses.jsonl", rows)
        manager.wait_until_finished()
    host = to_host(lora) if last == tc.steps else None  # a collective: every process
    if is_primary():
        plot_losses(rows, out / "loss.png")
        if host is not None:
            export_peft(host, spec, out / "adapter", lm.source, tc.lora_dropout)
    barrier("emgeo_train_done")  # no process returns before the files are written
    return lora
