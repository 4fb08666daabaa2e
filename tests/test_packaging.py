"""The wheel builds without setuptools warnings, carries its data files, installs alone (no
extras) into a fresh venv, answers --help and serves; every imported package is declared."""
from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from loadtests import stack
from tests.test_layers import OURS, ROOT, imported


def _run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_wheel_installs_alone_and_serves(tmp_path):
    source = tmp_path / "src"  # a clean copy: no egg-info or build/ of the developer's tree
    archive = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True,
                             check=True).stdout.decode().split("\0")
    for name in filter(None, archive):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    built = _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(tmp_path / "dist"),
                  str(source)], tmp_path)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    for noise in ("is absent from the `packages` configuration", "SetuptoolsDeprecationWarning",
                  "Package would be ignored"):
        assert noise not in built.stdout + built.stderr, noise
    wheel, = (tmp_path / "dist").glob("bidder-*.whl")

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)  # this pip installs into it: 15 s less
    python = str(env_dir / "bin" / "python")
    installed = _run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                      "--disable-pip-version-check", str(wheel)], tmp_path, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]

    outside = tmp_path / "elsewhere"  # not the source tree: the installed package runs
    outside.mkdir()
    for argv in ([str(env_dir / "bin" / "bidder"), "serve", "--help"],
                 [python, "-m", "bidder", "--help"]):
        done = _run(argv, outside)
        assert done.returncode == 0 and "usage: bidder" in done.stdout, done.stderr
    data = _run([python, "-c", "import importlib.resources as r; "
                 "print(r.files('bidder').joinpath('data/model.npz').is_file(), "
                 "r.files('server_hooks').joinpath('host/sysctl.d/99-bidder.conf').is_file())"],
                outside)
    assert data.stdout.split() == ["True", "True"], data.stderr
    # the load commands need the [load] extra, and say so
    demo = _run([python, "-m", "bidder", "demo"], outside)
    assert demo.returncode != 0 and "pip install 'bidder[load]'" in demo.stderr, demo.stderr

    server = stack.Server(["--workers", "1"], "none", str(tmp_path), python=python,
                          cwd=str(outside))
    with server:
        status, body = stack.get(server.admin_url + "/readyz")
        assert status == 200 and b'"ready":true' in body.replace(b" ", b"")


def test_every_imported_package_is_declared_where_it_is_needed():
    """What the server packages import is in the dependencies; what loadtests imports is there
    or in [load]; bidder train's plot in [train]; what tests import in any of them or [test]."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[\s\[<>=!~;]", r, maxsplit=1)[0].lower().replace("_", "-")
                for r in requirements}

    core = names(project["dependencies"])
    extra = {name: names(reqs) for name, reqs in project["optional-dependencies"].items()}
    declared = {"bidder": core, "server_hooks": core, "models": core,
                "loadtests": core | extra["load"], "tests": core | set().union(*extra.values())}
    declared_for_file = {"bidder/train.py": core | extra["train"],
                         "server_hooks/parserbench.py": core | extra["load"]}
    distributions = importlib.metadata.packages_distributions()
    missing = []
    for package in declared:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = str(path.relative_to(ROOT))
            tree = ast.parse(path.read_text())
            for line, name in imported(tree, package, relative):
                if name in OURS + ("tests", "__future__") or name in sys.stdlib_module_names:
                    continue
                provided_by = {d.lower().replace("_", "-") for d in distributions.get(name, [])}
                if not provided_by & declared_for_file.get(relative, declared[package]):
                    missing.append(f"{relative}:{line}: {name} (distribution "
                                   f"{sorted(provided_by) or 'unknown'})")
    assert not missing, "imported but not declared in pyproject.toml:\n" + "\n".join(missing)
