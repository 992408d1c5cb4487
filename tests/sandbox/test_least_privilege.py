"""gorb installed and least-privileged, on a real kernel: the wheel's install runs the whole
supervised system (API, writer, pulse, kernel entries, traffic through a VIP), and each program
has exactly the uid and capabilities ``gorb.services.launcher.accounts`` promises, read from
``/proc/<pid>/status`` as the kernel reports them.

Runs as root in the guest with the account ``gorb`` present (``conftest.gorb_account``), as a
``.deb`` install is: ``gorb run`` drops api, pulse-worker and discovery to it.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from gorb.common import runtime
from tests import installed
from tests.pace import limit, wait_until
from tests.sandbox import topology
from tests.sandbox.conftest import ACCOUNT
from tests.sandbox.test_supervised import PROGRAMS, Gorb, proc_table
from tests.sandbox.topology import BACKEND_PORT, VIP, VIP_PORT

NET_ADMIN = 1 << 12
SETUID_SETGID = (1 << 7) | (1 << 6)
NOBODY = pwd.getpwnam("nobody")


def status_of(pid: int | str) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def creds(status: dict[str, str]) -> dict:
    """The credentials that matter here: uids and gids (real, effective, saved, fs), the
    capability masks, no_new_privs."""
    return {"uid": {int(u) for u in status["Uid"].split()},
            "gid": {int(g) for g in status["Gid"].split()},
            **{k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
            "nnp": int(status["NoNewPrivs"])}


def owner_mode(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@pytest.fixture(scope="module")
def system(tmp_path_factory, gorb_account, module_netns):
    """One installed gorb run over the NAT topology, with one backend checked by an exec check
    that records the credentials it runs with."""
    topo = topology.build(module_netns, n_backends=2)
    root = tmp_path_factory.mktemp("lp")
    probe = root / "probe"
    probe.mkdir()
    probe.chmod(0o777)  # the exec check (user nobody) writes its status here
    gorb = Gorb(topo.lb, root)
    try:
        gorb.wait_states({p: "RUNNING" for p in PROGRAMS})
        gorb.wait_api()
        yield gorb, topo, probe, gorb_account
    finally:
        gorb.close()
        topo.close()


def test_the_installed_package_serves_traffic_through_a_vip(system):
    gorb, topo, probe, _ = system
    assert installed.is_install(), "tests/run sets GORB_TEST_VENV: this must run an install"
    # every program is the install's Python, not this checkout's
    for name in PROGRAMS:
        cmdline = Path(f"/proc/{gorb.pid(name)}/cmdline").read_bytes().split(b"\0")
        assert cmdline[0].decode().startswith(f"{installed.venv()}/bin/python"), (name, cmdline)
    pulse = {"type": "exec", "interval": "1s",
             "args": {"argv": ["/bin/sh", "-c", f"cat /proc/self/status > {probe}/status"]}}
    assert gorb.http("PUT", "/service/web", {"host": VIP, "port": VIP_PORT, "method": "rr"}
                     ).status == 200
    for rs in ("b1", "b2"):
        body = {"host": topo.addresses[rs], "port": BACKEND_PORT, "pulse": pulse}
        assert gorb.http("PUT", f"/service/web/{rs}", body).status == 200
    want = {f"TCP {VIP}:{VIP_PORT}": {f"{topo.addresses[rs]}:{BACKEND_PORT}": ("Masq", 100)
                                      for rs in ("b1", "b2")}}
    wait_until(lambda: proc_table(gorb.proc.pid), 30.0, "the kernel table", every=0.2,
               until=want.__eq__)
    wait_until(lambda: gorb.http("GET", "/service/web/b1").json()["metrics"]["status_name"], 30.0,
               "pulse says up", every=0.2, until="up".__eq__)
    result = topo.requests(20)
    assert result["failures"] == 0, result
    assert result["counts"] == {"b1": 10, "b2": 10}, result


def expected_creds(uid: int, gid: int, workers: int = 2) -> dict[str, dict]:
    """What ``creds`` of each program must be when gorb drops to the account ``uid``/``gid``."""
    nothing = {"CapInh": 0, "CapPrm": 0, "CapEff": 0, "CapBnd": 0, "CapAmb": 0, "nnp": 1}
    expect = {
        "ipvs-writer": {"uid": {0}, "gid": {gid}, "CapInh": 0, "CapPrm": NET_ADMIN,
                        "CapEff": NET_ADMIN, "CapBnd": NET_ADMIN, "CapAmb": 0, "nnp": 1},
        "api": {"uid": {uid}, "gid": {gid}, **nothing},
        "discovery": {"uid": {uid}, "gid": {gid}, **nothing},
    }
    for n in range(workers):
        expect[f"pulse-worker_{n:02d}"] = {
            "uid": {uid}, "gid": {gid}, "CapInh": SETUID_SETGID, "CapPrm": SETUID_SETGID,
            "CapEff": SETUID_SETGID, "CapBnd": SETUID_SETGID, "CapAmb": SETUID_SETGID, "nnp": 1}
    return expect


def test_each_program_has_its_uid_and_capabilities_only(system):
    gorb, _, _, account = system
    seen = {name: creds(status_of(gorb.pid(name))) for name in PROGRAMS}
    assert seen == expected_creds(account.pw_uid, account.pw_gid)
    # supervisord itself stays root (it must start the writer); nothing else does
    assert creds(status_of(gorb.proc.pid))["uid"] == {0}


def test_exec_checks_run_as_nobody_with_no_capabilities(system):
    gorb, _, probe, _ = system
    # the first test created the backends; their exec checks write this every second
    text = wait_until(lambda: (probe / "status").exists() and (probe / "status").read_text(),
                      30.0, "the exec check's status", every=0.2)
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    seen = creds(fields)
    assert seen == {"uid": {NOBODY.pw_uid}, "gid": {NOBODY.pw_gid}, "CapInh": 0, "CapPrm": 0,
                    "CapEff": 0, "CapBnd": SETUID_SETGID, "CapAmb": 0, "nnp": 1}
    assert fields["Groups"] == ""


def test_runtime_dir_and_sockets_belong_to_root_and_the_group(system):
    gorb, _, _, account = system
    rt = gorb.run_dir
    assert owner_mode(rt) == (0, account.pw_gid, 0o750)
    for name in (runtime.WRITER, runtime.EVENTS, runtime.HEALTH):
        path = rt / f"{name}.sock"
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
        assert owner_mode(path) == (0, account.pw_gid, 0o770), name
    assert owner_mode(rt / runtime.DISCOVERY_DIR) == (account.pw_uid, account.pw_gid, 0o700)
    assert owner_mode(rt / runtime.DISCOVERY_DIR / "discovery.sock")[:2] == \
        (account.pw_uid, account.pw_gid)
    assert owner_mode(rt / "supervisor.sock") == (0, 0, 0o700)
    assert owner_mode(rt / "gorb.toml") == (0, account.pw_gid, 0o640)


CONNECT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
    print(json.dumps("connected"))
except OSError as exc:
    print(json.dumps(exc.errno))
"""


