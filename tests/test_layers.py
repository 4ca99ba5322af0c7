"""The layering of ptx (docs/design.md, "Layers"), read from the source with ast: every import statement counts,
module-level or inside a function; imports under `if TYPE_CHECKING:` do not (they never run).

    cli, __main__                      the only click user
    stages/*  (run_study, one module per stage)
    report (report_data, the data it renders)    prompt_runs    sweep     sweep: the only Ray user
    track                              the only MLflow user
    library   (everything else: tasks backbones data prompt train ... figures config)

A module may import its own layer and the layers below it, never above; and there is no import cycle. A name with
a leading underscore stays inside its module: no other ptx module imports it or reads it as `module._name`.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "ptx"

ADAPTERS = {"ptx.track", "ptx.sweep", "ptx.prompt_runs", "ptx.report", "ptx.report_data"}
TOP = {"ptx.cli", "ptx.__main__"}
# what no library module may import: the MLflow and Ray adapters, the stages, the report, the CLI
NOT_FOR_LIBRARY = ("ptx.track", "ptx.sweep", "ptx.prompt_runs", "ptx.report", "ptx.report_data", "ptx.stages",
                   "ptx.cli")
# per adapter, the ptx modules (or packages) above its layer it must not import
ADAPTER_MUST_NOT = {
    "ptx.track": ("ptx.sweep", "ptx.prompt_runs", "ptx.report", "ptx.report_data", "ptx.stages", "ptx.cli"),
    "ptx.prompt_runs": ("ptx.sweep", "ptx.report", "ptx.report_data", "ptx.stages", "ptx.cli"),
    "ptx.sweep": ("ptx.report", "ptx.report_data", "ptx.stages", "ptx.cli"),
    "ptx.report": ("ptx.sweep", "ptx.prompt_runs", "ptx.stages", "ptx.cli"),
    "ptx.report_data": ("ptx.sweep", "ptx.prompt_runs", "ptx.report", "ptx.stages", "ptx.cli"),
}
# third-party packages with one home each
ONLY_IN = {"mlflow": {"ptx.track"}, "ray": {"ptx.sweep"}, "click": {"ptx.cli"}}

# Imports that break a rule today and are being removed; the test fails when one goes (drop it here) or a new
# violation appears. Each entry: (importer, imported).
KNOWN_EXCEPTIONS: set = set()


# Private names still used across modules, being removed; the test fails when one goes or a new one appears.
# Each entry: (user, "module._name").
KNOWN_PRIVATE_USES = {
    ("ptx.stages.tpt", "ptx.stages.transfer._study_tracker"),  # goes with the tracker seam (track.open)
}


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file of every module under `root` (a package's __init__.py is the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _type_checking_nodes(tree) -> set:
    """The ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                skip.update(id(n) for n in ast.walk(stmt))
    return skip


def imports_of(name: str, path: Path, modules) -> set[str]:
    """Every module `path` imports at run time: absolute names; `from a import b` counts as a.b when that is a
    module. The root package `ptx` is left out (it holds __version__ and a lazy re-export, nothing of a layer)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            subs = {f"{mod}.{a.name}" for a in node.names} & set(modules)
            out.update(subs or {mod})
    return out - {name, ROOT.name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """ptx module -> every name it imports (ptx modules and third-party packages)."""
    modules = module_names(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def _under(name: str, prefixes) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) for every import that breaks a layering rule."""
    bad = set()
    for mod, names in graph.items():
        for imp in names:
            top = imp.split(".")[0]
            if top in ONLY_IN and mod not in ONLY_IN[top]:
                bad.add((mod, top))
            if not imp.startswith("ptx."):
                continue
            if _under(mod, ("ptx.stages",)) or mod in TOP:
                if _under(imp, ("ptx.cli",)) and mod != "ptx.__main__":
                    bad.add((mod, imp))
            elif mod in ADAPTERS:
                if _under(imp, ADAPTER_MUST_NOT[mod]):
                    bad.add((mod, imp))
            elif _under(imp, NOT_FOR_LIBRARY):
                bad.add((mod, imp))
    return bad


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")  # dunders (__version__) are public by convention


