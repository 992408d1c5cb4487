"""The writer's engine against a hand-written fake kernel: replies, events, PATCH semantics, group
commit, restore + replay after a failed op, and converge (the reconcile path)."""

from __future__ import annotations

import errno

import msgspec
import pytest

from gorb.common import errors, messages
from gorb.common.errors import GorbError
from gorb.services.ipvs_writer.engine import Draft, Engine, desired_table, ops_between, stage
from gorb.services.ipvs_writer.table import KDest, KService
from tests.service.fake_kernel import FakeKernel

pytestmark = pytest.mark.timeout(10)

AF4, TCP, UDP = 2, 6, 17
WEB_KEY = (AF4, TCP, "10.0.0.1", 80, 0)

PLAIN_OK = {"ok": True, "errno": "ok", "reason": "", "data": None}


class OkReply(dict):
    """Equal to a successful reply: a read's with no data, or a mutation's, whose ``data`` is
    its change (compared by ``test_a_mutation_reply_carries_its_change``)."""

    def __eq__(self, other):
        if isinstance(other, dict) and set(other.get("data") or {}) == {"change"}:
            other = {**other, "data": None}
        return other == PLAIN_OK

    __hash__ = None


OK = OkReply(PLAIN_OK)
EXISTS = {"ok": False, "errno": "exists", "reason": "specified object already exists", "data": None}
NOT_FOUND = {"ok": False, "errno": "not_found", "reason": "unable to locate specified object",
             "data": None}


def invalid(reason: str) -> dict:
    return {"ok": False, "errno": "invalid", "reason": reason, "data": None}


# --- request builders ---------------------------------------------------------------------------

def svc_create(vs="web", host="10.0.0.1", port=80, address="", **opts):
    body = {"service": vs, "options": {"host": host, "port": port, **opts}}
    if address:
        body["address"] = address
    return ("service.create", body)


def svc_update(vs="web", **opts):
    return ("service.update", {"service": vs, "options": opts})


def svc_delete(vs="web"):
    return ("service.delete", {"service": vs})


def be_create(vs="web", rs="a", host="10.1.0.1", port=8080, **opts):
    return ("backend.create", {"service": vs, "backend": rs,
                               "options": {"host": host, "port": port, **opts}})


def be_update(vs="web", rs="a", weight=50):
    return ("backend.update", {"service": vs, "backend": rs, "weight": weight})


def be_delete(vs="web", rs="a"):
    return ("backend.delete", {"service": vs, "backend": rs})


class Persisted:
    """The persist callback: records every state it is handed."""

    def __init__(self):
        self.calls: list[dict] = []

    def __call__(self, services):
        self.calls.append(dict(services))


def make_engine(*setup, kernel: FakeKernel | None = None):
    """An engine on a fake kernel, with ``setup`` requests applied (each must succeed)."""
    kernel = kernel or FakeKernel()
    persisted = Persisted()
    engine = Engine({}, kernel, persisted)
    for req in setup:
        [(reply, _)] = engine.handle_batch([req])
        assert reply == OK, (req, reply)
    kernel.applied.clear()
    kernel.calls.clear()
    persisted.calls.clear()
    return engine, kernel, persisted


def one(engine, req):
    [(reply, events)] = engine.handle_batch([req])
    return reply, events


def kernel_matches_desired(engine, kernel, foreign=()):
    """The kernel holds exactly the desired state (plus the given foreign services)."""
    want = desired_table(engine.services)
    for svc in foreign:
        want[svc.key] = svc
    return kernel.snapshot() == want


BASE = (svc_create(), be_create())


# --- replies to mutations -----------------------------------------------------------------------

MUTATION_CASES = [
    # (name, request on top of BASE, exact reply)
    ("service create", svc_create("api", "10.0.0.2"), OK),
    ("service create, same id", svc_create("web", "10.0.0.9"), EXISTS),
    ("service create, same VIP:port/proto", svc_create("web2"),
     {**EXISTS, "reason": "specified object already exists: service 'web' has that address"}),
    ("service create, same VIP:port other proto", svc_create("dns", protocol="udp"), OK),
    ("service create, same VIP other port", svc_create("tls", port=443), OK),
    ("service create, no port", svc_create("x", port=0), invalid("endpoint information is missing")),
    ("service create, bad protocol", svc_create("x", protocol="icmp"),
     invalid("specified protocol is unknown")),
    ("service create, address given", svc_create("named", host="web.example", address="10.0.0.3"),
     OK),
    ("service create, bad id", svc_create("a/b"),
     invalid("invalid object id 'a/b': use 1-128 characters of A-Z a-z 0-9 _ . : @ -, "
             "starting with a letter or digit")),
    ("service update, unknown service", svc_update("nope", method="rr"), NOT_FOUND),
    ("service update, unknown option", svc_update(colour="red"), invalid("unknown option(s): colour")),
    ("service delete", svc_delete(), OK),
    ("service delete, unknown", svc_delete("nope"), NOT_FOUND),
    ("backend create", be_create(rs="b", host="10.1.0.2"), OK),
    ("backend create, unknown service", be_create("nope", "b"), NOT_FOUND),
    ("backend create, same id", be_create(host="10.1.0.9"), EXISTS),
    ("backend create, same addr:port", be_create(rs="b"),
     {**EXISTS,
      "reason": "specified object already exists: backend 'a' has that address and port"}),
    ("backend create, same addr other port", be_create(rs="b", port=8081), OK),
    ("backend create, no host", be_create(rs="b", host=""),
     invalid("endpoint information is missing")),
    ("backend create, other family", be_create(rs="b", host="2001:db8::1"),
     invalid("incompatible address families")),
    ("backend create, bad method", be_create(rs="b", method="carrier-pigeon"),
     invalid("specified forwarding method is unknown")),
    ("backend update", be_update(weight=7), OK),
    ("backend update, weight 0 (drain)", be_update(weight=0), OK),
    ("backend update, weight max", be_update(weight=2**31 - 1), OK),
    ("backend update, negative weight", be_update(weight=-1),
     invalid("weight must be an integer between 0 and 2147483647")),
    ("backend update, weight too big", be_update(weight=2**31),
     invalid("weight must be an integer between 0 and 2147483647")),
    ("backend update, unknown backend", be_update(rs="nope"), NOT_FOUND),
    ("backend update, unknown service", be_update(vs="nope"), NOT_FOUND),
    ("backend delete", be_delete(), OK),
    ("backend delete, unknown backend", be_delete(rs="nope"), NOT_FOUND),
    ("backend delete, unknown service", be_delete(vs="nope"), NOT_FOUND),
    ("unknown request type", ("service.explode", {"service": "web"}),
     invalid("unknown request type 'service.explode'")),
    ("extra field in body", ("service.delete", {"service": "web", "force": True}),
     invalid("Object contains unknown field `force`")),
    ("wrong type in body", ("backend.update", {"service": "web", "backend": "a", "weight": "1"}),
     invalid("Expected `int`, got `str` - at `$.weight`")),
    ("missing field in body", ("backend.delete", {"service": "web"}),
     invalid("Object missing required field `backend`")),
]


