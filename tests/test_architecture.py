"""The import rules of ARCHITECTURE.md, checked on the code as it is (every import statement,
module-level or inside a function, and every ``importlib.import_module("...")`` literal).

A test of the checker itself breaks each rule on purpose in a copy of the tree, so the
rules can fail.
"""
from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cache_tools", "pipeline")

# room -> the rooms (of cache_tools) it may import; pipeline may import any of them.
ROOMS = {
    "format": {"format"},
    "read": {"format", "read"},
    "profiler": {"format", "read", "profiler"},
    "commands": {"format", "read", "profiler", "commands"},
}
# What the format may import outside the standard library: the format is numpy's and zarr's codecs'.
FORMAT_THIRD_PARTY = {"numpy", "numcodecs"}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, root: Path, modules: set[str]) -> list[tuple[int, str]]:
    """(line, imported module or name) of every import in a file, relative imports resolved;
    ``from package import module`` is an import of the module."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module_name(path, root).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in modules else base))
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.append((node.lineno, node.args[0].value))
        elif isinstance(node, ast.Dict):  # lazy export tables: {"Name": "cache_tools.read.dataset", ...}
            found += [(node.lineno, v.value) for v in node.values
                      if isinstance(v, ast.Constant) and isinstance(v.value, str) and v.value.startswith(PACKAGES)]
    return found


def project_modules(root: Path) -> set[str]:
    return {module_name(p, root) for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}


def room_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "cache_tools" and len(parts) > 1 and parts[1] in ROOMS else None


def violations(root: Path) -> list[str]:
    """Every import that breaks a rule, and every import cycle, as one line each."""
    modules = project_modules(root)
    stdlib = set(sys.stdlib_module_names)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    found = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            here = module_name(path, root)
            room = room_of(here)
            for line, target in imports_of(path, root, modules):
                where = f"{path.relative_to(root)}:{line}: {here} imports {target}"
                top = target.split(".")[0]
                if here.startswith("cache_tools") and top == "pipeline":
                    found.append(f"{where}: cache_tools never imports pipeline")
                if room is not None and top == "cache_tools" and target != "cache_tools":
                    other = room_of(target)
                    if other is None or other not in ROOMS[room]:
                        found.append(f"{where}: {room} may import only {', '.join(sorted(ROOMS[room]))}")
                if room == "format" and top not in stdlib | FORMAT_THIRD_PARTY | {"cache_tools"}:
                    found.append(f"{where}: the format needs only the standard library and numpy")
                if target in modules and target != here:
                    graph[here].add(target)
    found += [f"import cycle: {' -> '.join(cycle)}" for cycle in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (a package importing
    its own submodules, and they it, counts: that is an import that runs back up)."""
    # A package's __init__ re-exporting its modules is the normal direction; an edge from a
    # module to its own package is the cycle. Tarjan's algorithm, iteratively.
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def strongconnect(start: str) -> None:
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]
        counter[0] += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
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
                    out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            strongconnect(node)
    return out


def test_the_code_follows_the_import_rules():
    assert violations(REPO) == []


@pytest.mark.parametrize("file,line,rule", [
    ("cache_tools/format/layout.py", "from cache_tools.read import reader\n", "format may import only format"),
    ("cache_tools/format/names.py", "import torch\n", "the format needs only the standard library and numpy"),
    ("cache_tools/read/dataset.py", "from cache_tools.commands import info\n", "read may import only format, read"),
    ("cache_tools/read/reader.py", "def _f():\n    import pipeline.repair\n", "cache_tools never imports pipeline"),
    ("cache_tools/commands/cli.py", "import importlib\nimportlib.import_module('pipeline.cli')\n",
     "cache_tools never imports pipeline"),
    ("cache_tools/profiler/timeline.py", "def _f():\n    from cache_tools.profiler import sampler\n", "import cycle"),
])
def test_each_rule_fails_when_broken_on_purpose(tmp_path, file, line, rule):
    for pkg in PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    with open(tmp_path / file, "a", encoding="utf-8") as fh:
        fh.write("\n" + line)
    found = violations(tmp_path)
    assert any(rule in v for v in found), found
