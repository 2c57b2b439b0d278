"""The few multi-process primitives the library's runs share (one process: all no-ops).

Under `jax.distributed.initialize` (`parallel.initialize_distributed`) every process runs the
same program over a mesh spanning all processes' devices. Runs that write files follow one
rule: every process computes, process 0 (`is_primary`) writes, and whatever decides what to
compute next (which cells or chunks are already on disk) is decided by process 0 and sent to
all (`broadcast_json`), so the processes never disagree about which collectives come next.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def simulated_cpu_env(devices: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a fresh CPU process with `devices` simulated devices (how a mesh is
    tried without chips): `base` (default this process's environment) with `JAX_PLATFORMS=cpu`
    and the device count as `JAX_NUM_CPU_DEVICES` and XLA's `--xla_force_host_platform_
    device_count` (replacing any count already in `XLA_FLAGS`, keeping its other flags)."""
    env = dict(os.environ if base is None else base)
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    env["XLA_FLAGS"] = " ".join([*flags, f"{DEVICE_COUNT_FLAG}={devices}"])
    return env


def is_primary() -> bool:
    """True on the process that writes outputs (process 0)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process calls `barrier(name)` (a no-op with one process), through the
    public `multihost_utils.sync_global_devices` (a small collective over all devices).

    On CPU, gloo sets up its communicator at the first collective and gives up when the
    processes arrive there more than ~30 s apart; later collectives wait much longer. So call
    `barrier` once right after `jax.distributed.initialize`, while the processes are in step
    and before slow work such as loading a model (`emgeo extract` does)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def broadcast_json(obj: Any) -> Any:
    """Process 0's `obj` (anything JSON can hold) on every process; `obj` itself with one
    process. Other processes' arguments are ignored (pass None)."""
    if jax.process_count() == 1:
        return obj
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if is_primary() else None
    size = int(multihost_utils.broadcast_one_to_all(np.int64(0 if data is None else len(data))))
    buf = data if data is not None else np.zeros(size, np.uint8)
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf), np.uint8)
    return json.loads(out.tobytes().decode())


def to_host(tree: Any) -> Any:
    """Every leaf of `tree` as a full numpy array on this process: arrays this process holds
    whole directly, replicated ones from a local copy, arrays split across processes
    gathered (`multihost_utils.process_allgather`, every process must call it then)."""

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


def put_global(tree: Any, shardings: Any) -> Any:
    """`tree` placed with `shardings` (a matching pytree of `Sharding`s). Leaves: host
    arrays or device arrays of this process holding the same values on every process (each
    process transfers only its devices' pieces; the whole value passes through the host, so
    small trees only: LoRA, optimizer state), or arrays already spanning processes (moved
    device to device)."""

    def one(x, sharding):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:  # already global
            return jax.device_put(x, sharding)
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    return jax.tree.map(one, tree, shardings)
