"""The `emgeo` command: `emgeo SUBCOMMAND [ARGS] [--flags]`.

One module per subcommand in this package (`SUBCOMMANDS`); only the chosen one is imported,
so `emgeo --help` stays fast. Flags are absl flags spelled with underscores
(`--max_new_tokens=64` or `--max_new_tokens 64`). The flags model-loading commands share
(`--model --dtype --mesh --distributed`, the sampling and steering groups) are defined once,
in `emgeo_jax.cli.common`, with the one way to load a model (`load_model_from_flags`: the mesh
is checked against the config and the devices before anything loads).

Errors: bad input (a missing or malformed file, a flag value the code refuses) ends the command
with one line `emgeo SUBCOMMAND: error: MESSAGE` on stderr and exit status 2; set
`EMGEO_TRACEBACK=1` to see the traceback instead. Any other exception is a bug and shows its
traceback as usual. absl's own flag errors are unchanged; `--help` prints the subcommand's
docstring and flags (`--helpfull` adds every library's flags). An unknown subcommand is named,
with the closest one suggested. Ctrl-C ends a command with "interrupted; run the same command
again to resume" and exit status 130.

Logs: by default one short line per message (time, message), our own progress at INFO and
other libraries' (orbax, jax, transformers) only from WARNING up; `--verbosity=0` (or any
`--verbosity`) shows absl's full format and every library's INFO lines.

Multi-process runs: `--distributed` or `EMGEO_DISTRIBUTED=1` (see `emgeo_jax.cli.common`).

`run(argv)` may be called several times in one process (tests do): each call starts from the
flag defaults, and switching to another subcommand re-imports the command modules so that
flags of the same name in different subcommands never meet.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import os
import sys
import time
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
    "dose-response": ("emgeo_jax.cli.dose_response", "judge-free steering effect on pair margins"),
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


INTERRUPTED_STATUS = 130


def reporting_user_errors(command: str, main: Callable[[list[str]], Any]) -> Callable:
    """`main` that turns bad input (`USER_ERRORS`, and `SystemExit("message")` usage errors)
    into one line `emgeo COMMAND: error: MESSAGE` on stderr and exit status 2. With
    `EMGEO_TRACEBACK=1` exceptions propagate with their traceback. Before `main` runs (the
    flags parsed), logs are set up and a multi-process run is started."""
    prefix = f"emgeo {command}: "

    def fail(message: str, hint: bool) -> None:
        message = one_line(message).removeprefix(prefix)
        print(f"{prefix}error: {message}", file=sys.stderr)
        if hint:
            print(f"(bad input; {TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        sys.exit(2)

    def wrapped(argv: list[str]) -> Any:
        try:
            setup_logging()
            start_distributed()
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


def start_distributed() -> None:
    """The one distributed start: `common.start_distributed` for commands with the shared
    flags, else `EMGEO_DISTRIBUTED=1` alone. Before it, native prints leave standard output
    (`native_prints_to_stderr`)."""
    from absl import flags

    shared = "distributed" in flags.FLAGS
    if shared:
        from emgeo_jax.cli.common import distributed_wanted

        wanted = distributed_wanted()
    else:
        wanted = os.environ.get("EMGEO_DISTRIBUTED") == "1"
    if not wanted:
        return
    native_prints_to_stderr()
    if shared:
        from emgeo_jax.cli.common import start_distributed as start

        start()
    else:
        from emgeo_jax.parallel import initialize_distributed

        initialize_distributed()


_stdout_moved = False


def native_prints_to_stderr() -> None:
    """Send what native code writes to file descriptor 1 to standard error, and keep Python's
    `sys.stdout` (a command's output: tables, JSON, "wrote ...") on the real standard output.

    On CPU, gloo prints "[Gloo] Rank N is connected to M peer ranks ..." on every process at
    its first collective (and again for each new group of devices), straight to descriptor 1:
    a multi-process `emgeo sae-check | jq` would read that line before the JSON, and process
    1, which prints nothing, would print it. Once per process, and only while `sys.stdout` is
    the process's own (a caller that redirected it keeps its redirection)."""
    global _stdout_moved
    if _stdout_moved or sys.stdout is not sys.__stdout__ or sys.stdout is None:
        return
    import io

    old = sys.stdout
    old.flush()
    real = os.dup(1)  # the real standard output, for Python's prints
    os.dup2(2, 1)  # descriptor 1 (native writes) -> standard error
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(
        io.FileIO(real, "w"),
        encoding=old.encoding,
        errors=old.errors,
        line_buffering=old.line_buffering,
    )
    _stdout_moved = True


# --- logs -----------------------------------------------------------------------------------

# Messages libraries print on every run that tell a user nothing (matched as substrings).
NOISE = ("Unable to initialize backend", "PyTorch was not found")


class ShortFormatter(logging.Formatter):
    """`HH:MM:SS message`, with `warning:` / `error:` before messages of those levels."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {text}"


def ours(record: logging.LogRecord) -> bool:
    """A record logged by emgeo_jax (through Python logging or absl.logging)."""
    return record.name.startswith("emgeo_jax") or (
        record.name == "absl" and f"{os.sep}emgeo_jax{os.sep}" in record.pathname
    )


def quiet_filter(record: logging.LogRecord) -> bool:
    """Keep our own INFO lines and everyone's warnings, minus the known noise."""
    if any(n in record.getMessage() for n in NOISE):
        return False
    return record.levelno >= logging.WARNING or ours(record)


def setup_logging() -> None:
    """Quiet, short log lines unless `--verbosity` was given (see the module docstring)."""
    from absl import flags
    from absl import logging as absl_logging

    # The judge's HTTP client logs every request at INFO (logger "httpx", or "httpx2").
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if flags.FLAGS["verbosity"].present:
        return
    absl_logging.set_verbosity(absl_logging.INFO)  # our progress lines; the filter does the rest
    handler = absl_logging.get_absl_handler()
    handler.setFormatter(ShortFormatter())
    if quiet_filter not in handler.filters:
        handler.addFilter(quiet_filter)
    root = logging.getLogger()
    for h in root.handlers:
        if h is not handler and quiet_filter not in h.filters:
            h.addFilter(quiet_filter)


def quiet_environment(argv: list[str]) -> None:
    """Environment defaults set before any library is imported: no transformers advisories
    (`PyTorch was not found`) and no TensorFlow/XLA C++ INFO lines, unless `--verbosity`."""
    if any(a.startswith("--verbosity") or a == "-v" for a in argv):
        return
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


# --- dispatch -------------------------------------------------------------------------------


def subcommand_help(command: str, module: Any) -> str:
    """`emgeo COMMAND --help`: the module's docstring and the flags of every emgeo_jax module
    it imported (only the chosen subcommand's modules are loaded, e.g. `common`)."""
    from absl import flags

    doc = (module.__doc__ or SUBCOMMANDS[command][1]).strip()
    ours_ = [m for m in flags.FLAGS.flags_by_module_dict() if m.startswith("emgeo_jax")]
    helps = "\n\n".join(flags.FLAGS.module_help(m) for m in ours_)
    return f"{doc}\n\nflags:\n{helps}"


def usage() -> str:
    lines = ["usage: emgeo SUBCOMMAND [ARGS] [--flags]   (emgeo SUBCOMMAND --help)", ""]
    lines += [f"  {name:<14} {help_}" for name, (_, help_) in SUBCOMMANDS.items()]
    return "\n".join(lines)


def unknown_command(name: str) -> str:
    """`emgeo: unknown command 'extrct'; did you mean 'extract'?` (the suggestion when one is
    close)."""
    close = difflib.get_close_matches(name, list(SUBCOMMANDS), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"emgeo: unknown command '{name}'{hint}"


_last_command: list[str] = []  # the subcommand the last run() in this process imported


def forget_commands() -> None:
    """Undefine every flag the command modules defined and drop the modules, so the next
    subcommand imports afresh (flags of the same name in two subcommands never meet)."""
    from absl import flags

    for module, defined in list(flags.FLAGS.flags_by_module_dict().items()):
        if module.startswith("emgeo_jax.cli"):
            for flag in list(defined):  # (deleting edits the live list)
                if flag.name in flags.FLAGS:
                    delattr(flags.FLAGS, flag.name)
    package = sys.modules[__name__]
    for name in [m for m in sys.modules if m.startswith(f"{__name__}.")]:
        del sys.modules[name]
        if hasattr(package, name.rsplit(".", 1)[1]):  # else `from emgeo_jax.cli import x` reuses it
            delattr(package, name.rsplit(".", 1)[1])


def run(argv: list[str] | None = None) -> None:
    """Dispatch `argv[1]` to its subcommand's `main` under absl (see the module docstring).
    Ends with `sys.exit` as a command does."""
    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        asked = len(argv) >= 2
        print(usage(), file=sys.stdout if asked else sys.stderr)
        sys.exit(0 if asked else 2)
    command = argv[1]
    if command not in SUBCOMMANDS:
        print(f"{unknown_command(command)}\n\n{usage()}", file=sys.stderr)
        sys.exit(2)
    try:
        dispatch(command, argv[2:])
    except KeyboardInterrupt:
        print(
            f"\nemgeo {command}: interrupted; run the same command again to resume",
            file=sys.stderr,
        )
        sys.exit(INTERRUPTED_STATUS)


def dispatch(command: str, args: list[str]) -> None:
    from absl import app, flags

    quiet_environment(args)
    if _last_command and _last_command[0] != command:
        forget_commands()
    _last_command[:] = [command]
    flags.FLAGS.unparse_flags()  # a second run() in one process starts from the defaults
    module = importlib.import_module(SUBCOMMANDS[command][0])
    if any(a in ("-h", "--help", "--helpshort") for a in args):
        print(subcommand_help(command, module))  # absl's --help lists only __main__'s flags
        sys.exit(0)
    main = reporting_user_errors(command, module.main)
    app.run(main, argv=[f"emgeo {command}", *args])


if __name__ == "__main__":
    run()
