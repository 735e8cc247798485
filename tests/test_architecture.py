"""The import graph of the packages, read with `ast`: no import cycle (TYPE_CHECKING and function-level
imports count too), and each package imports only what its layer may:

- engine.shared: settings, messages, IPC, child plumbing; imports nothing of ours outside itself.
- scheduler_proc, detokenizer_proc: separate processes; themselves and engine.shared only.
- tokenizer_proc: the frontend's request handling; itself and engine.shared only.
- engine (the rest): the frontend; anything but the process packages, which it starts by module name.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "tokenizer_proc", "scheduler_proc", "detokenizer_proc")
ALLOWED = {  # layer -> layers it may import
    "engine.shared": {"engine.shared"},
    "scheduler_proc": {"scheduler_proc", "engine.shared"},
    "detokenizer_proc": {"detokenizer_proc", "engine.shared"},
    "tokenizer_proc": {"tokenizer_proc", "engine.shared"},
    "engine": {"engine", "engine.shared", "tokenizer_proc"},
}


def layer(module: str) -> str:
    return "engine.shared" if module.startswith("engine.shared") else module.split(".")[0]


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (anywhere in its body)."""
    paths = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            name = ".".join(path.relative_to(root).with_suffix("").parts)
            paths[name.removesuffix(".__init__")] = path

    def resolve(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in paths.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(resolve(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".")
                    keep = len(parts) - node.level + (1 if path.name == "__init__.py" else 0)
                    base = ".".join(parts[:keep] + ([node.module] if node.module else []))
                deps.update(resolve(f"{base}.{alias.name}") or resolve(base) for alias in node.names)
        graph[module] = {d for d in deps if d and d != module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def forbidden(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer(d) not in ALLOWED[layer(m)])


def test_no_import_cycles() -> None:
    assert cycles(import_graph(ROOT)) == []


def test_processes_import_only_shared_definitions() -> None:
    assert forbidden(import_graph(ROOT)) == []


def _plant(tmp_path: Path, files: dict[str, str]) -> dict[str, set[str]]:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return import_graph(tmp_path)


def test_checker_finds_a_planted_cycle_and_forbidden_import(tmp_path: Path) -> None:
    graph = _plant(
        tmp_path,
        {
            "engine/__init__.py": "",
            "engine/shared/__init__.py": "",
            "engine/shared/args.py": "",
            "engine/shared/ipc.py": "import engine.engine\n",
            "engine/engine.py": "from engine.shared import args\nimport tokenizer_proc\n",
            "scheduler_proc/__init__.py": "",
            "scheduler_proc/a.py": "import typing\nif typing.TYPE_CHECKING:\n    from scheduler_proc.b import B\n",
            "scheduler_proc/b.py": "from . import a\nfrom engine.shared.args import X\n",
            "detokenizer_proc/__init__.py": "",
            "detokenizer_proc/d.py": "def f():\n    from scheduler_proc.a import A\n",
            "tokenizer_proc/__init__.py": "",
        },
    )
    assert cycles(graph) == [["scheduler_proc.a", "scheduler_proc.b"]]
    assert forbidden(graph) == ["detokenizer_proc.d -> scheduler_proc.a", "engine.shared.ipc -> engine.engine"]


def test_only_engine_ray_imports_ray() -> None:
    """ray is an optional extra: no other module may need it."""
    importers = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and not node.level:
                    names = [node.module or ""]
                if any(name == "ray" or name.startswith("ray.") for name in names):
                    importers.append(str(path.relative_to(ROOT)))
    assert set(importers) <= {"engine/ray.py"}, importers
