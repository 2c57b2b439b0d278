"""Activation extraction: per-class, per-layer pooled residual-stream means, sharded and
resumable.

Pipeline: tokenized examples -> fixed-shape batches (`emgeo_jax.data.make_batches`) -> one
jitted pooled forward per bucket shape over `lm.mesh` (batch on `data`/`fsdp`, parameters
where loading put them by the `emgeo_jax.parallel` rules, the residual pinned to the batch
split so each layer's weights are all-gathered inside the scan; a batch those axes do not
divide gets empty rows added) -> per-class sums and counts reduced
on device (and across hosts) -> float64 chunk partials on the host -> final reduction in
chunk order.

Layer `l` is the output of decoder block `l` (HF `hidden_states[l + 1]`). The forward uses
`Taps(resid="pooled")`, so `[L, B, T, D]` is never materialised, and runs only the first
`max(layers) + 1` blocks (no LM head).

Pooling (`pool`): the tokens of each example that are averaged:

    answer       the answer tokens (every token after the tokenized prompt)
    question     the prompt tokens (template, system and user turn, generation prompt)
    last_prompt  the last prompt token (the end of the generation prompt)
    all          every real token

Weighting: token-weighted class mean = sum over all pooled tokens of the class / token count
(the reference default); example-weighted = mean over the class's examples of each example's
mean. Both are always computed; `weighting` records which one `emgeo vectors` uses by default.

Output folder (`write_extraction`):

    activations.safetensors  token_sum, example_sum [2, L, D] float64; token_count,
                             example_count [2] float64; mean_token, mean_example [2, L, D]
                             float32; layers [L] int64. Class 0 = aligned, 1 = misaligned.
    per_example.safetensors  (optional) pooled [N, L, D] float32 (each example's mean),
                             tokens [N] int64 (tokens pooled per example, for token-weighted
                             statistics over resampled examples), label [N], example_index
                             [N], sorted by example_index
    meta.json                the metadata, also stored in each file's `__metadata__["emgeo"]`
    chunks/NNNNN.safetensors partial sums of each finished chunk (kept for resume)

Multi-host: load the model onto a mesh spanning every process's devices
(`emgeo_jax.load(..., mesh=make_mesh(...))`); every process calls `extract` with the same
examples; each takes its own batches (`make_batches(process_index=..., process_count=...)`),
the per-step sums are reduced over the global mesh, and process 0 writes the files. Call
`barrier` right after `jax.distributed.initialize` (see its docstring for why).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from emgeo_jax.data.batching import fit_buckets, make_batches, plan_batches
from emgeo_jax.data.tokenize import TokenizedExample
from emgeo_jax.hosts import barrier
from emgeo_jax.models.lm import LM, batch_multiple, forward, pad_rows, place_params
from emgeo_jax.models.scan import RunOptions
from emgeo_jax.models.taps import Taps
from emgeo_jax.parallel import (
    activation_sharding,
    batch_sharding,
    make_mesh,
)
from emgeo_jax.runs import (
    SettingsMismatch,
    mismatch,
    read_safetensors,
    read_settings,
    save_safetensors_atomic,
    write_json_atomic,
)

POOLS = ("answer", "question", "last_prompt", "all")
WEIGHTINGS = ("token", "example")
NUM_CLASSES = 2
SUM_FIELDS = ("token_sum", "token_count", "example_sum", "example_count")
ROW_FIELDS = ("pooled", "tokens", "label", "example_index")
ACTIVATIONS_FILE, PER_EXAMPLE_FILE, META_FILE = (
    "activations.safetensors",
    "per_example.safetensors",
    "meta.json",
)
RUN_FILE = "run.json"  # in the chunk folder: the run_hash and identity of the chunks' run


@dataclasses.dataclass(frozen=True)
class ExtractSettings:
    """What to extract and how to batch it.

    Attributes:
      pool: one of `POOLS`.
      layers: block outputs to keep (default: all); the forward stops after `max(layers)`.
      weighting: the default weighting recorded for `emgeo vectors` ("token" or "example").
      per_example: also keep each example's pooled activations `[N, L, D]`.
      batch_size: rows per batch per process (on a mesh whose `data x fsdp` rows do not
        divide it, each batch gets empty rows added; a multiple avoids that work).
      chunk_batches: batches (steps) per resumable chunk.
      buckets: allowed padded sequence lengths; default: the `max_buckets` lengths that pad
        these examples least (`emgeo_jax.data.fit_buckets`), one compilation each.
      max_buckets: the most bucket lengths fitted when `buckets` is not given.
    """

    pool: str = "answer"
    layers: tuple[int, ...] | None = None
    weighting: str = "token"
    per_example: bool = False
    batch_size: int = 8
    chunk_batches: int = 8
    buckets: tuple[int, ...] | None = None
    max_buckets: int = 8

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pool={self.pool!r}: use one of {POOLS}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={self.weighting!r}: use one of {WEIGHTINGS}")
        if self.batch_size < 1 or self.chunk_batches < 1:
            raise ValueError("batch_size and chunk_batches must be >= 1")


@dataclasses.dataclass
class Extraction:
    """The reduced result. Class 0 = aligned, 1 = misaligned; `L = len(layers)`.

    `token_sum [2, L, D]` float64 sums over pooled tokens, `token_count [2]` pooled tokens;
    `example_sum [2, L, D]` sums of per-example means, `example_count [2]` examples.
    `pooled [N, L, D]` float32, `tokens [N]` (tokens pooled per example), `label [N]`,
    `example_index [N]` when asked for (`tokens` is None in files written before it existed)."""

    layers: tuple[int, ...]
    token_sum: np.ndarray
    token_count: np.ndarray
    example_sum: np.ndarray
    example_count: np.ndarray
    pooled: np.ndarray | None = None
    tokens: np.ndarray | None = None
    label: np.ndarray | None = None
    example_index: np.ndarray | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

    def means(self, weighting: str = "token") -> np.ndarray:
        """Per-class per-layer means `[2, L, D]` (float64) with the given weighting."""
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting={weighting!r}: use one of {WEIGHTINGS}")
        total, count = (
            (self.token_sum, self.token_count)
            if weighting == "token"
            else (self.example_sum, self.example_count)
        )
        return total / count[:, None, None]

    def counts(self, weighting: str = "token") -> np.ndarray:
        return self.token_count if weighting == "token" else self.example_count


# An output folder holds chunks of a run with different settings or data: the package's one
# settings error (the old name stays for callers that catch it).
ResumeError = SettingsMismatch


# --- pooling masks and the jitted step --------------------------------------------------


def pool_mask(batch: dict[str, np.ndarray], pool: str) -> np.ndarray:
    """`[B, T]` bool: the tokens pooled for each row; empty rows (`example_index == -1`) get
    none, so padding never contributes."""
    if pool == "answer":
        mask = batch["answer_mask"]
    elif pool == "question":
        mask = batch["question_mask"]
    elif pool == "all":
        mask = batch["attention_mask"].astype(bool)
    elif pool == "last_prompt":
        cols = np.arange(batch["input_ids"].shape[1])
        mask = cols[None, :] == batch["last_prompt_index"][:, None]
    else:
        raise ValueError(f"pool={pool!r}: use one of {POOLS}")
    return mask & (batch["example_index"] >= 0)[:, None]


def _pooled_step(
    graphdef: nnx.GraphDef,
    layers: tuple[int, ...],
    per_example: bool,
    mesh: Mesh | None,
    attention: str,
    params: nnx.State,
    inputs: dict[str, jax.Array],
) -> dict[str, jax.Array]:
    """One batch: per-class sums on device. `inputs`: `input_ids, positions, attention_mask,
    pool_mask [B, T]`, `label, example_index [B]`. Returns `token_sum, example_sum [2, L, D]`,
    `token_count, example_count [2]` and, with `per_example`, `pooled [B, L, D]` (each row's
    mean), `tokens` (pooled tokens), `label`, `example_index [B]`. With a `mesh`, the
    residual `[B, T, D]` is pinned to `parallel.ACTIVATION_AXES["hidden"]` (rows over
    `data x fsdp`, `D` whole): left free, the compiler splits it along `D` like the weights
    and runs every row on every device."""
    resid_sharding = None
    if mesh is not None:
        width = jax.tree.leaves(params["embed"])[0].shape[-1]  # embedding [V, D]
        shape = (*inputs["input_ids"].shape, width)
        resid_sharding = activation_sharding(mesh, "hidden", shape)
    out = forward(
        graphdef,
        params,
        inputs["input_ids"],
        inputs["positions"],
        inputs["attention_mask"],
        taps=Taps(resid="pooled", pool_mask=inputs["pool_mask"]),
        num_layers=max(layers) + 1,
        return_logits=False,
        options=RunOptions(
            resid_sharding=resid_sharding,
            attention=attention,
            mesh=mesh if attention == "splash" else None,
        ),
    )
    sums = out.resid_post[jnp.asarray(layers)]  # [L, B, D] float32
    counts = out.counts  # [B]
    onehot = (inputs["label"][:, None] == jnp.arange(NUM_CLASSES)[None, :]) & (counts > 0)[:, None]
    onehot = onehot.astype(jnp.float32)  # [B, 2]
    row_means = sums / jnp.maximum(counts, 1.0)[None, :, None]
    result = {
        "token_sum": jnp.einsum("lbd,bc->cld", sums, onehot),
        "token_count": onehot.T @ counts,
        "example_sum": jnp.einsum("lbd,bc->cld", row_means, onehot),
        "example_count": jnp.sum(onehot, axis=0),
    }
    if per_example:
        result.update(
            pooled=jnp.transpose(row_means, (1, 0, 2)),
            tokens=counts,
            label=inputs["label"],
            example_index=inputs["example_index"],
        )
    return result


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded array, in global row order."""
    shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


