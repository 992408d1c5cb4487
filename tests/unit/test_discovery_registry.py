"""What the Consul agent should hold: registrations from state.dump views, the check status from
backend health, and the set difference with the agent's services."""

from __future__ import annotations

import pytest

from gorb.services.discovery import registry as reg

pytestmark = pytest.mark.timeout(5)


def view(port=80, protocol="tcp", method="wrr", address="10.0.0.1", fwmark=0, health=()):
    return {"options": {"host": address, "port": port, "protocol": protocol, "method": method,
                        "fwmark": fwmark},
            "address": address,
            "backends": {f"b{i}": {"health": {"status": s}} for i, s in enumerate(health)}}


def test_registration_fields():
    r = reg.registration("web", view(protocol="udp", method="rr"), "lb1")
    assert (r.service_id, r.name, r.address, r.port) == ("web", "web", "10.0.0.1", 80)
    assert r.tags == ("udp", "rr", "gorb")
    assert r.meta_dict() == {"protocol": "udp", "scheduler": "rr", "gorb_host": "lb1"}
    assert r.check_id == "service:web"


def test_fwmark_registration():
    r = reg.registration("fw", view(port=0, fwmark=7, address=""), "lb1")
    assert r.tags == ("fwmark", "wrr", "gorb") and r.meta_dict()["fwmark"] == "7"
    assert (r.address, r.port) == ("", 0)


CHECKS = [
    ("no backends", [], "critical"),
    ("all up", ["up", "up"], "passing"),
    ("not checked yet", ["unknown", "up"], "passing"),
    ("some down", ["up", "down", "unknown"], "warning"),
    ("all down", ["down", "down"], "critical"),
    ("one down of one", ["down"], "critical"),
]


@pytest.mark.parametrize("name,health,status", CHECKS, ids=[c[0] for c in CHECKS])
def test_check_status(name, health, status):
    got, output = reg.check_status(view(health=health))
    assert got == status
    if "down" in health:
        assert "down: " in output


def test_ttl_is_three_intervals():
    assert reg.ttl(10) == "30s" and reg.ttl(0.1) == "1s" and reg.ttl(0.5) == "2s"


def agent_entry(r: reg.Registration, **over):
    entry = {"ID": r.service_id, "Service": r.name, "Address": r.address, "Port": r.port,
             "Tags": list(r.tags), "Meta": r.meta_dict()}
    entry.update(over)
    return entry


def test_agent_plan():
    want = reg.desired({"web": view(), "api": view(port=443), "dns": view(port=53)}, "lb1")
    agent = {
        "web": agent_entry(want["web"]),                              # as wanted
        "api": agent_entry(want["api"], Port=8443),                   # changed
        "gone": agent_entry(reg.registration("gone", view(), "lb1")),  # ours, not wanted
        "other-host": agent_entry(reg.registration("x", view(), "lb2")),
        "consul": {"ID": "consul", "Service": "consul", "Tags": [], "Meta": {}},
    }
    plan = reg.agent_plan(want, agent, "lb1")
    assert [r.service_id for r in plan.register] == ["api", "dns"]
    assert plan.deregister == ["gone"]


def test_agent_that_forgot_everything():
    want = reg.desired({"web": view(), "api": view(port=443)}, "lb1")
    plan = reg.agent_plan(want, {}, "lb1")
    assert [r.service_id for r in plan.register] == ["api", "web"] and plan.deregister == []


def test_tag_order_and_null_fields_from_the_agent():
    r = reg.registration("web", view(), "lb1")
    assert reg.matches(r, agent_entry(r, Tags=list(reversed(r.tags))))
    assert not reg.matches(r, agent_entry(r, Meta=None))
    assert not reg.is_ours({"Tags": None, "Meta": None}, "lb1")


def test_id_format_keeps_the_name():
    want = reg.desired({"web": view()}, "lb1", "{service}@{host}")
    (r,) = want.values()
    assert (r.service_id, r.name, r.check_id) == ("web@lb1", "web", "service:web@lb1")


def test_another_gorb_hosts_registration_is_not_fought_over():
    want = reg.desired({"web": view(), "api": view(port=443)}, "lb1")
    theirs = reg.registration("web", view(), "lb2")
    plan = reg.agent_plan(want, {"web": agent_entry(theirs)}, "lb1")
    assert plan.conflicts == {"web": "lb2"}
    assert [r.service_id for r in plan.register] == ["api"] and plan.deregister == []
