"""Every kind of service and backend, created through the writer, as the real kernel shows it.

Each test drives one writer over the bus and compares ``ipvsadm -Ln`` (and its ``--thresholds``,
``--tun-info`` and ``--stats`` views) with what was asked. ipvsadm's formats, as seen on 6.1:

    TCP  10.77.0.1:80 rr                       service: proto, addr:port, scheduler, flags
    UDP  10.77.0.1:53 sh (sh-fallback,sh-port) persistent 600 mask 255.255.255.0
    FWM  8 IPv6 lc persistent 300 mask 64      a fwmark service; "IPv6" only for AF_INET6
      -> 10.77.1.1:8080  Masq  5  0  0         dest: forward weight activeconn inactconn
      -> 10.77.1.4:53    Tunnel  gue:6080:-c  100  0  0     (--tun-info; "-c" = nocsum)
"""

from __future__ import annotations

import os
import re
import sys

from tests.pace import wait_until
from tests.sandbox.conftest import sh

# --- ipvsadm listings parsed ----------------------------------------------------------------------

_SVC = re.compile(r"^(TCP|UDP|SCTP|FWM)\s+(\S+)( IPv6)?(?:\s+(.*?))?\s*$")
_DST = re.compile(r"^\s+->\s+(\S+)\s+(.*?)\s*$")


def listing(ns: str, *options: str) -> dict[str, dict]:
    """``ipvsadm -Ln [options]`` as {"FWM 8 IPv6": {"info": "lc ...", "dests": {addr: [cols]}}}.

    ``info`` is the rest of the service line (scheduler and flags, or the --stats numbers); each
    dest maps to the whitespace-split columns after its address. The 3 header lines are skipped.
    """
    lines = sh(" ".join(["ipvsadm", "-Ln", *options]), ns=ns).splitlines()
    assert lines and lines[0].startswith("IP Virtual Server"), lines
    table: dict[str, dict] = {}
    current = None
    for line in lines[3:]:
        m = _SVC.match(line)
        if m:
            proto, addr, v6, info = m.groups()
            current = table[f"{proto} {addr}{v6 or ''}"] = {"info": info or "", "dests": {}}
            continue
        m = _DST.match(line)
        assert m and current is not None, f"unexpected ipvsadm line {line!r}"
        current["dests"][m.group(1)] = m.group(2).split()
    return table


def services(ns: str) -> dict[str, tuple[str, dict[str, tuple[str, int]]]]:
    """``ipvsadm -Ln``: {service: (scheduler and flags, {dest: (forward, weight)})}."""
    return {k: (v["info"], {d: (c[0], int(c[1])) for d, c in v["dests"].items()})
            for k, v in listing(ns).items()}


def conns(ns: str) -> dict[str, dict[str, tuple[int, int]]]:
    """``ipvsadm -Ln``: {service: {dest: (ActiveConn, InActConn)}}."""
    return {k: {d: (int(c[2]), int(c[3])) for d, c in v["dests"].items()}
            for k, v in listing(ns).items()}


def thresholds(ns: str) -> dict[str, dict[str, tuple[int, int]]]:
    """``ipvsadm -Ln --thresholds``: {service: {dest: (upper, lower)}}."""
    return {k: {d: (int(c[0]), int(c[1])) for d, c in v["dests"].items()}
            for k, v in listing(ns, "--thresholds").items()}


def tun_info(ns: str) -> dict[str, dict[str, tuple[str, str]]]:
    """``ipvsadm -Ln --tun-info``: {service: {dest: (forward, tunnel info)}}."""
    return {k: {d: (c[0], c[1]) for d, c in v["dests"].items()}
            for k, v in listing(ns, "--tun-info").items()}


def service_conns_stat(ns: str) -> dict[str, int]:
    """``ipvsadm -Ln --stats``: the Conns counter of each service (it lags by up to 2 s)."""
    return {k: int(v["info"].split()[0]) for k, v in listing(ns, "--stats").items()}


