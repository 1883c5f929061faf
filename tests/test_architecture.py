"""The rules of docs/architecture.md that a test can check, read from the source as text (ast):
no import cycles between pixgen's modules; the store knows no stage; no stage imports the CLI,
the pipeline or the stage registry; the pipeline does not import the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pixgen"
# Modules that are not stages: the tools around them and the pieces every stage may use.
FRAME = {"cli", "pipeline", "stages", "__main__"}
FOUNDATION = {"assets", "config", "processes", "progress"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[1:-1] if parts[-1] == "__init__" else parts[1:]) or "__init__"


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                targets = [".".join(base)] + [".".join([*base, a.name]) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pixgen"):
                targets = [node.module.removeprefix("pixgen").lstrip(".")] + [f"{node.module.removeprefix('pixgen').lstrip('.')}.{a.name}".lstrip(".") for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix("pixgen").lstrip(".") for a in node.names if a.name.startswith("pixgen")]
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    found.add(target)
        graph[name] = found
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_store_knows_no_stage():
    graph = import_graph()
    assert graph["assets"] <= FOUNDATION, graph["assets"]


def test_stages_never_import_the_cli_the_pipeline_or_the_registry():
    graph = import_graph()
    for name, deps in graph.items():
        if name not in FRAME:
            assert not deps & FRAME, f"{name} imports {deps & FRAME}"
    assert "cli" not in graph["pipeline"]
