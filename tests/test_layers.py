"""The layering of ptx (docs/design.md, "Layers"), read from the source with ast: every import statement counts,
module-level or inside a function; imports under `if TYPE_CHECKING:` do not (they never run).

    cli/, __main__                     cli/: the only click user (a package: options, commands, servers)
    stages/*  (run_study, one module per stage)
    report    sweep/                   sweep/: the only Ray user (a package: cluster, experiment, tuner, trials,
                 |                             groups, finalisation, pools, faults)
              plan                     study planning without Ray (requests, groups, plan, sweep settings)
                 |
              prompt_runs
    track                              the only MLflow user
    library   (everything else: tasks backbones data prompt train ... figures config)

A module may import its own layer and the layers below it, never above; and there is no import cycle. A package
(cli/, sweep/, stages/) counts as one place: its modules share its rules and may import each other. The report
is two modules, report_data (the data it renders) and report. A name with a leading underscore stays inside its
module: no other ptx module imports it or reads it as `module._name`.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "ptx"

# the adapters, each a module or a package (every module under it)
ADAPTERS = ("ptx.track", "ptx.sweep", "ptx.plan", "ptx.prompt_runs", "ptx.report", "ptx.report_data")
TOP = ("ptx.cli", "ptx.__main__")  # the CLI package and `python -m ptx`
# what no library module may import: the MLflow and Ray adapters, planning, the stages, the report, the CLI
NOT_FOR_LIBRARY = ("ptx.track", "ptx.sweep", "ptx.plan", "ptx.prompt_runs", "ptx.report", "ptx.report_data",
                   "ptx.stages", "ptx.cli")
# per adapter, the ptx modules (or packages) above its layer it must not import
ADAPTER_MUST_NOT = {
    "ptx.track": ("ptx.sweep", "ptx.plan", "ptx.prompt_runs", "ptx.report", "ptx.report_data", "ptx.stages",
                  "ptx.cli"),
    "ptx.prompt_runs": ("ptx.sweep", "ptx.plan", "ptx.report", "ptx.report_data", "ptx.stages", "ptx.cli"),
    # planning never reaches the Ray adapter
    "ptx.plan": ("ptx.sweep", "ptx.report", "ptx.report_data", "ptx.stages", "ptx.cli"),
    "ptx.sweep": ("ptx.report", "ptx.report_data", "ptx.stages", "ptx.cli"),
    "ptx.report": ("ptx.sweep", "ptx.plan", "ptx.prompt_runs", "ptx.stages", "ptx.cli"),
    "ptx.report_data": ("ptx.sweep", "ptx.plan", "ptx.prompt_runs", "ptx.report", "ptx.stages", "ptx.cli"),
}
# third-party packages with one home each (a module, or a package and every module under it)
ONLY_IN = {"mlflow": ("ptx.track",), "ray": ("ptx.sweep",), "click": ("ptx.cli",)}

# Imports that break a rule today and are being removed; the test fails when one goes (drop it here) or a new
# violation appears. Each entry: (importer, imported).
KNOWN_EXCEPTIONS: set = set()


# Private names used across modules: none left; an entry (user, "module._name") would mark one being removed.
KNOWN_PRIVATE_USES: set = set()


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
            if top in ONLY_IN and not _under(mod, ONLY_IN[top]):
                bad.add((mod, top))
            if not imp.startswith("ptx."):
                continue
            adapter = next((a for a in ADAPTERS if _under(mod, (a,))), None)
            if _under(mod, ("ptx.stages",)) or _under(mod, TOP):
                if _under(imp, ("ptx.cli",)) and not _under(mod, TOP):  # the CLI's own modules and __main__ may
                    bad.add((mod, imp))
            elif adapter is not None:
                if _under(imp, ADAPTER_MUST_NOT[adapter]):
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


def tracker_constructions(root: Path = ROOT) -> list[str]:
    """'path:line' of every call to MlflowTracker (bare or as an attribute) under `root`, but in track.py."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).as_posix()
        if rel == f"{root.name}/track.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
                if name == "MlflowTracker":
                    out.append(f"{rel}:{node.lineno}")
    return out


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_every_module_and_function_level_imports(graph):
    assert {"ptx.track", "ptx.sweep", "ptx.cli", "ptx.figures", "ptx.stages", "ptx.stages.tpt",
            "ptx.tasks", "ptx.tasks.sources"} <= set(graph)
    def tops(package):  # what the modules of a package (or a module) import, by top-level name
        return {n.split(".")[0] for mod, names in graph.items() if _under(mod, (package,)) for n in names}

    assert "mlflow" in tops("ptx.track") and "ray" in tops("ptx.sweep") and "click" in tops("ptx.cli")
    assert "ptx.sweep" in graph["ptx.stages"]  # imported inside open_study's body
    assert "ptx.tasks" not in graph["ptx.tasks.sources"]  # only under TYPE_CHECKING


