"""The import graph: no cycles between ldmrt's modules or its packages, and a torch-free runtime.

Every `import` and `from ... import` of an ldmrt module counts, wherever it stands in the file (top
level, inside a function, under TYPE_CHECKING): a lazy import is still a dependency. The files are
parsed with `ast`, never imported.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_names(root: Path, package: str) -> dict[str, Path]:
    """Every module of `package` under `root`: dotted name -> file (a package is its __init__.py)."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _imported(node: ast.AST, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The known modules one import statement names (`from x import y`: x.y where y is a module)."""
    if isinstance(node, ast.Import):
        return [_known_prefix(alias.name, known) for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    found = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in known]
    if len(found) < len(node.names):     # some names are attributes of `source` itself
        found.append(_known_prefix(source, known))
    return found


def _known_prefix(name: str, known: set[str]) -> str:
    """The longest known module `name` lies in ('' when none: not ours)."""
    parts = name.split(".")
    while parts and ".".join(parts) not in known:
        parts.pop()
    return ".".join(parts)


def module_graph(root: Path, package: str) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its file."""
    modules = module_names(root, package)
    known = set(modules)
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        targets = set()
        for node in ast.walk(tree):
            targets.update(_imported(node, name, path.name == "__init__.py", known))
        graph[name] = {t for t in targets if t and t != name}
    return graph


def package_of(module: str) -> str:
    """The first level: ldmrt.engines.base -> ldmrt.engines; ldmrt.cli is its own package."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph with each module folded into its first-level package."""
    folded: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = folded.setdefault(package_of(module), set())
        edges.update(package_of(t) for t in targets)
    for name, edges in folded.items():
        edges.discard(name)
    return folded


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Every strongly connected set of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:    # the graphs have a few hundred nodes: recursion is fine
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [a, b, ..., a] through each strongly connected set, from its first node."""
    return [_cycle_through(min(c), c, graph) for c in strongly_connected(graph)]


def _cycle_through(start: str, component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """The shortest path start -> ... -> start inside one strongly connected set (breadth first)."""
    came_from: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for target in sorted(graph.get(node, ())):
                if target not in component:
                    continue
                if target == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(came_from[path[-1]])
                    return [start] + path[::-1][1:] + [start]
                if target not in came_from:
                    came_from[target] = node
                    following.append(target)
        frontier = following
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def _spelled(graph: dict[str, set[str]]) -> str:
    """Each cycle, and every member of its strongly connected set (breaking the one cycle shown
    may leave another through the same set)."""
    return "\n".join(f"{' -> '.join(_cycle_through(min(c), c, graph))}   (all of: {', '.join(sorted(c))})"
                     for c in strongly_connected(graph))


def test_no_module_cycles():
    graph = module_graph(ROOT, "ldmrt")
    assert not cycles(graph), f"import cycles between modules:\n{_spelled(graph)}"


def test_no_package_cycles():
    graph = package_graph(module_graph(ROOT, "ldmrt"))
    assert not cycles(graph), f"import cycles between packages (ldmrt.X):\n{_spelled(graph)}"


def test_commands_do_not_import_cli():
    graph = module_graph(ROOT, "ldmrt")
    back = sorted(m for m, targets in graph.items() if "ldmrt.cli" in targets)
    assert back == [], f"only the console entry imports ldmrt.cli; these import it back: {back}"


def test_cli_names_every_command():
    """Each command module is registered by name in cli.py (a reader finds `generate` there)."""
    source = (ROOT / "ldmrt" / "cli.py").read_text(encoding="utf-8")
    commands = sorted(p.stem for p in (ROOT / "ldmrt" / "commands").glob("*.py")
                      if p.stem not in ("__init__", "terminal"))
    assert commands, "ldmrt/commands/ holds no command modules"
    missing = [name for name in commands if f'"{name}"' not in source]
    assert missing == [], f"commands not registered by name in ldmrt/cli.py: {missing}"
    from ldmrt.cli import app
    registered = {command.name: command.callback.__module__ for command in app.registered_commands}
    assert registered == {name: f"ldmrt.commands.{name}" for name in commands}


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")


def test_checker_finds_a_lazy_relative_cycle(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg import b\n",
        "pkg/b.py": "def later():\n    from .c import helper\n    return helper\n",
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a.x\n",
        "pkg/d.py": "from pkg.a import name\n",          # d -> a, outside the cycle
    })
    graph = module_graph(tmp_path, "pkg")
    assert graph["pkg.c"] == {"pkg.a"}          # `import pkg.a.x`: x is no module, so pkg.a
    assert cycles(graph) == [["pkg.a", "pkg.b", "pkg.c", "pkg.a"]]


def test_checker_finds_a_package_cycle_without_a_module_cycle(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/top.py": "from pkg.low import base\n",
        "pkg/low/__init__.py": "",
        "pkg/low/base.py": "",
        "pkg/low/extra.py": "from ..top import thing\n",
    })
    graph = module_graph(tmp_path, "pkg")
    assert cycles(graph) == []
    assert cycles(package_graph(graph)) == [["pkg.low", "pkg.top", "pkg.low"]]


def test_checker_accepts_a_layered_package(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/leaf.py": "import json\n",
        "pkg/mid/__init__.py": "from .impl import run\nfrom pkg import leaf\n",
        "pkg/mid/impl.py": "from pkg.leaf import x\n",
        "pkg/top.py": "from pkg.mid import run, impl\n",
    })
    graph = module_graph(tmp_path, "pkg")
    assert graph["pkg.top"] == {"pkg.mid", "pkg.mid.impl"}
    assert graph["pkg.mid"] == {"pkg.mid.impl", "pkg.leaf"}
    assert cycles(graph) == [] and cycles(package_graph(graph)) == []


# The lean runtime: what a service imports to run a bundle with numpy and one backend.
LEAN_MODULES = ("ldmrt.manifest", "ldmrt.runtime.pipeline", "ldmrt.sampling", "ldmrt.tokenizer",
                "ldmrt.engines.base", "ldmrt.engines.dispatch", "ldmrt.engines.onnxruntime",
                "ldmrt.engines.tensorrt", "ldmrt.embed.host")   # embed.host: what libldmrt (ldmrt.h) calls
# The torch backend: dispatch imports it only when it is chosen (and the Triton copy leaves it out).
TORCH_BACKEND = "ldmrt.engines.torch"


def test_lean_runtime_imports_without_torch_or_onnx():
    blocked = ("torch", "onnx", "onnxscript", "transformers", "diffusers")
    code = textwrap.dedent(f"""
        import importlib, sys
        for name in {blocked!r}:
            sys.modules[name] = None          # `import torch` now raises ImportError
        for name in {LEAN_MODULES!r}:
            importlib.import_module(name)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r}
                        and sys.modules[m] is not None)
        print("loaded:", loaded)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded: []" in result.stdout, result.stdout


@pytest.mark.parametrize("module", LEAN_MODULES)
def test_lean_modules_do_not_name_torch(module):
    """Not even lazily: no lean module, nor an ldmrt module it reaches (the torch backend aside),
    imports torch or onnx."""
    graph, files = module_graph(ROOT, "ldmrt"), module_names(ROOT, "ldmrt")
    reached, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name not in reached and name != TORCH_BACKEND:
            reached.add(name)
            todo.extend(graph.get(name, ()))
    offenders = {}
    for name in sorted(reached):
        path = files[name]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            heavy = [n for n in names if n.split(".")[0] in ("torch", "onnx", "onnxscript")]
            if heavy:
                offenders.setdefault(name, []).extend(heavy)
    assert offenders == {}, f"{module} reaches modules that import torch/onnx: {offenders}"
