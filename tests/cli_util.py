"""Fresh processes for tests: the `emgeo` command (absl flags are process-global), `emgeo
serve`, and the environment of a CPU process with simulated devices (`cpu_env`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

from emgeo_jax.hosts import simulated_cpu_env

ROOT = Path(__file__).resolve().parents[1]
# what `conftest.py` adds to the session's XLA_FLAGS: LLVM optimisation off (tiny programs)
UNOPTIMISED = "--xla_backend_optimization_level=0"


def cpu_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a fresh CPU process with `devices` simulated devices
    (`emgeo_jax.hosts.simulated_cpu_env` of this process's, so the session's XLA flags and
    compilation cache, `conftest.py`), plus the repository on `PYTHONPATH`, and `extra`."""
    env = simulated_cpu_env(devices, dict(os.environ, **extra))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return env


def optimised_env() -> dict[str, str]:
    """This process's environment without the session's `UNOPTIMISED` flag: for a subprocess
    that runs SmolLM2 for long (its unoptimised code runs ~4x slower)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split() if f != UNOPTIMISED)
    return env


def run_emgeo(
    *args: str, timeout: float = 600, status: int = 0, env: Mapping[str, str] | None = None
) -> str:
    """`emgeo ARGS` from the repository root, with `env` added to the environment. Expects
    exit status `status` (the test fails with the end of stderr otherwise) and returns stdout
    when it is 0, else stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "emgeo_jax.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == status, f"exit {proc.returncode} != {status}: {proc.stderr[-3000:]}"
    return proc.stdout if status == 0 else proc.stderr


def start_serve(*args: str) -> tuple[subprocess.Popen, str]:
    """A real `emgeo serve ARGS` process (give `--port=0`) and its base URL, read from the
    line it prints once it listens (the test fails with its stderr if it exits first). The
    caller stops it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "emgeo_jax.cli", "serve", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ,
    )
    line = proc.stdout.readline()
    assert " at http://" in line, proc.stderr.read() if proc.poll() is not None else line
    return proc, line.split(" at ")[1].split()[0]