@pytest.mark.parametrize("req, want", [c[1:] for c in MUTATION_CASES],
                         ids=[c[0] for c in MUTATION_CASES])
def test_mutation_reply(req, want):
    engine, kernel, persisted = make_engine(*BASE)
    before = dict(engine.services)
    reply, events = one(engine, req)
    assert reply == want
    assert kernel_matches_desired(engine, kernel)
    if want["ok"]:
        assert len(events) == 1
        assert persisted.calls == [engine.services]
    else:
        assert events == []
        assert engine.services == before
        assert persisted.calls == []  # nothing changed, nothing written
        assert kernel.applied == []


def _states(engine, path):
    """A service's or backend's stored state, as a change shows it (None: absent)."""
    parts = path.split("/")[2:]
    record = engine.services.get(parts[0])
    if record is not None and len(parts) == 2:
        record = record.backends.get(parts[1])
    if record is None:
        return None
    return {"options": msgspec.to_builtins(record.options), "address": record.address}


@pytest.mark.parametrize("req, paths", [
    (svc_create("api", "10.0.0.2"), ["/service/api"]),
    (svc_update(method="rr"), ["/service/web"]),
    (svc_delete(), ["/service/web", "/service/web/a", "/service/web/b"]),
    (be_create(rs="c", host="10.1.0.3"), ["/service/web/c"]),
    (be_update(rs="b", weight=7), ["/service/web/b"]),
    (be_delete(rs="a"), ["/service/web/a"]),
])
def test_a_mutation_reply_carries_its_change(req, paths):
    """The before and after of every object the request touched, as stored: the API's audit
    log writes them (a service delete takes its backends along)."""
    engine, _, _ = make_engine(*BASE, be_create(rs="b", host="10.1.0.2"))
    before = {p: _states(engine, p) for p in paths}
    reply, _ = one(engine, req)
    after = {p: _states(engine, p) for p in paths}
    assert reply["ok"] and reply["data"] == {"change": {
        p: {"before": before[p], "after": after[p]} for p in paths}}
    assert before != after


def test_the_change_of_a_replayed_batch_is_each_requests_own():
    engine, _, _ = make_engine(*BASE)
    replies = [r for r, _ in engine.handle_batch([svc_create("bad", "10.0.0.66", method="nosuch"),
                                                  be_update(weight=9)])]
    assert replies[0]["ok"] is False and replies[0]["data"] is None  # a refusal changed nothing
    assert replies[1]["data"] == {"change": {"/service/web/a": {
        "before": {"options": {**replies[1]["data"]["change"]["/service/web/a"]["after"]
                               ["options"], "weight": 100}, "address": "10.1.0.1"},
        "after": _states(engine, "/service/web/a")}}}
    assert _states(engine, "/service/web/a")["options"]["weight"] == 9


@pytest.mark.parametrize("req, want", [
    (svc_create("api", "10.0.0.2", method="rr"), {("api", (AF4, TCP, "10.0.0.2", 80, 0))}),
    (svc_create("dns", protocol="udp", port=53), {("dns", (AF4, UDP, "10.0.0.1", 53, 0))}),
    (svc_create("v6", host="2001:DB8::0001"), {("v6", (10, TCP, "2001:db8::1", 80, 0))}),
    (svc_create("fw", host="", port=0, fwmark=7), {("fw", (AF4, 0, "", 0, 7))}),
    (svc_delete(), set()),
])
def test_services_and_their_kernel_keys(req, want):
    engine, kernel, _ = make_engine(svc_create())
    assert one(engine, req)[0] == OK
    got = {(vs, key) for vs in engine.services if vs != "web"
           for key in desired_table({vs: engine.services[vs]})}
    assert got == want
    assert kernel_matches_desired(engine, kernel)


