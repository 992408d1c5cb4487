"""The distribution's shape (pyproject.toml): one import package, ``gorb``, rooted at the tree.

Every folder of the tree that is a Python package (``common/``, ``services/*/``, ``supervisord/``)
must be listed in ``[tool.setuptools] packages`` as ``gorb.<path>``, or a wheel silently ships
without it; every file gorb reads at run time must be package data. The install itself (a wheel in
a fresh virtualenv, ``import common`` failing there) is tested by ``tests/sandbox/test_installed.py``
and by every whole-system test, which run the installed package.
"""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def tree_packages() -> set[str]:
    found = set()
    for init in REPO.rglob("__init__.py"):
        rel = init.parent.relative_to(REPO)
        if rel.parts[0] in ("tests", ".venv", "build") or rel.parts[0].startswith("."):
            continue
        found.add(".".join(("gorb", *rel.parts)))
    return found


def test_every_package_of_the_tree_is_in_the_wheel():
    assert SETUPTOOLS["package-dir"] == {"gorb": "."}
    assert set(SETUPTOOLS["packages"]) == tree_packages()
    assert all(p.startswith("gorb.") for p in SETUPTOOLS["packages"])


def test_run_time_files_are_package_data():
    data = SETUPTOOLS["package-data"]
    for package, names in data.items():
        for name in names:
            assert (resources.files(package) / name).is_file(), (package, name)
    assert (resources.files("gorb.supervisord") / "supervisord.conf.in").is_file()
    assert (resources.files("gorb.services.launcher") / "guest_init.sh").is_file()


def test_no_module_reads_a_path_into_the_checkout():
    """Code under common/ and services/ never climbs out of its package to find a file."""
    offenders = []
    for path in [*REPO.glob("common/*.py"), *REPO.glob("services/**/*.py")]:
        text = path.read_text()
        if "__file__" in text:  # the only way to a path outside the package is from here
            offenders.append(str(path.relative_to(REPO)))
    assert offenders == []


def test_console_scripts_point_into_gorb():
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts["gorb"] == "gorb.services.launcher.main:main"
    assert all(target.startswith("gorb.") for target in scripts.values())
