"""A multi-process command's standard output holds its output and nothing else.

On CPU, gloo prints "[Gloo] Rank N is connected to M peer ranks ..." to file descriptor 1 on
every process at its first collective. `emgeo` sends native prints to standard error once a
multi-process run starts (`emgeo_jax.cli.native_prints_to_stderr`), so `emgeo norms` on 2
processes prints exactly the one-process table on each, and gloo's line reaches stderr (the
positive control: gloo did print, and the line was moved, not lost)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.cli_util import ROOT, cpu_env
from tests.test_generate_cli import folder  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow


def test_native_prints_leave_stdout_on_two_processes(folder):  # noqa: F811
    command = [sys.executable, "-m", "emgeo_jax.cli", "norms", f"--model={folder}",
               "--prompt=hi there"]  # fmt: skip
    one = subprocess.run(
        command, cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=300
    )
    assert one.returncode == 0, one.stderr[-3000:]
    assert one.stdout.count("\n") > 3, one.stdout
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = []
    for i in range(2):
        env = cpu_env(1, EMGEO_DISTRIBUTED="1", EMGEO_COORDINATOR=f"127.0.0.1:{port}")
        env.update(EMGEO_NUM_PROCESSES="2", EMGEO_PROCESS_ID=str(i))
        procs.append(
            subprocess.Popen([*command, "--mesh=data=2"], cwd=ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        )  # fmt: skip
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert out == one.stdout, (i, out)
        assert f"[Gloo] Rank {i} is connected" in err, err[-3000:]
