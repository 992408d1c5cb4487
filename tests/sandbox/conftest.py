"""Fixtures for tests that need a real IPVS kernel: they run inside the user-mode-linux guest.

``tests/run`` boots the guest (``tests/sandbox/uml.py``) and runs ``pytest tests/sandbox`` in it;
``init.sh`` sets ``GORB_SANDBOX=1``. Run on a plain host (no IPVS), these tests are skipped with
a message saying how to run them; CI always runs them through ``tests/run``.

Isolation: IPVS tables are per network namespace, so each test gets fresh namespaces and its own
writer process (``ip netns exec``); nothing a test does is seen by another.

Addresses: 10.77.0.0/16, only inside namespaces made here (the guest has no network device).

Accounts: gorb drops api, pulse-worker and discovery to the account ``gorb`` when it exists
(``gorb.services.launcher.accounts``), as a ``.deb`` install has it. The guest's root is the
host's, read-only, so where the host has no such account ``gorb_account`` gives the guest one (a
copy of /etc/passwd and /etc/group with it added, bind-mounted over them): every whole-system test
here runs least-privileged, as production does.

gorb itself runs from an install (``tests/installed.py``: the wheel in a venv outside the tree),
never from this checkout.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

from gorb.common import runtime
from gorb.common.transport import RequestClient, TransportTimeout
from tests import installed
from tests.pace import limit, wait_until

IN_SANDBOX = os.environ.get("GORB_SANDBOX") == "1"
REPO = Path(__file__).resolve().parents[2]
_ns_counter = itertools.count(1)


def pytest_collection_modifyitems(config, items):
    if IN_SANDBOX:
        return
    skip = pytest.mark.skip(reason="needs real IPVS: run through tests/run (user-mode-linux)")
    for item in items:
        if "tests/sandbox" in str(item.fspath):
            item.add_marker(skip)


ACCOUNT = "gorb"
_ACCOUNT_ETC = Path("/run/gorb-test-etc")


@pytest.fixture(scope="session", autouse=True)
def gorb_account() -> pwd.struct_passwd | None:
    """The ``gorb`` account inside the guest (see the module docstring); None off the sandbox."""
    if not IN_SANDBOX:
        return None
    try:
        return pwd.getpwnam(ACCOUNT)
    except KeyError:
        pass
    passwd, group = Path("/etc/passwd").read_text(), Path("/etc/group").read_text()
    used = {int(line.split(":")[2]) for text in (passwd, group)
            for line in text.splitlines() if line.count(":") >= 2}
    uid = next(n for n in range(999, 100, -1) if n not in used)
    _ACCOUNT_ETC.mkdir(exist_ok=True)
    for name, text, line in (("passwd", passwd,
                              f"{ACCOUNT}:x:{uid}:{uid}:gorb (tests):/var/lib/gorb:"
                              "/usr/sbin/nologin"),
                             ("group", group, f"{ACCOUNT}:x:{uid}:")):
        (_ACCOUNT_ETC / name).write_text(text.rstrip("\n") + "\n" + line + "\n")
        (_ACCOUNT_ETC / name).chmod(0o644)
        sh(f"mount --bind {_ACCOUNT_ETC / name} /etc/{name}")
    return pwd.getpwnam(ACCOUNT)


def open_to_all(path: Path) -> None:
    """Let any account enter ``path`` and the directories above it (o+x, no listing): pytest
    makes its temporary directories 0700, and gorb's dropped programs must reach a runtime dir
    made under one (``gorb run`` refuses one they cannot reach)."""
    top = tempfile.gettempdir() + "/"
    for p in [path, *path.parents]:
        mode = p.stat().st_mode
        if str(p).startswith(top) and p.stat().st_uid == os.geteuid() and not mode & 0o001:
            p.chmod((mode & 0o7777) | 0o011)


def sh(cmd: str, check: bool = True, ns: str | None = None) -> str:
    """Run a shell command (in namespace ``ns``); return its stdout."""
    if ns:
        cmd = f"ip netns exec {ns} sh -c {shlex_quote(cmd)}"
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    if check and proc.returncode:
        raise AssertionError(f"{cmd!r} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def shlex_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


# --- ipvsadm -Ln parsed -------------------------------------------------------------------------

# "FWM  8 IPv6 lc ..." is how ipvsadm prints an IPv6 fwmark service.
_SVC = re.compile(r"^(TCP|UDP|SCTP|FWM)\s+(\S+(?: IPv6)?)\s+(\S+)(.*)$")
_DST = re.compile(r"^\s+->\s+(\S+)\s+(\S+)\s+(\d+)\s+\d+\s+\d+")


def ipvsadm(ns: str) -> dict[str, dict]:
    """``ipvsadm -Ln`` of namespace ``ns`` as {"TCP 10.77.0.100:80": {"sched", "flags", "dests"}}.

    ``flags`` is the rest of the service line (e.g. ``(sh-fallback,sh-port) persistent 300 mask
    255.255.255.0``); ``dests`` maps "addr:port" to (forward, weight).
    """
    table: dict[str, dict] = {}
    current = None
    for line in sh("ipvsadm -Ln", ns=ns).splitlines()[3:]:
        m = _SVC.match(line)
        if m:
            proto, addr, sched, rest = m.groups()
            current = table[f"{proto} {addr}"] = {"sched": sched, "flags": rest.strip(), "dests": {}}
            continue
        m = _DST.match(line)
        if m and current is not None:
            current["dests"][m.group(1)] = (m.group(2), int(m.group(3)))
    return table


# --- namespaces and the writer ------------------------------------------------------------------

@contextlib.contextmanager
def namespaces():
    """A factory of fresh network namespaces with lo up, all deleted (their processes killed)
    on exit: for fixtures of any scope (``netns`` is the per-test one)."""
    made: list[str] = []

    def make(prefix: str = "g") -> str:
        name = f"{prefix}{os.getpid() % 1000}x{next(_ns_counter)}"
        sh(f"ip netns add {name}")
        sh("ip link set lo up", ns=name)
        made.append(name)
        return name

    try:
        yield make
    finally:
        for name in made:
            sh(f"ip netns pids {name} | xargs -r kill -9", check=False)
            sh(f"ip netns del {name}", check=False)


@pytest.fixture
def netns():
    """A factory of fresh network namespaces with lo up; all deleted at teardown."""
    with namespaces() as make:
        yield make


@pytest.fixture(scope="module")
def module_netns():
    """``netns`` for module-scoped fixtures: deleted after the module's last test."""
    with namespaces() as make:
        yield make


