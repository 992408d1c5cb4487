"""``reconcile.plan``: the three-way diff store <-> writer into commands and write-backs, the
normalised comparison (no flapping), the safety rule, seeding and ``next_base``.

Writer views are built by the writer's own pure ``stage`` and ``service_view``, so they are
exactly what ``state.dump`` returns."""

from __future__ import annotations

import json

import pytest

from gorb.common import messages
from gorb.common.errors import invalid
from gorb.services.discovery import documents as docs
from gorb.services.discovery import reconcile as r
from gorb.services.ipvs_writer.engine import Draft, service_view, stage

pytestmark = pytest.mark.timeout(5)

WEB = {"host": "10.0.0.1", "port": 80}
API = {"host": "10.0.0.2", "port": 443}
A = {"host": "10.1.0.1", "port": 8080}
B = {"host": "10.1.0.2", "port": 8080}


def views(services: dict[str, tuple[dict, dict[str, dict]]], default_vip: str = "10.0.0.9"):
    """{vs: (options, {rs: options})} -> state.dump's services, through the writer's stage."""
    draft = Draft({})
    for vs, (opts, backends) in services.items():
        stage(draft, "service.create", messages.decode_request(
            "service.create", {"service": vs, "options": opts}), default_vip)
        for rs, bopts in backends.items():
            stage(draft, "backend.create", messages.decode_request(
                "backend.create", {"service": vs, "backend": rs, "options": bopts}))
            if bopts.get("weight") == 0:
                stage(draft, "backend.update", messages.decode_request(
                    "backend.update", {"service": vs, "backend": rs, "weight": 0}))
    return {vs: service_view(vs, rec) for vs, rec in draft.services.items()}


def kv(services: dict[str, tuple[dict, dict[str, dict]]], marker: bool = False, **raw):
    entries = {}
    for vs, (opts, backends) in services.items():
        entries[f"gorb/services/{vs}"] = json.dumps(opts).encode()
        for rs, bopts in backends.items():
            entries[f"gorb/backends/{vs}/{rs}"] = json.dumps(bopts).encode()
    if marker:
        entries["gorb/format"] = docs.render_marker()
    entries.update({f"gorb/{k.replace('__', '/')}": v for k, v in raw.items()})
    return docs.parse_kv("gorb", entries)


def ops(plan: r.Plan) -> list[tuple]:
    return [(s.op, s.service, s.backend) for a in plan.actions for s in a.steps]


def agreed_base(store, gorb):
    """The base after a round that found both sides as given and equal."""
    p = r.plan(store, gorb, None, writable=True)
    assert p.actions == []
    return r.next_base(None, p, {})


# --- store -> gorb (no base: the store is authoritative) ---------------------------------------

STORE_WINS = [
    ("create service with backends", {"web": (WEB, {"a": A})}, {},
     [("service.create", "web", None), ("backend.create", "web", "a")]),
    ("delete service", {"web": (WEB, {}), "api": (API, {})},
     {"web": (WEB, {}), "api": (API, {}), "old": ({"host": "10.0.0.3", "port": 1}, {})},
     [("service.delete", "old", None)]),
    ("scheduler change is an update", {"web": ({**WEB, "method": "rr"}, {"a": A})},
     {"web": (WEB, {"a": A})}, [("service.update", "web", None)]),
    ("port change re-creates with the store's backends", {"web": ({**WEB, "port": 81}, {"a": A})},
     {"web": (WEB, {"a": A})},
     [("service.delete", "web", None), ("service.create", "web", None),
      ("backend.create", "web", "a")]),
    ("weight only", {"web": (WEB, {"a": {**A, "weight": 7}})}, {"web": (WEB, {"a": A})},
     [("backend.update", "web", "a")]),
    ("drain through the store", {"web": (WEB, {"a": {**A, "weight": 0}})},
     {"web": (WEB, {"a": A})}, [("backend.update", "web", "a")]),
    ("other backend option: delete + create", {"web": (WEB, {"a": {**A, "method": "dr"}})},
     {"web": (WEB, {"a": A})}, [("backend.delete", "web", "a"), ("backend.create", "web", "a")]),
    ("new drained backend: create then weight 0", {"web": (WEB, {"b": {**B, "weight": 0}})},
     {"web": (WEB, {})}, [("backend.create", "web", "b"), ("backend.update", "web", "b")]),
    ("extra backend", {"web": (WEB, {"a": A}), "api": (API, {})},
     {"web": (WEB, {"a": A, "b": B}), "api": (API, {})}, [("backend.delete", "web", "b")]),
]


@pytest.mark.parametrize("name,store,gorb,expected", STORE_WINS, ids=[c[0] for c in STORE_WINS])
def test_store_is_authoritative_without_base(name, store, gorb, expected):
    p = r.plan(kv(store), views(gorb), None, writable=True)
    assert p.refused is None
    assert ops(p) == expected


