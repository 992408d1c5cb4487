"""Real servers for the pulse sandbox tests, a paced traffic client, and a fork-free kernel reader.

Every server is one Python process started with ``ip netns exec`` in a backend namespace (``ip
netns exec`` execs, so the process id is the server's own and SIGTERM stops it); it prints
``listening`` once its socket is bound, and ``Server.start`` returns only then. Stopping a server
closes its socket: TCP connects are then refused (RST) and UDP datagrams get ICMP port unreachable.

    tcp / http   ``topology.SERVER`` (answers every GET with its name)
    https        ``HTTPS``: the same over TLS with a self-signed certificate (``self_signed``)
    udp          ``UDP``: answers every datagram with ``pong <datagram>``
    dns          ``DNS`` (dnspython): A for one name; SIGUSR1 makes it answer SERVFAIL to
                 everything, SIGUSR2 makes it answer again (each acknowledged on stdout)

``Pacer`` is one client process in the client namespace that starts a GET to the VIP every
``pace`` seconds (fresh connection each) and reports EVERY request with its start and end time on
the guest's monotonic clock (one clock for all namespaces), so a test can split requests at the
moment it saw a kernel change. ``topology.ClientLoop`` keeps only 20 errors and no start times.

``KernelTable`` reads ``/proc/<pid>/net/ip_vs`` of a process in the director's namespace: the
kernel's own table without a fork (an ``ipvsadm`` under ``ip netns exec sh`` costs ~3 execs,
~250 ms in the guest), so weight changes can be timed to a few tens of ms. Tests cross-check it
against ``ipvsadm -Ln``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests.pace import limit
from tests.sandbox.conftest import ipvsadm, sh
from tests.sandbox.topology import PYTHON, SERVER, VIP, VIP_PORT, _read_line, _stop

HTTPS = r"""
import socket, ssl, sys
name, port, cert, key = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
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
        with ctx.wrap_socket(conn, server_side=True) as tls:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data.startswith(b"GET "):
                tls.sendall(reply)
    except OSError:  # ssl.SSLError too: a client that refuses our certificate
        pass
    finally:
        conn.close()
"""

UDP = r"""
import socket, sys
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
while True:
    data, peer = srv.recvfrom(65535)
    srv.sendto(b"pong " + data, peer)
"""

DNS = r"""
import signal, socket, sys
import dns.message, dns.name, dns.rcode, dns.rdatatype, dns.rrset
port, qname, address = int(sys.argv[1]), dns.name.from_text(sys.argv[2]), sys.argv[3]
mode = {"servfail": False}
def switch(servfail):
    def handler(*_):
        mode["servfail"] = servfail
        print("servfail" if servfail else "serving", flush=True)
    return handler
signal.signal(signal.SIGUSR1, switch(True))
signal.signal(signal.SIGUSR2, switch(False))
srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
srv.bind(("0.0.0.0", port))
print("listening", flush=True)
while True:
    wire, peer = srv.recvfrom(65535)
    try:
        query = dns.message.from_wire(wire)
    except Exception:
        continue
    reply = dns.message.make_response(query)
    q = query.question[0] if query.question else None
    if mode["servfail"]:
        reply.set_rcode(dns.rcode.SERVFAIL)
    elif q is not None and q.name == qname and q.rdtype == dns.rdatatype.A:
        reply.answer.append(dns.rrset.from_text(q.name, 30, "IN", "A", address))
    else:
        reply.set_rcode(dns.rcode.NXDOMAIN)
    srv.sendto(reply.to_wire(), peer)
"""

PACER = r"""
import http.client, json, signal, sys, time
host, port, pace, duration, timeout = (sys.argv[1], int(sys.argv[2]), float(sys.argv[3]),
                                       float(sys.argv[4]), float(sys.argv[5]))
records, stopped = [], []
signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
print("started", flush=True)
start = time.monotonic()
deadline, slot = start + duration, start
while not stopped and time.monotonic() < deadline:
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read().decode(errors="replace")
        who, error = (body, "") if resp.status == 200 else ("", f"HTTP {resp.status}")
    except Exception as exc:
        who, error = "", repr(exc)
    finally:
        conn.close()
    records.append([round(t0, 4), round(time.monotonic(), 4), who, error])
    slot = max(slot + pace, time.monotonic() - pace)  # no burst to catch up after a slow one
    time.sleep(max(0.0, slot - time.monotonic()))
print(json.dumps({"records": records}), flush=True)
"""


@dataclass
class Server:
    """One server process in namespace ``ns``: ``script`` with ``args`` (``site``: with the venv's
    site-packages, for dnspython)."""

    ns: str
    script: str
    args: list[str]
    site: bool = False
    proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> Server:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        python = [sys.executable, "-c"] if self.site else PYTHON
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *python, self.script,
                                      *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if wait:
            self.ready()
        return self

    def ready(self) -> None:
        self.expect("listening")

    def expect(self, line: str, timeout: float = 30.0) -> None:
        """The server's next line is ``line``, within a limit of ``timeout`` s."""
        assert self.proc is not None
        got = _read_line(self.proc, limit(timeout), f"server {self.args} in {self.ns}")
        assert got == line, (got, line)

    def stop(self) -> None:
        """Stop the server and wait until it is gone (its socket closed)."""
        if self.proc is not None:
            _stop(self.proc)

    def signal(self, sig: int, ack: str) -> None:
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(sig)
        self.expect(ack, timeout=10.0)


