"""What every resumable command needs: atomic files, JSONL, recorded settings.

* Atomic writes. `atomic_path(path)` yields a temporary file beside `path` (same folder, so
  the rename cannot cross filesystems) and renames it over `path` only when the block
  finishes; readers see the old file or the complete new one, never a partial one, and a
  failed write leaves no temporary behind. The file gets the mode `open()` would give it
  under the umask (`tempfile.mkstemp` alone makes 0600 files). `write_bytes_atomic`,
  `write_json_atomic`, `write_jsonl_atomic` and `save_safetensors_atomic` (JSON metadata under
  `METADATA_KEY`, read back by `read_safetensors`) are built on it; `atomic_folder` does the
  same for a whole folder (a converted checkpoint).
* JSONL. `read_jsonl` / `iter_jsonl` (errors name the file and line), `append_jsonl` (flushed
  and fsynced, for logs that grow run by run) and `ResumableJsonl` (rows written batch by
  batch to `OUT.partial`, renamed to `OUT` when complete, a re-run continuing after the last
  whole batch).
* Recorded settings. A resumable output records the settings that made it (a JSON file beside
  it, or its metadata); a later run with other settings is refused with one error type,
  `SettingsMismatch`, naming the file or folder and each setting that differs
  (`settings_diff`: `sampling.samples: 10 there, 2 now`): `mismatch` builds it,
  `check_settings` raises it, `read_settings` reads a record. Settings are compared after a
  JSON round trip (`as_json`), so tuples equal the lists read back from disk; arrays are
  recorded by `array_digest`.

None of these functions knows about processes: in a multi-process run process 0 writes
(`emgeo_jax.hosts.is_primary`) and tells the others what it found (`hosts.broadcast_json`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any


class SettingsMismatch(ValueError):
    """A file or folder holds results made with other settings than the current run's.

    The message names the file or folder, each differing setting (old there, new now) when
    they are recorded, and what to do about it."""


# --- atomic writes --------------------------------------------------------------------------


def umask_file_mode() -> int:
    """The mode `open()` would give a new file under the process umask (0o666 & ~umask):
    `tempfile.mkstemp` creates 0600 files, which would keep data from colleagues who can read
    the reports. Read from /proc on Linux (setting the umask to read it races other threads)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` for the block to write (by name, e.g. a safetensors or
    msgpack writer); on success it is fsynced and renamed over `path`, on an exception it is
    deleted and `path` is left as it was. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, umask_file_mode())  # as `open()` would: readable by whom the umask allows
        os.close(fd)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes | str) -> None:
    """`data` (bytes, or text written as UTF-8) to `path` atomically."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    with atomic_path(path) as tmp:
        tmp.write_bytes(raw)


def write_json_atomic(path: str | Path, obj: Any, indent: int | None = 1) -> None:
    """`obj` as JSON (NaN allowed, as Python writes it) to `path` atomically."""
    write_bytes_atomic(path, json.dumps(obj, indent=indent, allow_nan=True))


def write_jsonl_atomic(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """One JSON object per line (UTF-8, not ASCII-escaped) to `path` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# safetensors files of ours carry JSON metadata (the settings that made them) under this key
METADATA_KEY = "emgeo"


def save_safetensors_atomic(
    path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, Any] | None = None
) -> None:
    """Arrays (name -> array, each stored in its own dtype as a contiguous copy) to a
    safetensors file atomically, with `metadata` (JSON-able) as JSON under `METADATA_KEY`;
    readable from PyTorch too. A ValueError naming the file when there are no tensors."""
    import numpy as np
    from safetensors.numpy import save_file

    arrays = {name: np.ascontiguousarray(np.asarray(t)) for name, t in tensors.items()}
    if not arrays:
        raise ValueError(f"{path}: no tensors to save")
    header = None if metadata is None else {METADATA_KEY: json.dumps(metadata)}
    with atomic_path(path) as tmp:
        save_file(arrays, str(tmp), metadata=header)


def read_safetensors(
    path: str | Path, error: type[ValueError] = ValueError
) -> tuple[dict[str, Any], dict[str, Any]]:
    """`(tensors, metadata)` of a safetensors file: numpy arrays and the JSON under
    `METADATA_KEY` ({} when absent). `error` (a ValueError subclass) names the file when it is
    missing, not a readable safetensors file, or its metadata is not JSON."""
    from safetensors import safe_open

    if not Path(path).is_file():
        raise error(f"{path}: no such file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise error(f"{path}: not a readable safetensors file ({e})") from e
    return tensors, parse_metadata(raw, path, error)


def parse_metadata(
    raw: Mapping[str, str] | None, path: str | Path, error: type[ValueError] = ValueError
) -> dict[str, Any]:
    """Our metadata (the JSON under `METADATA_KEY`) from a safetensors header's
    `__metadata__` (`safe_open(...).metadata()`); {} when absent."""
    if not raw or METADATA_KEY not in raw:
        return {}
    try:
        return json.loads(raw[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise error(f"{path}: metadata field '{METADATA_KEY}' is not JSON") from e


@contextlib.contextmanager
def atomic_folder(folder: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """A fresh temporary folder beside `folder` for the block to fill; on success it replaces
    `folder` (an existing one only with `overwrite`, else FileExistsError naming it before
    anything is written), on an exception it is deleted. Replacing an existing folder is a
    delete then a rename: a crash between the two leaves no folder, never a partial one."""
    folder = Path(folder).absolute()
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} exists; pass overwrite=True (--overwrite) to replace it")
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


# --- JSONL ----------------------------------------------------------------------------------


def iter_jsonl(
    path: str | Path, error: type[ValueError] = ValueError, encoding: str = "utf-8"
) -> Iterator[tuple[int, dict[str, Any]]]:
    """`(line number, object)` for each non-blank line of a JSONL file; `error` (a ValueError
    subclass) naming the file and line for a line that is not a JSON object. `encoding`
    "utf-8-sig" also accepts a byte-order mark."""
    with open(path, encoding=encoding) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise error(f"{path}:{lineno}: expected a JSON object per line")
            yield lineno, obj


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The objects of a JSONL file (blank lines skipped); errors name the file and line."""
    return [obj for _, obj in iter_jsonl(path)]


def append_jsonl(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append rows to `path` (created with its folder if missing), flushed and fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        os.fsync(f.fileno())


class ResumableJsonl:
    """JSONL output that survives interruption: rows go to `OUT.partial`, next to a record of
    the run's settings (`OUT.partial.json`), and the file is renamed to `OUT` only when the
    run finished, so a file named `OUT` is always complete. A re-run with the same settings
    continues after the rows already written (whole units only: a unit is a batch whose rows
    must be produced together to come out the same; `done` counts them); other settings are
    refused with `SettingsMismatch`. `settings`: JSON-able; `unit`: rows per unit. No file is
    held open between appends, so an experiment can keep a writer per unfinished cell
    (thousands in a dense layer x scale sweep) under any open-file limit."""

    def __init__(self, out: str | Path, settings: Mapping[str, Any], unit: int = 1):
        self.out = Path(out)
        self.partial = self.out.with_name(self.out.name + ".partial")
        self.record = self.out.with_name(self.out.name + ".partial.json")
        settings = as_json(settings)
        lines: list[str] = []
        if self.partial.exists() and self.record.exists():
            check_settings(
                self.partial,
                read_settings(self.record),
                settings,
                what="an interrupted run with other settings",
                hint=f"delete {self.partial} to start again",
            )
            text = self.partial.read_text(encoding="utf-8")
            lines = text.splitlines(keepends=True)
            if lines and not lines[-1].endswith("\n"):
                lines.pop()  # cut off mid-row
            lines = lines[: len(lines) - len(lines) % unit]
        self.out.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.record, settings, indent=None)
        write_bytes_atomic(self.partial, "".join(lines))
        self.done = len(lines)  # rows already written, a whole number of units

    def append(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Write rows (one unit, or the last, shorter one) and flush them to disk."""
        rows = [json.dumps(row) + "\n" for row in rows]
        with open(self.partial, "a", encoding="utf-8") as f:
            f.writelines(rows)
            f.flush()
            os.fsync(f.fileno())
        self.done += len(rows)

    def finish(self) -> None:
        """All rows written: `OUT.partial` becomes `OUT`."""
        os.replace(self.partial, self.out)
        self.record.unlink()


# --- recorded settings ----------------------------------------------------------------------


def as_json(settings: Any) -> Any:
    """`settings` as it reads back from a JSON file (sorted keys, tuples as lists, other
    objects as their `str`)."""
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def settings_diff(then: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """The settings that differ between two recorded configurations, one `key: old there, new
    now` per setting, nested mappings named by dotted paths (`sampling.samples: 10 there, 2
    now`), joined by '; '. JSON-normalised first, so tuples equal the lists read from disk."""

    def flat(settings: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(settings, Mapping) or (not settings and prefix):
            return {prefix.rstrip("."): settings}
        out: dict[str, Any] = {}
        for k, v in settings.items():
            out.update(flat(v, f"{prefix}{k}."))
        return out

    a, b = (flat(as_json(dict(x))) for x in (then, now))
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} there, {b.get(k)!r} now" for k in keys)


def mismatch(
    where: str | Path,
    recorded: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    *,
    what: str = "results made with another configuration",
    hint: str = "use another --out or --overwrite to discard them",
) -> SettingsMismatch | None:
    """The `SettingsMismatch` for reusing `where` (made with settings `recorded`, None when
    they were not recorded) with settings `current`, or None when they are equal:
    `"{where} holds {what} ({differing settings}); {hint}"`."""
    diff = "its settings are not recorded" if recorded is None else settings_diff(recorded, current)
    if not diff:
        return None
    return SettingsMismatch(f"{where} holds {what} ({diff}); {hint}")


def check_settings(
    where: str | Path,
    recorded: Mapping[str, Any] | None,
    current: Mapping[str, Any],
    **message: str,
) -> None:
    """Raise `mismatch(where, recorded, current, **message)` if there is one."""
    error = mismatch(where, recorded, current, **message)
    if error is not None:
        raise error


def array_digest(values: Any, extra: bytes = b"") -> str:
    """Short sha256 (16 hex digits) of an array's float32 bytes and shape (any shape), plus
    `extra`: how a recorded setting names an array (a steering vector, a direction)."""
    import numpy as np

    a = np.ascontiguousarray(np.asarray(values, np.float32))
    return hashlib.sha256(a.tobytes() + str(a.shape).encode() + extra).hexdigest()[:16]


def read_settings(path: str | Path) -> dict[str, Any] | None:
    """The settings recorded in the JSON file `path`, or None if there is no such file; a
    SettingsMismatch naming the file if it is not a readable JSON object."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SettingsMismatch(f"{path}: the recorded settings are unreadable ({e})") from None
    if not isinstance(settings, dict):
        raise SettingsMismatch(f"{path}: the recorded settings are not a JSON object")
    return settings
