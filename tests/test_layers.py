"""The layers point one way: every import of every module (at the top and inside functions) goes
to its own layer or a lower one, no module imports the ``pagedq`` facade but the entry points,
and no two modules import each other, however indirectly.

The order (lowest first) is the one ARCHITECTURE.md draws. A new module must be placed in a
layer here; the test fails until it is.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# source folder -> the package it installs as (pyproject's package-dir)
SOURCES = {
    "pagedq": "pagedq",
    "kernels": "pagedq.kernels",
    "quant": "pagedq.quant",
    "jupyter_ext": "pagedq.jupyter_ext",
}

_CORE = [
    "pagedq.config",
    "pagedq.outputs",
    "pagedq.sequence",
    "pagedq.sampling_params",
    "pagedq.beam_search",
    "pagedq.block_manager",
    "pagedq.scheduler",
    "pagedq.policies",
    "pagedq.sampler",
    "pagedq.detokenizer",
    "pagedq.output_processor",
    "pagedq.model_runner",
    "pagedq.engine",
    "pagedq.llm",
    "pagedq.driver",
    "pagedq.metrics",
    "pagedq.options",
]

# lowest first; a module belongs to the layer of the longest prefix that names it
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["pagedq._lazy", "pagedq._version", "pagedq.checks"]),
    ("kernels", ["pagedq.kernels"]),
    ("models/quant", ["pagedq.models", "pagedq.quant"]),
    ("engine", _CORE),
    ("serve", ["pagedq.serve"]),
    ("jupyter and tools", ["pagedq.jupyter_ext", "pagedq.bench", "pagedq.quality"]),
    ("entry points", ["pagedq", "pagedq.__main__", "pagedq.cli"]),
]


def _modules() -> dict[str, str]:
    """module name -> file path, for every module of the package."""
    out = {}
    for folder, package in SOURCES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, dirnames, files in os.walk(base):
            dirnames[:] = [d for d in dirnames if d not in ("__pycache__", "data", "csrc")]
            rel = os.path.relpath(dirpath, base)
            prefix = package if rel == "." else package + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    name = prefix if f == "__init__.py" else f"{prefix}.{f[:-3]}"
                    out[name] = os.path.join(dirpath, f)
    return out


MODULES = _modules()


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = i, len(p)
    assert best is not None, f"{module} is in no layer; place it in tests/test_layers.py LAYERS"
    return best


def _imports(module: str, path: str) -> list[tuple[str, int]]:
    """(internal module imported, line) for every import statement anywhere in the file."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    is_pkg = path.endswith("__init__.py")
    package = module if is_pkg else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                src = f"{base}.{node.module}" if node.module else base
            else:
                src = node.module or ""
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one
            targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in MODULES else src for a in node.names]
        else:
            continue
        for t in targets:
            # ``import pagedq.x.y`` -> the longest module name it names
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != module:
                found.append((t, node.lineno))
    return found


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def test_every_module_has_a_layer():
    for m in MODULES:
        layer_of(m)


def test_imports_point_down_the_layers():
    bad = []
    for m, edges in GRAPH.items():
        for target, line in edges:
            if layer_of(target) > layer_of(m):
                bad.append(
                    f"{MODULES[m]}:{line}: {m} ({LAYERS[layer_of(m)][0]}) imports {target} "
                    f"({LAYERS[layer_of(target)][0]})"
                )
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_only_entry_points_import_the_facade():
    entry = layer_of("pagedq")
    bad = [
        f"{MODULES[m]}:{line}: {m} imports the pagedq facade; import the defining module instead"
        for m, edges in GRAPH.items()
        for target, line in edges
        if target == "pagedq" and layer_of(m) != entry
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    # Tarjan's strongly connected components over the module graph
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w, _ in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_imports_inside_functions():
    # the rule covers lazy imports too: the test would be empty if it did not
    assert any(t == "pagedq.quant.quantize" for t, _ in GRAPH["pagedq.quality"])
    assert layer_of("pagedq.kernels.native") < layer_of("pagedq.models.loader") < layer_of("pagedq.engine")
