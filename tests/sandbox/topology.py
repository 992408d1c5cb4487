"""A NAT load-balancer topology of network namespaces for traffic tests, and an HTTP client loop.

Everything lives inside the user-mode-linux guest, in 10.77.0.0/16::

    client 10.77.254.2/24 --veth-- 10.77.254.1 [lb] VIP 10.77.0.100/32 on lo, ip_forward=1
                                               [lb] 10.77.(10+i).1 --veth-- 10.77.(10+i).2 bi

``lb`` is where the writer runs (its IPVS table is the one under test). The VIP is a local address
of ``lb``, so client packets to it reach IPVS at LOCAL_IN; backends route everything back through
``lb`` (default route), so NAT replies are de-masqueraded there. Forwarding must be on in ``lb``:
without it the backends' replies, which are forwarded packets, are dropped by the routing lookup.

Each backend runs one tiny HTTP server (a Python process under ``ip netns exec``) on port 8080 that
answers every GET with its own name (``b1``, ``b2``, ...). ``ClientLoop`` is one long-lived Python
process in ``client`` that sends sequential GETs to the VIP, each on a fresh connection, and prints
a JSON summary: a process per request would cost ~80 ms of fork+exec in the guest.

Setup costs a handful of processes: one ``ip -batch`` per namespace, one server per backend
(started together, then awaited).
"""

from __future__ import annotations

import json
import select
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.pace import factor, limit
from tests.sandbox.conftest import sh

VIP = "10.77.0.100"
VIP_PORT = 80
BACKEND_PORT = 8080
CLIENT_IP = "10.77.254.2"
CLIENT_GW = "10.77.254.1"

# -S: no site import, for a faster start (the scripts need only the standard library).
PYTHON = [sys.executable, "-S", "-c"]

SERVER = r"""
import socket, sys
name, port = sys.argv[1], int(sys.argv[2])
body = name.encode()
reply = (b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
         b"Connection: close\r\n\r\n%s" % (len(body), body))
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(128)
print("listening", flush=True)
while True:
    conn, _ = srv.accept()
    try:
        conn.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(4096)
            if not chunk:
                break
            data += chunk
        if data.startswith(b"GET "):
            conn.sendall(reply)
    except OSError:
        pass
    finally:
        conn.close()
"""

CLIENT = r"""
import http.client, json, signal, sys, time
host, port, count, duration, timeout = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                        float(sys.argv[4]), float(sys.argv[5]))
counts, errors, order, ok_times = {}, [], [], []
n, worst, stopped = 0, 0.0, []
# SIGTERM ends the loop after the request in flight (PEP 475: the socket calls resume).
signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
print("started", flush=True)
start = time.monotonic()
deadline = start + duration
while not stopped and ((n < count) if count else (time.monotonic() < deadline)):
    n += 1
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {body[:80]!r}")
        counts[body] = counts.get(body, 0) + 1
        order.append(body)
        ok_times.append(round(time.monotonic(), 4))
    except Exception as exc:
        errors.append(f"#{n} at +{t0 - start:.2f}s: {exc!r}")
    finally:
        conn.close()
    worst = max(worst, time.monotonic() - t0)
print(json.dumps({"requests": n, "counts": counts, "failures": len(errors), "errors": errors[:20],
                  "order": order, "ok_times": ok_times, "start": start, "end": time.monotonic(),
                  "max_latency": round(worst, 4)}), flush=True)
"""


