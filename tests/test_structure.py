"""Facts about the package's structure, checked on its source (ast, no import of the package):
no import cycle between its modules, the runtime never imports a pass, and the environment is
read in one module only (``snlp_compile.options``)."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

PACKAGE = Path(__file__).resolve().parent.parent / "snlp_compile"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports, anywhere in it (function-level imports included):
    ``from a import b`` names the module a.b when there is one, else a."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in modules else target)
    return {m for m in found if m in modules and m != name}


def import_graph() -> nx.DiGraph:
    modules = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(modules)
    for name, path in modules.items():
        graph.add_edges_from((name, target) for target in _imports(name, path, modules))
    return graph


def test_no_import_cycle() -> None:
    cycles = list(nx.simple_cycles(import_graph()))
    assert not cycles, f"import cycles: {cycles}"


def test_runtime_never_imports_a_pass() -> None:
    graph = import_graph()
    runtime = [n for n in graph if n.startswith("snlp_compile.solve")]
    for module in runtime:
        reached = nx.descendants(graph, module)
        passes = sorted(m for m in reached if m.startswith("snlp_compile.passes"))
        assert not passes, f"{module} imports the passes {passes}"


def test_ir_imports_no_pass_and_no_runtime() -> None:
    graph = import_graph()
    for module in (n for n in graph if n.startswith("snlp_compile.ir")):
        reached = nx.descendants(graph, module)
        bad = sorted(m for m in reached if m.startswith(("snlp_compile.passes", "snlp_compile.solve")))
        assert not bad, f"{module} imports {bad}"


def test_environment_read_in_one_module() -> None:
    readers = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("environ", "getenv")
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
            ):
                readers.append(_module_name(path))
    assert set(readers) <= {"snlp_compile.options"}, sorted(set(readers))


def test_models_import_no_compiler() -> None:
    """The reference models use the op library (``kernels``) and nothing of the compiler."""
    graph = import_graph()
    compiler = ("snlp_compile.passes", "snlp_compile.solve", "snlp_compile.ir", "snlp_compile.pipeline")
    for module in (n for n in graph if n.startswith("snlp_compile.models")):
        reached = nx.descendants(graph, module)
        bad = sorted(m for m in reached if m.startswith(compiler) or m == "snlp_compile.api")
        assert not bad, f"{module} imports {bad}"
        direct = {
            m
            for m in graph.successors(module)
            if m.startswith("snlp_compile.") and not m.startswith("snlp_compile.models")
        }
        assert direct <= {"snlp_compile.kernels.attention", "snlp_compile.errors"}, (module, sorted(direct))


def test_no_submodule_is_named_like_a_public_name() -> None:
    """``import snlp_compile.X`` binds the module as the package's attribute X; were X also a
    public function (``snlp_compile.generate``), a script that imported the module first would
    find the module where it calls the function."""
    tree = ast.parse((PACKAGE / "__init__.py").read_text())
    public = next(
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
    )
    submodules = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    assert not submodules & set(public), sorted(submodules & set(public))


def test_the_periphery_shows_todays_truth() -> None:
    """Issue 21's countable facts: BENCHMARKS.md one page (under 200 lines), fewer than 40 tracked
    result files, no run-numbered scripts (history lives in git and docs/benchmark-history.md)."""
    root = PACKAGE.parent
    lines = len((root / "BENCHMARKS.md").read_text().splitlines())
    assert lines < 200, f"BENCHMARKS.md has {lines} lines: keep it to today's results"
    results = [p for p in (root / "benchmarks" / "results").rglob("*") if p.is_file()]
    assert len(results) < 40, f"{len(results)} files under benchmarks/results/"
    numbered = [p.name for p in root.rglob("run[0-9]*.sh") if ".venv" not in p.parts]
    assert not numbered, numbered
