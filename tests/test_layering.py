"""Import layering of `emgeo_jax`: a module imports only its own layer or the layers below it,
and no modules import each other in a cycle.

The layers, lowest first (`LAYERS`; a module belongs to the longest prefix that names it):

0. base utilities, which every layer may use and which know nothing of models beyond their
   description: `runs` (atomic files, JSONL, recorded settings), `hosts` (multi-process
   primitives), `parallel` (meshes, partition rules; its parameter axes come from the
   parameter table), `data/` (contrast data, question sets, chat templating, token masks),
   and the model *description* `models.config` + `models.params` (config and parameter
   table: plain data, no JAX modules, so `parallel` can derive its rules from them);
1. `models` (blocks, the layer scan, the functions per use, steering and taps);
2. `convert`, and the package root `emgeo_jax/__init__.py` (the public facade: re-exports of
   `convert.load` and `models`);
3. `generate`, `extract`;
4. `vectors`, `geometry`, `judge`;
5. `train` (LoRA organisms, probes), `serve` (the OpenAI-compatible server), `plan` (memory
   plans of the other commands' programs): tools built on everything above;
6. `experiments` (the evaluation of a trained organism, `experiments.lora_em`, included);
7. `cli`.

`launch/` holds shell scripts outside the package that call the `emgeo` CLI: no Python
imports to check.

What counts as an import: every `import` / `from ... import` statement anywhere in a module,
at module level and inside functions alike (a function-local import is a dependency all the
same; deferring it only hides a cycle). `from pkg import name` is an import of the submodule
`pkg.name` when that is a module, else of `pkg`; relative imports are resolved. Imports under
`if TYPE_CHECKING:` count for layering (a lower layer should not even name a higher layer's
types) but not for cycles (they never run, so they cannot form an import cycle).

`KNOWN_VIOLATIONS` / `KNOWN_CYCLES` list accepted exceptions; both are empty (an entry that
no longer occurs fails the test, so they cannot go stale).
"""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

PACKAGE = "emgeo_jax"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE

LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "emgeo_jax.runs",
        "emgeo_jax.hosts",
        "emgeo_jax.parallel",
        "emgeo_jax.data",
        "emgeo_jax.models.config",
        "emgeo_jax.models.params",
    ),
    ("emgeo_jax.models",),
    ("emgeo_jax", "emgeo_jax.convert"),
    ("emgeo_jax.generate", "emgeo_jax.extract"),
    ("emgeo_jax.vectors", "emgeo_jax.geometry", "emgeo_jax.judge"),
    ("emgeo_jax.train", "emgeo_jax.serve", "emgeo_jax.plan"),
    ("emgeo_jax.experiments",),
    ("emgeo_jax.cli",),
)

# (importer, imported) pairs that break the layering today, in the core redesign's files.
KNOWN_VIOLATIONS: set[tuple[str, str]] = set()
# import cycles today (as sorted module tuples)
KNOWN_CYCLES: set[tuple[str, ...]] = set()


@dataclasses.dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    type_checking: bool