def test_service_delete_removes_its_backends_from_the_kernel():
    engine, kernel, _ = make_engine(*BASE, be_create(rs="b", host="10.1.0.2"))
    assert one(engine, svc_delete())[0] == OK
    assert engine.services == {}
    assert kernel.snapshot() == {}
    assert [op.verb for op in kernel.applied[0]] == ["del_service"]


def test_backend_create_defaults_reach_the_kernel():
    engine, kernel, _ = make_engine(svc_create())
    assert one(engine, be_create(weight=0))[0] == OK  # weight <= 0 on create means 100 (GORB)
    dest = kernel.table[WEB_KEY].dests[("10.1.0.1", 8080)]
    assert (dest.weight, dest.fwd) == (100, 0)  # gorb's defaults, not pyroute2's (1, dr)
    assert kernel.table[WEB_KEY].sched == "wrr"


# --- service.update (PATCH) ---------------------------------------------------------------------

@pytest.mark.parametrize("patch, sched, flags, timeout, netmask", [
    ({"method": "rr"}, "rr", 0, 0, 32),
    ({"flags": "sh-port"}, "wrr", 0x10, 0, 32),
    ({"flags": "sh-fallback|sh-port", "method": "sh"}, "sh", 0x18, 0, 32),
    ({"persistent": True}, "wrr", 0x1, 300, 32),
    ({"persistent": True, "timeout": 60, "netmask": "255.255.255.0"}, "wrr", 0x1, 60, 24),
    ({}, "wrr", 0, 0, 32),
])
def test_service_update_sets_in_place(patch, sched, flags, timeout, netmask):
    engine, kernel, _ = make_engine(*BASE)
    reply, events = one(engine, svc_update(**patch))
    assert reply == OK
    assert [e[:2] for e in events] == [("service.web.updated", "service.updated")]
    verbs = [op.verb for batch in kernel.applied for op in batch]
    assert verbs == (["set_service"] if patch else [])  # never del + add: connections survive
    live = kernel.table[WEB_KEY]
    assert (live.sched, live.flags, live.timeout, live.netmask) == (sched, flags, timeout, netmask)
    assert set(live.dests) == {("10.1.0.1", 8080)}  # backends untouched
    assert kernel_matches_desired(engine, kernel)


def test_service_update_can_turn_persistence_off_again():
    # The stored options carry the timeout that validation defaulted (300) when persistence was
    # switched on; PATCH {"persistent": false} alone must still be accepted.
    engine, kernel, _ = make_engine(svc_create(persistent=True))
    assert kernel.table[WEB_KEY].timeout == 300
    assert one(engine, svc_update(persistent=False))[0] == OK
    live = kernel.table[WEB_KEY]
    assert (live.flags, live.timeout, live.netmask) == (0, 0, 32)
    assert engine.services["web"].options.persistent is False
    # ...but a timeout for a service that is not persistent is still refused when asked for.
    assert one(engine, svc_update(timeout=60))[0] == invalid(
        "timeout and netmask apply only to a persistent service")


KEY_MSG = ("the service key (host, port, protocol, fwmark) cannot be changed in place "
           "({} differs): delete and re-create it")


@pytest.mark.parametrize("base, patch, differs", [
    (svc_create(), {"host": "10.0.0.2"}, "host"),
    (svc_create(), {"port": 81}, "port"),
    (svc_create(), {"protocol": "udp"}, "protocol"),
    (svc_create(), {"port": 0, "fwmark": 5}, "port, fwmark"),
    (svc_create(host="", port=0, fwmark=5), {"fwmark": 6}, "fwmark"),
    (svc_create(), {"port": 81, "method": "rr"}, "port"),  # refused whole: no partial update
])
def test_service_update_refuses_a_key_change(base, patch, differs):
    engine, kernel, _ = make_engine(base)
    before = kernel.snapshot()
    assert one(engine, svc_update(**patch)) == (invalid(KEY_MSG.format(differs)), [])
    assert kernel.snapshot() == before
    assert kernel.applied == []


def test_service_update_same_key_in_other_spelling_is_no_change():
    engine, kernel, _ = make_engine(*BASE)
    assert one(engine, svc_update(protocol="TCP", host="10.0.0.1"))[0] == OK
    assert all(batch == [] for batch in kernel.applied)


# --- backend.update -----------------------------------------------------------------------------

@pytest.mark.parametrize("weight, verbs", [
    (0, ["set_dest"]),
    (1, ["set_dest"]),
    (2**31 - 1, ["set_dest"]),
    (100, []),  # the weight it has: nothing to do
])
def test_backend_update_sets_the_weight_in_place(weight, verbs):
    engine, kernel, _ = make_engine(*BASE)
    reply, events = one(engine, be_update(weight=weight))
    assert reply == OK
    assert [op.verb for batch in kernel.applied for op in batch] == verbs
    assert kernel.table[WEB_KEY].dests[("10.1.0.1", 8080)].weight == weight
    assert events[0][2]["options"]["weight"] == weight
    assert kernel_matches_desired(engine, kernel)


# --- events -------------------------------------------------------------------------------------

