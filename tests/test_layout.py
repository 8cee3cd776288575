"""The code's shape: no import cycles, layers that import only downwards, no hidden local imports.

``shared`` is imported by both sides and imports neither; ``producers`` (the training
process) never imports ``workers``; project modules import each other at the top of a
file, so the graph below is the whole truth (heavy third-party libraries such as the
ClearML SDK, torch and ultralytics may be imported where they are needed).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "producers", "workers")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


def project_imports(tree: ast.AST) -> list[tuple[str, bool]]:
    """(module, at top level) for every import of a project module."""
    found = []
    top = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            found += [(node.module, id(node) in top)]
            found += [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names if a.name.split(".")[0] in PACKAGES]
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        edges[name] = {target for target, _ in project_imports(tree) if target in mods and target != name}
    return edges


def test_project_modules_import_each_other_only_at_the_top_of_a_file():
    local = [
        f"{name}: {target}"
        for name, path in modules().items()
        for target, at_top in project_imports(ast.parse(path.read_text()))
        if not at_top
    ]
    assert not local, local


def test_layers_import_only_downwards():
    wrong = [
        (name, target)
        for name, targets in graph().items()
        for target in targets
        if (name.startswith("shared") and not target.startswith("shared"))
        or (name.startswith("producers") and target.startswith("workers"))
    ]
    assert not wrong, wrong


def test_no_import_cycles():
    edges = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target] if target in path else [node, target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, cycles


def test_dotted_paths_stored_outside_the_code_still_resolve():
    """Queued jobs name workers.drain_job.drain; users' command lines -w workers.rq_worker.Worker."""
    import importlib
    import subprocess
    import sys

    from workers.pipeline.drain_job import drain
    from workers.pipeline.rq_worker import SimpleWorker, Worker

    assert importlib.import_module("workers.drain_job").drain is drain
    old = importlib.import_module("workers.rq_worker")
    assert (old.Worker, old.SimpleWorker) == (Worker, SimpleWorker)
    for module in ("workers.cli", "producers.drain"):
        out = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
