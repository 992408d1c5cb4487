"""The ``.deb`` (``ops/build-deb``) installed on a clean root and run as gorb.service runs it, on a
real kernel: install, the account and files it makes, a token added as the README says, a PUT
that reaches IPVS and traffic through the VIP, each program's uid and capabilities, the audit log
and its rotation, a stop that leaves IPVS in place, remove and purge.

The clean root is an overlay over the guest's ``/`` (the host's, read-only: no gorb, no gorb
account, no /opt/gorb) with an empty upper layer, so what the package does is all there is to
see; ``dpkg --root`` installs into it (maintainer scripts chrooted there, as on a server).
systemd does not run in the guest, so the unit's ExecStart is run the way systemd would: chrooted
into that root, in a fresh network namespace, after making its RuntimeDirectory, StateDirectory
and LogsDirectory with their modes, with its UMask, and inside its CapabilityBoundingSet and
NoNewPrivileges (setpriv). That proves the bounding set is enough for gorb to start and drop
privileges; the sandboxing directives (ProtectSystem= ...) are checked by ``systemd-analyze`` on
the host (tests/host/test_deb.py). ``tests/run`` builds the package and exports its path as
GORB_TEST_DEB (the guest has no network, so it cannot be built here).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from tests.pace import limit, wait_until
from tests.sandbox import topology
from tests.sandbox.conftest import ipvsadm, sh
from tests.sandbox.test_least_privilege import creds, expected_creds, owner_mode, status_of
from tests.sandbox.test_supervised import PROGRAMS, Gorb, proc_table
from tests.sandbox.topology import BACKEND_PORT, VIP, VIP_PORT
from tests.unit.test_deb_files import unit_settings

DEB = os.environ.get("GORB_TEST_DEB", "")
UNIT = "lib/systemd/system/gorb.service"
TOKEN = "s3cret-token-of-the-ops-team"

pytestmark = pytest.mark.skipif(not DEB, reason="GORB_TEST_DEB is not set: tests/run builds the "
                                                 ".deb (ops/build-deb) and sets it")

# capability numbers (linux/capability.h) of the names systemd's CapabilityBoundingSet= takes
CAPS = {"CAP_CHOWN": 0, "CAP_DAC_OVERRIDE": 1, "CAP_FOWNER": 3, "CAP_KILL": 5, "CAP_SETGID": 6,
        "CAP_SETUID": 7, "CAP_SETPCAP": 8, "CAP_NET_BIND_SERVICE": 10, "CAP_NET_ADMIN": 12}


def dpkg(root: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dpkg", f"--root={root}", f"--log={root}/var/log/dpkg.log", *args],
                          capture_output=True, text=True, timeout=limit(600))
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def unit_keys(root: Path) -> dict[str, str]:
    return {key: values[-1] for key, values in unit_settings(root / UNIT).items()}


def systemd_like(root: Path) -> list[str]:
    """The command that runs the unit's ExecStart as systemd would here (module docstring)."""
    keys = unit_keys(root)
    caps = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}"
                               for c in keys["CapabilityBoundingSet"].split())])
    dirs = " && ".join(
        f"mkdir -p /{base}/{keys[key]} && chmod {keys[key + 'Mode']} /{base}/{keys[key]}"
        for key, base in (("RuntimeDirectory", "run"), ("StateDirectory", "var/lib"),
                          ("LogsDirectory", "var/log")))
    script = f"umask {keys['UMask']} && {dirs} && exec {keys['ExecStart']}"
    no_new_privs = ["--no-new-privs"] if keys["NoNewPrivileges"] == "yes" else []
    return ["chroot", str(root), "setpriv", f"--bounding-set={caps}", *no_new_privs, "--",
            "/bin/sh", "-c", script]


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory):
    """An empty overlay over ``/`` with the package installed by dpkg."""
    base = tmp_path_factory.mktemp("deb")
    for d in ("upper", "work", "root"):
        (base / d).mkdir()
    root = base / "root"
    if subprocess.run(["modprobe", "-d", "/run/modroot", "overlay"]).returncode:
        subprocess.run(["modprobe", "overlay"])
    sh(f"mount -t overlay overlay -o lowerdir=/,upperdir={base}/upper,workdir={base}/work {root}")
    mounted = [root]
    try:
        assert not (root / "opt" / "gorb").exists(), "the root is not clean"
        assert "\ngorb:" not in "\n" + (root / "etc" / "passwd").read_text()
        install = dpkg(root, "-i", DEB)
        assert "Setting up gorb" in install.stdout
        # what the chroot needs that systemd would give the service
        for fs, target, opts in (("proc", "proc", ""), ("tmpfs", "tmp", "-o mode=1777"),
                                 ("tmpfs", "run", "-o mode=0755")):
            sh(f"mount -t {fs} {opts} {fs} {root / target}")
            mounted.append(root / target)
        sh(f"mount --rbind /dev {root / 'dev'}")
        mounted.append(root / "dev")
        yield root
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)])