def last_start(writer) -> tuple[int, int, int]:
    """(services, ops, failed) from the writer's last "started with ..." log line."""
    found = re.findall(r"started with (\d+) service\(s\) from .*; converged with (\d+) op\(s\), "
                       r"(\d+) failed", writer.log.read_text())
    assert found, writer.log.read_text()
    return tuple(map(int, found[-1]))


def create(writer, vsid: str, options: dict, backends: dict[str, dict]) -> None:
    writer.must("service.create", {"service": vsid, "options": options})
    for rsid, opts in backends.items():
        writer.must("backend.create", {"service": vsid, "backend": rsid, "options": opts})


# --- every kind -----------------------------------------------------------------------------------

KINDS = {
    "web": ({"host": "10.77.0.1", "port": 80, "protocol": "tcp", "method": "rr"}, {
        "nat": {"host": "10.77.1.1", "port": 8080, "method": "nat", "weight": 5},
        "dr": {"host": "10.77.1.2", "port": 80, "method": "dr", "weight": 7,
               "upper_threshold": 100, "lower_threshold": 10},
        "ipip": {"host": "10.77.1.3", "port": 80, "method": "tunnel"},
    }),
    "dns": ({"host": "10.77.0.1", "port": 53, "protocol": "udp", "method": "sh",
             "flags": "sh-fallback|sh-port", "persistent": True, "timeout": 600,
             "netmask": "255.255.255.0"}, {
        "gue": {"host": "10.77.1.4", "port": 53, "method": "tunnel", "tunnel_type": "gue",
                "tunnel_port": 6080},
        "gre": {"host": "10.77.1.5", "port": 53, "method": "tunnel", "tunnel_type": "gre",
                "tunnel_flags": "csum", "upper_threshold": 50},
    }),
    "syslog": ({"host": "10.77.0.2", "port": 514, "protocol": "udp", "method": "rr",
                "flags": "ops"}, {
        "a": {"host": "10.77.1.6", "port": 514},
    }),
    "sig": ({"host": "10.77.0.1", "port": 2905, "protocol": "sctp", "method": "mh",
             "flags": "mh-fallback|mh-port"}, {
        "a": {"host": "10.77.1.7", "port": 2905, "weight": 3},
    }),
    "mark4": ({"fwmark": 7, "family": "ipv4", "method": "wlc", "persistent": True}, {
        "a": {"host": "10.77.1.8", "port": 80, "method": "dr"},
    }),
    "mark6": ({"fwmark": 8, "family": "ipv6", "method": "lc", "persistent": True,
               "netmask": 64}, {
        "a": {"host": "2001:db8:1::8", "port": 80, "method": "dr", "weight": 9},
    }),
    "web6": ({"host": "2001:DB8:0::1", "port": 443, "method": "wlc", "persistent": True,
              "timeout": 600, "netmask": 64}, {
        "nat": {"host": "2001:db8:1::1", "port": 8443, "method": "nat", "weight": 2},
        "dr": {"host": "2001:db8:1::2", "port": 443, "method": "dr",
               "upper_threshold": 1000, "lower_threshold": 1},
    }),
}

EXPECTED = {
    "TCP 10.77.0.1:80": ("rr", {"10.77.1.1:8080": ("Masq", 5), "10.77.1.2:80": ("Route", 7),
                                "10.77.1.3:80": ("Tunnel", 100)}),
    "UDP 10.77.0.1:53": ("sh (sh-fallback,sh-port) persistent 600 mask 255.255.255.0",
                         {"10.77.1.4:53": ("Tunnel", 100), "10.77.1.5:53": ("Tunnel", 100)}),
    "UDP 10.77.0.2:514": ("rr ops", {"10.77.1.6:514": ("Masq", 100)}),
    "SCTP 10.77.0.1:2905": ("mh (mh-fallback,mh-port)", {"10.77.1.7:2905": ("Masq", 3)}),
    "FWM 7": ("wlc persistent 300", {"10.77.1.8:80": ("Route", 100)}),
    "FWM 8 IPv6": ("lc persistent 300 mask 64", {"[2001:db8:1::8]:80": ("Route", 9)}),
    "TCP [2001:db8::1]:443": ("wlc persistent 600 mask 64",
                              {"[2001:db8:1::1]:8443": ("Masq", 2),
                               "[2001:db8:1::2]:443": ("Route", 100)}),
}