def start_all(servers: list[Server]) -> list[Server]:
    """Start the servers together (each start is ~0.5 s of interpreter in the guest), then wait."""
    try:
        for s in servers:
            s.start(wait=False)
        for s in servers:
            s.ready()
    except BaseException:
        for s in servers:
            s.stop()
        raise
    return servers


def http_server(ns: str, name: str, port: int) -> Server:
    return Server(ns, SERVER, [name, str(port)])


def https_server(ns: str, name: str, port: int, cert: Path, key: Path) -> Server:
    return Server(ns, HTTPS, [name, str(port), str(cert), str(key)])


def udp_server(ns: str, port: int) -> Server:
    return Server(ns, UDP, [str(port)])


def dns_server(ns: str, port: int, name: str, address: str) -> Server:
    return Server(ns, DNS, [str(port), name, address], site=True)


def dns_servfail(server: Server, on: bool) -> None:
    server.signal(signal.SIGUSR1 if on else signal.SIGUSR2, "servfail" if on else "serving")


def self_signed(directory: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed certificate for ``ip`` (openssl CLI; an EC key: RSA keygen is slow here)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    sh(f"openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 "
       f"-subj /CN=gorb-sandbox -addext subjectAltName=IP:{ip} -keyout {key} -out {cert}")
    return cert, key


# --- traffic ------------------------------------------------------------------------------------

@dataclass
class Request:
    start: float
    end: float
    who: str     # the backend that answered; "" when it failed
    error: str


@dataclass
class Pacer:
    proc: subprocess.Popen
    deadline: float
    records: list[Request] = field(default_factory=list)

    @classmethod
    def start(cls, client_ns: str, pace: float = 0.02, duration: float = 60.0,
              timeout: float = 2.0, host: str = VIP, port: int = VIP_PORT) -> Pacer:
        timeout = limit(timeout)  # each request's: a limit, as the loop's own waits
        proc = subprocess.Popen(["ip", "netns", "exec", client_ns, *PYTHON, PACER, host,
                                 str(port), str(pace), str(duration), str(timeout)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert _read_line(proc, limit(30.0), "pacer") == "started"
        except BaseException:
            _stop(proc)
            raise
        return cls(proc, deadline=duration + timeout + limit(30.0))

    def stop(self) -> list[Request]:
        """End the loop after the request in flight; every request it made."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            line = _read_line(self.proc, self.deadline, "pacer")
            self.proc.wait(timeout=limit(10))
        finally:
            _stop(self.proc)
        self.records = [Request(*r) for r in json.loads(line)["records"]]
        return self.records


def answered(requests: list[Request]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in requests:
        if r.who:
            counts[r.who] = counts.get(r.who, 0) + 1
    return counts


# --- the kernel's table without a fork ----------------------------------------------------------

def _endpoint(hexed: str) -> str:
    addr, port = hexed.split(":")
    return f"{socket.inet_ntoa(bytes.fromhex(addr))}:{int(port, 16)}"


@dataclass
class KernelTable:
    """``/proc/<pid>/net/ip_vs`` of a process living in the namespace ``ns`` (IPv4 only)."""

    ns: str
    pid: int

    def __post_init__(self) -> None:
        ours = os.stat(f"/proc/{self.pid}/ns/net").st_ino
        assert ours == os.stat(f"/run/netns/{self.ns}").st_ino, f"{self.pid} is not in {self.ns}"

    def read(self) -> dict[str, dict[str, int]]:
        """{"TCP 10.77.0.100:80": {"10.77.11.2:8080": weight, ...}}"""
        table: dict[str, dict[str, int]] = {}
        current = None
        lines = Path(f"/proc/{self.pid}/net/ip_vs").read_text().splitlines()
        for line in lines[3:]:
            parts = line.split()
            if parts and parts[0] in ("TCP", "UDP", "SCTP"):
                current = table[f"{parts[0]} {_endpoint(parts[1])}"] = {}
            elif parts and parts[0] == "->" and current is not None:
                current[_endpoint(parts[1])] = int(parts[3])
        return table

    def weight(self, service: str, dest: str) -> int:
        return self.read()[service][dest]


def ipvsadm_weights(ns: str) -> dict[str, dict[str, int]]:
    """``ipvsadm -Ln`` reduced to what ``KernelTable.read`` gives."""
    return {svc: {d: w for d, (_fwd, w) in entry["dests"].items()}
            for svc, entry in ipvsadm(ns).items()}
