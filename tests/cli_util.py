"""Run the `emgeo` command in a fresh process (absl flags are process-global)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_emgeo(*args: str, timeout: float = 600) -> str:
    """`emgeo ARGS` from the repository root; its stdout. Fails the test with the end of
    stderr when the command exits non-zero."""
    proc = subprocess.run(
        [sys.executable, "-m", "emgeo_jax.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout
