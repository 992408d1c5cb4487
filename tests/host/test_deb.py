"""The built ``.deb`` (``ops/build-deb``) as dpkg and systemd see it: its control fields and
files, and ``gorb.service`` passing ``systemd-analyze verify`` and ``security`` against the
package's own files. Installing and running it is tests/sandbox/test_deb_install.py.

``tests/run`` builds the package once and exports GORB_TEST_DEB; run by hand without it, the
fixture builds one (about a minute; needs root or user namespaces, and PyPI).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.pace import limit

REPO = Path(__file__).resolve().parents[2]
UNIT = "/lib/systemd/system/gorb.service"


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    given = os.environ.get("GORB_TEST_DEB")
    if given:
        return Path(given)
    out = tmp_path_factory.mktemp("deb")
    subprocess.run([str(REPO / "ops" / "build-deb"), str(out)], check=True, timeout=limit(900))
    (path,) = out.glob("gorb_*.deb")
    return path


@pytest.fixture(scope="module")
def tree(deb, tmp_path_factory) -> Path:
    """The package's files unpacked, with systemd's own units beside them (verify needs the
    targets the unit names)."""
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    units = root / "lib/systemd/system"
    for unit in Path("/usr/lib/systemd/system").iterdir():
        if not (units / unit.name).exists() and (unit.is_file() or unit.is_symlink()):
            shutil.copy(unit, units / unit.name, follow_symlinks=False)
    return root


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "--field", str(deb), name], check=True,
                          capture_output=True, text=True).stdout.strip()


def test_control_fields_and_conffiles(deb, tree):
    assert field(deb, "Package") == "gorb"
    assert field(deb, "Architecture") == subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True).stdout.strip()
    depends = {d.split()[0] for d in field(deb, "Depends").split(", ")}
    assert {"python3.11", "util-linux", "adduser", "init-system-helpers"} <= depends
    control = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(deb)], check=True,
                             capture_output=True).stdout
    listing = subprocess.run(["tar", "-t"], input=control, capture_output=True).stdout.decode()
    assert {"./conffiles", "./postinst", "./prerm", "./postrm"} <= set(listing.split())
    out = subprocess.run(["dpkg-deb", "--info", str(deb), "conffiles"], capture_output=True,
                         text=True, check=True).stdout.split()
    assert set(out) == {"/etc/gorb/gorb.toml", "/etc/logrotate.d/gorb", "/etc/sysctl.d/60-gorb.conf"}


def test_the_files_a_server_gets(tree):
    for path in ("opt/gorb/bin/gorb", "opt/gorb/bin/python", "etc/gorb/gorb.toml",
                 "lib/systemd/system/gorb.service", "usr/lib/modules-load.d/gorb.conf",
                 "etc/sysctl.d/60-gorb.conf", "etc/logrotate.d/gorb",
                 "usr/share/doc/gorb/README.md"):
        assert (tree / path).exists(), path
    assert os.readlink(tree / "usr/bin/gorb") == "/opt/gorb/bin/gorb"
    # the venv is Debian's python's, and holds gorb as one package, no checkout's top level
    assert os.readlink(tree / "opt/gorb/bin/python").endswith("python3")
    assert "home = /usr/bin" in (tree / "opt/gorb/pyvenv.cfg").read_text()
    site = tree / "opt/gorb/lib/python3.11/site-packages"
    assert (site / "gorb" / "services" / "api").is_dir()
    assert not (site / "common").exists() and not (site / "services").exists()
    assert "/opt/gorb/bin/python" in (tree / "opt/gorb/bin/gorb").read_text().splitlines()[0]
    modules = (tree / "usr/lib/modules-load.d/gorb.conf").read_text().split("\n")
    assert "ip_vs" in modules and "ip_vs_wrr" in modules


def verify(tree: Path, unit: str = UNIT) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", "verify", "--man=no", f"--root={tree}", unit],
                          capture_output=True, text=True)


def test_the_unit_passes_systemd_analyze_verify(tree):
    result = verify(tree)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    # and verify does fail a unit whose command the package does not ship
    broken = tree / "lib/systemd/system/gorb-broken.service"
    broken.write_text((tree / UNIT.lstrip("/")).read_text().replace(
        "ExecStart=/opt/gorb/bin/gorb", "ExecStart=/opt/gorb/bin/gorb-missing"))
    try:
        bad = verify(tree, "/lib/systemd/system/gorb-broken.service")
        assert bad.returncode != 0 and "gorb-missing" in bad.stderr
    finally:
        broken.unlink()


def test_the_units_exposure_is_ok_by_systemd_analyze_security(tree):
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", f"--root={tree}",
                             "--no-pager", "gorb.service"], capture_output=True, text=True)
    m = re.search(r"Overall exposure level for gorb.service: ([0-9.]+)", result.stdout)
    assert m, result.stdout + result.stderr
    # 0 (locked down) .. 10 (unprotected); supervisord must stay root to start the writer with
    # CAP_NET_ADMIN, which keeps it above the lowest levels
    assert float(m.group(1)) <= 5.0, result.stdout
