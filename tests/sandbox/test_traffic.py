"""Real HTTP through a NAT VIP that the writer programs: rr spread, draining by weight 0, and a
writer killed with SIGKILL and restarted while traffic flows (the data path never notices).

The topology (``tests/sandbox/topology.py``): a client namespace, the writer's ``lb`` namespace
holding the VIP, three backend namespaces each running an HTTP server that answers its own name.
"""

from __future__ import annotations

import re
import signal
import time

import pytest

from tests.pace import wait_until
from tests.sandbox import topology
from tests.sandbox.conftest import ipvsadm, sh
from tests.sandbox.topology import BACKEND_PORT, VIP, VIP_PORT, Topology

SERVICE = "web"


@pytest.fixture
def lb(netns, writer_factory):
    """(topology, writer): three backends, the writer running in the lb namespace."""
    topo = topology.build(netns, n_backends=3)
    try:
        yield topo, writer_factory(ns=topo.lb)
    finally:
        topo.close()


def create_service(writer, topo: Topology) -> None:
    writer.must("service.create", {"service": SERVICE,
                                   "options": {"host": VIP, "port": VIP_PORT, "method": "rr"}})
    for name, ip in topo.addresses.items():
        writer.must("backend.create", {"service": SERVICE, "backend": name,
                                       "options": {"host": ip, "port": BACKEND_PORT,
                                                   "method": "nat"}})


def expected_table(topo: Topology, weights: dict[str, int] | None = None) -> dict:
    weights = weights or {}
    return {f"TCP {VIP}:{VIP_PORT}": {
        "sched": "rr", "flags": "",
        "dests": {f"{ip}:{BACKEND_PORT}": ("Masq", weights.get(name, 100))
                  for name, ip in topo.addresses.items()}}}


def set_weight(writer, backend: str, weight: int) -> None:
    writer.must("backend.update", {"service": SERVICE, "backend": backend, "weight": weight})


def assert_clean(result: dict) -> None:
    assert result["failures"] == 0, result["errors"]


def kernel_text(ns: str) -> list[str]:
    """``ipvsadm -Ln`` without the ActiveConn/InActConn columns, which traffic changes."""
    return [re.sub(r"\s+\d+\s+\d+\s*$", "", line) if line.lstrip().startswith("->") else line
            for line in sh("ipvsadm -Ln", ns=ns).splitlines()]


def connections_counted(ns: str, at_least: int) -> int:
    """The VIP service's kernel connection counter, polled until it reaches ``at_least``: the
    estimator publishes the counters only every 2 s (those, then a limit)."""
    def conns() -> int:
        out = sh(f"ipvsadm -Ln --stats --exact -t {VIP}:{VIP_PORT}", ns=ns)
        return int(next(line for line in out.splitlines() if line.startswith("TCP")).split()[2])
    return wait_until(conns, 4.0, f"{at_least} connections counted", every=0.5, fixed=2.0,
                      until=lambda n: n >= at_least)


def backends_view(view: dict) -> dict:
    """A service.get view's backends without their (changing) stats."""
    return {rs: (b["address"], b["options"], b["kernel"]["weight"], b["kernel"]["fwd"])
            for rs, b in view["backends"].items()}