def test_commands_are_ordinary_writer_requests():
    p = r.plan(kv({"web": (WEB, {"a": {**A, "weight": 0}})}), {}, None, writable=False)
    for a in p.actions:
        for s in a.steps:
            messages.decode_request(s.op, s.body)  # the writer would accept the shape
    create = p.actions[0].steps[0].body
    assert create["address"] == "10.0.0.1" and create["options"]["protocol"] == "tcp"


NO_FLAP = [
    ("protocol case", {**WEB, "protocol": "TCP"}),
    ("method left out", {"host": "10.0.0.1", "port": 80, "protocol": "tcp"}),
    ("extra unknown field (GORB K's vsid)", {**WEB, "vsid": "x"}),
]


@pytest.mark.parametrize("name,doc", NO_FLAP, ids=[c[0] for c in NO_FLAP])
def test_normalised_comparison_does_not_flap(name, doc):
    p = r.plan(kv({"web": (doc, {"a": {**A, "method": "NAT"}})}), views({"web": (WEB, {"a": A})}),
               None, writable=True)
    assert p.actions == [], ops(p)


def test_ipv6_service_without_family_does_not_flap():
    v6 = {"v6": ({"host": "2001:DB8::0001", "port": 80}, {"a": {"host": "2001:db8::a",
                                                                "port": 80}})}
    gorb = views(v6)
    assert gorb["v6"]["address"] == "2001:db8::1" and gorb["v6"]["options"]["family"] == "ipv6"
    assert r.plan(kv(v6), gorb, None, writable=True).actions == []


def test_missing_host_is_the_default_vip_and_does_not_flap():
    """GORB bug: a document without host never compared equal (re-created every round)."""
    gorb = views({"web": ({"port": 80}, {"a": A})}, default_vip="10.0.0.9")
    assert gorb["web"]["address"] == "10.0.0.9" and gorb["web"]["options"]["family"] == "ipv4"
    p = r.plan(kv({"web": ({"port": 80}, {"a": A})}), gorb, None, writable=True)
    assert p.actions == []


def test_fwmark_service_backends_may_have_port_zero():
    fw = {"fw": ({"fwmark": 7, "family": "ipv4"}, {"a": {"host": "10.1.0.1"}})}
    store = kv({**fw, "web": (WEB, {"z": {"host": "10.1.0.9"}})})
    p = r.plan(store, views({**fw, "web": (WEB, {})}), None, writable=True)
    assert p.actions == []
    assert p.errors == {"gorb/backends/web/z": "endpoint information is missing"}


def test_create_without_host_leaves_the_vip_to_the_writer():
    p = r.plan(kv({"web": ({"port": 80}, {})}), {}, None, writable=True)
    assert p.actions[0].steps[0].body["address"] == ""


def test_host_names_resolve_through_the_injected_resolver():
    names = {"web.example": "10.0.0.7", "be.example": "10.1.0.7"}

    def resolve(host):
        if host not in names:
            raise invalid(f"lookup {host}: no such host")
        return names[host]

    store = kv({"web": ({"host": "web.example", "port": 80}, {"a": {"host": "be.example",
                                                                      "port": 1}}),
                "bad": ({"host": "nowhere.example", "port": 80}, {})})
    p = r.plan(store, {}, None, writable=True, resolve=resolve)
    assert ops(p) == [("service.create", "web", None), ("backend.create", "web", "a")]
    assert p.actions[0].steps[0].body["address"] == "10.0.0.7"
    assert p.actions[1].steps[0].body["address"] == "10.1.0.7"
    assert p.errors == {"gorb/services/bad": "lookup nowhere.example: no such host"}


def test_the_writers_resolution_is_reused():
    """GORB resolved a name once, at creation; an unchanged host is not looked up again."""
    draft = Draft({})
    stage(draft, "service.create", messages.decode_request("service.create", {
        "service": "web", "options": {"host": "web.example", "port": 80}, "address": "10.0.0.7"}))
    gorb = {vs: service_view(vs, rec) for vs, rec in draft.services.items()}

    def no_lookups(host):
        raise AssertionError(f"looked up {host}")

    p = r.plan(kv({"web": ({"host": "web.example", "port": 80}, {})}), gorb, None,
               writable=True, resolve=no_lookups)
    assert p.actions == [] and p.errors == {}


