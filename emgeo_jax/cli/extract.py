"""`emgeo extract --model SOURCE --data FILE --out DIR [--pool answer] [--layers 0,5,10]
[--per_example] [--weighting token] [--batch_size 8] [--chunk_batches 8]`.

Writes `DIR/activations.safetensors` (per-class sums, counts and means `[2, L, D]`),
`DIR/per_example.safetensors` (with `--per_example`: `pooled [N, L, D]`, `label`,
`example_index`) and `DIR/meta.json`. An interrupted run resumes from its last finished chunk
in `DIR/chunks/` and gives the same result. Multi-host: pass `--distributed` (TPU VMs find
their peers) or `--coordinator_address HOST:PORT --num_processes N --process_id I`; every
process runs the same command and reads its own share of the batches.
"""

from __future__ import annotations

from absl import flags

_MODEL = flags.DEFINE_string("model", "default", "model source: default, HF folder, .gguf, ckpt")
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
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "parameter dtype")
_FSDP = flags.DEFINE_integer("fsdp", 1, "mesh size of the fsdp axis (parameters sharded)")
_TENSOR = flags.DEFINE_integer("tensor", 1, "mesh size of the tensor axis")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "jax.distributed.initialize() (auto)")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


def _initialize_distributed() -> None:
    import jax

    if _COORDINATOR.value is not None:
        # CPU processes need gloo for cross-process collectives; other platforms ignore it.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
    elif _DISTRIBUTED.value:
        jax.distributed.initialize()
    else:
        return
    from emgeo_jax.extract import barrier

    barrier("emgeo_extract_initialized")  # the first collective, before the model loads


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise SystemExit(f"emgeo extract takes no positional arguments, got {argv[1:]}")
    if _DATA.value is None or _OUT.value is None:
        raise SystemExit("usage: emgeo extract --model SOURCE --data FILE --out DIR")
    _initialize_distributed()
    import emgeo_jax
    from emgeo_jax.data import load_examples, tokenize_examples
    from emgeo_jax.data.files import file_sha256
    from emgeo_jax.extract import ExtractSettings, extract, write_extraction
    from emgeo_jax.parallel import make_mesh

    examples, report = load_examples(_DATA.value, on_error=_ON_ERROR.value)
    mesh = make_mesh({"fsdp": _FSDP.value, "tensor": _TENSOR.value})
    lm = emgeo_jax.load(_MODEL.value, dtype=_DTYPE.value, mesh=mesh)
    if lm.tokenizer is None:
        raise SystemExit(f"{_MODEL.value}: no tokenizer found next to the model")
    tokenized, tok_report = tokenize_examples(
        examples, lm.tokenizer, _MAX_LENGTH.value, on_error=_ON_ERROR.value
    )
    settings = ExtractSettings(
        pool=_POOL.value,
        layers=None if _LAYERS.value is None else tuple(int(x) for x in _LAYERS.value),
        weighting=_WEIGHTING.value,
        per_example=_PER_EXAMPLE.value,
        batch_size=_BATCH_SIZE.value,
        chunk_batches=_CHUNK_BATCHES.value,
    )
    identity = {
        "model": _MODEL.value,
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