def account(root: Path) -> tuple[int, int]:
    for line in (root / "etc" / "passwd").read_text().splitlines():
        name, _, uid, gid, *_ = line.split(":")
        if name == "gorb":
            return int(uid), int(gid)
    raise AssertionError("the package did not create the gorb account")


def test_the_package_installs_its_account_files_and_unit(clean_root):
    root = clean_root
    uid, gid = account(root)
    assert 0 < uid < 1000  # a system account
    shell = (root / "etc" / "passwd").read_text().split(f"gorb:x:{uid}:")[1].splitlines()[0]
    assert shell.endswith(":/usr/sbin/nologin")
    assert owner_mode(root / "etc/gorb/gorb.toml") == (0, gid, 0o640)  # it may hold secrets
    assert os.readlink(root / "usr/bin/gorb") == "/opt/gorb/bin/gorb"
    wants = root / "etc/systemd/system/multi-user.target.wants/gorb.service"
    assert os.readlink(wants) == "/lib/systemd/system/gorb.service"  # enabled, not started
    for path in ("etc/logrotate.d/gorb", "etc/sysctl.d/60-gorb.conf",
                 "usr/lib/modules-load.d/gorb.conf"):
        assert (root / path).is_file(), path
    conffiles = dpkg(root, "--status", "gorb").stdout.split("Conffiles:")[1]
    assert "/etc/gorb/gorb.toml" in conffiles and "/etc/logrotate.d/gorb" in conffiles
    # gorb is the install's: Debian's python, nothing of this checkout
    cfg = (root / "opt/gorb/pyvenv.cfg").read_text()
    assert "home = /usr/bin" in cfg
    out = subprocess.run(["chroot", str(root), "/opt/gorb/bin/python", "-c",
                          "import gorb.services.api, sys; print(gorb.services.api.__file__)"],
                         capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.startswith("/opt/gorb/lib/python3.11/"), out


@pytest.fixture(scope="module")
def service(clean_root, tmp_path_factory, module_netns):
    """gorb.service started as systemd would, with a token added to /etc/gorb/gorb.toml the
    way the README tells, over the NAT topology."""
    root = clean_root
    uid, gid = account(root)
    secret = root / "etc/gorb/ops.token"
    secret.write_text(TOKEN + "\n")
    os.chown(secret, 0, gid)
    secret.chmod(0o640)
    with open(root / "etc/gorb/gorb.toml", "a") as f:
        f.write('\n[api.tokens]\nops = { secret_file = "/etc/gorb/ops.token", role = "admin" }\n')
    topo = topology.build(module_netns, n_backends=2)
    gorb = Gorb(topo.lb, tmp_path_factory.mktemp("debrun"), listen="127.0.0.1:4672",
                command=systemd_like(root), run_dir=root / "run/gorb",
                log_dir=root / "var/log/gorb")
    try:
        gorb.wait_states({p: "RUNNING" for p in PROGRAMS}, timeout=90)
        gorb.wait_api(timeout=60)
        yield gorb, topo, root
    finally:
        gorb.close()
        topo.close()


def api(gorb: Gorb, method: str, path: str, body=None, token: str | None = TOKEN):
    conn = gorb.connect(10.0)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=None if body is None else json.dumps(body),
                     headers=headers)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"null")
    finally:
        conn.close()


def test_the_installed_service_serves_and_needs_the_token(service):
    gorb, topo, _ = service
    assert api(gorb, "GET", "/health", token=None)[0] == 200
    status, body = api(gorb, "PUT", "/service/web", {"host": VIP, "port": VIP_PORT}, token=None)
    assert status == 401 and body["error"]
    assert api(gorb, "PUT", "/service/web", {"host": VIP, "port": VIP_PORT, "method": "rr"}
               )[0] == 200
    for rs in ("b1", "b2"):
        body = {"host": topo.addresses[rs], "port": BACKEND_PORT}
        assert api(gorb, "PUT", f"/service/web/{rs}", body)[0] == 200
    want = {f"TCP {VIP}:{VIP_PORT}": {f"{topo.addresses[rs]}:{BACKEND_PORT}": ("Masq", 100)
                                      for rs in ("b1", "b2")}}
    wait_until(lambda: proc_table(gorb.proc.pid), 30.0, "the kernel table", every=0.2,
               until=want.__eq__)
    result = topo.requests(20)
    assert result["failures"] == 0 and result["counts"] == {"b1": 10, "b2": 10}, result


