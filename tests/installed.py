"""gorb installed as a user installs it: the wheel built from this tree, installed (not editable)
into a fresh virtualenv outside the checkout. Whole-system tests run that install, never the tree.

    python -m tests.installed DIR     build the wheel, make DIR/venv, install it; print the venv

``tests/run`` makes one under ``/tmp`` (on purpose: the user-mode-linux guest mounts a tmpfs of its
own over ``/tmp``, and gorb's guest mode must still find a venv there) and exports its path as
``GORB_TEST_VENV``; the sandbox runner mounts it into the guest. ``venv()`` is that path, or, when
a developer runs a test file by hand without it, this tree's own ``.venv`` (said once on stderr).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = "GORB_TEST_VENV"
_warned = False


def venv() -> Path:
    """The venv whose ``bin/gorb`` and ``bin/python`` the whole-system tests run."""
    global _warned
    path = os.environ.get(ENV)
    if path:
        return Path(path)
    if not _warned:
        print(f"tests: {ENV} is not set: running this tree's .venv (editable), not an install "
              "(tests/run sets it)", file=sys.stderr)
        _warned = True
    return Path(sys.prefix)


def is_install() -> bool:
    return bool(os.environ.get(ENV))


def gorb() -> str:
    return str(venv() / "bin" / "gorb")


def python() -> str:
    return str(venv() / "bin" / "python")


def build(root: Path, python: str = sys.executable) -> Path:
    """The wheel of this tree in ``root/dist``, installed into a new ``root/venv``; the venv."""
    dist, target = root / "dist", root / "venv"
    shutil.rmtree(dist, ignore_errors=True)
    shutil.rmtree(target, ignore_errors=True)
    quiet = ["-q", "--disable-pip-version-check"]
    with tempfile.TemporaryDirectory() as scratch:
        # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
        src = Path(scratch) / "src"
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                               check=True, capture_output=True, text=True).stdout.split()
        for name in files:
            if (REPO / name).is_file():
                (src / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, src / name)
        subprocess.run([python, "-m", "pip", "wheel", *quiet, "--no-deps", "-w", str(dist),
                        str(src)], check=True)
    wheels = list(dist.glob("gorb-*.whl"))
    assert len(wheels) == 1, wheels
    subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
    subprocess.run([str(target / "bin" / "pip"), "install", *quiet, str(wheels[0])], check=True,
                   cwd="/")
    return target


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.splitlines()[2].strip(), file=sys.stderr)
        return 2
    root = Path(argv[0]).resolve()
    if root == REPO or REPO in root.parents:
        print(f"tests.installed: {root} is inside the checkout", file=sys.stderr)
        return 2
    root.mkdir(parents=True, exist_ok=True)
    print(build(root))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