def test_bad_documents_are_isolated_and_left_alone():
    store = kv({"web": (WEB, {"a": A}), "api": (API, {})},
               services__api=b"{not json", backends__web__b=b'{"host": "10.1.0.2"}')
    gorb = views({"web": (WEB, {"a": A, "b": B}), "api": (API, {})})
    p = r.plan(store, gorb, None, writable=True)
    assert p.actions == []  # api (bad) not deleted, web/b (bad) not deleted
    assert set(p.errors) == {"gorb/services/api", "gorb/backends/web/b"}
    assert "endpoint information is missing" in p.errors["gorb/backends/web/b"]


def test_one_bad_key_does_not_stop_the_others():
    store = kv({"web": (WEB, {}), "new": ({"host": "10.0.0.5", "port": 1}, {})},
               services__broken=b'{"port": 80, "protocol": "icmp"}')
    p = r.plan(store, views({"web": (WEB, {})}), None, writable=True)
    assert ops(p) == [("service.create", "new", None)]
    assert p.errors == {"gorb/services/broken": "specified protocol is unknown"}


# --- three-way: gorb -> store write-backs ---------------------------------------------------------

def test_rest_changes_are_written_back():
    store = kv({"web": (WEB, {"a": A})}, marker=True)
    before = views({"web": (WEB, {"a": A})})
    base = agreed_base(store, before)
    after = views({"web": ({**WEB, "method": "rr"}, {"a": {**A, "weight": 0}, "b": B}),
                   "api": (API, {})})
    p = r.plan(store, after, base, writable=True)
    assert [(a.side, a.verb, a.label) for a in p.actions] == [
        ("store", "create", "api"), ("store", "update", "web"), ("store", "update", "web/a"),
        ("store", "create", "web/b")]
    steps = {s.key: s for a in p.actions for s in a.steps}
    assert steps["services/web"].expect == store.raw["services/web"]
    assert steps["backends/web/b"].expect is None
    assert steps["services/api"].tree  # a service new to the store clears stale backend keys
    assert json.loads(steps["backends/web/a"].value)["weight"] == 0
    # what gorb writes parses back to what gorb has: the next round is quiet
    entries = {f"gorb/{s.key}": s.value for s in steps.values()}
    entries["gorb/format"] = docs.render_marker()
    new_base = r.next_base(base, p, {i: True for i in range(len(p.actions))})
    again = r.plan(docs.parse_kv("gorb", entries), after, new_base, writable=True)
    assert again.actions == [], ops(again)


def test_rest_delete_is_written_back_with_its_backends():
    store = kv({"web": (WEB, {"a": A}), "api": (API, {})}, marker=True)
    base = agreed_base(store, views({"web": (WEB, {"a": A}), "api": (API, {})}))
    p = r.plan(store, views({"api": (API, {})}), base, writable=True)
    (action,) = p.actions
    (step,) = action.steps
    assert (action.side, step.op, step.key, step.tree) == ("store", "store.delete",
                                                           "services/web", True)
    assert action.agreed == {("service", "web"): None, ("backend", "web", "a"): None}


def test_store_change_wins_over_an_unchanged_gorb_and_a_conflict():
    store0 = kv({"web": (WEB, {})}, marker=True)
    base = agreed_base(store0, views({"web": (WEB, {})}))
    # the store changed web; gorb changed it too (REST) meanwhile: the store wins
    store1 = kv({"web": ({**WEB, "method": "lc"}, {})}, marker=True)
    p = r.plan(store1, views({"web": ({**WEB, "method": "rr"}, {})}), base, writable=True)
    assert ops(p) == [("service.update", "web", None)]
    assert p.actions[0].steps[0].body["options"]["method"] == "lc"


def test_store_deletion_after_base_is_applied():
    both = {"web": (WEB, {}), "api": (API, {}), "db": ({"host": "10.0.0.3", "port": 5432}, {})}
    base = agreed_base(kv(both, marker=True), views(both))
    store = kv({k: v for k, v in both.items() if k != "db"}, marker=True)
    p = r.plan(store, views(both), base, writable=True)
    assert ops(p) == [("service.delete", "db", None)] and p.refused is None


def test_read_only_store_always_wins():
    store = docs.parse_files({"web.json": json.dumps({"options": WEB}).encode()})
    p = r.plan(store, views({"web": (WEB, {"a": A}), "api": (API, {})}), None, writable=False)
    assert ops(p) == [("service.delete", "api", None), ("backend.delete", "web", "a")]
    assert all(a.side == r.GORB for a in p.actions)


def test_an_empty_writable_store_is_seeded_from_gorb():
    store = kv({})
    gorb = views({"web": (WEB, {"a": A}), "api": (API, {})})
    base = r.initial_base(store, writable=True)
    assert base == {} and r.initial_base(store, writable=False) is None
    assert r.initial_base(kv({"web": (WEB, {})}), writable=True) is None
    p = r.plan(store, gorb, base, writable=True)
    assert p.refused is None
    assert [s.key for a in p.actions for s in a.steps] == [
        "format", "services/api", "services/web", "backends/web/a"]