def private_uses(root: Path = ROOT) -> set[tuple[str, str]]:
    """(user, "module._name") for every private name of one ptx module that another imports (`from ptx.b import
    _x`) or reads as an attribute of the module (`b._x`, `ptx.b._x`, after `from ptx import b` or `import ptx.b`)."""
    modules = module_names(root)
    out = set()
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        local = {}  # a name bound to a ptx module in this file -> that module
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules:
                        local[a.asname or a.name] = a.name
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                for a in node.names:
                    if f"{mod}.{a.name}" in modules:
                        local[a.asname or a.name] = f"{mod}.{a.name}"
                    elif _private(a.name) and mod in modules and mod != name:
                        out.add((name, f"{mod}.{a.name}"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and _private(node.attr):
                owner = ast.unparse(node.value)
                owner = local.get(owner, owner if owner in modules else None)
                if owner is not None and owner != name:
                    out.add((name, f"{owner}.{node.attr}"))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one ptx module (Tarjan)."""
    edges = {m: sorted(i for i in names if i in graph) for m, names in graph.items()}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_every_module_and_function_level_imports(graph):
    assert {"ptx.track", "ptx.sweep", "ptx.cli", "ptx.figures", "ptx.stages", "ptx.stages.tpt",
            "ptx.tasks", "ptx.tasks.sources"} <= set(graph)
    def tops(mod):
        return {n.split(".")[0] for n in graph[mod]}

    assert "mlflow" in tops("ptx.track") and "ray" in tops("ptx.sweep") and "click" in tops("ptx.cli")
    assert "ptx.sweep" in graph["ptx.stages"]  # imported inside open_study's body
    assert "ptx.tasks" not in graph["ptx.tasks.sources"]  # only under TYPE_CHECKING


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_layering_rules_hold_but_for_the_known_exceptions(graph):
    found = violations(graph)
    assert found - KNOWN_EXCEPTIONS == set(), "new layering violations"
    assert KNOWN_EXCEPTIONS - found == set(), "fixed: remove these from KNOWN_EXCEPTIONS"


def test_no_private_name_crosses_a_module_seam_but_the_known_ones():
    found = private_uses()
    assert found - KNOWN_PRIVATE_USES == set(), "private names used across modules: make them public or move the code"
    assert KNOWN_PRIVATE_USES - found == set(), "fixed: remove these from KNOWN_PRIVATE_USES"


def test_the_private_name_check_finds_planted_uses(tmp_path):
    """`from ptx.b import _x`, `b._x` after `from ptx import b`, `ptx.b._y` after `import ptx.b` and a relative
    import are caught; a module's own private names, dunders and private attributes of objects are not."""
    pkg = tmp_path / "ptx"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("__version__ = '0'\n")
    (pkg / "b.py").write_text("_x = 1\n_y = 2\nclass C:\n    _z = 3\nprint(_x)\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..b import _y\nfrom ptx import __version__\n")
    (pkg / "a.py").write_text("from ptx.b import _x, C\nfrom ptx import b\nimport ptx.b\n"
                              "def f():\n    return b._y, ptx.b._y, C._z, C()._z\n")
    assert private_uses(pkg) == {("ptx.a", "ptx.b._x"), ("ptx.a", "ptx.b._y"), ("ptx.sub.c", "ptx.b._y")}


def test_the_checker_finds_planted_violations(tmp_path):
    """The rules are not vacuous: a library module importing sweep and mlflow in a function, a cycle, click in a
    stage and a relative import are all caught."""
    pkg = tmp_path / "ptx"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("from . import train\n")
    (pkg / "stages" / "train.py").write_text("import click\nfrom ptx import sweep\n")
    (pkg / "sweep.py").write_text("import ray\nfrom ptx import data\n")
    (pkg / "data.py").write_text("def f():\n    import mlflow\n    from ptx.sweep import go\n")
    (pkg / "prompt.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ptx import sweep\n")
    g = import_graph(pkg)
    assert g["ptx.stages"] == {"ptx.stages.train"}
    assert violations(g) == {("ptx.data", "mlflow"), ("ptx.data", "ptx.sweep"), ("ptx.stages.train", "click")}
    assert cycles(g) == [["ptx.data", "ptx.sweep"]]
