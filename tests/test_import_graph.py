"""The layout's import rule (docs/DESIGN.md): imports run one way,
`cluster`/`bench` -> `workers` -> `router` | `engine` | `kvtransfer` -> `kernels` | `protocol`,
with no circle between packages or between modules. Every import counts, also those inside
functions or under `TYPE_CHECKING` (a circle hidden there is still a circle)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Lower layers never import higher ones; packages of one layer do not import each other.
LAYER = {"protocol": 0, "kernels": 0, "engine": 1, "router": 1, "kvtransfer": 1, "workers": 2,
         "cluster": 3, "bench": 3}


def _modules() -> dict[str, Path]:
    """`tandem.<package>.<module>` -> file, for every Python file of the product's folders."""
    found = {}
    for package in LAYER:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[0] == "bench" and len(parts) > 1 and parts[1] in {"probes", "checks"}:
                continue  # scripts, not imported by anything
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(("tandem", *parts))] = path
    return found


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The Tandem modules `path` imports (a `from X import name` of a submodule counts it)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("tandem."):
                out.add(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) - {name} for name, path in modules.items()}


def _package(module: str) -> str:
    return module.split(".")[1]


def test_imports_run_downward_only():
    wrong = sorted(f"{src} imports {dst}" for src, dsts in _graph().items() for dst in dsts
                   if _package(src) != _package(dst) and not LAYER[_package(dst)] < LAYER[_package(src)])
    assert wrong == []


def test_no_import_circle_between_modules():
    graph = _graph()
    # Packages import their own `__init__` implicitly; an `__init__` re-exporting its modules is
    # not a circle with them.
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_rule_sees_a_wrong_import(tmp_path):
    """The parser finds imports hidden inside functions."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from tandem.workers.app import build_app\n")
    modules = _modules()
    assert _imports(source, modules) == {"tandem.workers.app"}
