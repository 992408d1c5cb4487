"""Drift repair, startup adoption and ``--flush`` against the real kernel.

The writer reconciles every ``RECONCILE`` s here: dump, plan, apply, the same path as a request.
What it owns it repairs — a service gorb created owns its whole backend list, so a dest added by
hand under it is removed — and what it does not own (a service made by hand for another VIP) it
never touches. Each repair is awaited by polling ``ipvsadm`` against a deadline of one period plus
``SLACK``, a limit scaled by the guest's pace (UML is slow and may share its two cores with other
guests).
"""

from __future__ import annotations

import re
import time

from tests.pace import wait_until
from tests.sandbox.conftest import sh
from tests.sandbox.test_kinds import (
    create,
    dns_with_4_connections,
    last_start,
    listing,
    services,
)

RECONCILE = 1.0
SLACK = 3.0

VIP = "10.77.0.1"
SVC = f"TCP {VIP}:80"
OWNED = {SVC: ("wrr", {"10.77.1.1:8080": ("Masq", 5), "10.77.1.2:8080": ("Masq", 6)})}
FOREIGN = {"TCP 10.77.0.200:80": ("lc", {"10.77.1.50:80": ("Route", 2)})}
MAKE_FOREIGN = ("ipvsadm -A -t 10.77.0.200:80 -s lc && "
                "ipvsadm -a -t 10.77.0.200:80 -r 10.77.1.50:80 -g -w 2")


def create_web(writer) -> None:
    create(writer, "web", {"host": VIP, "port": 80},
           {"a": {"host": "10.77.1.1", "port": 8080, "weight": 5},
            "b": {"host": "10.77.1.2", "port": 8080, "weight": 6}})


def drift_and_wait(ns: str, command: str, drifted: dict, repaired: dict) -> float:
    """Run ``command``, check the kernel shows ``drifted``, then wait for ``repaired``.

    A reconcile may land between the command and the first look (ipvsadm's success already
    proves the drift happened), so that look accepts either state. Returns how long the repair
    took; fails when it takes longer than a period plus slack.
    """
    sh(command, ns=ns)
    assert services(ns) in (drifted, repaired)
    start = time.monotonic()
    wait_until(lambda: services(ns), SLACK, f"repair after {command!r}", every=0.2,
               fixed=RECONCILE, until=repaired.__eq__)
    return time.monotonic() - start


def repairs_logged(writer) -> list[str]:
    return re.findall(r"reconcile: repaired drift with (\d+) op\(s\), (\d+) failed",
                      writer.log.read_text())


def test_dest_drift_is_repaired(writer_factory):
    w = writer_factory(reconcile=RECONCILE)
    create_web(w)
    assert services(w.ns) == OWNED
    dests = OWNED[SVC][1]

    # An owned dest deleted by hand comes back.
    drift_and_wait(w.ns, f"ipvsadm -d -t {VIP}:80 -r 10.77.1.1:8080",
                   {SVC: ("wrr", {"10.77.1.2:8080": ("Masq", 6)})}, OWNED)
    # An owned dest's weight changed by hand is set back.
    drift_and_wait(w.ns, f"ipvsadm -e -t {VIP}:80 -r 10.77.1.2:8080 -m -w 50",
                   {SVC: ("wrr", {**dests, "10.77.1.2:8080": ("Masq", 50)})}, OWNED)
    # A dest added by hand under a gorb service is removed: gorb owns the whole backend list.
    drift_and_wait(w.ns, f"ipvsadm -a -t {VIP}:80 -r 10.77.1.9:8080 -m -w 1",
                   {SVC: ("wrr", {**dests, "10.77.1.9:8080": ("Masq", 1)})}, OWNED)

    # One repair of one op per drift, and no spurious repair of what already matched.
    wait_until(lambda: len(repairs_logged(w)) >= 3, 2.0, "three repairs logged", every=0.2)
    assert repairs_logged(w) == [("1", "0")] * 3, w.log.read_text()
    b = w.must("backend.get", {"service": "web", "backend": "b"})["data"]
    assert b["kernel"]["weight"] == 6


def test_deleted_service_comes_back_and_foreign_entries_are_left_alone(writer_factory):
    w = writer_factory(reconcile=RECONCILE)
    create_web(w)
    sh(MAKE_FOREIGN, ns=w.ns)
    assert services(w.ns) == {**OWNED, **FOREIGN}

    # An owned service deleted by hand comes back with its dests.
    drift_and_wait(w.ns, f"ipvsadm -D -t {VIP}:80", FOREIGN, {**OWNED, **FOREIGN})
    # Two more drifts, each repaired, prove further reconcile passes ran over the foreign service.
    for dest in ("10.77.1.1:8080", "10.77.1.2:8080"):
        others = {d: v for d, v in OWNED[SVC][1].items() if d != dest}
        drift_and_wait(w.ns, f"ipvsadm -d -t {VIP}:80 -r {dest}",
                       {SVC: ("wrr", others), **FOREIGN}, {**OWNED, **FOREIGN})
    assert w.must("service.list", {})["data"] == {"services": ["web"]}


def test_start_adopts_the_kernel_table_without_recreating_anything(writer_factory):
    w = writer_factory(reconcile=60.0)  # only the start's converge runs in this test
    svc = dns_with_4_connections(w, (3, 4))
    table, stats = listing(w.ns), listing(w.ns, "--stats")
    assert table[svc]["dests"] == {"10.77.1.1:53": ["Masq", "3", "0", "2"],
                                   "10.77.1.2:53": ["Masq", "4", "0", "2"]}

    w.stop()
    assert w.proc.returncode == 0
    assert listing(w.ns) == table  # SIGTERM leaves the entries in place

    w.start()
    assert last_start(w) == (1, 0, 0)  # one service, converged with 0 ops
    # Same entries, same connection counts, and counters not reset: nothing was re-created.
    assert listing(w.ns) == table
    assert listing(w.ns, "--stats") == stats
    assert w.must("service.get", {"service": "dns"})["data"]["kernel"]["stats"]["conns"] == 4


def test_flush_at_start_removes_foreign_services(writer_factory):
    w = writer_factory(reconcile=60.0)
    create_web(w)
    w.stop()
    sh(MAKE_FOREIGN, ns=w.ns)
    assert services(w.ns) == {**OWNED, **FOREIGN}

    w.start("--flush")
    # Everything was flushed, then the owned service was re-created from the state file.
    assert services(w.ns) == OWNED
    assert last_start(w) == (1, 3, 0)  # add_service + 2 add_dest
    assert "flushing every IPVS service of this namespace (--flush)" in w.log.read_text()
