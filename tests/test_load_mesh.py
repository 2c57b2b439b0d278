"""Loading straight onto a mesh: every host-to-device transfer recorded, on 8 simulated devices.

For each source kind (an HF safetensors folder, a GGUF file written from the same tensors,
an orbax checkpoint) and each mesh (`fsdp=8`, `data=2,fsdp=4`, `tensor=2`), a fresh process
with `JAX_NUM_CPU_DEVICES=8` wraps JAX's one host-to-device transfer function
(`pxla.batched_device_put`, which `jax.device_put`, `jnp.asarray`, jit arguments,
`make_array_from_callback` and orbax's per-device restores all end in) and the public entry
points, loads the model, and checks:

- no transfer ever puts a whole parameter the mesh splits (or a whole layer of it) on one
  device, nor replicates it: every piece sent is at most the device's shard;
- the final shardings of `lm.params` are the documented rules, written out by hand below
  (kernels: `embed` side over `fsdp`, heads / MLP / vocab side over `tensor`; norm scales
  over `fsdp`; the layer axis and `data` never split), each device holds exactly its share
  of the bytes, the values equal a one-device load, and `lm.mesh` is the mesh;
- the recorder catches the two wrong patterns (a default-device `device_put` then a
  reshard, `jnp.asarray` before placement), so the checks above can fail.

Run by hand: `JAX_NUM_CPU_DEVICES=8 python -m tests.test_load_mesh SPEC.json`.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.cli_util import cpu_env, optimised_env
from tests.tiny_models import LLAMA, hf_model, save_hf_folder

ROOT = Path(__file__).resolve().parents[1]

# Widths chosen so that no sharded parameter's whole shape (or whole layer) equals any
# piece a correct load sends on any of the meshes (`forbidden_and_allowed` checks it):
# D = q = 48 (6 heads of 8), k/v 8 (1 KV head), F 40, V 160.
SPEC = dict(
    LLAMA,
    hidden_size=48,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=1,
    head_dim=8,
    vocab_size=160,
    rope_scaling=None,  # GGUF files with rope scaling are refused
)
MESHES = {"fsdp=8": {"fsdp": 8}, "data=2,fsdp=4": {"data": 2, "fsdp": 4}, "tensor=2": {"tensor": 2}}

# The partition rules by hand: mesh axis of each dimension (the layer axis is never split).
HAND_RULES = {
    ("embed", "embedding"): ("tensor", "fsdp"),  # [V, D]
    ("lm_head", "kernel"): ("fsdp", "tensor"),  # [D, V]
    ("final_norm", "scale"): ("fsdp",),
    ("layers", "input_norm", "scale"): (None, "fsdp"),
    ("layers", "post_attn_norm", "scale"): (None, "fsdp"),
    **{
        ("layers", "attn", p, "kernel"): (None, "fsdp", "tensor")
        for p in ("q_proj", "k_proj", "v_proj")
    },
    ("layers", "attn", "o_proj", "kernel"): (None, "tensor", "fsdp"),
    ("layers", "mlp", "gate_proj", "kernel"): (None, "fsdp", "tensor"),
    ("layers", "mlp", "up_proj", "kernel"): (None, "fsdp", "tensor"),
    ("layers", "mlp", "down_proj", "kernel"): (None, "tensor", "fsdp"),
}


def write_gguf_from_hf(folder: Path, path: Path) -> Path:
    """A F32 GGUF holding exactly the tensors of the HF folder saved from `SPEC` (q/k rows
    permuted the way llama.cpp's converter does, which our reader undoes)."""
    import gguf
    from safetensors.numpy import load_file

    cfg = SPEC
    tensors = load_file(str(folder / "model.safetensors"))
    h, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    def permute(w: np.ndarray, n: int) -> np.ndarray:  # llama.cpp convert_hf_to_gguf.permute
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(h)
    w.add_head_count_kv(k)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")  # letters, one merge ("aa")
    w.add_token_list([chr(ord("a") + i % 26) * (1 + i // 26) for i in range(cfg["vocab_size"])])
    w.add_token_merges(["a a"])
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    block = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, t in sorted(tensors.items()):
        t = np.asarray(t, np.float32)
        if name in names:
            w.add_tensor(names[name], t)
            continue
        _, _, layer, rest = name.split(".", 3)
        module = rest.removesuffix(".weight")
        if module == "self_attn.q_proj":
            t = permute(t, h)
        elif module == "self_attn.k_proj":
            t = permute(t, k)
        w.add_tensor(f"blk.{layer}.{block[module]}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    import emgeo_jax
    from emgeo_jax.convert.checkpoint import save_checkpoint

    tmp = tmp_path_factory.mktemp("load_mesh")
    folder = save_hf_folder(hf_model(SPEC, seed=11), tmp / "hf")
    save_checkpoint(emgeo_jax.load(folder), tmp / "ckpt")
    return {
        "hf": str(folder),
        "gguf": str(write_gguf_from_hf(folder, tmp / "model.gguf")),
        "orbax": str(tmp / "ckpt"),
    }


@pytest.fixture(scope="module")
def results(sources, tmp_path_factory) -> dict:
    spec = tmp_path_factory.mktemp("spec") / "spec.json"
    spec.write_text(json.dumps(sources))
    env = cpu_env(8)
    res = subprocess.run(
        [sys.executable, "-m", "tests.test_load_mesh", str(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_the_recorder_catches_whole_parameters_on_one_device(results):
    assert results["controls"] == {"device_put then reshard": True, "jnp.asarray": True}


@pytest.mark.parametrize("mesh", MESHES)
@pytest.mark.parametrize("kind", ["hf", "gguf", "orbax"])
def test_parameters_go_straight_to_their_shards(results, kind, mesh):
    r = results[f"{kind} {mesh}"]
    assert r["violations"] == [], r["violations"][:5]
    # the recorder saw this load's transfers: every split parameter's shard pieces went by
    assert r["unseen"] == [], r["unseen"]
    assert r["wrong_shardings"] == [], r["wrong_shardings"]
    assert r["wrong_bytes"] == [], r["wrong_bytes"]
    assert r["values_equal"] and r["lm_mesh_is_the_mesh"]
    # every parameter is split, but the three norm scales on tensor=2 (no fsdp axis)
    assert r["split_params"] == len(HAND_RULES) - 3 * (mesh == "tensor=2")


def test_qwen_7b_width_load_stays_within_its_memory_bounds(tmp_path, monkeypatch):
    """2 layers of Qwen2.5-7B widths (d=3584, F=18944, 28/4 heads; vocab cut to 16384 to keep
    the files small), bf16, onto fsdp=8: each device holds exactly its eighth of every
    split parameter plus the replicated q/k/v biases (hand count), and the host's peak RSS
    beyond the device buffers (which simulated devices keep in host memory) stays below
    `1.5 x the largest tensor + 0.75 GB` = 0.95 GB, below the 1.17 GB model (measured 0.36 GB
    when written; 0.50-0.72 GB over 10 loads on 2026-12-07, so the earlier 0.5 GB of slack
    failed one suite run in three): the host never holds the model besides its devices'
    buffers."""
    from benchmarks.convert_memory import hf_config, write_synthetic
    from benchmarks.load_memory import host_bound, largest_tensor_bytes, measure_load

    cfg = hf_config("qwen2.5-7b", 2, vocab_size=16384)
    size = write_synthetic(tmp_path / "hf", cfg, "bfloat16")
    # the loading child compiles as users' processes do: at the suite's LLVM level 0 its
    # overhead is 0.64-0.65 GB instead of 0.57 (measured), too near the bound to say anything
    monkeypatch.setenv("XLA_FLAGS", optimised_env()["XLA_FLAGS"])
    r = measure_load(tmp_path / "hf", {"fsdp": 8}, "bfloat16")
    d, f, v = 3584, 18944, 16384
    biases = 2 * (d + 2 * 512) * 2  # q, k, v biases of 2 layers: split over tensor only
    matrices = 2 * (2 * d * d + 2 * d * 512 + 3 * d * f) + 2 * v * d
    norms = (2 * 2 + 1) * d
    assert r["params"] == size == (matrices + norms) * 2 + biases
    assert r["replicated"] == biases
    for device, held in r["per_device"].items():
        assert held <= 1.1 * (r["params"] - biases) / 8 + biases, (device, held)
        assert held == (matrices + norms) * 2 // 8 + biases, (device, held)
    overhead = r["peak_rss"] - r["base_rss"] - r["params"]
    assert largest_tensor_bytes(cfg, 2) == f * d * 2
    assert overhead < host_bound(cfg, 2) < 0.85 * size, (overhead, r)


def test_two_processes_load_their_own_shards(sources, tmp_path):
    """2 processes x 2 CPU devices (gloo), one `fsdp=4` mesh over both: each process loads
    the HF folder, the GGUF and the orbax checkpoint, places only its own devices' shards,
    and every shard it holds equals that slice of a one-device load."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(sources))
    procs = []
    for i in range(2):
        env = cpu_env(2, EMGEO_COORDINATOR=f"127.0.0.1:{port}", EMGEO_NUM_PROCESSES="2")
        env["EMGEO_PROCESS_ID"] = str(i)
        cmd = [sys.executable, "-m", "tests.test_load_mesh", str(spec), "two_processes"]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))  # fmt: skip
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        result = json.loads(out.strip().splitlines()[-1])
        assert result["checked"] == dict.fromkeys(["hf", "gguf", "orbax"], 2 * len(HAND_RULES)), (
            result
        )


# --- the child process --------------------------------------------------------------------


def hand_sharding(mesh, path: tuple[str, ...]):
    from jax.sharding import NamedSharding, PartitionSpec

    return NamedSharding(mesh, PartitionSpec(*HAND_RULES[path]))


def shard_shape(shape, sharding) -> tuple[int, ...]:
    return tuple(sharding.shard_shape(tuple(shape)))


def forbidden_and_allowed(pure: dict, mesh) -> tuple[set, set, dict]:
    """Shapes no transfer piece may have (a whole split parameter or a whole layer of it),
    the shapes a correct load sends, and each split parameter's expected shard shapes."""
    forbidden, allowed, shards = set(), set(), {}
    for path, x in pure.items():
        s = hand_sharding(mesh, path)
        stacked = path[0] == "layers"
        if s.is_fully_replicated:
            allowed |= {tuple(x.shape), tuple(x.shape[1:])} if stacked else {tuple(x.shape)}
            continue
        forbidden |= {tuple(x.shape), tuple(x.shape[1:])} if stacked else {tuple(x.shape)}
        piece = shard_shape(x.shape, s)
        shards[path] = {piece, piece[1:]} if stacked else {piece}
        allowed |= shards[path]
    assert not forbidden & allowed, ("test model widths collide", forbidden & allowed)
    return forbidden, allowed, shards


class Recorder:
    """Every host-to-device transfer: `(array shape, per-device piece shapes, replicated)`."""

    def __init__(self):
        import jax
        from jax._src.interpreters import pxla

        self.transfers: list[tuple[tuple, list[tuple], bool]] = []
        self.entry_points: list[str] = []
        original = pxla.batched_device_put

        def batched_device_put(aval, sharding, xs, devices, *args, **kwargs):
            pieces = [tuple(np.shape(x)) for x in xs]
            whole = sharding.is_fully_replicated  # one device, or a full copy on each
            self.transfers.append((tuple(aval.shape), pieces, whole))
            return original(aval, sharding, xs, devices, *args, **kwargs)

        pxla.batched_device_put = batched_device_put
        for name in (
            "device_put",
            "make_array_from_callback",
            "make_array_from_single_device_arrays",
        ):
            fn = getattr(jax, name)

            def wrapped(*args, _fn=fn, _name=name, **kwargs):
                self.entry_points.append(_name)
                return _fn(*args, **kwargs)

            setattr(jax, name, wrapped)

    def clear(self) -> None:
        self.transfers.clear()
        self.entry_points.clear()

    def violations(self, forbidden: set) -> list:
        """Transfers that put a forbidden shape whole on some device."""
        return [
            (shape, pieces)
            for shape, pieces, whole in self.transfers
            if any(p in forbidden for p in pieces) or (whole and shape in forbidden)
        ]


def child(spec_path: str) -> None:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import emgeo_jax
    from emgeo_jax.parallel import make_mesh

    assert jax.device_count() == 8, jax.devices()
    sources = json.loads(Path(spec_path).read_text())
    recorder = Recorder()
    reference = {
        k: np.asarray(v)
        for k, v in flat(nnx.to_pure_dict(emgeo_jax.load(sources["hf"]).params)).items()
    }
    out: dict = {}
    for mesh_name, shape in MESHES.items():
        mesh = make_mesh(shape)
        for kind, source in sources.items():
            recorder.clear()
            lm = emgeo_jax.load(source, mesh=mesh)
            pure = flat(nnx.to_pure_dict(lm.params))
            forbidden, _, shards = forbidden_and_allowed(pure, mesh)
            sent = {p for _, pieces, _ in recorder.transfers for p in pieces}
            wrong_shardings, wrong_bytes = [], []
            for path, x in pure.items():
                expected = hand_sharding(mesh, path)
                if not x.sharding.is_equivalent_to(expected, x.ndim):
                    wrong_shardings.append(["/".join(path), str(x.sharding.spec)])
                factor = math.prod(mesh.shape[a] for a in HAND_RULES[path] if a)
                for device in mesh.devices.flat:
                    held = sum(s.data.nbytes for s in x.addressable_shards if s.device == device)
                    if held != x.nbytes // factor:
                        wrong_bytes.append(["/".join(path), str(device), held])
            out[f"{kind} {mesh_name}"] = dict(
                violations=recorder.violations(forbidden),
                unseen=["/".join(p) for p, s in shards.items() if not s & sent],
                wrong_shardings=wrong_shardings,
                wrong_bytes=wrong_bytes,
                split_params=len(shards),
                values_equal=all(
                    np.array_equal(np.asarray(x), reference[p]) for p, x in pure.items()
                ),
                lm_mesh_is_the_mesh=lm.mesh == mesh,
                entry_points=sorted(set(recorder.entry_points)),
            )
    # negative controls: the two patterns the loader must not use
    mesh = make_mesh(MESHES["fsdp=8"])
    q = ("layers", "attn", "q_proj", "kernel")
    host = reference[q]
    forbidden, _, _ = forbidden_and_allowed(reference, mesh)
    controls = {}
    recorder.clear()
    jax.device_put(jax.device_put(host), hand_sharding(mesh, q))
    controls["device_put then reshard"] = bool(recorder.violations(forbidden))
    recorder.clear()
    jax.device_put(jnp.asarray(host), hand_sharding(mesh, q))
    controls["jnp.asarray"] = bool(recorder.violations(forbidden))
    out["controls"] = controls
    print(json.dumps(out))


def child_two_processes(spec_path: str) -> None:
    import jax
    from flax import nnx

    import emgeo_jax
    from emgeo_jax.parallel import initialize_distributed, make_mesh

    initialize_distributed()
    assert jax.process_count() == 2 and jax.device_count() == 4
    sources = json.loads(Path(spec_path).read_text())
    reference = {
        k: np.asarray(v)
        for k, v in flat(nnx.to_pure_dict(emgeo_jax.load(sources["hf"]).params)).items()
    }
    mesh = make_mesh({"fsdp": 4})
    checked = {}
    for kind, source in sources.items():
        lm = emgeo_jax.load(source, mesh=mesh)
        n = 0
        for path, x in flat(nnx.to_pure_dict(lm.params)).items():
            assert x.sharding.is_equivalent_to(hand_sharding(mesh, path), x.ndim), path
            assert not x.is_fully_addressable and len(x.addressable_shards) == 2, path
            for shard in x.addressable_shards:
                np.testing.assert_array_equal(np.asarray(shard.data), reference[path][shard.index])
                n += 1
        checked[kind] = n
    print(json.dumps({"checked": checked}))


def flat(tree: dict, prefix: tuple[str, ...] = ()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


if __name__ == "__main__":
    if sys.argv[2:] == ["two_processes"]:
        child_two_processes(sys.argv[1])
    else:
        child(sys.argv[1])