# --- the safety rule ------------------------------------------------------------------------------

FOUR = {f"s{i}": ({"host": f"10.0.0.{i}", "port": 80}, {}) for i in range(1, 5)}

SAFETY = [
    # (name, store services kept, marker, base?, force, refused?)
    ("emptied prefix, with base", [], False, True, False, "the store is empty"),
    ("emptied prefix, no base", [], False, False, False, "the store is empty"),
    ("emptied prefix, forced", [], False, True, True, None),
    ("three of four deleted", ["s1"], True, True, False, "would delete 3 of 4 services"),
    ("two of four deleted (= share)", ["s1", "s2"], True, True, False, None),
    ("services/ emptied, marker kept", [], True, True, False, "would delete 4 of 4 services"),
    ("one of four deleted", ["s1", "s2", "s3"], True, True, False, None),
    ("three of four, forced", ["s1"], True, True, True, None),
]


@pytest.mark.parametrize("name,kept,marker,with_base,force,refused", SAFETY,
                         ids=[c[0] for c in SAFETY])
def test_safety_rule(name, kept, marker, with_base, force, refused):
    gorb = views(FOUR)
    base = agreed_base(kv(FOUR, marker=True), gorb) if with_base else None
    store = kv({k: FOUR[k] for k in kept}, marker=marker)
    p = r.plan(store, gorb, base, writable=True, force=force, max_delete_share=0.5)
    if refused is None:
        assert p.refused is None
    else:
        assert p.refused and refused in p.refused and "force" in p.refused
        assert p.status() == "refused"


def test_the_last_service_can_be_deleted_when_the_marker_stays():
    one = {"web": (WEB, {"a": A})}
    base = agreed_base(kv(one, marker=True), views(one))
    p = r.plan(kv({}, marker=True), views(one), base, writable=True)
    assert p.refused is None and ops(p) == [("service.delete", "web", None)]


def test_backend_share_is_guarded_too():
    many = {"web": (WEB, {f"b{i}": {"host": f"10.1.0.{i}", "port": 80} for i in range(4)})}
    base = agreed_base(kv(many, marker=True), views(many))
    p = r.plan(kv({"web": (WEB, {})}, marker=True), views(many), base, writable=True)
    assert "would delete 4 of 4 backends" in p.refused


def test_recreate_is_not_a_deletion():
    p = r.plan(kv({"web": ({**WEB, "port": 81}, {})}), views({"web": (WEB, {})}), None,
               writable=True, max_delete_share=0.0)
    assert p.refused is None


# --- status and base ---------------------------------------------------------------------------

def test_dry_run_diff_lists():
    store = kv({"web": ({**WEB, "method": "rr"}, {"a": {**A, "weight": 5}, "c": B}),
                "new": ({"host": "10.0.0.5", "port": 1}, {})})
    gorb = views({"web": (WEB, {"a": A, "b": {"host": "10.1.0.3", "port": 1}}),
                  "old": ({"host": "10.0.0.6", "port": 1}, {})})
    services, backends, writes = r.plan(store, gorb, None, writable=True).diff()
    assert (services.create, services.update, services.delete) == (["new"], ["web"], ["old"])
    assert (backends.create, backends.update, backends.delete) == (["web/c"], ["web/a"],
                                                                   ["web/b"])
    assert (writes.put, writes.delete) == ([], [])


def test_next_base_keeps_failures_pending():
    store = kv({"web": (WEB, {}), "api": (API, {})})
    p = r.plan(store, {}, None, writable=True)
    assert [a.label for a in p.actions] == ["api", "web"]
    base = r.next_base(None, p, {0: True, 1: False})
    assert base[("service", "api")]["port"] == 443
    assert base[("service", "web")] is r.CONFLICT
    # next round, the writer still lacks web: the store wins again (not a write-back delete)
    again = r.plan(store, views({"api": (API, {})}), base, writable=True)
    assert ops(again) == [("service.create", "web", None)]
    # with a base, a failure keeps the old value
    kept = r.next_base(base, again, {0: False})
    assert kept[("service", "web")] is r.CONFLICT


def test_gorb_side_errors_are_isolated():
    gorb = views({"web": (WEB, {}), "api": (API, {})})
    gorb["api"]["options"]["protocol"] = "icmp"  # cannot happen, but must not stop the round
    p = r.plan(kv({"web": (WEB, {})}, marker=True), gorb, None, writable=True)
    assert p.actions == [] and "gorb: service api" in p.errors


def test_conflict_equals_nothing():
    assert r.CONFLICT != r.CONFLICT and r.CONFLICT != {} and r.CONFLICT != None  # noqa: E711
