"""`emgeo extract --model SOURCE --data FILE --out DIR [--pool answer] [--layers 0,5,10]
[--per_example] [--weighting token] [--batch_size 8] [--chunk_batches 8]`.

Writes `DIR/activations.safetensors` (per-class sums, counts and means `[2, L, D]`),
`DIR/per_example.safetensors` (with `--per_example`: `pooled [N, L, D]`, `label`,
`example_index`) and `DIR/meta.json`. An interrupted run resumes from its last finished chunk
in `DIR/chunks/` and gives the same result. `--mesh fsdp=4,tensor=2` splits the parameters
over devices (the batch goes over data x fsdp; the old `--fsdp N --tensor N` still work, with
a warning); without `--mesh` it runs on one device (CPU) or on `auto` (accelerators).
Multi-host: pass `--distributed` (TPU VMs find their peers) or `--coordinator_address HOST:PORT
--num_processes N --process_id I`; every process runs the same command and reads its own share
of the batches.
"""

from __future__ import annotations

from absl import flags

from emgeo_jax.cli import common

FLAGS = flags.FLAGS
_DATA = flags.DEFINE_string("data", None, "dataset file (contrast pairs or judged responses)")
_OUT = flags.DEFINE_string("out", None, "output folder")
_POOL = flags.DEFINE_enum("pool", "answer", ["answer", "question", "last_prompt", "all"], "tokens")
_LAYERS = flags.DEFINE_list("layers", None, "layers to keep (default all); l = output of block l")
_WEIGHTING = flags.DEFINE_enum("weighting", "token", ["token", "example"], "default for vectors")
_PER_EXAMPLE = flags.DEFINE_bool("per_example", False, "also write per-example pooled rows")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "rows per batch per process")
_CHUNK_BATCHES = flags.DEFINE_integer("chunk_batches", 8, "batches per resumable chunk")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 1024, "longest sequence in tokens")
_ON_ERROR = flags.DEFINE_enum("on_error", "raise", ["raise", "skip"], "bad rows: stop or skip")
flags.DEFINE_integer("fsdp", None, "deprecated: use --mesh fsdp=N")
flags.DEFINE_integer("tensor", None, "deprecated: use --mesh tensor=N")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"emgeo extract takes no positional arguments, got {argv[1:]}")
    if _DATA.value is None or _OUT.value is None:
        raise SystemExit("usage: emgeo extract --model SOURCE --data FILE --out DIR")
    from emgeo_jax.cli.parsing import number_list
    from emgeo_jax.data import load_examples, tokenize_examples
    from emgeo_jax.data.files import file_sha256
    from emgeo_jax.extract import ExtractSettings, extract, write_extraction

    layers = None if _LAYERS.value is None else tuple(number_list(_LAYERS.value, "layers"))
    examples, report = load_examples(_DATA.value, on_error=_ON_ERROR.value)
    cfg = common.read_config(FLAGS.model)
    common.check_layers(cfg, layers, "layers")
    lm = common.load_model_from_flags(config=cfg)
    if lm.tokenizer is None:
        raise SystemExit(f"{FLAGS.model}: no tokenizer found next to the model")
    tokenized, tok_report = tokenize_examples(
        examples, lm.tokenizer, _MAX_LENGTH.value, on_error=_ON_ERROR.value
    )
    settings = ExtractSettings(
        pool=_POOL.value,
        layers=layers,
        weighting=_WEIGHTING.value,
        per_example=_PER_EXAMPLE.value,
        batch_size=_BATCH_SIZE.value,
        chunk_batches=_CHUNK_BATCHES.value,
    )
    identity = {
        "model": FLAGS.model,
        "data": str(_DATA.value),
        "data_sha256": file_sha256(_DATA.value),
        "max_length": _MAX_LENGTH.value,
        "skipped_rows": len(report.skipped) + len(tok_report.skipped),
    }
    result = extract(lm, tokenized, settings, _OUT.value, metadata=identity, progress=True)
    if result is None:  # processes other than 0 hold no result
        return
    write_extraction(result, _OUT.value)
    counts = ", ".join(
        f"{name} {int(n)} examples / {int(t)} tokens"
        for name, n, t in zip(
            ("aligned", "misaligned"), result.example_count, result.token_count, strict=True
        )
    )
    print(f"{_OUT.value}: layers {list(result.layers)}, pool {settings.pool}; {counts}")
