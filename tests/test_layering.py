"""The package is layered: a module imports only modules of its own layer or of lower ones, and the
import graph has no circle. Every module of ``genie_fast/`` (and of the top-level ``kernels/``
folder, installed as ``genie_fast.kernels``) is read with ``ast``; every import counts, the ones
inside functions too (a lazy import is still a dependency, and an upward one is how circles come
back). The only exceptions are the few upward edges of `ALLOWED_UPWARD`, each with its reason.

Layers (low to high; a module of layer n may import layers 0..n):

    0 base      _ext, checks, profiling, schedule, layout, reference, precision, files, noise
                (seeds, x_T), devices (dtype names, TF32, the device rule), weights (the model
                on the engine's device), graphs (CUDA graph capture), conditioning (the checks
                of cond / negative_cond, null inputs, decoders)
    1 ops       ops, kernels (genie_fast.kernels: the Triton kernels ops dispatches to)
    2 models    models (and models/*), data: networks, their files and the training data
    3 solvers   solvers (the module, or the package genie_fast/solvers/ and all its modules)
    4 engine    engine, guidance, grid_store (tuned grids stored beside a model)
    5 sampling  sampling, cascade (two stages, each a sample() call), and the package root
                ``genie_fast`` (its public names are lazy re-exports of sampling, engine, solvers, cascade)
    6 jobs      generate, training (and training/*), and the old entry modules train,
                distill, distill_diffusers (re-exports of genie_fast.training); generate's parts:
                cli_args (the sampling flags of sample, encode, generate), cli_cascade (the flags
                of sample --cascade and the cascade command), store (the output
                folder), distributed (the torchrun process group)
    7 cli       cli

Imports are resolved to the module that defines the imported name where that is a module of the
package (``from . import ops`` -> genie_fast.ops; ``from .models.unet import UNet`` ->
genie_fast.models.unet); the implicit import of a module's parent packages is not an edge, and the
names of a ``_LAZY`` table (a package's lazy re-exports through ``importlib``) count as imports.
A module that is in no layer fails the test: a new module gets a line in `LAYERS`. Inside a
layer only circles are refused: so the distillation core (training.distill) never imports the
diffusers front-end (training.distill_diffusers), which imports it. An import of a module of the
package that does not exist fails too (a lazy one would fail only when it runs).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "genie_fast"
# (package name, folder) of every source tree of the package: kernels/ is installed as genie_fast.kernels
SOURCES = ((PACKAGE, ROOT / "genie_fast"), (f"{PACKAGE}.kernels", ROOT / "kernels"))

BASE, OPS, MODELS, SOLVERS, ENGINE, SAMPLING, JOBS, CLI = range(8)
LAYER_NAMES = ("base", "ops", "models", "solvers", "engine", "sampling", "jobs", "cli")
# module (or package: it covers its submodules) -> layer. The root package is matched exactly.
LAYERS = {
    "genie_fast._ext": BASE, "genie_fast.checks": BASE, "genie_fast.profiling": BASE,
    "genie_fast.schedule": BASE, "genie_fast.reference": BASE, "genie_fast.precision": BASE,
    "genie_fast.files": BASE, "genie_fast.layout": BASE, "genie_fast.noise": BASE, "genie_fast.devices": BASE,
    "genie_fast.weights": BASE, "genie_fast.graphs": BASE, "genie_fast.conditioning": BASE,
    "genie_fast.ops": OPS, "genie_fast.kernels": OPS,
    "genie_fast.models": MODELS, "genie_fast.data": MODELS,
    "genie_fast.solvers": SOLVERS,
    "genie_fast.engine": ENGINE, "genie_fast.guidance": ENGINE, "genie_fast.grid_store": ENGINE,
    "genie_fast.sampling": SAMPLING, "genie_fast.tuning": SAMPLING, "genie_fast": SAMPLING,
    "genie_fast.cascade": SAMPLING,
    "genie_fast.generate": JOBS, "genie_fast.training": JOBS, "genie_fast.train": JOBS,
    "genie_fast.distill": JOBS, "genie_fast.distill_diffusers": JOBS, "genie_fast.cli_args": JOBS,
    "genie_fast.store": JOBS, "genie_fast.distributed": JOBS, "genie_fast.cli_cascade": JOBS,
    "genie_fast.cli": CLI,
}
# Upward imports tolerated, (importer, imported) -> why. Keep it to a few, each lazy (inside a
# function) and with the change that would remove it.
ALLOWED_UPWARD = {
    # GaussianMixture.exact_deps (the exact d eps*/d gamma of the test model) borrows the solvers'
    # forward-mode JVP (solvers.exact_deps -> solvers.jvp); moving jvp / exact_deps to a base
    # module (they need only torch and schedule.ode_tangents) would remove this edge.
    ("genie_fast.models.gmm", "genie_fast.solvers"): "models -> solvers: the forward-mode JVP",
}


# --------------------------------------------------------------------------- the checker

def module_files(sources=SOURCES) -> dict[str, Path]:
    """module name -> file of every Python module of the package (a package: its __init__.py)."""
    files = {}
    for pkg, folder in sources:
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if "__pycache__" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join([pkg, *parts])] = path
    return files


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _compiled(pkg: str, name: str, files: dict[str, Path]) -> bool:
    """Whether ``pkg.name`` is a compiled extension module (such as genie_fast._C): not a source module."""
    if pkg not in files or not _is_package(pkg, files):
        return False
    return any(p.name.startswith(name + ".") and p.suffix in (".so", ".pyd") for p in files[pkg].parent.iterdir())


def _lazy_table(tree: ast.Module) -> list[str]:
    """The module names of a top-level ``_LAZY = {name: ".module", ...}`` table (importlib re-exports)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets) \
                and isinstance(node.value, ast.Dict):
            return [v.value for v in node.value.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
    return []


def _resolve(name: str, level: int, importer: str, is_package: bool) -> str:
    """The absolute name of ``from <level dots><name> import ...`` in module ``importer``."""
    if not level:
        return name
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _target(name: str, files: dict[str, Path]) -> str | None:
    """The module of the package that ``name`` (a module or a name in a module) lives in; None: not ours."""
    while name and name not in files:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(files: dict[str, Path] | None = None,
                 broken: list[str] | None = None) -> dict[str, dict[str, tuple[int, bool]]]:
    """importer -> {imported module: (line of the first import, whether every import of it is lazy)}.

    Lazy: inside a function. Only modules of the package are kept; ``from . import <submodule>``
    is an edge to the submodule. ``broken`` (a list) receives the imports of modules of the package
    that do not exist (a lazy ``from .x import y`` left behind by a move fails only when it runs)."""
    files = module_files() if files is None else files
    roots = {name.split(".")[0] for name in files}
    graph = {}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        pkg = _is_package(mod, files)
        edges: dict[str, tuple[int, bool]] = {}

        def add(name, line, lazy):
            target = _target(name, files) if name else None
            if name and name not in files and name.split(".")[0] in roots \
                    and not _compiled(*name.rpartition(".")[::2], files) and broken is not None:
                broken.append(f"{mod}, line {line}: no module {name}")
            if target is None or target == mod:
                return
            first_line, all_lazy = edges.get(target, (line, True))
            edges[target] = (min(first_line, line), all_lazy and lazy)

        def visit(node, lazy):
            for child in ast.iter_child_nodes(node):
                inner = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                if isinstance(child, ast.Import):
                    for alias in child.names:
                        add(alias.name, child.lineno, lazy)
                elif isinstance(child, ast.ImportFrom):
                    src = _resolve(child.module or "", child.level, mod, pkg)
                    for alias in child.names:
                        sub = f"{src}.{alias.name}"
                        if sub in files:
                            add(sub, child.lineno, lazy)
                        elif not _compiled(src, alias.name, files):  # a name defined in module src
                            add(src, child.lineno, lazy)
                visit(child, inner)

        visit(tree, False)
        for rel in _lazy_table(tree):
            level = len(rel) - len(rel.lstrip("."))
            add(_resolve(rel.lstrip("."), level, mod, pkg), 1, True)
        graph[mod] = edges
    return graph


def layer_of(mod: str, layers: dict[str, int] = LAYERS) -> int | None:
    """The layer of module ``mod``: its own entry, else its closest package's (the root only exactly)."""
    name = mod
    while name:
        if name in layers and (name == mod or "." in name):
            return layers[name]
        name = name.rpartition(".")[0]
    return None


def _within(mod: str, name: str) -> bool:
    return mod == name or mod.startswith(name + ".")


def _allowed(mod: str, target: str, allowed) -> bool:
    """Whether the edge mod -> target is in ``allowed`` (an entry for a package covers its modules)."""
    return any(_within(mod, a) and _within(target, b) for a, b in allowed)


def _edges(graph, mod: str, target: str) -> list[tuple[int, bool]]:
    """(line, lazy) of every edge of ``graph`` that the allowed entry (mod, target) covers."""
    return [e for m, edges in graph.items() if _within(m, mod) for t, e in edges.items() if _within(t, target)]


def upward_imports(graph, layers: dict[str, int] = LAYERS, allowed=()) -> list[str]:
    """'importer (layer) -> imported (layer), line N' for every import of a higher layer not allowed."""
    out = []
    for mod, edges in sorted(graph.items()):
        for target, (line, lazy) in sorted(edges.items()):
            lo, hi = layer_of(mod, layers), layer_of(target, layers)
            if lo is not None and hi is not None and hi > lo and not _allowed(mod, target, allowed):
                out.append(f"{mod} ({LAYER_NAMES[lo]}) -> {target} ({LAYER_NAMES[hi]}), line {line}"
                           + (" (lazy)" if lazy else ""))
    return out


def find_cycles(graph) -> list[list[str]]:
    """The import circles: each strongly connected component of more than one module (Tarjan),
    as a sorted list of its modules."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []

    def strong(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                strong(w)
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

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return sorted(cycles)


# --------------------------------------------------------------------------- the package

@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_has_a_layer(graph):
    missing = sorted(m for m in graph if layer_of(m) is None)
    assert not missing, f"modules in no layer (give each a line in LAYERS of {__file__}): {missing}"


def test_no_upward_import(graph):
    bad = upward_imports(graph, allowed=ALLOWED_UPWARD)
    assert not bad, "imports of a higher layer:\n  " + "\n  ".join(bad)


def test_allowed_upward_imports_are_lazy_and_still_needed(graph):
    """Each allowed edge still exists (else it goes from the list), is lazy, and goes up."""
    for (mod, target), why in ALLOWED_UPWARD.items():
        edges = _edges(graph, mod, target)
        assert edges, f"{mod} -> {target} is gone: remove it from ALLOWED_UPWARD"
        assert all(lazy for _, lazy in edges), f"{mod} -> {target} ({why}) must stay inside a function"
        assert layer_of(target) > layer_of(mod), f"{mod} -> {target} is not upward: remove it from the list"
    assert len(ALLOWED_UPWARD) <= 3


def test_every_import_resolves():
    broken = []
    import_graph(broken=broken)
    assert not broken, "imports of modules that do not exist:\n  " + "\n  ".join(broken)


def test_no_import_circle(graph):
    cycles = find_cycles(graph)
    assert not cycles, "import circles: " + "; ".join(
        " <-> ".join(c) + " (" + ", ".join(f"{a} -> {b}" for a in c for b in graph[a] if b in c) + ")"
        for c in cycles)


def test_the_graph_is_read():
    """The reader sees top-level, lazy, relative, ``from . import`` and ``_LAZY`` imports."""
    g = import_graph()
    assert "genie_fast.schedule" in g["genie_fast.ops"]
    assert g["genie_fast.ops"]["genie_fast.kernels"][1]                     # from . import kernels (lazy)
    assert "genie_fast.engine" in g["genie_fast.sampling"]                  # from .engine import ...
    assert "genie_fast.sampling" in g["genie_fast"]                         # _LAZY of the root package
    assert "genie_fast.models.gmm" in g["genie_fast.models"]                # _LAZY of models/
    assert "genie_fast.models.unet" in g["genie_fast.models.head"]          # from .unet import ...
    assert "genie_fast.schedule" in g["genie_fast.kernels._common"]         # kernels/: absolute import
    assert not any(m.endswith("._C") for m in g["genie_fast._ext"]) and "genie_fast" not in g["genie_fast._ext"]


# --------------------------------------------------------------------------- the checker fails

def test_checker_finds_upward_edges_and_circles(tmp_path):
    """A synthetic package: base <- low <- high, with an upward import (low -> high, lazy) and a
    circle (high.a <-> high.b); the checker names both, and the allow-list silences the first."""
    pkg = tmp_path / "toy"
    (pkg / "high").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text("import os\n")
    (pkg / "low.py").write_text("from .base import x\n\ndef f():\n    from .high import a\n")
    (pkg / "high" / "__init__.py").write_text("")
    (pkg / "high" / "a.py").write_text("from . import b\nfrom ..base import y\n")
    (pkg / "high" / "b.py").write_text("import toy.high.a\n")
    files = module_files((("toy", pkg),))
    g = import_graph(files)
    assert g["toy.low"] == {"toy.base": (1, False), "toy.high.a": (4, True)}
    layers = {"toy": 9, "toy.base": 0, "toy.low": 1, "toy.high": 2}
    up = upward_imports(g, layers)
    assert up == ["toy.low (ops) -> toy.high.a (models), line 4 (lazy)"], up
    assert upward_imports(g, layers, allowed={("toy.low", "toy.high.a")}) == []
    assert find_cycles(g) == [["toy.high.a", "toy.high.b"]]
    # base imports low (upward): base -> low -> high.a -> base closes a circle through the layers
    (pkg / "base.py").write_text("from . import low\n")
    g = import_graph(files)
    assert find_cycles(g) == [["toy.base", "toy.high.a", "toy.high.b", "toy.low"]]
    assert "toy.base (base) -> toy.low (ops), line 1" in upward_imports(g, layers)
    (pkg / "high" / "b.py").write_text("def f():\n    from .gone import x\n    from .. import _C\n")
    (pkg / "_C.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    broken = []
    import_graph(files, broken)
    assert broken == ["toy.high.b, line 2: no module toy.high.gone"], broken
    assert layer_of("toy.high.a", layers) == 2 and layer_of("toy.other", {"toy": 9}) is None


def test_pyproject_lists_every_package():
    """A non-editable install ships only the packages pyproject.toml names: every folder of
    genie_fast/ with an __init__.py (and the data-only assets, and kernels/ as genie_fast.kernels)
    must be listed, or the installed package misses modules the editable one has."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (the package supports 3.10)

    root = Path(__file__).resolve().parent.parent
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "genie_fast").rglob("__init__.py")}
    assert found <= listed, f"pyproject.toml packages misses {sorted(found - listed)}"
    assert {"genie_fast.assets", "genie_fast.kernels"} <= listed
