"""Import rules of hephaestus_jax, read from the source with `ast` (nothing is imported).

A CLI module is one with an `if __name__ == "__main__":` block (`python -m hephaestus_jax.<name>`); library
modules must not import one, and the module-level import graph must have no cycle. Function-level imports
between the project's own modules are allowed only to keep a heavy optional dependency off a path: each needs
a `# lazy: <reason>` comment on its line. `python tests/test_layering.py` prints the graph's figures.
"""
from __future__ import annotations

import ast
import dataclasses
import os
import pathlib
import re
import subprocess
import sys

PACKAGE = "hephaestus_jax"
ROOT = pathlib.Path(__file__).resolve().parent.parent / PACKAGE


@dataclasses.dataclass(frozen=True)
class Edge:
    """One import of a project module by another: where it is and whether it runs at import time."""

    source: str
    target: str
    line: int
    top_level: bool
    lazy_reason: bool


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    """`hephaestus_jax/data/tasks.py` -> `hephaestus_jax.data.tasks` (a package is its `__init__`)."""
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_main_guard(node: ast.stmt) -> bool:
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def _targets(node: ast.Import | ast.ImportFrom, source: str, modules: set[str], is_package: bool) -> list[str]:
    """The project modules one import statement names (`from pkg import mod` names `pkg.mod` if that exists)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = source.split(".") if is_package else source.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" if f"{prefix}.{alias.name}" in modules else prefix
                 for alias in node.names]
    found = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != source and name not in found:
            found.append(name)
    return found


def _imports(node: ast.AST, top_level: bool = True):
    """Every import statement under `node`, and whether it runs at import time (is outside any function)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child, top_level
        inside = top_level and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        yield from _imports(child, inside)


class Graph:
    """Every `hephaestus_jax` module, which of them are CLIs, and every import between them."""

    def __init__(self, root: pathlib.Path = ROOT):
        paths = sorted(root.rglob("*.py"))
        self.modules = {module_name(path, root): path for path in paths}
        self.cli: set[str] = set()
        self.edges: list[Edge] = []
        for name, path in self.modules.items():
            source = path.read_text()
            tree = ast.parse(source, filename=str(path))
            lines = source.splitlines()
            if any(_is_main_guard(node) for node in tree.body):
                self.cli.add(name)
            for node, top_level in _imports(tree):
                comment = " ".join(lines[node.lineno - 1:node.end_lineno])
                for target in _targets(node, name, set(self.modules), path.name == "__init__.py"):
                    self.edges.append(Edge(name, target, node.lineno, top_level, "# lazy:" in comment))

    def module_level(self) -> dict[str, set[str]]:
        graph: dict[str, set[str]] = {name: set() for name in self.modules}
        for edge in self.edges:
            if edge.top_level:
                graph[edge.source].add(edge.target)
        return graph

    def all_imports(self) -> dict[str, set[str]]:
        graph: dict[str, set[str]] = {name: set() for name in self.modules}
        for edge in self.edges:
            graph[edge.source].add(edge.target)
        return graph

    def into_cli(self) -> list[Edge]:
        """Imports of a CLI module by any other project module."""
        return [edge for edge in self.edges if edge.target in self.cli]

    def function_level(self) -> list[Edge]:
        return [edge for edge in self.edges if not edge.top_level]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def report(graph: Graph) -> str:
    lines = [f"modules: {len(graph.modules)}; CLI modules: {', '.join(sorted(graph.cli))}"]
    lines.append(f"module-level cycles: {cycles(graph.module_level())}")
    lines.append(f"cycles counting function-level imports: {cycles(graph.all_imports())}")
    into = graph.into_cli()
    lines.append(f"imports of CLI modules by project modules: {len(into)}")
    lines += [f"  {edge.source}:{edge.line} -> {edge.target}" for edge in into]
    inner = graph.function_level()
    lines.append(f"function-level imports between project modules: {len(inner)}"
                 f" ({sum(edge.lazy_reason for edge in inner)} with a '# lazy:' reason)")
    lines += [f"  {edge.source}:{edge.line} -> {edge.target}" for edge in inner]
    return "\n".join(lines)


def test_no_import_cycle():
    graph = Graph()
    assert cycles(graph.all_imports()) == [], report(graph)


def test_library_modules_import_no_cli_module():
    graph = Graph()
    assert {"hephaestus_jax.train", "hephaestus_jax.evaluate", "hephaestus_jax.generate"} <= graph.cli
    assert graph.into_cli() == [], report(graph)