@dataclass
class Writer:
    """An ipvs-writer process in namespace ``ns``, with a bus client."""

    ns: str
    workdir: Path
    reconcile: float = 1.0
    extra_args: list[str] = field(default_factory=list)
    proc: subprocess.Popen | None = None
    client: RequestClient | None = None

    @property
    def state_file(self) -> Path:
        return self.workdir / "state" / "state.json"

    @property
    def runtime_dir(self) -> str:
        return str(self.workdir / "run")

    @property
    def log(self) -> Path:
        return self.workdir / "writer.log"

    def start(self, *args: str, wait: bool = True) -> None:
        cmd = ["ip", "netns", "exec", self.ns, installed.python(), "-P", "-m",
               "gorb.services.ipvs_writer",
               "--runtime-dir", self.runtime_dir, "--state-file", str(self.state_file),
               "--reconcile-interval", str(self.reconcile), *self.extra_args, *args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd="/", stdout=log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = 30.0) -> None:
        if self.client is None:
            self.client = RequestClient(zmq.Context.instance(),
                                        runtime.endpoint(self.runtime_dir, runtime.WRITER),
                                        "tests", timeout=limit(2.0))

        def answers() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"writer exited with {self.proc.returncode}:\n"
                                     + self.log.read_text())
            try:
                return bool(self.client.request("service.list", {}, timeout=limit(1.0)))
            except TransportTimeout:
                return False
        wait_until(answers, timeout, lambda: "the writer to answer:\n" + self.log.read_text(),
                   every=0.1)

    def request(self, type_: str, body: dict, timeout: float = 10.0) -> dict:
        """``timeout``: a limit (scaled by the pace)."""
        assert self.client is not None
        return self.client.request(type_, body, timeout=limit(timeout))

    def must(self, type_: str, body: dict) -> dict:
        reply = self.request(type_, body)
        assert reply["ok"], reply
        return reply

    def kill(self, sig: int = signal.SIGKILL) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=limit(30))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill(signal.SIGTERM)
        if self.client is not None:
            self.client.close()
            self.client = None


@pytest.fixture
def writer_factory(netns):
    """Writers in fresh namespaces: ``writer_factory(ns=None, start=True)``."""
    made: list[Writer] = []

    def make(ns: str | None = None, start: bool = True, **kw) -> Writer:
        w = Writer(ns or netns(), Path(tempfile.mkdtemp(prefix="gw", dir="/tmp")), **kw)
        made.append(w)
        if start:
            w.start()
        return w

    yield make
    for w in made:
        w.stop()
        shutil.rmtree(w.workdir, ignore_errors=True)


@pytest.fixture
def writer(writer_factory) -> Writer:
    return writer_factory()
