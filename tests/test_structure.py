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