def test_each_program_runs_least_privileged_inside_the_units_bounding_set(service):
    gorb, _, root = service
    uid, gid = account(root)
    seen = {name: creds(status_of(gorb.pid(name))) for name in PROGRAMS}
    assert seen == expected_creds(uid, gid)
    keys = unit_keys(root)
    bounding = sum(1 << CAPS[c] for c in keys["CapabilityBoundingSet"].split())
    top = creds(status_of(gorb.proc.pid))
    assert top["uid"] == {0} and top["CapBnd"] == bounding and top["nnp"] == 1
    cmdline = Path(f"/proc/{gorb.pid('api')}/cmdline").read_bytes().split(b"\0")
    assert cmdline[0].startswith(b"/opt/gorb/bin/python")
    # the directories of the unit, as gorb leaves them
    assert owner_mode(root / "run/gorb") == (0, gid, 0o750)
    assert owner_mode(root / "run/gorb/gorb.toml") == (0, gid, 0o640)
    assert (root / "var/lib/gorb/state.json").is_file()


def test_every_change_is_audited_in_var_log_gorb_and_survives_logrotate(service):
    gorb, topo, root = service
    uid, gid = account(root)
    audit = root / "var/log/gorb/audit.log"
    assert owner_mode(audit) == (uid, gid, 0o640)
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {(a["token"], a["method"], a["status"]) for a in lines} >= \
        {(None, "PUT", 401), ("ops", "PUT", 200)}
    assert all(TOKEN not in json.dumps(a) for a in lines)
    if not Path("/usr/sbin/logrotate").exists():
        pytest.fail("logrotate is missing: ops/bootstrap installs it")
    rotate = subprocess.run(["chroot", str(root), "logrotate", "-f", "/etc/logrotate.d/gorb"],
                            capture_output=True, text=True)
    assert rotate.returncode == 0, rotate.stderr
    assert (root / "var/log/gorb/audit.log.1").exists()
    assert owner_mode(audit) == (uid, gid, 0o640) and audit.read_text() == ""
    assert api(gorb, "PATCH", "/service/web/b2", {"weight": 50})[0] == 200
    after = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(a["method"], a["route"], a["status"]) for a in after] == \
        [("PATCH", "/service/<vs>/<rs>", 200)]
    wait_until(lambda: proc_table(gorb.proc.pid)[f"TCP {VIP}:{VIP_PORT}"]
               [f"{topo.addresses['b2']}:{BACKEND_PORT}"][1],
               30.0, "the new weight", every=0.2, until=(50).__eq__)


def test_stopping_the_service_leaves_ipvs_and_the_package_removes_and_purges(service):
    gorb, topo, root = service
    before = ipvsadm(topo.lb)
    assert f"TCP {VIP}:{VIP_PORT}" in before
    gorb.proc.send_signal(signal.SIGTERM)  # systemctl stop, KillMode=mixed: the main process
    assert gorb.proc.wait(timeout=limit(90)) == 0, gorb.log()
    assert ipvsadm(topo.lb) == before  # traffic keeps flowing while gorb is stopped
    assert topo.requests(6)["failures"] == 0
    dpkg(root, "--remove", "gorb")
    assert not (root / "opt/gorb").exists() and not (root / "usr/bin/gorb").exists()
    assert (root / "etc/gorb/gorb.toml").exists()  # a conffile stays until purge
    assert (root / "var/lib/gorb/state.json").exists()
    dpkg(root, "--purge", "gorb")
    for path in ("etc/gorb/gorb.toml", "var/lib/gorb", "var/log/gorb"):
        assert not (root / path).exists(), path
    assert (root / "etc/gorb/ops.token").exists()  # the admin's own file is the admin's
    overrides = subprocess.run(["dpkg-statoverride", f"--root={root}", "--list"],
                               capture_output=True, text=True).stdout
    assert "gorb.toml" not in overrides
    account(root)  # the account stays, as Debian keeps system users (files may remain)