def _read_line(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """The next stdout line of ``proc`` within ``timeout`` s, already a limit (AssertionError
    otherwise)."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"{what}: no output within {timeout:.0f} s (pace {factor():.2f})")
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout=limit(5))
        err = proc.stderr.read() if proc.stderr else ""
        raise AssertionError(f"{what} exited with {proc.returncode}: {err.strip()}")
    return line.strip()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=limit(5))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for f in (proc.stdout, proc.stderr):
        if f is not None:
            f.close()


@dataclass
class Topology:
    """The namespaces and servers of one NAT topology; ``close()`` stops the servers."""

    lb: str
    client: str
    backends: dict[str, str]  # name ("b1") -> namespace
    addresses: dict[str, str]  # name -> backend IP
    servers: list[subprocess.Popen] = field(default_factory=list)

    def close(self) -> None:
        for proc in self.servers:
            _stop(proc)
        self.servers.clear()

    def client_loop(self, count: int = 0, duration: float = 0.0, timeout: float = 2.0,
                    host: str = VIP, port: int = VIP_PORT) -> ClientLoop:
        """Start a client loop (``count`` requests, or for at most ``duration`` s: ``stop()``
        ends it sooner) and return once it runs. At the ~700 requests/s seen in the guest, a loop
        of more than ~30 s starts reusing client ports whose IPVS entries are still in TIME_WAIT.
        ``timeout`` (each request's) is a limit, scaled by the pace; ``duration`` is not."""
        assert bool(count) != bool(duration), "give either count or duration"
        timeout = limit(timeout)
        cmd = ["ip", "netns", "exec", self.client, *PYTHON, CLIENT,
               host, str(port), str(count), str(duration), str(timeout)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        loop = ClientLoop(proc, deadline=limit(30.0) + duration + count * timeout)
        try:
            line = _read_line(proc, limit(30.0), "client loop")
            assert line == "started", line
        except BaseException:
            _stop(proc)
            raise
        return loop

    def requests(self, count: int, timeout: float = 2.0) -> dict:
        """Send ``count`` sequential GETs to the VIP; the client's JSON summary."""
        return self.client_loop(count=count, timeout=timeout).result()


@dataclass
class ClientLoop:
    proc: subprocess.Popen
    deadline: float  # seconds result() waits at most

    def stop(self) -> dict:
        """End the loop after the request in flight; its summary."""
        self.proc.send_signal(signal.SIGTERM)
        return self.result()

    def result(self) -> dict:
        """Wait for the loop to end; its summary (see ``CLIENT``)."""
        try:
            line = _read_line(self.proc, self.deadline, "client loop")
            self.proc.wait(timeout=limit(10))
            return json.loads(line)
        finally:
            _stop(self.proc)


def build(netns: Callable[[str], str], n_backends: int = 3) -> Topology:
    """Create lb, client and ``n_backends`` backend namespaces with ``netns``, wire them, start
    the HTTP servers and wait until each listens. The caller must ``close()`` the result."""
    lb, client = netns("lb"), netns("cl")
    backends = {f"b{i}": netns("be") for i in range(1, n_backends + 1)}
    addresses = {name: f"10.77.{10 + i}.2" for i, name in enumerate(backends, start=1)}

    # Interfaces are named per namespace, so short fixed names cannot clash between tests.
    lb_cmds = [f"addr add {VIP}/32 dev lo",
               f"link add cl type veth peer name eth0 netns {client}",
               f"addr add {CLIENT_GW}/24 dev cl", "link set cl up"]
    peers = {client: [f"addr add {CLIENT_IP}/24 dev eth0", "link set eth0 up",
                      f"route add default via {CLIENT_GW}"]}
    for i, (name, ns) in enumerate(backends.items(), start=1):
        lb_cmds += [f"link add {name} type veth peer name eth0 netns {ns}",
                    f"addr add 10.77.{10 + i}.1/24 dev {name}", f"link set {name} up"]
        peers[ns] = [f"addr add {addresses[name]}/24 dev eth0", "link set eth0 up",
                     f"route add default via 10.77.{10 + i}.1"]
    script = [_batch(lb, lb_cmds)] + [_batch(ns, cmds) for ns, cmds in peers.items()]
    script.append(f"ip netns exec {lb} sysctl -qw net.ipv4.ip_forward=1")
    sh(" && ".join(script))

    topo = Topology(lb, client, backends, addresses)
    try:
        for name, ns in backends.items():
            topo.servers.append(subprocess.Popen(
                ["ip", "netns", "exec", ns, *PYTHON, SERVER, name, str(BACKEND_PORT)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        for name, proc in zip(backends, topo.servers):
            line = _read_line(proc, limit(30.0), f"HTTP server {name}")
            assert line == "listening", line
    except BaseException:
        topo.close()
        raise
    return topo


def _batch(ns: str, cmds: list[str]) -> str:
    """A shell command running ``cmds`` through one ``ip -batch`` in namespace ``ns``."""
    body = "\n".join(cmds)
    return f"printf '%s\\n' {shlex.quote(body)} | ip -n {ns} -batch -"