def module_name(path: Path, root: Path, package: str) -> str:
    parts = [package, *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    """Line numbers of the statements inside `if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    for sub in ast.walk(stmt):
                        if hasattr(sub, "lineno"):
                            lines.add(sub.lineno)
    return lines


def imports(root: Path, package: str) -> list[Import]:
    """Every import of a package module by a package module (module docstring)."""
    files = {module_name(p, root, package): p for p in sorted(root.rglob("*.py"))}
    out = []
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        guarded = _type_checking_lines(tree)
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.append(sub if sub in files else base)
            for target in targets:
                if target == package or target.startswith(package + "."):
                    # `import a.b.c` of a name that is not a module: its nearest module
                    while target not in files and "." in target:
                        target = target.rsplit(".", 1)[0]
                    if target != name:
                        out.append(Import(name, target, node.lineno, node.lineno in guarded))
    return out


def layer_of(module: str, layers: tuple[tuple[str, ...], ...]) -> int | None:
    """The layer of the longest prefix naming `module` (None: no layer names it)."""
    best, best_len = None, -1
    for i, prefixes in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    return best


def violations(found: list[Import], layers: tuple[tuple[str, ...], ...]) -> dict:
    """`{(importer, imported): "importer (layer i) line n imports imported (layer j)"}` for
    each import of a higher layer."""
    out = {}
    for imp in found:
        a, b = layer_of(imp.importer, layers), layer_of(imp.imported, layers)
        if a is not None and b is not None and b > a:
            out.setdefault(
                (imp.importer, imp.imported),
                f"{imp.importer} (layer {a}) line {imp.line} imports {imp.imported} (layer {b})",
            )
    return out


def cycles(found: list[Import]) -> set[tuple[str, ...]]:
    """The import cycles (strongly connected groups of 2+ modules, sorted) among the imports
    that run (not those under TYPE_CHECKING); Tarjan's algorithm."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        if not imp.type_checking:
            graph.setdefault(imp.importer, set()).add(imp.imported)
            graph.setdefault(imp.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[tuple[str, ...]] = set()

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.add(tuple(sorted(group)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def package_imports() -> list[Import]:
    return imports(ROOT, PACKAGE)


def test_every_module_has_a_layer():
    modules = {module_name(p, ROOT, PACKAGE) for p in ROOT.rglob("*.py")}
    assert sorted(m for m in modules if layer_of(m, LAYERS) is None) == []


def test_no_module_imports_a_higher_layer(package_imports):
    found = violations(package_imports, LAYERS)
    new = sorted(msg for key, msg in found.items() if key not in KNOWN_VIOLATIONS)
    assert new == [], "imports of a higher layer:\n" + "\n".join(new)
    stale = sorted(KNOWN_VIOLATIONS - set(found))
    assert stale == [], f"fixed, remove from KNOWN_VIOLATIONS: {stale}"


def test_no_import_cycles(package_imports):
    found = cycles(package_imports)
    new = sorted(found - KNOWN_CYCLES)
    assert new == [], f"import cycles: {new}"
    stale = sorted(KNOWN_CYCLES - found)
    assert stale == [], f"fixed, remove from KNOWN_CYCLES: {stale}"


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_new_violations_and_cycles(tmp_path):
    """A fake package with layers low < mid < top: an upward import at module level, one
    inside a function and one under TYPE_CHECKING are all violations; a function-local
    import closing a loop is a cycle, a TYPE_CHECKING one is not; relative imports and
    `from pkg import submodule` resolve to the module."""
    root = tmp_path / "fake"
    _write(
        root,
        {
            "__init__.py": "",
            "low.py": "import fake.top\n",  # module level, upward
            "mid/__init__.py": "",
            "mid/a.py": (
                "from typing import TYPE_CHECKING\n"
                "from .. import low\n"  # relative, downward: fine
                "if TYPE_CHECKING:\n"
                "    from fake.top import T\n"  # upward, but never runs
                "def f():\n"
                "    from fake import top\n"  # function-local, upward
                "    from fake.mid.b import g\n"  # closes a cycle with mid.b
            ),
            "mid/b.py": "from fake.mid import a\n",
            "top.py": "from fake.mid.a import f\nclass T: ...\n",
        },
    )
    layers = (("fake.low",), ("fake", "fake.mid"), ("fake.top",))
    found = imports(root, "fake")
    bad = violations(found, layers)
    assert set(bad) == {("fake.low", "fake.top"), ("fake.mid.a", "fake.top")}
    assert "fake.low (layer 0) line 1 imports fake.top (layer 2)" in bad.values()
    upward = [i for i in found if (i.importer, i.imported) == ("fake.mid.a", "fake.top")]
    assert sorted((i.line, i.type_checking) for i in upward) == [(4, True), (6, False)]
    # low -> top -> mid.a -> low is a cycle; mid.a <-> mid.b another, merged with it
    assert cycles(found) == {("fake.low", "fake.mid.a", "fake.mid.b", "fake.top")}
    # without the runtime upward imports, only the TYPE_CHECKING one remains: still a
    # violation, but no cycle although top imports mid.a
    typing_only = (
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from fake.top import T\n"
    )
    _write(root, {"low.py": "", "mid/b.py": "", "mid/a.py": typing_only})
    found = imports(root, "fake")
    assert cycles(found) == set()
    assert set(violations(found, layers)) == {("fake.mid.a", "fake.top")}
