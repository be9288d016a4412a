"""Imports run one way: ground <- operators <- pipelines <- jobs (STYLE.md 11)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A package may import itself and anything to its left, never to its right.
LAYERS = ["ground", "operators", "pipelines", "jobs"]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("layer", LAYERS)
def test_no_layer_imports_a_higher_one(layer):
    higher = set(LAYERS[LAYERS.index(layer) + 1:])
    bad = {}
    for path in sorted((REPO / layer).rglob("*.py")):
        wrong = _imports(path) & higher
        if wrong:
            bad[str(path.relative_to(REPO))] = sorted(wrong)
    assert not bad, f"{layer} imports a higher layer: {bad}"


def test_ray_is_imported_only_by_pipelines_and_jobs():
    offenders = [str(p.relative_to(REPO)) for layer in ("ground", "operators")
                 for p in sorted((REPO / layer).rglob("*.py")) if "ray" in _imports(p)]
    assert not offenders


def test_plan_and_cli_import_neither_ray_nor_torch():
    code = ("import sys, jobs.cli, pipelines.plan, pipelines.config; "
            "print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_code_package_ships_in_the_wheel():
    """pyproject lists packages by hand (conf/ is mapped in as mmcurate_conf); a new folder must join it."""
    import tomllib

    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(REPO)).replace("/", ".") for layer in LAYERS
             for p in (REPO / layer).rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
