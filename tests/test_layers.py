"""The import-linter contracts of pyproject.toml: the tree keeps them, and they catch breaking ones.

The layers (docs: DESIGN.md) are surfaces > pipeline (tasks, signal handlers) > services > search >
core > data, and a layering inside the services; every module must be given a layer, and no
package may hold an import cycle, imports inside functions included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from importlinter.api import read_configuration

from tests.conftest import PROJECT_ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """``lint-imports`` on the ``imagetags`` package under ``root``, with ``root``'s pyproject."""
    # PYTHONPATH first on sys.path: the package under root is analysed, never an installed one.
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--no-logo"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def contracts() -> dict[str, dict]:
    config = read_configuration(str(PROJECT_ROOT / "pyproject.toml"))
    return {contract["id"]: contract for contract in config["contracts_options"]}


def test_the_tree_keeps_every_contract():
    result = lint_imports(PROJECT_ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_contracts_state_the_documented_layers():
    found = contracts()
    app = found["app-layers"]
    assert app["type"] == "layers" and app["containers"] == ["imagetags"]
    layers = [layer.split("|")[0].split(":")[0].strip() for layer in app["layers"]]
    assert layers[layers.index("signal_handlers") :] == [
        "signal_handlers",
        "services",
        "search",
        "core",
        "migrations",
        "models",
        "images",
        "conf",
    ]
    assert {"admin", "api", "management", "views", "forms", "widgets"} <= {
        name.strip(" ()") for layer in app["layers"] for name in layer.replace(":", "|").split("|")
    }
    # Exhaustive: a module nobody placed breaks the contract (see the test below).
    assert app["exhaustive"] in (True, "True", "true")
    assert found["service-layers"]["containers"] == ["imagetags.services"]
    assert found["acyclic"]["type"] == "acyclic_siblings"
    assert "django" in found["core-pure"]["forbidden_modules"]
    assert "django" in found["search-pure"]["forbidden_modules"]


@pytest.fixture
def tree_copy(tmp_path: Path) -> Path:
    """The package's Python files and pyproject.toml, copied to change them freely."""
    shutil.copytree(
        PROJECT_ROOT / "imagetags",
        tmp_path / "imagetags",
        ignore=shutil.ignore_patterns("__pycache__", "static", "templates"),
    )
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path)
    return tmp_path


# (file to append to, the import appended, words lint-imports must print)
BREAKING_IMPORTS = {
    "a model importing a service": (
        "models.py",
        "from imagetags.services import features",
        "imagetags.models is not allowed to import imagetags.services",
    ),
    "a service importing the pipeline": (
        "services/features.py",
        "from imagetags import tasks",
        "imagetags.services is not allowed to import imagetags.tasks",
    ),
    "the core importing Django": (
        "core/vectors.py",
        "import django",
        "imagetags.core is not allowed to import django",
    ),
    # Same layer, so only the acyclic contract stops it; the import hides inside a function.
    "a cycle through an import inside a function": (
        "services/vectors.py",
        "def _late():\n    from imagetags.services import store",
        "No cycles are allowed in imagetags.services",
    ),
}


@pytest.mark.parametrize("case", sorted(BREAKING_IMPORTS))
def test_a_breaking_import_fails_the_lint(tree_copy: Path, case: str):
    path, line, message = BREAKING_IMPORTS[case]
    module = tree_copy / "imagetags" / path
    module.write_text(module.read_text() + f"\n\n{line}\n")

    result = lint_imports(tree_copy)

    assert result.returncode == 1, result.stdout + result.stderr
    assert message in " ".join(result.stdout.split()), result.stdout


def test_a_module_without_a_layer_fails_the_lint(tree_copy: Path):
    (tree_copy / "imagetags" / "helpers.py").write_text('"""Placed in no layer."""\n')

    result = lint_imports(tree_copy)

    assert result.returncode == 1, result.stdout + result.stderr
    assert "- imagetags.helpers" in result.stdout