def test_function_level_imports_state_their_reason():
    unexplained = [edge for edge in Graph().function_level() if not edge.lazy_reason]
    assert unexplained == [], "\n".join(f"{e.source}:{e.line} -> {e.target}: add '# lazy: <reason>' or move it "
                                        "to the top" for e in unexplained)


def test_config_imports_no_model_module_and_the_model_only_its_config_type():
    """config.py sits below the model: it imports nothing of `model/`, and the model takes from config.py the
    ModelConfig type only (remat policies, projection names and kernels live under `model/`)."""
    graph = Graph()
    assert [e.target for e in graph.edges if e.source == f"{PACKAGE}.config" and ".model" in e.target] == []
    taken = set()
    for path in (ROOT / "model").glob("*.py"):
        for node, _ in _imports(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == f"{PACKAGE}.config":
                taken |= {alias.name for alias in node.names}
            elif any(f"{getattr(node, 'module', None) or ''}.{alias.name}".endswith(f"{PACKAGE}.config")
                     for alias in node.names):  # import hephaestus_jax.config, from hephaestus_jax import config
                taken.add("the whole module")
    assert taken == {"ModelConfig"}, taken


def library_modules_importing(graph: Graph, module: str) -> list[str]:
    """The library (non-CLI) modules with an import of `module` anywhere in them."""
    found = []
    for name, path in graph.modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        names = {alias.name for node, _ in _imports(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module for node, _ in _imports(tree) if isinstance(node, ast.ImportFrom) and node.module}
        if name not in graph.cli and any(n == module or n.startswith(f"{module}.") for n in names):
            found.append(name)
    return sorted(found)


def test_argparse_lives_only_in_commands():
    """Command lines are parsed by the commands (tools/*.py and the `python -m` modules), never by the library."""
    assert library_modules_importing(Graph(), "argparse") == []


def test_packing_records_and_training_lanes_import_no_tensorflow():
    modules = ("hephaestus_jax.data.packing", "hephaestus_jax.data.records", "hephaestus_jax.data.pipeline",
               "hephaestus_jax.gin_configs", "hephaestus_jax.tpu_catalog", "hephaestus_jax.config")
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(sorted(m for m in ('tensorflow', 'seqio', "\
           "'apache_beam') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": str(ROOT.parent)}, check=True)
    assert result.stdout.strip() == "[]"


def test_the_checker_sees_cycles_cli_imports_and_lazy_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from hephaestus_jax.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from .. import a\n    from . import c  # lazy: heavy\n")
    (package / "sub" / "c.py").write_text("import hephaestus_jax.main\n")
    (package / "main.py").write_text("if __name__ == '__main__':\n    pass\n")
    graph = Graph(package)
    assert graph.cli == {"hephaestus_jax.main"}
    assert cycles(graph.module_level()) == []
    assert cycles(graph.all_imports()) == [["hephaestus_jax.a", "hephaestus_jax.sub.b"]]
    assert [(e.source, e.target) for e in graph.into_cli()] == [("hephaestus_jax.sub.c", "hephaestus_jax.main")]
    assert [(e.target, e.lazy_reason) for e in graph.function_level()] == [
        ("hephaestus_jax.a", False), ("hephaestus_jax.sub.c", True)]


if __name__ == "__main__":
    print(report(Graph(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT)))


def design_tiers() -> dict[str, int]:
    """Module -> tier from docs/design.md's Layout block: 2 under "CLIs", 1 under "library", 0 under "core"."""
    text = (ROOT.parent / "docs" / "design.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    tiers, tier = {}, None
    for line in block.splitlines():
        heading = line.split(" ", 1)[0]
        if line and not line[0].isspace():
            tier = {"CLIs": 2, "library": 1, "core": 0}.get(heading)
        elif tier is not None and (match := re.match(r"^\s+([a-z_/]+)\.py\s", line)):
            tiers[f"{PACKAGE}.{match[1].replace('/', '.')}"] = tier
    return tiers


def test_every_import_points_to_its_own_tier_or_below():
    """The tiers of docs/design.md (CLIs -> library -> core) hold in the code: no import climbs back up."""
    tiers, graph = design_tiers(), Graph()
    assert set(tiers) == {name for name, path in graph.modules.items() if path.name != "__init__.py"}
    upward = [f"{e.source} ({tiers[e.source]}) -> {e.target} ({tiers[e.target]})" for e in graph.edges
              if e.source in tiers and e.target in tiers and tiers[e.target] > tiers[e.source]]
    assert upward == []