@pytest.mark.parametrize("req, topic, type_, body_keys", [
    (svc_create("api", "10.0.0.2"), "service.api.created", "service.created",
     {"service": "api", "address": "10.0.0.2", "backends": {}, "kernel": None}),
    (svc_update(method="rr"), "service.web.updated", "service.updated", {"service": "web"}),
    (svc_delete(), "service.web.deleted", "service.deleted", {"service": "web"}),
    (be_create(rs="b", host="10.1.0.2"), "backend.web.b.created", "backend.created",
     {"service": "web", "backend": "b", "address": "10.1.0.2", "kernel": None}),
    (be_update(weight=0), "backend.web.a.updated", "backend.updated",
     {"service": "web", "backend": "a"}),
    (be_delete(), "backend.web.a.deleted", "backend.deleted", {"service": "web", "backend": "a"}),
])
def test_event_per_mutation(req, topic, type_, body_keys):
    engine, _, _ = make_engine(*BASE)
    reply, events = one(engine, req)
    assert reply == OK
    [(got_topic, got_type, body)] = events
    assert (got_topic, got_type) == (topic, type_)
    assert {k: body[k] for k in body_keys} == body_keys
    if type_.endswith(".deleted"):
        assert body == body_keys


def test_events_follow_the_batch_order_and_only_successes_publish():
    engine, _, _ = make_engine()
    answers = engine.handle_batch([svc_create(), be_create(), be_create(),  # the 2nd is a dup
                                   be_update(weight=3), be_delete(), svc_delete()])
    assert [r["errno"] for r, _ in answers] == ["ok", "ok", "exists", "ok", "ok", "ok"]
    assert [t for _, evs in answers for t, _, _ in evs] == [
        "service.web.created", "backend.web.a.created", "backend.web.a.updated",
        "backend.web.a.deleted", "service.web.deleted"]


# --- reads --------------------------------------------------------------------------------------

def test_service_get_shows_desired_and_kernel_view():
    engine, kernel, _ = make_engine(*BASE)
    reply = engine.read("service.get", {"service": "web"})
    assert (reply["ok"], reply["errno"], reply["reason"]) == (True, "ok", "")
    data = reply["data"]
    assert data["service"] == "web"
    assert data["address"] == "10.0.0.1"
    assert data["options"]["method"] == "wrr"
    assert data["kernel"] == {"scheduler": "wrr", "flags": 0, "timeout": 0, "netmask": 32,
                              "stats": None}
    assert data["backends"]["a"]["kernel"] == {"weight": 100, "fwd": 0, "stats": None}
    assert kernel.calls == ["service"]


def test_get_shows_kernel_none_when_the_kernel_lost_it():
    engine, kernel, _ = make_engine(*BASE)
    del kernel.table[WEB_KEY]
    data = engine.read("service.get", {"service": "web"})["data"]
    assert data["kernel"] is None
    assert data["backends"]["a"]["kernel"] is None


@pytest.mark.parametrize("type_, body, want", [
    ("service.list", {}, {**OK, "data": {"services": ["api", "web"]}}),
    ("service.get", {"service": "nope"}, NOT_FOUND),
    ("backend.get", {"service": "web", "backend": "nope"}, NOT_FOUND),
    ("backend.get", {"service": "nope", "backend": "a"}, NOT_FOUND),
    ("service.get", {}, invalid("Object missing required field `service`")),
    ("service.list", {"x": 1}, invalid("Object contains unknown field `x`")),
    ("state.fetch", {}, invalid("unknown request type 'state.fetch'")),
])
def test_read_replies(type_, body, want):
    engine, _, _ = make_engine(*BASE, svc_create("api", "10.0.0.2"))
    assert engine.read(type_, body) == want


def test_backend_get_and_state_dump():
    engine, _, _ = make_engine(*BASE)
    got = engine.read("backend.get", {"service": "web", "backend": "a"})
    assert got["ok"] and got["data"]["address"] == "10.1.0.1"
    assert got["data"]["kernel"]["weight"] == 100
    dump = engine.read("state.dump", {})["data"]["services"]
    assert set(dump) == {"web"} and set(dump["web"]["backends"]) == {"a"}


# --- the pure core ------------------------------------------------------------------------------

@pytest.mark.parametrize("req, verbs", [
    (svc_create("api", "10.0.0.2"), ["add_service"]),
    (svc_update(method="rr"), ["set_service"]),
    (svc_delete(), ["del_service"]),
    (be_create(rs="b", host="10.1.0.2"), ["add_dest"]),
    (be_update(weight=1), ["set_dest"]),
    (be_delete(), ["del_dest"]),
])
def test_stage_then_ops_between(req, verbs):
    engine, _, _ = make_engine(*BASE, svc_create("other", "10.0.0.9"))
    old = engine.services
    frozen = msgspec.json.encode(old)
    draft = Draft(old)
    st = stage(draft, req[0], messages.decode_request(*req))
    assert msgspec.json.encode(old) == frozen  # the base state is never changed in place
    assert [op.verb for op in ops_between(old, draft.services, {st.touched})] == verbs
    # An untouched service never produces ops, even if it differs.
    assert ops_between(old, draft.services, {"other"}) == []


@pytest.mark.parametrize("req", [svc_create(), be_create(), be_delete("nope"), svc_update(port=1),
                                 be_update(weight=-5), svc_delete("nope")])
def test_a_refused_stage_leaves_the_draft_as_it_was(req):
    engine, _, _ = make_engine(*BASE)
    draft = Draft(engine.services)
    frozen = msgspec.json.encode(draft.services)
    with pytest.raises(GorbError):
        stage(draft, req[0], messages.decode_request(*req))
    assert msgspec.json.encode(draft.services) == frozen


