"""The `emgeo` command: `emgeo SUBCOMMAND [ARGS] [--flags]`.

Each subcommand lives next to the code it drives and defines its own absl flags (spelled
with underscores: `--max_new_tokens=64` or `--max_new_tokens 64`). Only the chosen
subcommand's module is imported, so flags of different subcommands never collide and
`emgeo --help` stays fast.

Errors: bad input (a missing or malformed file, a flag value the code refuses) ends the command
with one line `emgeo SUBCOMMAND: error: MESSAGE` on stderr and exit status 2; set
`EMGEO_TRACEBACK=1` to see the traceback instead. Any other exception is a bug and shows its
traceback as usual. absl's own flag errors are unchanged; `--help` prints the subcommand's
docstring and flags (`--helpfull` adds every library's flags).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

# subcommand -> (module defining `main(argv)`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("emgeo_jax.cli.convert", "HF folder / GGUF (+ PEFT adapter) -> checkpoints/NAME"),
    "norms": ("emgeo_jax.cli.norms", "print per-layer residual norms and a greedy reply"),
    "generate": (
        "emgeo_jax.cli.generate",
        "steered / ablated sampling of prompts -> responses JSONL",
    ),
    "check-data": (
        "emgeo_jax.cli.check_data",
        "check a dataset: bad rows (file:line), counts, lengths",
    ),
    "judge": ("emgeo_jax.cli.judge", "score {question, answer} JSONL with an LLM judge (cached)"),
    "geometry": ("emgeo_jax.cli.geometry", "cosines, independence tests, nulls, report"),
    "sae-check": ("emgeo_jax.cli.sae_check", "SAE fit: MSE, FVE, L0, dead, loss recovered"),
    "sae-features": ("emgeo_jax.cli.sae_features", "SAE features a direction turns on"),
    "train-sae": ("emgeo_jax.cli.train_sae", "train a TopK/BatchTopK SAE (SAELens out)"),
    "plan": ("emgeo_jax.cli.plan", "compile a task on a simulated mesh: memory, FLOPs, tokens/s"),
    "train-lora": ("emgeo_jax.cli.train_lora", "fine-tune a LoRA model organism (resumable)"),
    "lora-scalars": ("emgeo_jax.cli.lora_scalars", "per-token adapter scalars and B directions"),
    "probe": ("emgeo_jax.cli.probe", "L1 probes on adapter scalars (four tests)"),
    "lora-em": ("emgeo_jax.cli.lora_em", "EM rate of a train-lora run vs its base model"),
    "sweep": ("emgeo_jax.cli.sweep", "steering sweep: directions x layers x scales"),
    "ablate": (
        "emgeo_jax.cli.ablate",
        "EM rate before/after projecting a direction out",
    ),
    "transfer": ("emgeo_jax.cli.transfer", "transfer matrix of vectors across models"),
    "persona": ("emgeo_jax.cli.persona", "contrast pairs from persona system prompts"),
    "demo": ("emgeo_jax.cli.demo", "offline end-to-end demo on the default model"),
    "extract": ("emgeo_jax.cli.extract", "pooled per-class per-layer activations (resumable)"),
    "vectors": ("emgeo_jax.cli.vectors", "mean-diff / PCA / random-control directions"),
    "serve": ("emgeo_jax.cli.serve", "OpenAI-compatible chat server for a (steered) model"),
}


# Exceptions that mean bad input. Every input check of the package raises ValueError or one of
# its subclasses (VectorFileError, PromptFileError, DataError, CheckpointError, ConfigError,
# ConfigMismatchError, SAEError, ...; json.JSONDecodeError and UnicodeDecodeError are
# ValueErrors too), or an OSError about a path the user gave. KeyError, TypeError, IndexError,
# AttributeError, RuntimeError and other OSErrors (connection refused, disk full) keep their
# traceback: from this code base they are bugs or environment failures, not bad input.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
)
TRACEBACK_ENV = "EMGEO_TRACEBACK"


def one_line(message: str) -> str:
    """`message` with its lines and runs of whitespace joined by single spaces."""
    return " ".join(message.split())


def number_list(values: list[str], flag: str, kind: type = int) -> list:
    """A list flag's values as numbers of `kind` (int or float); a ValueError naming `--flag`
    and the bad value otherwise."""
    out = []
    for v in values:
        try:
            out.append(kind(v))
        except ValueError:
            raise ValueError(f"--{flag}: {v!r} is not a number ({kind.__name__})") from None
    return out


def reporting_user_errors(command: str, main: Callable[[list[str]], Any]) -> Callable:
    """`main` that turns bad input (`USER_ERRORS`, and `SystemExit("message")` usage errors)
    into one line `emgeo COMMAND: error: MESSAGE` on stderr and exit status 2. With
    `EMGEO_TRACEBACK=1` exceptions propagate with their traceback."""
    prefix = f"emgeo {command}: "

    def fail(message: str, hint: bool) -> None:
        message = one_line(message).removeprefix(prefix)
        print(f"{prefix}error: {message}", file=sys.stderr)
        if hint:
            print(f"(bad input; {TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)

    def wrapped(argv: list[str]) -> Any:
        try:
            return main(argv)
        except SystemExit as e:
            if not isinstance(e.code, str):
                raise
            fail(e.code, hint=False)
        except USER_ERRORS as e:
            if os.environ.get(TRACEBACK_ENV) == "1":
                raise
            fail(str(e) or type(e).__name__, hint=True)

    return wrapped


def subcommand_help(command: str, module: Any) -> str:
    """`emgeo COMMAND --help`: the module's docstring and the flags of every emgeo_jax module
    it imported (only the chosen subcommand's modules are loaded, e.g. `steer_flags`)."""
    from absl import flags

    doc = (module.__doc__ or SUBCOMMANDS[command][1]).strip()
    ours = [m for m in flags.FLAGS.flags_by_module_dict() if m.startswith("emgeo_jax")]
    helps = "\n\n".join(flags.FLAGS.module_help(m) for m in ours)
    return f"{doc}\n\nflags:\n{helps}"


def usage() -> str:
    lines = ["usage: emgeo SUBCOMMAND [ARGS] [--flags]   (emgeo SUBCOMMAND --help)", ""]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    """Dispatch `argv[1]` to its subcommand's `main` under absl (see the module docstring)."""
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] not in SUBCOMMANDS:
        print(usage(), file=sys.stderr)
        sys.exit(0 if len(argv) >= 2 and argv[1] in ("-h", "--help") else 2)
    from absl import app

    if os.environ.get("EMGEO_DISTRIBUTED") == "1":  # set by the scripts in launch/
        from emgeo_jax.parallel import initialize_distributed

        initialize_distributed()
    # The judge's HTTP client logs every request at INFO, which drowns the progress lines
    # under absl (its logger is "httpx", or "httpx2" for openai on the httpx2 fork).
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    module = importlib.import_module(SUBCOMMANDS[argv[1]][0])
    if any(a in ("-h", "--help", "--helpshort") for a in argv[2:]):
        print(subcommand_help(argv[1], module))  # absl's --help lists only __main__'s flags
        sys.exit(0)
    main = reporting_user_errors(argv[1], module.main)
    app.run(main, argv=[f"emgeo {argv[1]}", *argv[2:]])


if __name__ == "__main__":
    run()