def test_no_import_cycles(graph):
    assert cycles(graph) == []


def test_layering_rules_hold_but_for_the_known_exceptions(graph):
    found = violations(graph)
    assert found - KNOWN_EXCEPTIONS == set(), "new layering violations"
    assert KNOWN_EXCEPTIONS - found == set(), "fixed: remove these from KNOWN_EXCEPTIONS"


def test_mlflow_tracker_is_constructed_only_in_track():
    # MlflowTracker is constructed only in ptx/track.py: everything else calls track.open or TrackerRef.open()
    found = tracker_constructions()
    assert found == [], "construct trackers with track.open(uri, experiment, workdir) or TrackerRef(...).open()"


def test_the_tracker_construction_scan_finds_planted_calls(tmp_path):
    pkg = tmp_path / "ptx"
    (pkg / "stages").mkdir(parents=True)
    (pkg / "track.py").write_text("class MlflowTracker: ...\ndef open(u):\n    return MlflowTracker(u)\n")
    (pkg / "stages" / "a.py").write_text("from ptx import track\n\ndef f(u):\n    return track.MlflowTracker(u)\n")
    (pkg / "b.py").write_text("from ptx.track import MlflowTracker as M, MlflowTracker\nx = MlflowTracker('u')\n")
    assert tracker_constructions(pkg) == ["ptx/b.py:2", "ptx/stages/a.py:4"]


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


def test_ray_and_click_stay_inside_their_packages(graph):
    """Ray only inside ptx/sweep/, click only inside ptx/cli/: no module elsewhere imports them, and no module
    outside the CLI imports a module of the CLI package."""
    for package, top in (("ptx.sweep", "ray"), ("ptx.cli", "click")):
        outside = {mod for mod, names in graph.items() if not _under(mod, (package,))
                   and any(n.split(".")[0] == top for n in names)}
        assert outside == set(), f"{top} imported outside {package}"
    assert {m for m, names in graph.items() if not _under(m, TOP) and any(_under(n, ("ptx.cli",)) for n in names)} \
        == set()


def test_planning_reaches_no_ray(graph):
    """ptx.plan (what `ptx run --dry-run` and the stages plan with) reaches neither Ray nor the Ray adapter
    through anything it imports, directly or not."""
    seen, todo = set(), ["ptx.plan"]
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        todo.extend(n for n in graph.get(mod, ()) if n in graph)
    reached = {n for m in seen for n in graph[m]}
    assert not {n for n in reached if n.split(".")[0] == "ray" or _under(n, ("ptx.sweep",))}, sorted(seen)


def test_the_checker_follows_packages(tmp_path):
    """The rules hold for packages: Ray anywhere under ptx/sweep/ and click anywhere under ptx/cli/ pass, their
    modules import each other; Ray in ptx.plan, ptx.plan importing the Ray adapter, a library module importing
    ptx.plan and a stage importing a CLI module are caught."""
    pkg = tmp_path / "ptx"
    for sub in ("stages", "sweep", "cli"):
        (pkg / sub).mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "stages" / "__init__.py").write_text("from ptx.cli import options\n")
    (pkg / "sweep" / "__init__.py").write_text("from ptx.sweep import pools\n")
    (pkg / "sweep" / "pools.py").write_text("import ray\nfrom ptx import plan, track\n")
    (pkg / "cli" / "__init__.py").write_text("from ptx.cli import options\n")
    (pkg / "cli" / "options.py").write_text("import click\nfrom ptx import sweep\n")
    (pkg / "plan.py").write_text("import ray.tune\nfrom ptx.sweep import pools\n")
    (pkg / "track.py").write_text("import mlflow\n")
    (pkg / "data.py").write_text("from ptx.plan import plan\n")
    g = import_graph(pkg)
    assert violations(g) == {("ptx.stages", "ptx.cli.options"), ("ptx.plan", "ray"), ("ptx.plan", "ptx.sweep.pools"),
                             ("ptx.data", "ptx.plan")}