def test_stage_raises_gorb_errors():
    with pytest.raises(GorbError) as exc:
        stage(Draft({}), "service.delete",
              messages.decode_request("service.delete", {"service": "x"}))
    assert exc.value.errno == errors.NOT_FOUND


@pytest.mark.parametrize("batch", [
    [be_create(rs="b", host="10.1.0.2"), be_update(weight=1), be_delete()],
    [svc_update(method="rr"), be_delete(), svc_delete()],
    [be_create(rs="b", host="10.1.0.2"), svc_create("bad", "10.0.0.66", method="nosuch"),
     be_delete()],  # the failure path: restore and replay
])
def test_a_batch_never_changes_the_previous_state_in_place(batch):
    # Snapshots handed to persist, and the state a failed batch rolls back to, must stay as they
    # were: the batch works on copies.
    engine, _, persisted = make_engine(*BASE, be_create(rs="c", host="10.1.0.3"))
    old = engine.services
    frozen = msgspec.json.encode(old)
    engine.handle_batch(batch)
    assert msgspec.json.encode(old) == frozen
    written = [(s, msgspec.json.encode(s)) for s in persisted.calls]
    assert written
    engine.handle_batch([svc_create("z", "10.0.0.50"), be_create("z", "q"),
                         be_create(rs="e", host="10.1.0.5"), be_delete(rs="c")])
    assert [msgspec.json.encode(s) for s, _ in written] == [w for _, w in written]


# --- group commit -------------------------------------------------------------------------------

def test_a_batch_of_100_is_one_apply_and_one_persist():
    engine, kernel, persisted = make_engine(svc_create())
    batch = [be_create(rs=f"b{i}", host=f"10.1.{i // 250}.{i % 250 + 1}") for i in range(100)]
    answers = engine.handle_batch(batch)
    assert [r for r, _ in answers] == [OK] * 100
    assert kernel.calls == ["apply"]
    assert len(kernel.applied[0]) == 100
    assert persisted.calls == [engine.services]
    assert len(engine.services["web"].backends) == 100
    assert kernel_matches_desired(engine, kernel)


def test_a_batch_of_only_refusals_touches_nothing():
    engine, kernel, persisted = make_engine(*BASE)
    answers = engine.handle_batch([svc_create(), be_create(), svc_delete("nope")])
    assert [r for r, _ in answers] == [EXISTS, EXISTS, NOT_FOUND]
    assert kernel.calls == [] and persisted.calls == []


def kernel_reason(verb_where: str, code: int) -> str:
    import os
    return (f"error while calling into IPVS: {verb_where}: {os.strerror(code)} "
            f"({errno.errorcode[code]})")


def test_a_failed_op_fails_only_its_request_and_the_kernel_ends_as_desired():
    engine, kernel, persisted = make_engine(*BASE)
    batch = [
        be_create(rs="b1", host="10.1.0.11"),
        svc_create("bad", "10.0.0.66", method="nosuch"),   # the kernel has no such scheduler
        be_create("bad", "x", host="10.1.0.99"),           # under the service that fails
        be_update(weight=5),
        svc_create("api", "10.0.0.2"),
        be_create("api", "y", host="10.1.0.21"),
        be_delete(rs="b1"),
        be_create(rs="b2", host="10.1.0.12"),
    ]
    answers = engine.handle_batch(batch)
    replies = [r for r, _ in answers]
    assert replies[1] == {"ok": False, "errno": "kernel", "data": None,
                          "reason": kernel_reason("add_service 10.0.0.66:80/6", errno.ENOENT)}
    assert replies[2] == NOT_FOUND  # replayed after its service failed
    assert [r["errno"] for i, r in enumerate(replies) if i not in (1, 2)] == ["ok"] * 6
    assert "bad" not in engine.services
    assert set(engine.services) == {"web", "api"}
    assert set(engine.services["web"].backends) == {"a", "b2"}
    assert engine.services["web"].backends["a"].options.weight == 5
    assert set(engine.services["api"].backends) == {"y"}
    # Nothing the failed batch half-applied remains; the replay left exactly the desired state.
    assert kernel_matches_desired(engine, kernel)
    assert (AF4, TCP, "10.0.0.66", 80, 0) not in kernel.table
    # Events only for the requests that succeeded, in order.
    assert [t for _, evs in answers for t, _, _ in evs] == [
        "backend.web.b1.created", "backend.web.a.updated", "service.api.created",
        "backend.api.y.created", "backend.web.b1.deleted", "backend.web.b2.created"]
    # Written ahead (the staged state), then the state that was committed.
    assert len(persisted.calls) == 2
    assert persisted.calls[-1] == engine.services


def test_a_failed_set_service_rolls_back_the_whole_service_then_replays():
    engine, kernel, _ = make_engine(*BASE)
    answers = engine.handle_batch([
        be_create(rs="b1", host="10.1.0.11"),
        svc_update(method="nosuch"),
        be_update(weight=9),
    ])
    assert [r["errno"] for r, _ in answers] == ["ok", "kernel", "ok"]
    assert engine.services["web"].options.method == "wrr"
    assert kernel.table[WEB_KEY].sched == "wrr"
    assert kernel_matches_desired(engine, kernel)


def test_a_failed_service_create_alone_leaves_no_trace():
    engine, kernel, persisted = make_engine(*BASE)
    before_kernel, before = kernel.snapshot(), dict(engine.services)
    [(reply, events)] = engine.handle_batch([svc_create("bad", "10.0.0.66", method="nosuch")])
    assert reply["errno"] == "kernel" and events == []
    assert engine.services == before
    assert kernel.snapshot() == before_kernel
    assert persisted.calls[-1] == before