@functools.lru_cache(maxsize=16)
def _jitted_step(
    graphdef: nnx.GraphDef,
    layers: tuple[int, ...],
    per_example: bool,
    mesh: Mesh,
    attention: str = "xla",
) -> Callable:
    """`_pooled_step` jitted for `mesh` (cached, so repeated extractions reuse compilations);
    the residual is pinned when the mesh has more than one device. `attention`: the
    implementation (`RunOptions.attention`; `LM.attention`)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    out_shardings = dict.fromkeys(SUM_FIELDS, replicated)
    if per_example:
        out_shardings["pooled"] = batch_sharding(mesh, 3)
        for k in ("tokens", "label", "example_index"):
            out_shardings[k] = batch_sharding(mesh, 1)
    pinned = mesh if mesh.size > 1 else None
    step = functools.partial(_pooled_step, graphdef, layers, per_example, pinned, attention)
    return jax.jit(step, out_shardings=out_shardings)


def extraction_mesh(lm: LM) -> Mesh:
    """The mesh extraction runs on: `lm.mesh`, else the one device holding the params (a
    run over several processes needs `lm.mesh`: load the model onto a mesh spanning them)."""
    if lm.mesh is not None:
        return lm.mesh
    if jax.process_count() > 1:
        raise ValueError(
            "extract on several processes: load the model onto a mesh spanning every "
            "process's devices (emgeo_jax.load(..., mesh=make_mesh(...)))"
        )
    leaf = jax.tree.leaves(lm.params)[0]
    devices = list(leaf.devices()) if isinstance(leaf, jax.Array) else jax.devices()
    return make_mesh(devices=devices[:1])


class _Runner:
    """The jitted step on `lm`'s mesh; `run(batch)` dispatches one batch asynchronously."""

    def __init__(self, lm: LM, settings: ExtractSettings, layers: tuple[int, ...]):
        mesh = extraction_mesh(lm)
        pc = jax.process_count()
        row_split = batch_multiple(mesh)
        if row_split % pc:
            raise ValueError(
                f"the mesh {dict(mesh.shape)} splits batch rows {row_split} ways (data x fsdp), "
                f"which is not a multiple of the {pc} processes each feeding its own rows"
            )
        self.local_multiple = row_split // pc
        self.mesh, self.pool = mesh, settings.pool
        self.params = place_params(lm.params, mesh)
        self.step = _jitted_step(lm.graphdef, layers, settings.per_example, mesh, lm.attention)

    def run(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Dispatch one batch (this process's rows); rows the mesh's row split needs are
        added as empty rows (`example_index` -1: nothing pooled, dropped from the rows)."""
        b = len(batch["example_index"])
        batch = pad_rows(batch, self.local_multiple)
        batch["example_index"] = batch["example_index"].copy()
        batch["example_index"][b:] = -1
        batch["label"] = batch["label"].copy()
        batch["label"][b:] = -1
        local = {
            "input_ids": batch["input_ids"],
            "positions": batch["positions"],
            "attention_mask": batch["attention_mask"],
            "pool_mask": pool_mask(batch, self.pool),
            "label": batch["label"],
            "example_index": batch["example_index"],
        }
        inputs = {
            k: jax.make_array_from_process_local_data(batch_sharding(self.mesh, v.ndim), v)
            for k, v in local.items()
        }
        return self.step(self.params, inputs)


def _fetch(out: dict[str, jax.Array]) -> dict[str, np.ndarray]:
    """Step outputs on the host: sums as float64 (replicated), rows of this process."""
    host = {k: np.asarray(out[k].addressable_data(0), np.float64) for k in SUM_FIELDS}
    host.update({k: _local_rows(out[k]) for k in ROW_FIELDS if k in out})
    return host


# --- chunks, resume, reduction ------------------------------------------------------------


def _gather_rows(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-example rows of all processes (concatenated), empty rows dropped."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        rows = {
            k: np.asarray(multihost_utils.process_allgather(v, tiled=True)) for k, v in rows.items()
        }
    keep = rows["example_index"] >= 0
    return {k: v[keep] for k, v in rows.items()}


def run_hash(
    tokenized: Sequence[TokenizedExample], settings: ExtractSettings, identity: dict[str, Any]
) -> str:
    """sha256 guarding resume: the token ids, labels and masks of every example, the settings
    that change chunk contents, the process count (it changes the batch plan) and `identity`
    (model source, dtype, ...)."""
    h = hashlib.sha256()
    for ex in tokenized:
        h.update(np.asarray(ex.input_ids, np.int32).tobytes())
        label = -1 if ex.label is None else ex.label
        h.update(np.asarray([ex.prompt_length, ex.answer_end, ex.example_index, label]).tobytes())
    fields = dataclasses.asdict(settings)
    fields.pop("weighting")  # only a default for later use; never changes what is summed
    fields.update(process_count=jax.process_count(), identity=identity, rows=ROW_FIELDS)
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _finished_chunks(chunk_dir: Path, settings: dict[str, Any], num_chunks: int) -> int:
    """How many leading chunks are already on disk (process 0 decides, all processes agree;
    when process 0 refuses to resume, every process raises instead of waiting for it).
    `settings`: `run_hash` and the identity, as recorded in `chunk_dir/run.json`; chunks of
    another `run_hash` are refused with a `SettingsMismatch` naming the settings that differ."""
    done, error = 0, None
    if jax.process_index() == 0 and chunk_dir.is_dir():
        recorded = read_settings(chunk_dir / RUN_FILE)
        if recorded is not None and recorded.get("run_hash") != settings["run_hash"]:
            error = mismatch(
                chunk_dir,
                recorded,
                settings,
                what="chunks of another run",
                hint="the data, model or settings changed. Use a new --out or delete the folder.",
            )
        while done < num_chunks and (chunk_dir / f"{done:05d}.safetensors").exists():
            done += 1
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        barrier("emgeo_extract_resume")  # broadcast's own collective may be a first contact
        done = int(multihost_utils.broadcast_one_to_all(np.int32(-1 if error else done)))
    if error is not None:
        raise error
    if done < 0:
        raise SettingsMismatch(f"{chunk_dir}: process 0 refused to resume (see its log)")
    return done


def _steps(
    batches: Iterator[dict[str, np.ndarray]], runner: _Runner
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """(batch, fetched outputs) per step, dispatching the next step before fetching one."""
    pending = None
    for batch in batches:
        out = runner.run(batch)
        if pending is not None:
            yield pending[0], _fetch(pending[1])
        pending = (batch, out)
    if pending is not None:
        yield pending[0], _fetch(pending[1])


def _reduce(chunks: Sequence[dict[str, np.ndarray]], per_example: bool) -> dict[str, np.ndarray]:
    """Sum chunk partials in chunk order; concatenate rows and sort them by example index."""
    total = {k: chunks[0][k].copy() for k in SUM_FIELDS}
    for chunk in chunks[1:]:
        for k in SUM_FIELDS:
            total[k] = total[k] + chunk[k]
    if per_example:
        rows = {k: np.concatenate([c[k] for c in chunks]) for k in ROW_FIELDS}
        order = np.argsort(rows["example_index"], kind="stable")
        total.update({k: v[order] for k, v in rows.items()})
    return total


def extract(
    lm: LM,
    tokenized: Sequence[TokenizedExample],
    settings: ExtractSettings = ExtractSettings(),
    out_dir: str | Path | None = None,
    *,
    metadata: dict[str, Any] | None = None,
    pad_id: int | None = None,
    on_chunk: Callable[[int], None] | None = None,
    progress: bool = False,
) -> Extraction | None:
    """Pool `lm`'s residual stream over `tokenized` examples (labels 0/1, both present).

    Args:
      lm: the model: on one device, or loaded onto `lm.mesh` (the mesh extraction uses;
        its `data x fsdp` axes split the batch rows).
      tokenized: from `tokenize_examples`; every process passes the same list.
      settings: pooling, layers, batching (see `ExtractSettings`).
      out_dir: if given, chunks go to `out_dir/chunks/` and finished chunks of an earlier run
        with the same `run_hash` are reused (resume); the final files are written by
        `write_extraction`. Without it, nothing is written.
      metadata: identity of the run (model, data file and hash, dtype, ...): stored in the
        outputs and part of the resume guard.
      pad_id: token id on padding (default: the tokenizer's pad, else EOS, else 0).
      on_chunk: called with each chunk number after it is saved (progress, tests).
      progress: show a tqdm bar with tokens/s on process 0.

    Returns the `Extraction` on process 0 and None on the other processes (every process
    takes part in the computation; process 0 holds the reduced result and writes the files).
    """
    labels = {ex.label for ex in tokenized}
    if not labels <= {0, 1} or len(labels) < 2:
        bad = next((ex for ex in tokenized if ex.label not in (0, 1)), None)
        where = f"; e.g. {bad.source} is unlabelled" if bad else ""
        raise ValueError(f"extraction needs aligned (0) and misaligned (1) examples{where}")
    cfg = lm.config
    layers = tuple(range(cfg.num_layers)) if settings.layers is None else tuple(settings.layers)
    if not layers or any(not 0 <= layer < cfg.num_layers for layer in layers):
        raise ValueError(
            f"layers {list(layers)}: each must be in 0..{cfg.num_layers - 1} "
            "(layer l = output of block l = HF hidden_states[l+1])"
        )
    if pad_id is None:
        tok = lm.tokenizer
        pad_id = next(
            (
                i
                for i in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
                if i is not None
            ),
            0,
        )
    identity = dict(metadata or {})
    digest = run_hash(tokenized, settings, identity)
    pc, pi = jax.process_count(), jax.process_index()
    lengths = [ex.length for ex in tokenized]
    buckets = settings.buckets or fit_buckets(
        lengths, settings.batch_size, settings.max_buckets, process_count=pc
    )
    plan = plan_batches(lengths, settings.batch_size, buckets, pc)
    num_steps = len(plan) // pc
    num_chunks = -(-num_steps // settings.chunk_batches)

    chunk_dir = None if out_dir is None else Path(out_dir) / "chunks"
    recorded = {"run_hash": digest, **identity}
    done = 0 if chunk_dir is None else _finished_chunks(chunk_dir, recorded, num_chunks)
    chunks = []
    if chunk_dir is not None and pi == 0:
        write_json_atomic(chunk_dir / RUN_FILE, recorded, indent=None)
        chunks = [read_safetensors(chunk_dir / f"{c:05d}.safetensors")[0] for c in range(done)]

    runner = _Runner(lm, settings, layers)
    barrier("emgeo_extract_start")
    batches = make_batches(
        tokenized,
        settings.batch_size,
        pad_id,
        buckets,
        process_index=pi,
        process_count=pc,
    )
    skip = done * settings.chunk_batches
    bar = None
    if progress and pi == 0:
        from tqdm import tqdm

        mine = [ps for j, (_, ps) in enumerate(plan) if j % pc == pi]
        bar = tqdm(
            total=sum(lengths[p] for ps in mine for p in ps),
            initial=sum(lengths[p] for ps in mine[:skip] for p in ps),
            unit="tok",
            unit_scale=True,
            desc=f"extract ({done} of {num_chunks} chunks done before)",
        )
    todo = (b for j, b in enumerate(batches) if j >= skip)
    acc: dict[str, Any] = {}
    rows: dict[str, list[np.ndarray]] = {k: [] for k in ROW_FIELDS}
    for step, (batch, host) in enumerate(_steps(todo, runner), start=skip):
        for k in SUM_FIELDS:
            acc[k] = acc[k] + host[k] if k in acc else host[k]
        for k in ROW_FIELDS if settings.per_example else ():
            rows[k].append(host[k])
        if bar is not None:
            bar.update(int(batch["attention_mask"].sum()))
        if (step + 1) % settings.chunk_batches == 0 or step + 1 == num_steps:
            chunk = dict(acc)
            if settings.per_example:
                chunk.update(_gather_rows({k: np.concatenate(v) for k, v in rows.items()}))
            c = step // settings.chunk_batches
            if chunk_dir is not None and pi == 0:
                save_safetensors_atomic(
                    chunk_dir / f"{c:05d}.safetensors", chunk, {"run_hash": digest}
                )
            chunks.append(chunk)
            acc, rows = {}, {k: [] for k in ROW_FIELDS}
            if on_chunk is not None:
                on_chunk(c)
    if bar is not None:
        bar.close()
    if pi != 0:
        return None
    total = _reduce(chunks, settings.per_example)
    meta = {
        **identity,
        "layers": list(layers),
        "pooling": settings.pool,
        "weighting": settings.weighting,
        "token_count": total["token_count"].tolist(),
        "example_count": total["example_count"].tolist(),
        "classes": {"0": "aligned", "1": "misaligned"},
        "dtype": str(lm.dtype),
        "batch_size": settings.batch_size,
        "buckets": list(buckets),
        "process_count": pc,
        "device_count": jax.device_count(),
        "mesh": {name: int(size) for name, size in runner.mesh.shape.items()},
        "run_hash": digest,
    }
    return Extraction(layers=layers, metadata=meta, **total)


# --- files ---------------------------------------------------------------------------------


def write_extraction(result: Extraction, out_dir: str | Path) -> None:
    """Write the final files (see module docstring), each atomically; on process 0 only."""
    if jax.process_index() != 0:
        return
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = result.metadata
    tensors = {k: getattr(result, k) for k in SUM_FIELDS}
    tensors["mean_token"] = result.means("token").astype(np.float32)
    tensors["mean_example"] = result.means("example").astype(np.float32)
    tensors["layers"] = np.asarray(result.layers, np.int64)
    if result.pooled is not None:
        save_safetensors_atomic(
            out / PER_EXAMPLE_FILE,
            {
                "pooled": result.pooled.astype(np.float32),
                "tokens": result.tokens.astype(np.int64),
                "label": result.label.astype(np.int64),
                "example_index": result.example_index.astype(np.int64),
            },
            meta,
        )
    save_safetensors_atomic(out / ACTIVATIONS_FILE, tensors, meta)
    write_json_atomic(out / META_FILE, meta, indent=2)


def read_extraction(path: str | Path) -> Extraction:
    """Read `DIR` (or `DIR/activations.safetensors`) written by `write_extraction`, with the
    per-example rows when present."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    file = folder / ACTIVATIONS_FILE if path.is_dir() else path
    tensors, meta = read_safetensors(file)
    missing = [k for k in (*SUM_FIELDS, "layers") if k not in tensors]
    if missing:
        raise ValueError(f"{file}: missing tensors {missing}; not an `emgeo extract` output")
    rows = {}
    if (folder / PER_EXAMPLE_FILE).exists():
        rows, _ = read_safetensors(folder / PER_EXAMPLE_FILE)
    return Extraction(
        layers=tuple(int(x) for x in tensors["layers"]),
        metadata={**meta, "path": str(file)},
        **{k: tensors[k] for k in SUM_FIELDS},
        **{k: rows.get(k) for k in ROW_FIELDS},
    )
