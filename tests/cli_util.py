"""Running `emgeo` in tests: in a fresh process (`run_emgeo`, `start_serve`: absl flags are
process-global), through the dispatcher in the calling process (`emgeo_in_process`,
`emgeo_status_and_stderr`: each command starts from the default flags), many commands one
after another in one fresh process (`emgeo_cases`), and the environment of a CPU process with
simulated devices (`cpu_env`)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
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


def emgeo_in_process(*args: str, status: tuple = (0, None)) -> str:
    """`emgeo ARGS` through `emgeo_jax.cli.run` in this process; what it printed (stdout).
    The command must exit with one of `status`."""
    from emgeo_jax.cli import run

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            run(["emgeo", *map(str, args)])
        except SystemExit as e:
            assert e.code in status, (args, e.code)
    return buf.getvalue()


def emgeo_status_and_stderr(args: Sequence[str]) -> tuple[int, str]:
    """`emgeo ARGS` through `emgeo_jax.cli.run` in this process: (exit status, what it wrote
    on stderr)."""
    from emgeo_jax.cli import run

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            run(["emgeo", *map(str, args)])
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code  # absl's sys.exit() after main
    return code, err.getvalue()


CASES_CODE = """
import json, sys
from tests.cli_util import emgeo_status_and_stderr
cases = json.loads(sys.argv[1])
print(json.dumps({name: emgeo_status_and_stderr(args) for name, args in cases.items()}))
"""


def emgeo_cases(
    cases: Mapping[str, Sequence[str]], env: Mapping[str, str] | None = None, timeout: float = 600
) -> dict[str, tuple[int, str]]:
    """Each case (name -> `emgeo` arguments) through the dispatcher, one after another in one
    fresh process with `env` (default this one's): {name: (exit status, stderr)}. One process
    start instead of one per case; each command still starts from the default flags."""
    cases = {name: [str(a) for a in args] for name, args in cases.items()}
    proc = subprocess.run(
        [sys.executable, "-c", CASES_CODE, json.dumps(cases)], cwd=ROOT, capture_output=True,
        text=True, timeout=timeout, env=dict(os.environ if env is None else env),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {name: tuple(r) for name, r in json.loads(proc.stdout.splitlines()[-1]).items()}
