"""Run the `emgeo` command in a fresh process (absl flags are process-global)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
