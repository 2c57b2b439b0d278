"""One process of a multi-process run of several `emgeo` commands, in this one process (run by
launch/local.sh, or with the EMGEO_* variables set; see tests/test_cli_mesh.py).

    python tests/multiprocess_cli.py PLAN.json

PLAN.json: {"watch": DIR, "log": DIR, "runs": [{"name": NAME, "args": [COMMAND, ARG...],
"interrupt_at": K, "status": [0, ...]}, ...]}. Each run is `emgeo_jax.cli.run(["emgeo",
*args])` (so the one distributed start of `emgeo_jax.cli` joins the processes, once); with
`interrupt_at` K the experiments' K-th generation batch (`experiments.folder.generate`,
called in step by every process) raises KeyboardInterrupt, as a Ctrl-C on every host would,
so the command ends with status 130 and its folder holds a half-generated cell for the next
run to resume. Each run must exit with one of its `status` values (default 0).

Everything this process opens for writing, renames, removes or creates under DIR, and every
judge cache it opens there, is recorded (a Python audit hook: files written by C/Rust code
without Python's `open` are not seen). LOG/process-I.json gets the runs' exit statuses, what
each printed (stdout, and what went to stderr other than log lines) and those writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
# audit events that change the file system: event -> indices of the path arguments
CHANGES = {
    "os.rename": (0, 1),
    "os.remove": (0,),
    "os.rmdir": (0,),
    "os.mkdir": (0,),
    "shutil.rmtree": (0,),
    "shutil.copyfile": (1,),
    "shutil.move": (1,),
    "sqlite3.connect": (0,),
}


def watch_writes(root: Path) -> list[tuple[str, str]]:
    """A list that every later write under `root` by this process is appended to, as
    (event, path); writes while `recording[0]` is False are skipped."""
    root_text = str(root.resolve())
    writes: list[tuple[str, str]] = []

    def under(path) -> str | None:
        if isinstance(path, int):
            return None
        text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
        full = os.path.abspath(text)
        return full if full.startswith(root_text) else None

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if mode else bool((flags or 0) & WRITE_FLAGS)
            paths = [path] if writing else []
        else:
            paths = [args[i] for i in CHANGES.get(event, ()) if i < len(args)]
        for p in paths:
            full = under(p)
            if full is not None:
                writes.append((event, full))

    sys.addaudithook(hook)
    return writes


def interrupt_generation(at: list[int | None]) -> None:
    """Make the `at[0]`-th call of `experiments.folder.generate` from now raise
    KeyboardInterrupt (None: never); `at[0]` counts down."""
    from emgeo_jax.experiments import folder

    original = folder.generate

    def counting(*args, **kwargs):
        if at[0] is not None:
            at[0] -= 1
            if at[0] == 0:
                raise KeyboardInterrupt
        return original(*args, **kwargs)

    folder.generate = counting


def main(plan_file: Path) -> None:
    from emgeo_jax.cli import run

    plan = json.loads(plan_file.read_text())
    writes = watch_writes(Path(plan["watch"]))
    interrupt_at: list[int | None] = [None]
    interrupt_generation(interrupt_at)
    done = []
    for step in plan["runs"]:
        interrupt_at[0] = step.get("interrupt_at")
        printed, err = io.StringIO(), io.StringIO()
        first = len(writes)
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(err):
            try:
                run(["emgeo", *map(str, step["args"])])
                status = 0
            except SystemExit as e:
                status = 0 if e.code is None else e.code
        sys.stderr.write(err.getvalue())  # (log lines go to the real stderr directly)
        assert status in step.get("status", [0]), (step["args"], status)
        done.append(
            {
                "name": step.get("name"),
                "args": step["args"],
                "status": status,
                "stdout": printed.getvalue(),
                "stderr": err.getvalue(),
                "writes": sorted(set(map(tuple, writes[first:]))),
            }
        )
    pid = int(os.environ.get("EMGEO_PROCESS_ID", "0"))
    log = Path(plan["log"])
    log.mkdir(parents=True, exist_ok=True)
    (log / f"process-{pid}.json").write_text(json.dumps(done))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main(Path(sys.argv[1]))