def connect_as(user: str, path: Path) -> object:
    """Connect to the unix socket ``path`` as ``user`` (no groups of root's, no capabilities)."""
    out = subprocess.run(["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
                          "--init-groups", "--inh-caps=-all", "--bounding-set=-all", "--",
                          installed.python(), "-S", "-c", CONNECT, str(path)],
                         capture_output=True, text=True, timeout=limit(60))
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_another_user_cannot_connect_to_the_writer(system):
    gorb, _, _, _ = system
    writer = gorb.run_dir / f"{runtime.WRITER}.sock"
    import errno
    assert connect_as("nobody", writer) == errno.EACCES
    assert connect_as(ACCOUNT, writer) == "connected"  # the group may: the api does
    # nor reach supervisord's control socket, even as the gorb account
    assert connect_as(ACCOUNT, gorb.run_dir / "supervisor.sock") == errno.EACCES


def test_install_holds_one_top_level_package_and_no_common():
    venv = installed.venv()
    assert installed.is_install()
    site = next((venv / "lib").glob("python3*/site-packages"))
    out = subprocess.run([installed.python(), "-c", "import common"], cwd="/",
                         capture_output=True, text=True)
    assert out.returncode != 0 and "No module named 'common'" in out.stderr
    out = subprocess.run([installed.python(), "-c", "import services"], cwd="/",
                         capture_output=True, text=True)
    assert out.returncode != 0
    where = subprocess.run([installed.python(), "-c",
                            "import gorb.services.api.app as m, gorb.common.model as c; "
                            "print(m.__file__); print(c.__file__)"],
                           cwd="/", capture_output=True, text=True, check=True).stdout.split()
    assert all(path.startswith(str(site) + "/gorb/") for path in where), where
    record = next(site.glob("gorb-*.dist-info")) / "RECORD"
    tops = {line.split("/")[0] for line in record.read_text().splitlines()
            if not line.startswith("../")}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"gorb"}, tops
