"""Flag values as the commands read them: below the dispatcher (`emgeo_jax.cli`) and the shared
flags (`emgeo_jax.cli.common`), so both and every command module import from here."""

from __future__ import annotations


def number_list(values: list[str], flag: str, kind: type = int) -> list:
    """A list flag's values as numbers of `kind` (int or float); a ValueError naming `--flag`
    and the bad value otherwise."""
    out = []
    for v in values:
        try:
            out.append(kind(v))
        except ValueError:
            raise ValueError(f"--{flag}: {v!r} is not a number ({kind.__name__})") from None
    return out
