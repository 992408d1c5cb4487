"""The README's run command on a host whose kernel has no IPVS (like this one), end to end:
``gorb run`` boots the supervised system in a user-mode-linux guest and relays the API to
127.0.0.1:4672. Driven only from outside, as an operator would: the README's quickstart commands
verbatim (curl and ``gorb ctl``), HTTP through the relay, SIGTERM to stop, then a second
``gorb run`` on the same state directory.

The test's ``gorb run`` lives in a network namespace of its own (entered with ``nsenter --net``,
which changes nothing else), so its 127.0.0.1:4672 is private and the host's port stays free; it
creates its guest-link namespace (``gorb-<pid>``) beside it like any other run. Skipped where the
kernel has IPVS (gorb would run there directly), without root (namespaces, tap) or without UML.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from gorb.services.launcher import netns, uml
from gorb.services.launcher.relay import connect_in
from tests import installed
from tests.pace import limit, wait_until

REPO = Path(__file__).resolve().parents[2]
GORB = installed.gorb()  # the install's (tests/installed.py), never this checkout
PORT = 4672

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(Path("/proc/net/ip_vs").exists(),
                       reason="this kernel has IPVS: gorb run does not use a guest here"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (network namespaces, tap)"),
    pytest.mark.skipif(uml.available() is not None, reason=str(uml.available())),
]


class InNetns:
    """HTTP to 127.0.0.1 of another network namespace, on a socket made inside it."""

    def __init__(self, ns: str):
        self.ns = ns

    def request(self, method: str, path: str, body: dict | None = None,
                timeout: float = 10) -> tuple[int, bytes]:
        """``timeout``: a limit (scaled by the pace)."""
        timeout = limit(timeout)
        fd = netns.open_ns(self.ns)
        try:
            sock = connect_in(fd, ("127.0.0.1", PORT), timeout=timeout)
        finally:
            os.close(fd)
        sock.settimeout(timeout)
        conn = http.client.HTTPConnection("127.0.0.1", PORT, timeout=timeout)
        conn.sock = sock
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data,
                         headers={"Content-Type": "application/json"} if data else {})
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()


def quickstart() -> list[str]:
    """The shell commands of the README's quickstart block, continuation lines joined."""
    text = (REPO / "README.md").read_text()
    block = text.split("## Quickstart", 1)[1].split("```", 2)[1]
    commands, pending = [], ""
    for line in block.splitlines():
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(line.strip())
    return commands


class GorbRun:
    """``gorb run`` in namespace ``ns`` with every directory under ``work``."""

    def __init__(self, ns: str, work: Path):
        self.ns = ns
        self.work = work
        self.out = open(work / f"out-{time.monotonic_ns()}", "w+")
        self.proc = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{ns}", GORB, "run", "-l", f":{PORT}",
             "--runtime-dir", str(work / "run"), "--state-dir", str(work / "state"),
             "--log-dir", str(work / "log")],
            cwd="/", stdout=self.out, stderr=subprocess.STDOUT)
        self.http = InNetns(ns)

    def output(self) -> str:
        self.out.flush()
        return Path(self.out.name).read_text()

    def wait_ready(self, seconds: float = 120) -> float:
        """Seconds until the API answered ``/health``; fails at once if ``gorb run`` exits."""
        t0 = time.monotonic()

        def ready() -> bool:
            assert self.proc.poll() is None, f"gorb run exited {self.proc.returncode}:\n" \
                                             f"{self.output()}"
            try:
                return self.http.request("GET", "/health", timeout=2)[0] == 200
            except (OSError, TimeoutError):
                return False
        wait_until(ready, seconds, lambda: f"the API to answer /health:\n{self.output()}",
                   every=0.3)
        return time.monotonic() - t0

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([GORB, "ctl", "--runtime-dir", str(self.work / "run"), *args],
                              capture_output=True, text=True, timeout=limit(30))

    def shell(self, command: str) -> subprocess.CompletedProcess:
        """``command`` as an operator's shell on this host runs it (in the test's namespace, with
        gorb's runtime dir given by the environment, so ``gorb ctl`` needs no flag)."""
        env = {**os.environ, "GORB_GORB_RUNTIME_DIR": str(self.work / "run")}
        return subprocess.run(["nsenter", f"--net=/run/netns/{self.ns}", "sh", "-c", command],
                              cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=limit(60))

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(limit(60))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def ns():
    name = f"gorbtest{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    yield name
    subprocess.run(["ip", "netns", "del", name], check=False)


