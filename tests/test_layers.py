"""The package's structure: layers import one way, no import cycles, ruff-clean, a memory/ map that is true."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "loratui"


def contract_names() -> list[str]:
    from importlinter.api import read_configuration

    config = read_configuration(str(ROOT / "pyproject.toml"))
    return [contract["name"] for contract in config["contracts_options"]]


def lint_imports(project: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` on the package under `project`, with the contracts of its pyproject.toml."""
    env = {**os.environ, "PYTHONPATH": str(project)}
    command = (
        "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    )
    return subprocess.run(
        [sys.executable, "-c", command, "--no-cache", str(project / "pyproject.toml")],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def contract_states(output: str) -> dict[str, str]:
    """Contract name -> 'KEPT' or 'BROKEN', from lint-imports' summary lines."""
    return dict(re.findall(r"^(.+?) (KEPT|BROKEN)$", output, flags=re.MULTILINE))


def copy_package(target: Path) -> Path:
    """The package's Python files and pyproject.toml, copied under `target`."""
    shutil.copy2(ROOT / "pyproject.toml", target / "pyproject.toml")

    def ignore(folder: str, names: list[str]) -> list[str]:
        return [
            n for n in names if n == "__pycache__" or (Path(folder, n).is_file() and not n.endswith(".py"))
        ]

    shutil.copytree(PACKAGE, target / "loratui", ignore=ignore)
    return target


def test_import_contracts_are_kept() -> None:
    names = contract_names()
    assert len(names) == 2
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert contract_states(result.stdout) == dict.fromkeys(names, "KEPT")
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    ("module", "source", "broken"),
    [
        ("models/back_import.py", "import loratui.train\n", "Layers import one way"),
        ("runs/prints_with_typer.py", "import typer\n", "Only the CLI and the TUI use"),
    ],
)
def test_a_back_import_breaks_a_contract(tmp_path: Path, module: str, source: str, broken: str) -> None:
    project = copy_package(tmp_path)
    (project / "loratui" / module).write_text(
        f'"""Imports against the layers."""\n\n{source}', encoding="utf-8"
    )
    result = lint_imports(project)
    states = contract_states(result.stdout)
    assert result.returncode == 1, result.stdout + result.stderr
    assert set(states) == set(contract_names())
    assert [name for name, state in states.items() if state == "BROKEN"] == [
        name for name in contract_names() if name.startswith(broken)
    ]
    added = "loratui." + module.removesuffix(".py").replace("/", ".")
    assert added in result.stdout
    assert "Contracts: 1 kept, 1 broken." in result.stdout


def import_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (each sorted), by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
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
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_import_cycles_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}, "f": {"f"}}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_between_modules() -> None:
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("loratui", include_external_packages=False, cache_dir=None)
    modules = {name: graph.find_modules_directly_imported_by(name) for name in graph.modules}
    assert len(modules) > 100
    # imports inside functions count too: the worker imports the trainers only inside a function
    assert "loratui.train.sd.trainer" in modules["loratui.train.process.worker"]
    assert import_cycles(modules) == []


def ruff() -> str:
    try:
        from ruff.__main__ import find_ruff_bin
    except ImportError:
        found = shutil.which("ruff")
        if found is None:
            pytest.skip("ruff is not installed (pip install -e '.[dev]')")
        return found
    return str(find_ruff_bin())


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]], ids=["format", "lint"])
def test_tree_is_ruff_clean(command: list[str]) -> None:
    result = subprocess.run([ruff(), *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_memory_module_map_names_every_module() -> None:
    memory = PACKAGE / "memory"
    docstring = ast.get_docstring(ast.parse((memory / "__init__.py").read_text(encoding="utf-8"))) or ""
    named = set(re.findall(r"`([a-z_.]+)`", docstring))
    modules = {p.stem for p in memory.glob("*.py") if p.stem != "__init__"}
    modules |= {f"{p.parent.name}.{p.stem}" for p in memory.glob("*/*.py") if p.stem != "__init__"}
    assert modules, "no modules found"
    assert modules - named == set()