def test_rr_over_a_nat_vip_reaches_every_backend_evenly(lb):
    topo, writer = lb
    create_service(writer, topo)
    assert ipvsadm(topo.lb) == expected_table(topo)

    result = topo.requests(30)

    assert_clean(result)
    assert result["counts"] == {"b1": 10, "b2": 10, "b3": 10}
    # rr with sequential new connections is a fixed rotation: every 3 in a row are distinct.
    order = result["order"]
    assert all(len(set(order[i:i + 3])) == 3 for i in range(len(order) - 2)), order

    # Reads carry the kernel's live statistics: 10 connections per backend, 30 for the service
    # (the kernel's estimator publishes counters every 2 s, so poll).
    view = wait_until(lambda: writer.must("service.get", {"service": SERVICE})["data"], 4.0,
                      "30 connections in the view's stats", every=0.5, fixed=2.0,
                      until=lambda v: v["kernel"]["stats"]["conns"] >= 30)
    stats = view["kernel"]["stats"]
    assert stats["conns"] == 30
    assert stats["inpkts"] > 0 and stats["outpkts"] > 0
    assert stats["inbytes"] > 0 and stats["outbytes"] > 0
    assert set(stats) >= {"conns", "inpkts", "outpkts", "inbytes", "outbytes", "cps", "inpps",
                          "outpps", "inbps", "outbps"}
    for name in ("b1", "b2", "b3"):
        one = writer.must("backend.get", {"service": SERVICE, "backend": name})["data"]
        assert one["kernel"]["stats"]["conns"] == 10, one
        assert one["kernel"]["weight"] == 100


def test_weight_zero_drains_a_backend_and_weight_100_brings_it_back(lb):
    topo, writer = lb
    create_service(writer, topo)

    set_weight(writer, "b2", 0)
    assert ipvsadm(topo.lb) == expected_table(topo, {"b2": 0})
    drained = topo.requests(30)
    assert_clean(drained)
    assert drained["counts"] == {"b1": 15, "b3": 15}

    set_weight(writer, "b2", 100)
    assert ipvsadm(topo.lb) == expected_table(topo)
    back = topo.requests(30)
    assert_clean(back)
    assert back["counts"] == {"b1": 10, "b2": 10, "b3": 10}


def test_writer_sigkill_and_restart_under_traffic_drops_nothing(lb):
    topo, writer = lb
    create_service(writer, topo)
    table, text = ipvsadm(topo.lb), kernel_text(topo.lb)
    assert table == expected_table(topo)
    view = writer.must("service.get", {"service": SERVICE})["data"]

    loop = topo.client_loop(duration=60.0, timeout=2.0)
    try:
        time.sleep(3.0)
        killed_at = time.monotonic()
        assert writer.kill(signal.SIGKILL) == -signal.SIGKILL
        time.sleep(1.0)
        writer.start()  # same namespace, state file and runtime dir; returns once it answers
        back_at = time.monotonic()
        time.sleep(3.0)  # traffic goes on across a few of the restarted writer's reconcile passes
    finally:
        result = loop.stop()
    during_outage = [t for t in result["ok_times"] if killed_at <= t <= back_at]
    print(f"writer down {back_at - killed_at:.2f} s; {result['requests']} requests in "
          f"{result['end'] - result['start']:.2f} s, {len(during_outage)} answered while it was "
          f"down; counts {result['counts']}; slowest {result['max_latency']} s")

    assert_clean(result)
    ok = sum(result["counts"].values())
    assert ok == result["requests"]
    assert ok >= 20 * (result["end"] - result["start"]), result["counts"]  # ~700/s measured
    assert len(during_outage) >= 20, (killed_at, back_at, result["ok_times"][:5])
    assert result["end"] > back_at + 2.0, "the loop should outlive the restart"

    assert ipvsadm(topo.lb) == table
    # The service was never re-created: its counter holds every connection of the whole loop.
    assert connections_counted(topo.lb, result["requests"]) == result["requests"]
    assert kernel_text(topo.lb) == text
    # The restarted writer adopted the kernel's entries as they were: no op at start.
    starts = re.findall(r"started with (\d+) service\(s\) from .*; converged with (\d+) op\(s\), "
                        r"(\d+) failed", writer.log.read_text())
    assert starts[-1] == ("1", "0", "0"), starts
    # One rr rotation all along: nothing rescheduled or re-added the dests.
    assert max(result["counts"].values()) - min(result["counts"].values()) <= 1, result["counts"]
    again = writer.must("service.get", {"service": SERVICE})["data"]
    assert backends_view(again) == backends_view(view)
    assert again["options"] == view["options"] and again["address"] == view["address"]
