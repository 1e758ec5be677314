"""ldbfx's modules import each other one way: no circle, and only downwards in a declared layer order.

Read from the source with ``ast`` (nothing is imported, torch neither), counting every import of an
ldbfx module: top-level, inside functions and under ``if TYPE_CHECKING:`` alike (a type-level loop
is still a loop for a reader). ``from . import x`` imports the module ``ldbfx.x`` where there is one.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ldbfx"

# From the bottom up. A module may import from its own layer and the layers below it, never from
# one above. ``name.*`` is a subpackage: the package and every module in it.
LAYERS = [
    # Foundations: the exceptions and the frozen records (Layer, Branch, TransformConfig, Capture)
    # that the pass builds and the run time stores. They import nothing else of ldbfx.
    {"ldbfx.errors", "ldbfx.records"},
    # Capture: torch.fx tracing and torch.export, and the facts of a capture the run time checks
    # again (a module's hooks, the autocast in effect).
    {"ldbfx.capture.*"},
    # Run-time state: the drop mask and what the ops and the optimizer hook read beside it.
    {"ldbfx.runtime", "ldbfx.runtime.state"},
    # Ops: the functions a rewritten graph calls, their kernels and the native build.
    {"ldbfx.ops.*"},
    # The transformed module and the run-time API on it (layer and branch drops, rows, measuring
    # passes, DDP helpers).
    {"ldbfx.runtime.module", "ldbfx.runtime.mask", "ldbfx.runtime.branch_mask", "ldbfx.runtime.distributed",
     "ldbfx.runtime.measure"},
    # Rewrite rules: the handlers per op family and the Rewriter they emit into (the analysis
    # reads them to tell layers apart).
    {"ldbfx.rewrite", "ldbfx.rewrite.handlers"},
    # Analysis: the layers and the residual branches of a captured graph.
    {"ldbfx.analysis.*"},
    # The pass driver (ldbfx.transform) and the graph surgery of branch drop it runs.
    {"ldbfx.rewrite.driver", "ldbfx.rewrite.gates"},
    # Policies and integrations built on the public API.
    {"ldbfx.policies.*", "ldbfx.integrations.*"},
    # The package's namespace, and the old names of moved modules (which import all of the above).
    {"ldbfx", "ldbfx.moved"},
    # The application (the app extra): training loop, data, CLI, demos, benchmark harnesses.
    {"ldbfx.app.*", "ldbfx.__main__"},
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("ldbfx", *path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _layer_of(module: str) -> int | None:
    for k, layer in enumerate(LAYERS):
        for entry in layer:
            if module == entry or (entry.endswith(".*") and (module == entry[:-2] or module.startswith(entry[:-1]))):
                return k
    return None


def _owner(name: str) -> str | None:
    """The ldbfx module ``name`` lies in (``ldbfx.ops.path._aten`` -> ``ldbfx.ops.path``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path):
    """``(line, target module, names)`` for each import of an ldbfx module; ``names`` are the
    names taken from the target (empty for an import of the module itself)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _owner(alias.name) if alias.name.split(".")[0] == "ldbfx" else None
                if target:
                    yield node.lineno, target, ()
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = module.split(".") if is_package else module.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != "ldbfx":
                continue
            names = []
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:  # `from . import ops`: the module ldbfx.ops
                    yield node.lineno, f"{base}.{alias.name}", ()
                else:
                    names.append(alias.name)
            if names and _owner(base):
                yield node.lineno, _owner(base), tuple(names)


IMPORTS = {m: [(line, t, names) for line, t, names in _imports(m, p) if t != m] for m, p in MODULES.items()}


def _circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle():
    edges = {m: {t for _, t, _ in imports} for m, imports in IMPORTS.items()}
    circles = _circles(edges)
    assert not circles, "import circles (each counts top-level, function-local and TYPE_CHECKING imports):\n" + "\n".join(
        f"  {len(c)} modules: {', '.join(c)}; edges inside: "
        + "; ".join(f"{m} -> {t}" for m in c for t in sorted(edges[m]) if t in c) for c in circles)


def test_every_module_has_a_layer():
    missing = sorted(m for m in MODULES if _layer_of(m) is None)
    assert not missing, f"modules in no layer: {missing}; add each to LAYERS in {Path(__file__).name}"


def test_imports_point_down_the_layers():
    upward = []
    for module, imports in sorted(IMPORTS.items()):
        own = _layer_of(module)
        for line, target, names in imports:
            theirs = _layer_of(target)
            if own is not None and theirs is not None and theirs > own:
                what = f"from {target} import {', '.join(names)}" if names else f"import {target}"
                upward.append(f"  {MODULES[module].relative_to(PACKAGE.parent)}:{line}: {what} "
                              f"({module} is in layer {own}, {target} in layer {theirs})")
    assert not upward, "imports up the layers (see LAYERS):\n" + "\n".join(upward)


def _all(module: str) -> set[str] | None:
    """The names a module lists in ``__all__`` (None without one)."""
    for node in ast.parse(MODULES[module].read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return {e.value for e in node.value.elts if isinstance(e, ast.Constant)}
    return None


def crossings() -> list[str]:
    """Imports of a name another layer's module does not list in its ``__all__``."""
    found = []
    for module, imports in sorted(IMPORTS.items()):
        for line, target, names in imports:
            if not names or _layer_of(module) == _layer_of(target):
                continue
            public = _all(target) or set()
            for name in names:
                if name not in public:
                    found.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line}: {module} imports "
                                 f"{target}.{name}, not in its __all__")
    return found


def test_imports_across_layers_use_public_names():
    # A layer's interface is what its modules list in __all__: an import of anything else from
    # another layer (a private helper, an internal table) couples the two where no one looks.
    found = crossings()
    assert not found, "imports of names outside the target's __all__, across layers:\n" + "\n".join(found)