def test_gorb_run_boots_the_guest_relays_the_api_and_keeps_state_across_runs(ns, tmp_path):
    run = GorbRun(ns, tmp_path)
    try:
        ready = run.wait_ready()
        banner = run.output()
        assert "no IPVS" in banner and "user-mode-linux guest" in banner, banner
        assert f"http://127.0.0.1:{PORT}/" in banner, banner
        guest_ns = f"gorb-{run.proc.pid}"
        assert guest_ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                          text=True).stdout
        # The README's quickstart, verbatim: every command succeeds and says what it promises.
        commands = quickstart()
        assert len(commands) >= 15 and any("PATCH" in c for c in commands), commands
        for command in commands:
            done = run.shell(command)
            assert done.returncode == 0, (command, done.stdout, done.stderr)
            words = command.split()
            if words[:3] == ["curl", "-sS", "-X"]:  # PUT / PATCH / DELETE: 200, empty body
                assert done.stdout == "", (command, done.stdout)
            elif words[:2] == ["curl", "-sS"]:
                url = words[2]
                if url.endswith(":4672/service"):
                    assert json.loads(done.stdout) == ["web"], done.stdout
                elif url.endswith("/service/web"):
                    assert json.loads(done.stdout)["backends"] == ["a"], done.stdout
                elif url.endswith("/service/web/a"):
                    assert json.loads(done.stdout)["options"]["port"] == 8080, done.stdout
                elif url.endswith("/health"):
                    assert json.loads(done.stdout) == {"api": "ok", "writer": "ok", "auth": "off"}, done.stdout
                elif url.endswith("/metrics"):
                    assert "gorb_" in done.stdout, done.stdout[:500]
                elif url.endswith("/openapi.json"):
                    assert json.loads(done.stdout)["openapi"].startswith("3.1"), done.stdout[:200]
            elif "gorb ctl status" in command:
                assert done.stdout.count("RUNNING") == 5, done.stdout
        run.wait_ready(60)  # the quickstart ends with ``gorb ctl restart api``
        assert json.loads(run.http.request("GET", "/service")[1]) == [], \
            "the quickstart deletes what it created"
        status = run.ctl("status")
        assert status.returncode == 0, status
        running = [line.split()[0] for line in status.stdout.splitlines() if "RUNNING" in line]
        assert sorted(running) == ["api", "discovery", "ipvs-writer",
                                   "pulse-worker:pulse-worker_00", "pulse-worker:pulse-worker_01"]
        assert run.http.request("PUT", "/service/web", {
            "host": "10.77.0.100", "port": 80, "protocol": "tcp", "method": "rr"})[0] == 200
        assert run.http.request("PUT", "/service/web/a", {"host": "10.77.0.1", "port": 8080})[0] \
            == 200
        assert run.http.request("PUT", "/service/web", {"host": "10.77.0.100", "port": 80})[0] \
            == 409
        # The API restarted by supervisorctl through the relayed socket comes back.
        restart = run.ctl("restart", "api")
        assert restart.returncode == 0 and "api: started" in restart.stdout, restart
        run.wait_ready(60)
    finally:
        code = run.stop()
    assert code == 0, run.output()
    assert "stopping" in run.output()
    assert guest_ns not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                          text=True).stdout
    assert not (tmp_path / "run" / "supervisor.sock").exists()
    assert "web" in json.loads((tmp_path / "state" / "state.json").read_text())["services"]
    assert "stopped: ipvs-writer (exit status 0)" in (tmp_path / "log" /
                                                      "supervisord.log").read_text()

    # A second run on the same state directory serves what the first one was told.
    again = GorbRun(ns, tmp_path)
    try:
        again.wait_ready()
        status, body = again.http.request("GET", "/service/web/a")
        assert status == 200, body
        view = json.loads(body)
        assert view["options"]["host"] == "10.77.0.1" and view["options"]["port"] == 8080
        status, body = again.http.request("GET", "/service/web")
        assert status == 200 and json.loads(body)["options"]["method"] == "rr", body
    finally:
        assert again.stop() == 0, again.output()
    print(f"gorb run: API ready after {ready:.1f} s")
