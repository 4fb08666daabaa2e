"""The layers of docs/architecture.md: imports only point down.

    loadtests  ->  bidder  ->  server_hooks
         \\            \\
          `---------->  models  (numpy and the standard library only)

Every ``import`` statement of every module is read from its syntax tree, including
imports inside functions, so a lazy import cannot hide a crossing. ``bidder``
reaches ``loadtests`` only through the CLI's command table (a module name as a
string, imported when that load command runs).
"""
from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("bidder", "models", "server_hooks", "loadtests")
# package -> the packages of ours it may import (itself included)
MAY_IMPORT = {
    "server_hooks": {"server_hooks"},
    "models": {"models"},
    "bidder": {"bidder", "models", "server_hooks"},
    "loadtests": {"loadtests", "bidder", "models"},
}
# package -> the third-party packages it may import (None: any)
THIRD_PARTY = {"server_hooks": None, "models": {"numpy"}, "bidder": None, "loadtests": None}


def imported(tree: ast.AST, package: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute top-level name) of every import in ``tree``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the importing package
                found.append((node.lineno, package))
            elif node.module:
                found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(root: Path = ROOT) -> list[str]:
    """Every import that points the wrong way, as ``path:line: what and why``."""
    problems = []
    for package in OURS:
        for path in sorted((root / package).rglob("*.py")):
            relative = path.relative_to(root)
            tree = ast.parse(path.read_text(), str(relative))
            for line, name in imported(tree, package, str(relative)):
                if name in OURS:
                    if name not in MAY_IMPORT[package]:
                        problems.append(f"{relative}:{line}: {package} imports {name} "
                                        f"(it may import {sorted(MAY_IMPORT[package])})")
                elif name not in sys.stdlib_module_names and name != "__future__":
                    allowed = THIRD_PARTY[package]
                    if allowed is not None and name not in allowed:
                        problems.append(f"{relative}:{line}: {package} imports {name} "
                                        f"(it may import {sorted(allowed)} and the standard "
                                        "library only)")
    return problems


def test_imports_point_down_only():
    problems = violations()
    assert not problems, "imports that point the wrong way:\n" + "\n".join(problems)


def test_a_planted_forbidden_import_is_caught(tmp_path):
    for package in OURS:
        shutil.copytree(ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "data", "host"))
    assert violations(tmp_path) == []
    plants = {"server_hooks/hooks.py": "from bidder.settings import resolve\n",
              "models/artifact.py": "def f():\n    from bidder import metrics\n",
              "models/lr.py": "import msgspec\n",
              "bidder/app.py": "from loadtests import stack\n"}
    for relative, code in plants.items():
        with open(tmp_path / relative, "a") as fh:
            fh.write(code)
    found = violations(tmp_path)
    assert len(found) == len(plants), found
    for relative in plants:
        assert any(problem.startswith(relative + ":") for problem in found), (relative, found)
