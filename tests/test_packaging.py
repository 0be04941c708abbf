"""The installed layout: every package of the repository is installed, and the harness never as ``evaluation``
(kvpress's checkout has its own ``evaluation/`` folder, which an installed ``evaluation`` would collide with)."""

from __future__ import annotations

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_package_folder_is_installed():
    renamed = {folder: name for name, folder in _setuptools()["package-dir"].items()}
    found = set()
    for top in ("pikvpress", "evaluation"):
        for init in (ROOT / top).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT).parts
            found.add(".".join((renamed.get(parts[0], parts[0]), *parts[1:])))
    assert found == set(_setuptools()["packages"])


def test_the_harness_is_installed_as_pikvpress_eval_only():
    packages = _setuptools()["packages"]
    assert not any(p == "evaluation" or p.startswith("evaluation.") for p in packages)
    assert _setuptools()["package-dir"] == {"pikvpress_eval": "evaluation"}
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pikvpress-eval"].startswith("pikvpress_eval.")


def test_the_installed_harness_imports_under_its_name():
    import pikvpress_eval.config
    import pikvpress_eval.runner

    assert Path(pikvpress_eval.config.__file__).parent == ROOT / "evaluation"