def test_a_create_colliding_with_a_foreign_kernel_service_leaves_it_alone():
    foreign = KService(AF4, TCP, "10.9.9.9", 80, sched="rr")
    foreign.dests = {("10.8.0.1", 80): KDest("10.8.0.1", 80, weight=5)}
    kernel = FakeKernel(table={foreign.key: foreign})
    engine, kernel, _ = make_engine(kernel=kernel)
    answers = engine.handle_batch([svc_create("w2", "10.9.9.9"), be_create("w2", "a", port=80)])
    [r1, r2] = [r for r, _ in answers]
    assert r1["errno"] == "exists"
    assert r1["reason"].startswith("specified object already exists: the kernel already has it")
    assert r2 == NOT_FOUND
    assert engine.services == {}
    # The dest the batch added under the foreign service before the rollback is gone again.
    assert kernel.snapshot() == {foreign.key: foreign}


# --- converge / start ---------------------------------------------------------------------------

FOREIGN = KService(AF4, UDP, "192.0.2.1", 53, sched="rr",
                   dests={("192.0.2.10", 53): KDest("192.0.2.10", 53, weight=1, fwd=3)})


def _drop_dest(k):
    del k.table[WEB_KEY].dests[("10.1.0.1", 8080)]


def _reweigh(k):
    k.table[WEB_KEY].dests[("10.1.0.1", 8080)].weight = 1


def _extra_dest(k):
    k.table[WEB_KEY].dests[("10.7.0.1", 80)] = KDest("10.7.0.1", 80, weight=100)


def _resched(k):
    k.table[WEB_KEY].sched = "lc"


def _drop_service(k):
    del k.table[WEB_KEY]


def _foreign(k):
    k.put(FOREIGN)


@pytest.mark.parametrize("drift, verbs", [
    (lambda k: None, []),
    (_drop_dest, ["add_dest"]),
    (_reweigh, ["set_dest"]),
    (_extra_dest, ["del_dest"]),
    (_resched, ["set_service"]),
    (_drop_service, ["add_service", "add_dest"]),
    (_foreign, []),
])
def test_converge_repairs_drift_and_leaves_foreign_services(drift, verbs):
    engine, kernel, persisted = make_engine(*BASE)
    _foreign(kernel)
    drift(kernel)
    n, failures = engine.converge()
    assert (n, failures) == (len(verbs), [])
    assert [op.verb for batch in kernel.applied for op in batch] == verbs
    assert kernel_matches_desired(engine, kernel, foreign=[FOREIGN])
    assert engine.converge() == (0, [])
    assert persisted.calls == []


def test_converge_reports_kernel_failures():
    engine, kernel, _ = make_engine(*BASE)
    kernel.schedulers.discard("wrr")  # e.g. a kernel without the module
    del kernel.table[WEB_KEY]
    n, failures = engine.converge()
    assert n == 2
    assert failures == ["add_service 10.0.0.1:80/6: No such file or directory (ENOENT)",
                        "add_dest 10.0.0.1:80/6 -> 10.1.0.1:8080: No such process (ESRCH)"]


@pytest.mark.parametrize("flush, calls, left", [
    (True, ["flush", "dump", "apply"], set()),
    (False, ["dump", "apply"], {FOREIGN.key}),
])
def test_start_adopts_or_flushes_first(flush, calls, left):
    source, _, _ = make_engine(*BASE)
    kernel = FakeKernel(table={FOREIGN.key: FOREIGN})
    kernel.put(desired_table(source.services)[WEB_KEY])
    _reweigh(kernel)  # adopt, then repair
    engine = Engine(dict(source.services), kernel, Persisted())
    n, failures = engine.start(flush=flush)
    assert failures == []
    assert kernel.calls == calls
    assert n == (2 if flush else 1)  # after a flush everything is added; else one set_dest
    assert set(kernel.table) - {WEB_KEY} == left
    assert kernel_matches_desired(engine, kernel, foreign=[FOREIGN] if left else [])


@pytest.mark.parametrize("steps", [
    # each step is one batch; the last request of the last batch must succeed
    [[be_delete(), be_create(rs="b")]],
    [[be_delete()], [be_create(rs="b")]],
    [[be_update(weight=0)], [be_delete()], [be_create(rs="b")]],
    [[svc_delete()], [svc_create(), be_create(rs="b")]],
])
def test_a_freed_backend_endpoint_can_be_reused(steps):
    engine, kernel, _ = make_engine(*BASE)
    for batch in steps:
        answers = engine.handle_batch(batch)
        assert [r for r, _ in answers] == [OK] * len(batch)
    assert set(engine.services["web"].backends) == {"b"}
    assert kernel_matches_desired(engine, kernel)


def test_the_target_table_is_updated_in_place_and_equals_a_rebuild():
    """Commits update only the touched services' targets; the result equals a full rebuild."""
    from gorb.services.ipvs_writer.targets import targets as rebuild

    kernel = FakeKernel()
    engine = Engine({}, kernel, lambda s: None)
    engine.handle_batch([("service.create", {"service": f"s{i}", "options": {
        "host": f"10.0.0.{i + 1}", "port": 80}}) for i in range(3)])
    engine.targets()  # build the cache
    reqs = [("backend.create", {"service": f"s{i % 3}", "backend": f"b{i}", "options": {
        "host": f"10.1.0.{i % 4 + 1}", "port": 8080}}) for i in range(12)]
    engine.handle_batch(reqs)
    engine.handle_batch([("backend.delete", {"service": "s0", "backend": "b0"}),
                         ("service.delete", {"service": "s2"}),
                         ("backend.create", {"service": "s1", "backend": "x", "options": {
                             "host": "10.1.0.9", "port": 8080, "pulse": {"type": "none"}}})])
    cached = {k: sorted(g.members) for k, g in engine.targets().items()}
    fresh = {k: sorted(g.members) for k, g in rebuild(engine.services).items()}
    assert cached == fresh
    assert any(len(m) > 1 for m in cached.values())  # shared targets exist in this table


