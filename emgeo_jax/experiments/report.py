"""Self-contained HTML reports: captions, tables and PNG figures inlined as base64.

Numbers are printed with `fmt` (4 significant digits, as the geometry report prints them;
whole numbers without decimals), so a report can be checked against the JSON it was written
from."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

STYLE = (
    "body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
    "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;"
    "padding:2px 6px;font-size:13px}img{max-width:100%}figure{margin:1.5em 0}"
    ".note{background:#fff6dd;border-left:4px solid #e0b000;padding:0.5em 1em}"
)


def fmt(x: Any) -> str:
    """A number as the report prints it: 4 significant digits (-8.0 -> -8, 0.00200 -> 0.002,
    195.618 -> 195.6; from 10,000 on, no decimals); None -> n/a; NaN -> NaN; True/False ->
    yes/no; intervals as [lo, hi]."""
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, (list, tuple)):
        return "[" + ", ".join(fmt(v) for v in x) + "]"
    if isinstance(x, float):
        if math.isnan(x):
            return "NaN"
        x += 0.0  # -0.0 prints as 0
        return f"{x:.0f}" if abs(x) >= 1e4 else f"{x:.4g}"
    return html.escape(str(x))


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def save_figure(fig: plt.Figure, path: Path, caption: str) -> str:
    """Save `fig` as PNG at `path`, close it, and return an HTML figure embedding it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return embed_png(path, caption)


def embed_png(path: Path, caption: str) -> str:
    """An HTML figure holding the PNG file at `path` inline, with its caption."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(path.name)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(caption)} (<code>{html.escape(path.name)}</code>)"
        "</figcaption></figure>"
    )


def paragraph(text: str, note: bool = False) -> str:
    cls = ' class="note"' if note else ""
    return f"<p{cls}>{html.escape(text)}</p>"


def write_page(path: str | Path, title: str, blocks: Sequence[str]) -> Path:
    """Write one HTML page holding `blocks` (HTML strings) under an <h1> title."""
    path = Path(path)
    page = (
        f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
        + "\n".join(blocks)
        + "\n</body></html>"
    )
    path.write_text(page, encoding="utf-8")
    return path
