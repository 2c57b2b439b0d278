"""The `emgeo` command: `emgeo SUBCOMMAND [ARGS] [--flags]`.

Each subcommand lives next to the code it drives and defines its own absl flags (spelled
with underscores: `--max_new_tokens=64` or `--max_new_tokens 64`). Only the chosen
subcommand's module is imported, so flags of different subcommands never collide and
`emgeo --help` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# subcommand -> (module defining `main(argv)`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("emgeo_jax.convert.cli", "HF folder / GGUF (+ PEFT adapter) -> checkpoints/NAME"),
    "norms": ("emgeo_jax.convert.cli_norms", "print per-layer residual norms and a greedy reply"),
    "generate": (
        "emgeo_jax.generate_cli",
        "steered / ablated sampling of prompts -> responses JSONL",
    ),
    "check-data": ("emgeo_jax.data.cli", "check a dataset: bad rows (file:line), counts, lengths"),
    "judge": ("emgeo_jax.judge.cli", "score {question, answer} JSONL with an LLM judge (cached)"),
    "geometry": ("emgeo_jax.geometry.cli", "cosines, independence tests, nulls, report"),
    "sae-check": ("emgeo_jax.vectors.sae.cli_check", "SAE fit: MSE, FVE, L0, dead, loss recovered"),
    "sae-features": ("emgeo_jax.vectors.sae.cli_features", "SAE features a direction turns on"),
    "train-sae": ("emgeo_jax.vectors.sae.cli_train", "train a TopK/BatchTopK SAE (SAELens out)"),
    "plan": ("emgeo_jax.plan_cli", "compile a task on a simulated mesh: memory, FLOPs, tokens/s"),
    "train-lora": ("emgeo_jax.train.cli_train", "fine-tune a LoRA model organism (resumable)"),
    "lora-scalars": ("emgeo_jax.train.cli_scalars", "per-token adapter scalars and B directions"),
    "probe": ("emgeo_jax.train.cli_probe", "L1 probes on adapter scalars (four tests)"),
    "lora-em": ("emgeo_jax.train.cli_em", "EM rate of a train-lora run vs its base model"),
    "sweep": ("emgeo_jax.experiments.cli_sweep", "steering sweep: directions x layers x scales"),
    "ablate": (
        "emgeo_jax.experiments.cli_ablate",
        "EM rate before/after projecting a direction out",
    ),
    "transfer": ("emgeo_jax.experiments.cli_transfer", "transfer matrix of vectors across models"),
    "persona": ("emgeo_jax.experiments.cli_persona", "contrast pairs from persona system prompts"),
    "demo": ("emgeo_jax.experiments.demo", "offline end-to-end demo on the default model"),
    "extract": ("emgeo_jax.extract_cli", "pooled per-class per-layer activations (resumable)"),
    "vectors": ("emgeo_jax.vectors.cli", "mean-diff / PCA / random-control directions"),
    "serve": ("emgeo_jax.serve_cli", "OpenAI-compatible chat server for a (steered) model"),
}


def usage() -> str:
    lines = ["usage: emgeo SUBCOMMAND [ARGS] [--flags]   (emgeo SUBCOMMAND --help)", ""]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
        print(usage(), file=sys.stderr)
        sys.exit(0 if len(argv) >= 2 and argv[1] in ("-h", "--help") else 2)
    from absl import app

    if os.environ.get("EMGEO_DISTRIBUTED") == "1":  # set by the scripts in launch/
        from emgeo_jax.parallel import initialize_distributed

        initialize_distributed()
    # httpx logs every judge request at INFO, which drowns the progress lines under absl.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    module = importlib.import_module(SUBCOMMANDS[argv[1]][0])
    app.run(module.main, argv=[f"emgeo {argv[1]}", *argv[2:]])


if __name__ == "__main__":
    run()
