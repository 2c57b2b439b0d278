"""The `emgeo` command: `emgeo SUBCOMMAND [ARGS] [--flags]`.

Each subcommand lives next to the code it drives and defines its own absl flags (spelled
with underscores: `--max_new_tokens=64` or `--max_new_tokens 64`). Only the chosen
subcommand's module is imported, so flags of different subcommands never collide and
`emgeo --help` stays fast.
"""

from __future__ import annotations

import importlib
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

    module = importlib.import_module(SUBCOMMANDS[argv[1]][0])
    app.run(module.main, argv=[f"emgeo {argv[1]}", *argv[2:]])


if __name__ == "__main__":
    run()