# --- the incremental paths against the whole-state ones -----------------------------------------

def _random_request(rnd, engine):
    """A mutation that may or may not succeed: backend creates/updates/deletes mostly, now and
    then a service change (scheduler, pulse defaults, fail-open) that forces a whole-service
    comparison."""
    vs = rnd.choice(["web", "api", "dns"])
    rs = f"b{rnd.randrange(12)}"
    roll = rnd.random()
    if roll < 0.35:
        pulse = rnd.choice([None, {"type": "none"}, {"type": "tcp", "interval": "2s"}])
        extra = {"pulse": pulse} if pulse else {}
        return be_create(vs, rs, host=f"10.1.0.{rnd.randrange(1, 16)}",
                         port=rnd.choice([80, 8080]), weight=rnd.choice([0, 10, 100]), **extra)
    if roll < 0.65:
        return be_update(vs, rs, weight=rnd.choice([0, 1, 50, 100]))
    if roll < 0.85:
        return be_delete(vs, rs)
    return svc_update(vs, **rnd.choice([{"method": rnd.choice(["rr", "wrr", "lc"])},
                                        {"pulse": {"type": "tcp", "interval": "1s"}},
                                        {"pulse": {"type": "none"}},
                                        {"fail_open": rnd.choice([0.0, 0.5])}]))


def _groups(groups):
    return {k: sorted(g.members) for k, g in groups.items()}


@pytest.mark.parametrize("seed", range(8))
def test_incremental_ops_and_targets_equal_the_whole_state_ones(seed):
    """``ops_between`` compares only the backends whose records changed and ``update_targets``
    moves only their targets; after every batch (mutations and health results, with fail-open
    on and off) the kernel must still equal the desired state, the target table the one built
    from scratch, and the state file's content a fresh encoding of the whole state."""
    import random

    from gorb.services.ipvs_writer import state
    from gorb.services.ipvs_writer.targets import targets

    rnd = random.Random(seed)
    engine, kernel, _ = make_engine(svc_create("web", "10.0.0.1"), svc_create("api", "10.0.0.2"),
                                    svc_create("dns", "10.0.0.3", protocol="udp", port=53))
    engine.targets()  # build the cache: from now on it is only ever updated
    for step in range(60):
        if rnd.random() < 0.25 and engine.targets():
            keys = rnd.sample(sorted(engine.targets()), min(3, len(engine.targets())))
            status = rnd.choice(["up", "down"])
            engine.handle_health([{"worker": 0, "results": [
                {"key": k, "ok": status == "up", "status": status, "at": float(step)}
                for k in keys]}])
        elif rnd.random() < 0.15:  # re-created in one batch: same endpoint, another check
            vs, rs = rnd.choice(["web", "api"]), f"b{rnd.randrange(12)}"
            pulse = rnd.choice([{"type": "none"}, {"type": "tcp", "interval": "3s"},
                                {"type": "http", "interval": "1s"}])
            engine.handle_batch([be_delete(vs, rs), be_create(vs, rs, host="10.1.0.99", port=80,
                                                              pulse=pulse)])
        else:
            engine.handle_batch([_random_request(rnd, engine) for _ in range(rnd.randrange(1, 5))])
        assert kernel_matches_desired(engine, kernel), f"step {step}"
        assert _groups(engine.targets()) == _groups(targets(engine.services)), f"step {step}"
        # The state file reuses each unchanged record's encoding: never a stale one.
        assert msgspec.json.decode(state.encode(engine.services)) == msgspec.json.decode(
            msgspec.json.encode(state.StateDocument(state.STATE_VERSION, engine.services)))


@pytest.mark.parametrize("removal", [be_delete(), svc_delete()])
def test_a_removed_backends_last_check_is_forgotten(removal):
    """The last check shown by backend.get belongs to the backend checked: once removed (or its
    service), a backend re-created under the same id starts without one."""
    engine, _, _ = make_engine(*BASE, be_create(rs="b", host="10.1.0.2"))
    [key_a] = [k for k, g in engine.targets().items() if ("web", "a") in g.members]
    [key_b] = [k for k, g in engine.targets().items() if ("web", "b") in g.members]
    engine.handle_health([{"worker": 0, "results": [
        {"key": k, "ok": True, "status": "up", "at": 1.0} for k in (key_a, key_b)]}])
    assert engine.read("backend.get", {"service": "web", "backend": "a"})["data"]["check"]
    assert one(engine, removal)[0] == OK
    again = [be_create()] if removal[0] == "backend.delete" else [*BASE]
    for req in again:
        assert one(engine, req)[0] == OK
    assert engine.read("backend.get", {"service": "web", "backend": "a"})["data"]["check"] is None
    b = engine.read("backend.get", {"service": "web", "backend": "b"})
    if removal[0] == "backend.delete":  # b was not touched: it keeps its check
        assert b["data"]["check"]["ok"] is True
    else:
        assert b == NOT_FOUND and ("web", "b") not in engine.observed