EXPECTED_THRESHOLDS = {
    "TCP 10.77.0.1:80": {"10.77.1.1:8080": (0, 0), "10.77.1.2:80": (100, 10),
                         "10.77.1.3:80": (0, 0)},
    "UDP 10.77.0.1:53": {"10.77.1.4:53": (0, 0), "10.77.1.5:53": (50, 0)},
    "UDP 10.77.0.2:514": {"10.77.1.6:514": (0, 0)},
    "SCTP 10.77.0.1:2905": {"10.77.1.7:2905": (0, 0)},
    "FWM 7": {"10.77.1.8:80": (0, 0)},
    "FWM 8 IPv6": {"[2001:db8:1::8]:80": (0, 0)},
    "TCP [2001:db8::1]:443": {"[2001:db8:1::1]:8443": (0, 0), "[2001:db8:1::2]:443": (1000, 1)},
}

# Only tunnel dests have tunnel info; ipvsadm prints "gue:<port>:<csum>", "gre:<csum>", "ipip",
# where "-c" is nocsum and "+c" csum.
EXPECTED_TUNNELS = {
    "TCP 10.77.0.1:80": {"10.77.1.1:8080": ("Masq", "n/a"), "10.77.1.2:80": ("Route", "n/a"),
                         "10.77.1.3:80": ("Tunnel", "ipip")},
    "UDP 10.77.0.1:53": {"10.77.1.4:53": ("Tunnel", "gue:6080:-c"),
                         "10.77.1.5:53": ("Tunnel", "gre:+c")},
}


def test_every_kind_of_service_and_backend_reaches_the_kernel(writer):
    for vsid, (options, backends) in KINDS.items():
        create(writer, vsid, options, backends)

    assert services(writer.ns) == EXPECTED
    assert thresholds(writer.ns) == EXPECTED_THRESHOLDS
    tunnels = tun_info(writer.ns)
    for svc, dests in EXPECTED_TUNNELS.items():
        assert tunnels[svc] == dests, svc

    # The writer reads back exactly what it wrote: a restart adopts every entry with no op.
    before = listing(writer.ns)
    writer.stop()
    writer.start()
    assert last_start(writer) == (len(KINDS), 0, 0)
    assert listing(writer.ns) == before


def kernel_schedulers() -> set[str]:
    """The schedulers this kernel ships: its ip_vs_<name> modules, less the helpers."""
    ipvs = f"/usr/lib/uml/modules/{os.uname().release}/kernel/net/netfilter/ipvs"
    names = {f[len("ip_vs_"):-len(".ko")] for f in os.listdir(ipvs) if f.startswith("ip_vs_")}
    return names - {"ftp", "pe_sip"}


SCHEDULERS = ["rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh"]


def test_every_scheduler_of_the_kernel(writer):
    assert kernel_schedulers() == set(SCHEDULERS)
    expected = {}
    for i, sched in enumerate(SCHEDULERS):
        create(writer, sched, {"host": "10.77.3.1", "port": 1000 + i, "method": sched},
               {"a": {"host": f"10.77.4.{i + 1}", "port": 80, "weight": i + 1}})
        expected[f"TCP 10.77.3.1:{1000 + i}"] = (sched, {f"10.77.4.{i + 1}:80": ("Masq", i + 1)})
    assert services(writer.ns) == expected


# --- bad input ------------------------------------------------------------------------------------

