"""The supervised system on a real kernel: ``gorb run`` in a fresh namespace, supervisorctl, stop.

``gorb run`` here takes the host path (the guest's kernel has IPVS): it becomes supervisord, which
starts ipvs-writer and api. The API is required once ``services/api/__main__.py`` exists.
Also here (it needs root and namespaces): the relay that ``gorb run``'s guest mode uses on a host
without IPVS; that mode as a whole is checked by ``check_run_on_host.sh``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import xmlrpc.client
from pathlib import Path

import pytest
import zmq
from supervisor.xmlrpc import SupervisorTransport

from common import runtime
from common.transport import RequestClient
from services.launcher import netns as launcher_netns
from services.launcher.relay import Relay, connect_in
from tests.sandbox.conftest import REPO, ipvsadm, sh

HAS_API = (REPO / "services" / "api" / "__main__.py").exists()
PROGRAMS = ["api", "ipvs-writer"] if HAS_API else ["ipvs-writer"]
API_PORT = 4672


class Gorb:
    """One ``gorb run`` in namespace ``ns`` with its files under ``root``."""

    def __init__(self, ns: str, root: Path) -> None:
        self.ns, self.root = ns, root
        self.run_dir = root / "run"
        self.config = root / "gorb.toml"
        self.config.write_text(
            f'[api]\nlisten = "127.0.0.1:{API_PORT}"\n'
            f'[writer]\nstate_file = "{root}/state/state.json"\nreconcile_interval = 1.0\n')
        self.out = root / "gorb-run.out"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "services.launcher", "run",
                 "--config", str(self.config), "--runtime-dir", str(self.run_dir),
                 "--log-dir", str(root / "log")],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT)

    def ctl(self, *args: str) -> str:
        proc = subprocess.run([sys.executable, "-m", "services.launcher", "ctl", "--runtime-dir",
                               str(self.run_dir), *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
        return proc.stdout + proc.stderr

    def states(self) -> dict[str, str]:
        """{program: state} from supervisord's XML-RPC (what ``status`` prints, without the
        second a supervisorctl process costs in the guest)."""
        transport = SupervisorTransport(None, None, f"unix://{self.run_dir}/supervisor.sock")
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport)
        try:
            return {p["name"]: p["statename"] for p in proxy.supervisor.getAllProcessInfo()}
        except (OSError, xmlrpc.client.Error):
            return {}

    def wait_states(self, want: dict[str, str], timeout: float = 40.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"gorb run exited {self.proc.returncode}:\n{self.log()}")
            if {k: v for k, v in self.states().items() if k in want} == want:
                return
            time.sleep(0.3)
        raise AssertionError(f"not {want}: {self.states()}\n{self.log()}")

    def log(self) -> str:
        logs = [self.out, *sorted((self.root / "log").glob("*.log"))]
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in logs if p.exists())

    def http_get(self, path: str) -> tuple[int, object]:
        """GET on the API, from inside the namespace (it listens on the namespace's loopback)."""
        fd = launcher_netns.open_ns(self.ns)
        try:
            sock = connect_in(fd, ("127.0.0.1", API_PORT), timeout=5)
        finally:
            os.close(fd)
        sock.settimeout(10)
        conn = http.client.HTTPConnection("127.0.0.1", API_PORT)
        conn.sock = sock
        conn.request("GET", path)
        reply = conn.getresponse()
        body = json.loads(reply.read() or b"null")
        conn.close()
        return reply.status, body

    def wait_api(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.http_get("/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"the API does not answer:\n{self.log()}")


def writer_request(run_dir: Path, type_: str, body: dict) -> dict:
    client = RequestClient(zmq.Context.instance(), runtime.endpoint(run_dir, runtime.WRITER),
                           "tests", timeout=10.0)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                return client.request(type_, body, timeout=2.0)
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        client.close()


@pytest.fixture
def gorb(netns, tmp_path):
    g = Gorb(netns("sv"), tmp_path)
    yield g
    if g.proc.poll() is None:
        g.proc.kill()
        g.proc.wait()


def test_gorb_run_supervises_writer_and_api(gorb):
    gorb.wait_states({p: "RUNNING" for p in PROGRAMS})
    assert (gorb.run_dir / "gorb.toml").exists() and (gorb.run_dir / "supervisord.conf").exists()
    status = gorb.ctl("status")
    assert all(f"{p} " in status for p in PROGRAMS) and status.count("RUNNING") == len(PROGRAMS)
    plain = subprocess.run([str(Path(sys.executable).parent / "supervisorctl"), "-c",
                            str(gorb.run_dir / "supervisord.conf"), "status"],
                           capture_output=True, text=True, timeout=60).stdout
    assert "ipvs-writer" in plain and "RUNNING" in plain

    reply = writer_request(gorb.run_dir, "service.create",
                           {"service": "web", "options": {"host": "10.77.0.100", "port": 80}})
    assert reply["ok"], reply
    reply = writer_request(gorb.run_dir, "backend.create",
                           {"service": "web", "backend": "a",
                            "options": {"host": "10.77.1.2", "port": 8080, "weight": 5}})
    assert reply["ok"], reply
    table = {"TCP 10.77.0.100:80": {"sched": "wrr", "flags": "",
                                    "dests": {"10.77.1.2:8080": ("Masq", 5)}}}
    assert ipvsadm(gorb.ns) == table

    # restart: the kernel table is never touched, the new writer adopts it
    assert "ipvs-writer: started" in gorb.ctl("restart", "ipvs-writer")
    assert ipvsadm(gorb.ns) == table
    listed = writer_request(gorb.run_dir, "service.list", {})
    assert listed["data"]["services"] == ["web"]

    # stop/start: traffic's table stays while the writer is down
    assert "ipvs-writer: stopped" in gorb.ctl("stop", "ipvs-writer")
    gorb.wait_states({"ipvs-writer": "STOPPED"})
    assert ipvsadm(gorb.ns) == table
    assert "ipvs-writer: started" in gorb.ctl("start", "ipvs-writer")
    gorb.wait_states({p: "RUNNING" for p in PROGRAMS})
    assert writer_request(gorb.run_dir, "service.list", {})["data"]["services"] == ["web"]

    if HAS_API:
        gorb.wait_api()
        assert "api: started" in gorb.ctl("restart", "api")
        gorb.wait_api()
        status, services = gorb.http_get("/service")
        assert status == 200 and "web" in services, (status, services)

    # SIGTERM to `gorb run` (it became supervisord): every child stops, nothing is left behind
    pids = set(sh(f"ip netns pids {gorb.ns}").split())
    assert len(pids) >= 1 + len(PROGRAMS), pids
    gorb.proc.send_signal(signal.SIGTERM)
    assert gorb.proc.wait(timeout=40) == 0, gorb.log()
    assert sh(f"ip netns pids {gorb.ns}").split() == []
    assert [p for p in pids if Path(f"/proc/{p}").exists()] == []
    assert ipvsadm(gorb.ns) == table  # the writer leaves IPVS in place when it stops
    assert "exit status 0" in (gorb.root / "log" / "supervisord.log").read_text()


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def test_relay_reaches_a_server_that_exists_only_inside_a_namespace(netns):
    ns_fd = launcher_netns.open_ns(netns("rl"))
    made: list[socket.socket] = []

    def listen_inside() -> None:  # a socket belongs to the namespace of the thread creating it
        launcher_netns.enter(ns_fd)
        made.append(socket.create_server(("127.0.0.1", 0)))

    t = threading.Thread(target=listen_inside)
    t.start()
    t.join()
    server = made[0]
    port = server.getsockname()[1]

    def upper_echo() -> None:
        conn, _ = server.accept()
        with conn:
            conn.sendall(_recv_all(conn).upper())  # answers after the client's half-close

    threading.Thread(target=upper_echo, daemon=True).start()
    relay = Relay("test", socket.create_server(("127.0.0.1", 0)), ns_fd, ("127.0.0.1", port))
    dead = Relay("dead", socket.create_server(("127.0.0.1", 0)), ns_fd, ("127.0.0.1", port + 1))
    relay.start()
    dead.start()
    try:
        with socket.create_connection(relay.listener.getsockname(), timeout=10) as client:
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            assert _recv_all(client) == b"PING"
        with socket.create_connection(dead.listener.getsockname(), timeout=10) as client:
            assert _recv_all(client) == b""  # nothing listens there: closed, not hung
    finally:
        relay.close()
        dead.close()
        server.close()
        os.close(ns_fd)