# --- a state file that cannot be written --------------------------------------------------------

class FailingPersist(Persisted):
    """Refuses (ENOSPC) while ``full`` is set, like a full file system."""

    full = False

    def __call__(self, services):
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device", "/var/lib/gorb/state.json.tmp")
        super().__call__(services)


def test_a_batch_that_cannot_be_saved_is_refused_and_changes_nothing():
    kernel = FakeKernel()
    persist = FailingPersist()
    engine = Engine({}, kernel, persist)
    assert [r for r, _ in engine.handle_batch([svc_create(), be_create()])] == [OK, OK]
    before, table = engine.services, kernel.snapshot()
    applied = len(kernel.applied)
    persist.full = True
    replies = engine.handle_batch([be_update(weight=7), be_create(rs="b", host="10.1.0.2"),
                                   be_delete("web", "nope")])
    refused = {"ok": False, "errno": "state", "data": None,
               "reason": "cannot save the desired state ([Errno 28] No space left on device: "
                         "'/var/lib/gorb/state.json.tmp'); nothing was changed"}
    assert [r for r, _ in replies] == [refused, refused, NOT_FOUND]  # its own error kept
    assert all(events == [] for _, events in replies)
    assert engine.services is before and kernel.snapshot() == table
    assert len(kernel.applied) == applied  # write-ahead: the kernel was not even asked
    # Reads still work; once the file system has room, the next change goes through.
    assert engine.read("backend.get", {"service": "web", "backend": "a"})["data"]["weight"] == 100
    persist.full = False
    assert one(engine, be_update(weight=7))[0] == OK
    assert kernel_matches_desired(engine, kernel)
    assert engine.services["web"].backends["a"].options.weight == 7


def test_health_changes_are_applied_even_when_they_cannot_be_saved(caplog):
    """Traffic first: a backend pulse finds down is drained although the state file cannot be
    written; the verdict is saved with the next change that can be."""
    persist = FailingPersist()
    kernel = FakeKernel()
    engine = Engine({}, kernel, persist)
    for req in BASE:
        assert one(engine, req)[0] == OK
    [key] = engine.targets()
    persist.full = True
    engine.handle_health([{"worker": 0, "results": [
        {"key": key, "ok": False, "status": "down", "at": 5.0}]}])
    assert kernel.snapshot()[WEB_KEY].dests[("10.1.0.1", 8080)].weight == 0
    assert engine.services["web"].backends["a"].health.status == "down"
    assert "applying them anyway" in caplog.text
    persist.full = False
    assert one(engine, svc_create("api", "10.0.0.2"))[0] == OK
    assert persist.calls[-1]["web"].backends["a"].health.status == "down"


def test_a_replayed_batch_that_cannot_be_saved_keeps_its_answers_and_saves_later(caplog):
    """The batch was saved, then an op failed, the kernel was restored and the requests replayed
    one at a time; if saving the replayed state then fails, the replies stand (the kernel and the
    writer have those changes) and the next save that succeeds writes them."""
    persist = FailingPersist()
    kernel = FakeKernel()
    engine = Engine({}, kernel, persist)
    for req in BASE:
        assert one(engine, req)[0] == OK

    def fill_after_first_save(services, real=persist.__call__):
        real(services)
        persist.full = True

    engine.persist = fill_after_first_save
    replies = [r for r, _ in engine.handle_batch([
        be_update(weight=5), svc_create("bad", "10.0.0.66", method="nosuch")])]
    assert replies[0] == OK and replies[1]["errno"] == "kernel"
    assert "a restart before the next successful save would lose them" in caplog.text
    assert kernel_matches_desired(engine, kernel)
    persist.full = False
    engine.persist = persist
    assert one(engine, svc_create("api", "10.0.0.2"))[0] == OK
    saved = persist.calls[-1]
    assert saved["web"].backends["a"].options.weight == 5 and set(saved) == {"web", "api"}


def test_only_the_shards_whose_targets_changed_are_told_to_re_pull():
    from gorb.common.pulse_messages import TargetsChanged, concerns
    from gorb.common.shard import owner

    engine, _, _ = make_engine(svc_create(), be_create(rs="a", host="10.1.0.1"))
    # no worker has pulled yet: every one is told
    assert engine.take_targets_changed() == TargetsChanged()
    assert engine.take_targets_changed() is None  # taken
    assert engine.read("pulse.targets", {"worker": 0, "workers": 4})["ok"]
    one(engine, be_update(rs="a", weight=7))  # a weight moves no target
    assert engine.take_targets_changed() is None
    one(engine, be_create(rs="b", host="10.1.0.2"))
    (key,) = [k for k in engine.targets() if "10.1.0.2" in k]
    notice = engine.take_targets_changed()
    assert notice == TargetsChanged(4, [owner(key, 4)])
    told = [w for w in range(4) if concerns(notice, w, 4)]
    assert told == [owner(key, 4)]
    assert all(concerns(notice, w, 3) for w in range(3))  # split another way: all re-pull
    # a pulse change moves the target: the shards of the old and the new key
    old = set(engine.targets())
    one(engine, svc_update(pulse={"type": "tcp", "interval": "7s"}))
    notice = engine.take_targets_changed()
    new = set(engine.targets())
    assert not old & new
    assert set(notice.shards) == {owner(k, 4) for k in new | old}
