"""The supervised system on a real kernel: ``gorb run`` in a fresh namespace, supervisorctl, stop.

``gorb run`` here takes the host path (the guest's kernel has IPVS): it becomes supervisord, which
starts ipvs-writer, api and ``pulse.workers`` pulse workers (pulse-worker_00, _01 by default).
Also here (it needs root and namespaces): the relay that ``gorb run``'s guest mode uses on a host
without IPVS; that mode as a whole is tested on the host by ``tests/host/test_gorb_run_guest.py``.

``Gorb`` (one ``gorb run`` and the means to reach it from the test process: supervisord's
XML-RPC, HTTP to the API through a socket made inside the namespace) and ``proc_table`` (the
kernel's table without a fork) are shared with ``test_api_e2e.py``.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
import xmlrpc.client
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
from supervisor.xmlrpc import SupervisorTransport

from gorb.common import runtime
from gorb.common.transport import RequestClient
from gorb.services.launcher import netns as launcher_netns
from gorb.services.launcher.relay import Relay, connect_in
from tests import installed
from tests.pace import limit, wait_until
from tests.sandbox import topology
from tests.sandbox.conftest import ipvsadm, open_to_all, sh
from tests.sandbox.topology import BACKEND_PORT, VIP, VIP_PORT

# What `gorb run` supervises with the default pulse.workers = 2; discovery runs (idle) even with
# nothing configured in [discovery].
PROGRAMS = ["api", "discovery", "ipvs-writer", "pulse-worker_00", "pulse-worker_01"]
API_PORT = 4672


@dataclass
class Reply:
    status: int
    headers: dict[str, str]  # lower-cased names
    raw: bytes

    def json(self):
        return json.loads(self.raw)


class Gorb:
    """One ``gorb run`` in namespace ``ns`` with its files under ``root``.

    The API listens on ``listen`` inside the namespace; ``http`` reaches it from the test process
    through a socket created inside the namespace (``connect_in``: a short-lived thread enters
    it), so no address has to be routed between the guest's root namespace and ``ns``.
    """

    def __init__(self, ns: str, root: Path, listen: str = f"127.0.0.1:{API_PORT}",
                 device: str | None = None, extra_config: str = "",
                 api_config: str = "", command: list[str] | None = None,
                 run_dir: Path | None = None, log_dir: Path | None = None) -> None:
        """``extra_config``: more TOML (whole sections) after the [api] and [writer] ones;
        ``api_config``: more [api] keys (lines; ``tokens = { ... }`` as an inline table).
        ``command``: run this (in ``ns``) instead of the install's ``gorb run`` on a config of
        ours; ``run_dir`` and ``log_dir`` say where it keeps its sockets and logs."""
        self.ns, self.root = ns, root
        self.api_address = (listen.rpartition(":")[0] or "127.0.0.1",
                            int(listen.rpartition(":")[2]))
        self.run_dir = run_dir or root / "run"
        self.log_dir = log_dir or root / "log"
        self.out = root / "gorb-run.out"
        self._ns_fd = launcher_netns.open_ns(ns)
        if command is not None:
            with open(self.out, "wb") as out:
                self.proc = subprocess.Popen(["ip", "netns", "exec", ns, *command], cwd="/",
                                             stdout=out, stderr=subprocess.STDOUT)
            return
        self.config = root / "gorb.toml"
        device_line = f'device = "{device}"\n' if device else ""
        self.config.write_text(
            f'[api]\nlisten = "{listen}"\n{api_config}'
            f'[writer]\nstate_file = "{root}/state/state.json"\nreconcile_interval = 1.0\n'
            f'{device_line}{extra_config}')
        open_to_all(root)  # dropped programs (user gorb) must reach the runtime dir under it
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", ns, installed.gorb(), "run",
                 "--config", str(self.config), "--runtime-dir", str(self.run_dir),
                 "--log-dir", str(root / "log")],
                cwd="/", stdout=out, stderr=subprocess.STDOUT)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self._ns_fd >= 0:
            os.close(self._ns_fd)
            self._ns_fd = -1

    def ctl(self, *args: str) -> str:
        proc = subprocess.run([installed.gorb(), "ctl", "--runtime-dir", str(self.run_dir),
                               *args], cwd="/", capture_output=True, text=True,
                              timeout=limit(60))
        return proc.stdout + proc.stderr

    def processes(self) -> dict[str, dict]:
        """{process name: supervisord's process info} from its XML-RPC (what ``status`` prints,
        without the second a supervisorctl process costs in the guest); {} if it does not
        answer."""
        transport = SupervisorTransport(None, None, f"unix://{self.run_dir}/supervisor.sock")
        proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport)
        try:
            return {p["name"]: p for p in proxy.supervisor.getAllProcessInfo()}
        except (OSError, xmlrpc.client.Error):
            return {}

    def states(self) -> dict[str, str]:
        return {name: p["statename"] for name, p in self.processes().items()}

    def pid(self, name: str) -> int:
        return self.processes()[name]["pid"]

    def wait_states(self, want: dict[str, str], timeout: float = 40.0) -> None:
        def reached() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"gorb run exited {self.proc.returncode}:\n{self.log()}")
            return {k: v for k, v in self.states().items() if k in want} == want
        wait_until(reached, timeout, lambda: f"{want} (now {self.states()})\n{self.log()}",
                   every=0.3)

    def log(self) -> str:
        logs = [self.out, *sorted(self.log_dir.glob("*.log"))]
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in logs if p.exists())

    def connect(self, timeout: float = 5.0) -> http.client.HTTPConnection:
        """An HTTP connection to the API, its socket made inside the namespace; ``timeout``: a
        limit (scaled by the pace)."""
        timeout = limit(timeout)
        sock = connect_in(self._ns_fd, self.api_address, timeout=timeout)
        sock.settimeout(timeout)
        conn = http.client.HTTPConnection(*self.api_address, timeout=timeout)
        conn.sock = sock
        return conn

    def http(self, method: str, path: str, body: object = None, timeout: float = 10.0) -> Reply:
        """One request on a fresh connection (as curl does); ``body`` a JSON value or bytes.
        Connection errors (refused, reset) propagate as ``ConnectionError``."""
        conn = self.connect(timeout)
        try:
            data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
            conn.request(method, path, body=data,
                         headers={} if data is None else {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return Reply(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
        finally:
            conn.close()

    def http_get(self, path: str) -> tuple[int, object]:
        reply = self.http("GET", path)
        return reply.status, json.loads(reply.raw or b"null")

    def wait_api(self, timeout: float = 30.0) -> None:
        def answers() -> bool:
            try:
                return self.http("GET", "/health").status == 200
            except OSError:
                return False
        wait_until(answers, timeout, lambda: f"the API to answer:\n{self.log()}", every=0.3)


_FWD = {"Masq", "Route", "Tunnel", "Local"}


def _hex_endpoint(text: str) -> str:
    addr, port = text.split(":")
    return f"{socket.inet_ntoa(bytes.fromhex(addr))}:{int(port, 16)}"


def proc_table(pid: int) -> dict[str, dict[str, tuple[str, int]]]:
    """The IPv4 IPVS table of the namespace of process ``pid``, read from
    ``/proc/<pid>/net/ip_vs`` without a fork (an ``ipvsadm`` under ``ip netns exec`` costs
    ~250 ms in the guest), as {"TCP 10.77.0.100:80": {"10.77.11.2:8080": ("Masq", 100)}}."""
    table: dict[str, dict[str, tuple[str, int]]] = {}
    current: dict[str, tuple[str, int]] | None = None
    for line in Path(f"/proc/{pid}/net/ip_vs").read_text().splitlines()[3:]:
        fields = line.split()
        if fields[:1] in (["TCP"], ["UDP"], ["SCTP"]) and len(fields[1]) == 13:
            current = table[f"{fields[0]} {_hex_endpoint(fields[1])}"] = {}
        elif fields[:1] == ["->"] and current is not None and fields[2] in _FWD:
            current[_hex_endpoint(fields[1])] = (fields[2], int(fields[3]))
    return table


def writer_request(run_dir: Path, type_: str, body: dict) -> dict:
    client = RequestClient(zmq.Context.instance(), runtime.endpoint(run_dir, runtime.WRITER),
                           "tests", timeout=limit(10.0))
    try:  # the writer may be starting: its transport errors count as not yet
        return wait_until(lambda: client.request(type_, body, timeout=limit(2.0)), 20,
                          f"the writer to answer {type_}", every=0.2, ignoring=(Exception,))
    finally:
        client.close()


@pytest.fixture
def gorb(netns, tmp_path):
    g = Gorb(netns("sv"), tmp_path)
    yield g
    g.close()


def test_gorb_run_supervises_writer_api_and_pulse_workers(gorb):
    gorb.wait_states({p: "RUNNING" for p in PROGRAMS})
    assert (gorb.run_dir / "gorb.toml").exists() and (gorb.run_dir / "supervisord.conf").exists()
    status = gorb.ctl("status")
    assert all(f"{p} " in status for p in PROGRAMS), status
    assert status.count("RUNNING") == len(PROGRAMS), status
    assert "pulse-worker:pulse-worker_00 " in status, status  # one group, numprocs = 2
    plain = subprocess.run([str(installed.venv() / "bin" / "supervisorctl"), "-c",
                            str(gorb.run_dir / "supervisord.conf"), "status"],
                           capture_output=True, text=True, timeout=limit(60)).stdout
    assert "ipvs-writer" in plain and "RUNNING" in plain

    reply = writer_request(gorb.run_dir, "service.create",
                           {"service": "web", "options": {"host": "10.77.0.100", "port": 80}})
    assert reply["ok"], reply
    # No health check: the address does not exist, and a (default tcp) check would take it to 0.
    reply = writer_request(gorb.run_dir, "backend.create",
                           {"service": "web", "backend": "a",
                            "options": {"host": "10.77.1.2", "port": 8080, "weight": 5,
                                        "pulse": {"type": "none"}}})
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

    gorb.wait_api()
    assert "api: started" in gorb.ctl("restart", "api")
    gorb.wait_api()
    status, services = gorb.http_get("/service")
    assert status == 200 and "web" in services, (status, services)

    # SIGTERM to `gorb run` (it became supervisord): every child stops, nothing is left behind
    pids = set(sh(f"ip netns pids {gorb.ns}").split())
    assert len(pids) >= 1 + len(PROGRAMS), pids
    gorb.proc.send_signal(signal.SIGTERM)
    assert gorb.proc.wait(timeout=limit(40)) == 0, gorb.log()
    assert sh(f"ip netns pids {gorb.ns}").split() == []
    assert [p for p in pids if Path(f"/proc/{p}").exists()] == []
    assert ipvsadm(gorb.ns) == table  # the writer leaves IPVS in place when it stops
    assert "exit status 0" in (gorb.root / "log" / "supervisord.log").read_text()


def test_a_killed_pulse_worker_is_restarted_and_no_kernel_weight_moves(netns, tmp_path):
    """kill -9 of a pulse worker while it checks real servers (two up, one refusing): supervisord
    restarts it, its targets are re-seeded with the writer's verdicts, and the kernel's weights
    do not move at any moment, sampled every ~50 ms from the kill until the new worker has run
    several check rounds; then the checks go on (newer results) and traffic is even."""
    topo = topology.build(netns, n_backends=2)
    gorb = Gorb(topo.lb, tmp_path)
    try:
        gorb.wait_states({p: "RUNNING" for p in PROGRAMS})
        gorb.wait_api()
        pulse = {"type": "http", "interval": "1s", "timeout": "1s", "args": {"path": "/"}}
        assert gorb.http("PUT", "/service/web", {"host": VIP, "port": VIP_PORT, "method": "rr",
                                                 "pulse": pulse}).status == 200
        hosts = {"b1": (topo.addresses["b1"], BACKEND_PORT),
                 "b2": (topo.addresses["b2"], BACKEND_PORT),
                 "dead": (topo.addresses["b2"], 9)}  # nothing listens: refused, down
        for rs, (host, port) in hosts.items():
            reply = gorb.http("PUT", f"/service/web/{rs}", {"host": host, "port": port})
            assert reply.status == 200, reply
        settled = {f"TCP {VIP}:{VIP_PORT}": {
            f"{topo.addresses['b1']}:{BACKEND_PORT}": ("Masq", 100),
            f"{topo.addresses['b2']}:{BACKEND_PORT}": ("Masq", 100),
            f"{topo.addresses['b2']}:9": ("Masq", 0)}}
        wait_until(lambda: proc_table(gorb.proc.pid), 20.0, "the settled table", every=0.2,
                   until=settled.__eq__)

        def names() -> dict[str, str]:
            return {rs: gorb.http("GET", f"/service/web/{rs}").json()["metrics"]["status_name"]
                    for rs in hosts}

        wait_until(names, 20.0, "pulse verdicts", every=0.2,
                   until={"b1": "up", "b2": "up", "dead": "down"}.__eq__)
        assert {k: v["dests"] for k, v in ipvsadm(topo.lb).items()} == settled

        # Each worker in turn, so that whichever worker owns a target (rendezvous hashing) was
        # killed once under it.
        samples, restarted_at = 0, 0.0
        for name in ("pulse-worker_00", "pulse-worker_01"):
            old = gorb.pid(name)
            os.kill(old, signal.SIGKILL)
            back: list[float] = []

            def sampled_until_rounds_ran(name=name, old=old, back=back) -> bool:
                nonlocal samples, restarted_at
                table = proc_table(gorb.proc.pid)
                samples += 1
                assert table == settled, f"{name} killed, sample {samples}: {table}"
                if not back:
                    info = gorb.processes().get(name, {})
                    if info.get("statename") == "RUNNING" and info.get("pid") not in (0, old):
                        back.append(time.monotonic())
                        restarted_at = time.time()
                    return False
                return time.monotonic() > back[0] + 4.0  # the new worker ran a few 1 s rounds
            wait_until(sampled_until_rounds_ran, 40,
                       lambda: f"{name} restarted: {gorb.processes()}\n{gorb.log()}", every=0.05)
            assert gorb.pid(name) != old
            assert f"exited: {name} (terminated by SIGKILL" in \
                (gorb.root / "log" / "supervisord.log").read_text()
        status = gorb.ctl("status")
        assert status.count("RUNNING") == len(PROGRAMS), status

        # Every target is still checked (by whichever worker owns it now): newer results.
        def last_checks() -> list[float]:
            return [gorb.http("GET", f"/service/web/{rs}").json()["metrics"]["last_check"] or 0
                    for rs in hosts]

        wait_until(last_checks, 15.0, "checks after the restart", every=0.2,
                   until=lambda ts: min(ts) > restarted_at)
        assert proc_table(gorb.proc.pid) == settled
        result = topo.requests(20)
        assert result["failures"] == 0, result["errors"]
        assert result["counts"] == {"b1": 10, "b2": 10}
        print(f"both pulse workers killed and restarted: {samples} kernel samples, no weight "
              "moved")
    finally:
        gorb.close()
        topo.close()


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
        with socket.create_connection(relay.listener.getsockname(), timeout=limit(10)) as client:
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            assert _recv_all(client) == b"PING"
        with socket.create_connection(dead.listener.getsockname(), timeout=limit(10)) as client:
            assert _recv_all(client) == b""  # nothing listens there: closed, not hung
    finally:
        relay.close()
        dead.close()
        server.close()
        os.close(ns_fd)
