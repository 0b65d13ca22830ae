"""How the package reads: short module docstrings (reasons live in docs/), no references outside
the repository, backends independent of each other, a Trainer whose state is declared."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "fastalex"
FORMAT_SPEC = {"shards.py"}  # its docstring is the on-disk format's specification


def modules():
    return sorted(PACKAGE.rglob("*.py"))


def test_module_docstrings_state_a_contract_in_at_most_15_lines():
    long = {}
    for path in modules():
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if path.name not in FORMAT_SPEC and len(doc.splitlines()) > 15:
            long[str(path.relative_to(PACKAGE))] = len(doc.splitlines())
    assert not long, f"move the reasons to docs/: {long}"


def test_the_code_cites_nothing_outside_the_repository():
    for path in modules():
        text = path.read_text()
        assert "DALI_NOTES" not in text and "the issue" not in text, path


def test_resident_imports_nothing_from_the_cpu_backend():
    tree = ast.parse((PACKAGE / "loaders" / "resident.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "fastalex.loaders.cpu" not in imported


def test_the_trainer_declares_its_state():
    from fastalex.train import Trainer

    assert {"cfg", "runtime", "progress", "train_loader", "decisions"} <= set(
        Trainer.__annotations__
    )


MAX_LINES = 500  # past this a module is two concerns


def module_imports() -> dict[str, set[str]]:
    """Each fastalex module's fastalex imports, those inside functions included."""
    names = {}
    for path in modules():
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in names.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
        graph[name] = {other for other in found if other in names and other != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as the modules along it, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for other in sorted(graph[name]):
            if state.get(other) == 1:
                return path[path.index(other) :] + [other]
            if other not in state and (cycle := visit(other, path + [other])):
                return cycle
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [name])):
            return cycle
    return None


def test_imports_flow_one_way_counting_those_inside_functions():
    assert find_cycle(module_imports()) is None, " -> ".join(find_cycle(module_imports()))


def test_the_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_module_is_two_concerns():
    long = {
        str(path.relative_to(PACKAGE)): n
        for path in modules()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these by reason to change: {long}"