def test_unknown_scheduler_is_a_kernel_error_and_the_writer_keeps_serving(writer):
    reply = writer.request("service.create", {"service": "bad", "options": {
        "host": "10.77.0.9", "port": 80, "method": "nosuch"}})
    assert (reply["ok"], reply["errno"]) == (False, "kernel"), reply
    assert "ENOENT" in reply["reason"], reply
    assert services(writer.ns) == {}
    assert writer.must("service.list", {})["data"] == {"services": []}

    writer.must("service.create", {"service": "good", "options": {
        "host": "10.77.0.9", "port": 80, "method": "rr"}})
    writer.must("backend.create", {"service": "good", "backend": "a", "options": {
        "host": "10.77.1.9", "port": 80, "weight": 4}})
    good = {"TCP 10.77.0.9:80": ("rr", {"10.77.1.9:80": ("Masq", 4)})}
    assert services(writer.ns) == good

    # A PATCH to an unknown scheduler is refused the same way; the service keeps its old one.
    reply = writer.request("service.update", {"service": "good", "options": {"method": "nosuch"}})
    assert (reply["ok"], reply["errno"]) == (False, "kernel"), reply
    assert "ENOENT" in reply["reason"], reply
    assert services(writer.ns) == good
    got = writer.must("service.get", {"service": "good"})["data"]
    assert got["options"]["method"] == "rr"
    assert got["kernel"]["scheduler"] == "rr"


def send_udp(ns: str, vip: str, port: int, count: int) -> None:
    """``count`` datagrams to vip:port from the director itself, each from a new source port.

    Each one makes an IPVS connection entry (a UDP one counts as InActConn); the backends do not
    exist, so the packets die after scheduling, which is all the counters need.
    """
    sh(f"{sys.executable} -c 'import socket\nfor _ in range({count}): "
       f"socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b\"x\", (\"{vip}\", {port}))'",
       ns=ns)


def dns_with_4_connections(writer, weights: tuple[int, int]) -> str:
    """Service ``dns`` (udp, rr) on 10.77.0.100:53, backends ``a`` and ``b`` of ``weights``, and
    4 datagrams through it (two connection entries per dest), until the kernel's estimator
    counts them; its ipvsadm name."""
    create(writer, "dns", {"host": "10.77.0.100", "port": 53, "protocol": "udp", "method": "rr"},
           {"a": {"host": "10.77.1.1", "port": 53, "weight": weights[0]},
            "b": {"host": "10.77.1.2", "port": 53, "weight": weights[1]}})
    svc = "UDP 10.77.0.100:53"
    sh("ip addr add 10.77.0.100/32 dev lo", ns=writer.ns)
    send_udp(writer.ns, "10.77.0.100", 53, 4)
    wait_until(lambda: service_conns_stat(writer.ns)[svc] == 4, 3.0, "--stats Conns 4", every=0.2,
               fixed=2.0)  # the estimator's 2 s period as it is, then a limit
    return svc


def test_patch_changes_the_service_in_place_and_refuses_a_key_change(writer):
    svc = dns_with_4_connections(writer, (3, 3))
    live = {"10.77.1.1:53": (0, 2), "10.77.1.2:53": (0, 2)}  # rr: two each
    assert conns(writer.ns)[svc] == live

    writer.must("service.update", {"service": "dns", "options": {
        "method": "wrr", "persistent": True, "timeout": 120, "netmask": "255.255.255.0"}})
    table = services(writer.ns)
    assert table == {svc: ("wrr persistent 120 mask 255.255.255.0",
                           {"10.77.1.1:53": ("Masq", 3), "10.77.1.2:53": ("Masq", 3)})}
    # Neither the service nor its dests were re-created: counters and connections survive.
    assert conns(writer.ns)[svc] == live
    assert service_conns_stat(writer.ns)[svc] == 4

    for change, field in (({"port": 54}, "port"), ({"protocol": "tcp"}, "protocol"),
                          ({"host": "10.77.0.101"}, "host")):
        reply = writer.request("service.update", {"service": "dns", "options": change})
        assert (reply["ok"], reply["errno"]) == (False, "invalid"), reply
        assert f"{field} differs" in reply["reason"], reply
    assert services(writer.ns) == table
    assert conns(writer.ns)[svc] == live
    got = writer.must("service.get", {"service": "dns"})["data"]["options"]
    assert (got["port"], got["protocol"], got["method"], got["timeout"]) == (53, "udp", "wrr", 120)
