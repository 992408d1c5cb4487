"""``plan(desired, actual, owned)``: set difference into ops, ``set`` for changes, hands off what
gorb does not own; and ``kservice``/``kdest``, the kernel values of validated options."""

from dataclasses import replace

import pytest

from gorb.common.model import BackendOptions, ServiceOptions
from gorb.common.validation import validate_backend, validate_service
from gorb.services.ipvs_writer.table import KDest, KService, Op, kdest, kservice, plan, service_key

pytestmark = pytest.mark.timeout(5)

TCP, UDP, SCTP = 6, 17, 132
AF4, AF6 = 2, 10
NAT, TUNNEL, DR = 0, 2, 3


def _d(addr="10.1.0.1", port=8080, **kw) -> KDest:
    return KDest(addr, port, **{"fwd": NAT, "weight": 100, **kw})


def _s(addr="10.0.0.1", port=80, dests=(), **kw) -> KService:
    svc = KService(kw.pop("af", AF4), kw.pop("protocol", TCP), addr, port, **kw)
    svc.dests = {d.key: d for d in dests}
    return svc


def _table(*services: KService) -> dict:
    return {s.key: s for s in services}


def _summary(ops: list[Op]) -> list[tuple]:
    return [(op.verb, op.service.key, op.dest.key if op.dest else None) for op in ops]


WEB = _s()
WEB_KEY = (AF4, TCP, "10.0.0.1", 80, 0)
DNS = _s(port=53, protocol=UDP, sched="rr")
DNS_KEY = (AF4, UDP, "10.0.0.1", 53, 0)
B1, B2, B3 = _d("10.1.0.1"), _d("10.1.0.2"), _d("10.1.0.3")
TUN = _d("10.1.0.9", fwd=TUNNEL, tun_type=1, tun_port=6080, tun_flags=1)
V6 = _s("2001:db8::1", af=AF6, netmask=128, dests=[_d("2001:db8::10", af=AF6)])
V6_KEY = (AF6, TCP, "2001:db8::1", 80, 0)
FW = KService(AF4, 0, "", 0, fwmark=42, sched="rr")
FW_KEY = (AF4, 0, "", 0, 42)


@pytest.mark.parametrize("desired, actual, owned, expected", [
    pytest.param([], [], set(), [], id="empty"),
    pytest.param([_s(dests=[B1, B2])], [], set(), [
        ("add_service", WEB_KEY, None),
        ("add_dest", WEB_KEY, ("10.1.0.1", 8080)),
        ("add_dest", WEB_KEY, ("10.1.0.2", 8080)),
    ], id="new-service-then-its-dests"),
    pytest.param([V6, FW], [], set(), [
        ("add_service", V6_KEY, None),
        ("add_dest", V6_KEY, ("2001:db8::10", 8080)),
        ("add_service", FW_KEY, None),
    ], id="new-ipv6-and-fwmark"),
    pytest.param([_s(dests=[B1, B2])], [_s(dests=[B1, B2])], set(), [], id="identical"),
    pytest.param([_s(dests=[B1, TUN]), DNS], [_s(dests=[B1, TUN]), DNS], {WEB_KEY, DNS_KEY}, [],
                 id="identical-and-owned"),
    pytest.param([_s(sched="sh")], [_s()], set(), [("set_service", WEB_KEY, None)],
                 id="scheduler-changed"),
    pytest.param([_s(flags=0x18)], [_s(flags=0x08)], set(), [("set_service", WEB_KEY, None)],
                 id="flags-changed"),
    pytest.param([_s(flags=1, timeout=600)], [_s(flags=1, timeout=300)], set(),
                 [("set_service", WEB_KEY, None)], id="timeout-changed"),
    pytest.param([_s(flags=1, timeout=300, netmask=24)], [_s(flags=1, timeout=300, netmask=32)],
                 set(), [("set_service", WEB_KEY, None)], id="netmask-changed"),
    pytest.param([_s(sched="sh", flags=0x19, timeout=60, netmask=24, dests=[B1])],
                 [_s(dests=[B1])], set(), [("set_service", WEB_KEY, None)],
                 id="everything-changed-one-set"),
    pytest.param([_s(dests=[_d(weight=0)])], [_s(dests=[B1])], set(),
                 [("set_dest", WEB_KEY, ("10.1.0.1", 8080))], id="weight-drained"),
    pytest.param([_s(dests=[_d(fwd=DR)])], [_s(dests=[B1])], set(),
                 [("set_dest", WEB_KEY, ("10.1.0.1", 8080))], id="forwarding-changed"),
    pytest.param([_s(dests=[_d(u_thresh=100)])], [_s(dests=[B1])], set(),
                 [("set_dest", WEB_KEY, ("10.1.0.1", 8080))], id="upper-threshold-changed"),
    pytest.param([_s(dests=[_d(l_thresh=5)])], [_s(dests=[B1])], set(),
                 [("set_dest", WEB_KEY, ("10.1.0.1", 8080))], id="lower-threshold-changed"),
    pytest.param([_s(dests=[replace(TUN, tun_port=6081)])], [_s(dests=[TUN])], set(),
                 [("set_dest", WEB_KEY, ("10.1.0.9", 8080))], id="tunnel-port-changed"),
    pytest.param([_s(dests=[replace(TUN, tun_type=2, tun_port=0)])], [_s(dests=[TUN])], set(),
                 [("set_dest", WEB_KEY, ("10.1.0.9", 8080))], id="tunnel-type-changed"),
    pytest.param([_s(dests=[replace(TUN, tun_flags=2)])], [_s(dests=[TUN])], set(),
                 [("set_dest", WEB_KEY, ("10.1.0.9", 8080))], id="tunnel-flags-changed"),
    # a NAT or DR dest ignores tunnel attributes: the kernel may report leftovers
    pytest.param([_s(dests=[B1])], [_s(dests=[_d(tun_type=1, tun_port=6080, tun_flags=1)])],
                 set(), [], id="nat-ignores-tunnel-attrs"),
    pytest.param([_s(dests=[_d(fwd=DR, tun_port=1)])], [_s(dests=[_d(fwd=DR, tun_type=2)])],
                 set(), [], id="dr-ignores-tunnel-attrs"),
    pytest.param([_s(dests=[B1])], [_s(dests=[B1, B2])], set(),
                 [("del_dest", WEB_KEY, ("10.1.0.2", 8080))], id="extra-dest-removed"),
    pytest.param([_s(dests=[B1, B3])], [_s(dests=[B1, B2])], set(), [
        ("del_dest", WEB_KEY, ("10.1.0.2", 8080)),
        ("add_dest", WEB_KEY, ("10.1.0.3", 8080)),
    ], id="dest-swapped-delete-first"),
    pytest.param([_s(dests=[_d(port=8081)])], [_s(dests=[B1])], set(), [
        ("del_dest", WEB_KEY, ("10.1.0.1", 8080)),
        ("add_dest", WEB_KEY, ("10.1.0.1", 8081)),
    ], id="dest-port-is-key"),
    pytest.param([_s(sched="rr", dests=[B2])], [_s(dests=[B1])], set(), [
        ("set_service", WEB_KEY, None),
        ("del_dest", WEB_KEY, ("10.1.0.1", 8080)),
        ("add_dest", WEB_KEY, ("10.1.0.2", 8080)),
    ], id="service-set-before-dest-changes"),
    pytest.param([], [_s(dests=[B1])], set(), [], id="foreign-service-untouched"),
    pytest.param([WEB], [WEB, DNS], set(), [], id="foreign-beside-ours-untouched"),
    pytest.param([], [_s(dests=[B1])], {WEB_KEY}, [("del_service", WEB_KEY, None)],
                 id="owned-and-gone-deleted"),
    pytest.param([], [WEB, DNS], {DNS_KEY}, [("del_service", DNS_KEY, None)],
                 id="only-owned-deleted"),
    pytest.param([], [], {WEB_KEY}, [], id="owned-already-gone"),
    pytest.param([_s(dests=[B1])], [_s(dests=[B1])], {WEB_KEY}, [], id="owned-and-desired-kept"),
    pytest.param([], [FW, V6], {FW_KEY, V6_KEY}, [
        ("del_service", FW_KEY, None), ("del_service", V6_KEY, None),
    ], id="owned-fwmark-and-ipv6-deleted"),
    # a service of the other family or protocol is another key
    pytest.param([_s(protocol=UDP)], [_s()], set(), [("add_service", (AF4, UDP, "10.0.0.1", 80, 0),
                                                      None)], id="protocol-is-key"),
])
def test_plan(desired, actual, owned, expected):
    got = _summary(plan(_table(*desired), _table(*actual), owned))
    # Deletions of services come last; among themselves they follow the set `owned`: any order.
    n = sum(1 for verb, _, _ in expected if verb != "del_service")
    assert got[:n] == expected[:n]
    assert sorted(got[n:]) == sorted(expected[n:])
    assert len(got) == len(expected)


def test_plan_never_deletes_to_change():
    desired = _table(_s(sched="sh", flags=0x19, timeout=60, netmask=24,
                        dests=[_d(weight=5, fwd=DR, u_thresh=9, l_thresh=1)]))
    actual = _table(_s(dests=[B1]))
    verbs = [op.verb for op in plan(desired, actual, {WEB_KEY})]
    assert verbs == ["set_service", "set_dest"]


def test_set_ops_carry_desired_values():
    want = _s(sched="sh", flags=0x19, timeout=60, netmask=24, dests=[_d(weight=7, fwd=DR)])
    ops = plan(_table(want), _table(_s(dests=[B1])))
    svc_op, dest_op = ops
    assert svc_op.service == KService(AF4, TCP, "10.0.0.1", 80, 0, "sh", 0x19, 60, 24)
    assert svc_op.service.dests == {} and svc_op.dest is None
    assert dest_op.dest == KDest("10.1.0.1", 8080, fwd=DR, weight=7)
    assert dest_op.service.key == WEB_KEY


def test_add_and_delete_service_ops_carry_no_dests():
    ops = plan(_table(_s(dests=[B1])), {})
    assert ops[0].service.dests == {}
    assert ops[1].dest == B1
    gone = plan({}, _table(_s(dests=[B1])), {WEB_KEY})
    assert gone[0].service == KService(AF4, TCP, "10.0.0.1", 80) and gone[0].service.dests == {}


def test_del_dest_names_the_kernels_dest():
    extra = _d("10.1.0.2", weight=3, fwd=DR)
    (op,) = plan(_table(_s(dests=[B1])), _table(_s(dests=[B1, extra])))
    assert (op.verb, op.dest) == ("del_dest", extra)


@pytest.mark.parametrize("left, right", [
    (_s(stats={"conns": 1}), _s(stats={"conns": 99})),
    (_s(stats=None), _s(stats={"conns": 99, "inbytes": 2**40})),
    (_d(stats={"activeconns": 1}), _d(stats={"activeconns": 7})),
])
def test_stats_never_compare(left, right):
    assert left == right


def test_stats_cause_no_ops():
    desired = _table(_s(dests=[_d()]))
    actual = _table(_s(stats={"conns": 10}, dests=[_d(stats={"conns": 10, "activeconns": 3})]))
    assert plan(desired, actual, {WEB_KEY}) == []


def test_plan_does_not_mutate_its_inputs():
    desired, actual = _table(_s(sched="sh", dests=[B2])), _table(_s(dests=[B1]))
    before = (repr(desired), repr(actual))
    plan(desired, actual, {WEB_KEY})
    assert (repr(desired), repr(actual)) == before


@pytest.mark.parametrize("op, text", [
    (Op("add_service", WEB), "add_service 10.0.0.1:80/6"),
    (Op("del_dest", V6, _d("2001:db8::10", af=AF6)), "del_dest [2001:db8::1]:80/6 -> "
                                                     "[2001:db8::10]:8080"),
    (Op("set_service", FW), "set_service fwmark 42"),
])
def test_op_str(op, text):
    assert str(op) == text


# --- kservice / kdest ---------------------------------------------------------------------------

def _svc_opts(**kw) -> ServiceOptions:
    return validate_service(ServiceOptions(**{"host": "10.0.0.1", "port": 80, **kw}))


@pytest.mark.parametrize("opts, address, expected", [
    (_svc_opts(), "10.0.0.1", KService(AF4, TCP, "10.0.0.1", 80, 0, "wrr", 0, 0, 32)),
    (_svc_opts(protocol="UDP", method="rr"), "10.0.0.1",
     KService(AF4, UDP, "10.0.0.1", 80, 0, "rr", 0, 0, 32)),
    (_svc_opts(protocol="sctp"), "10.0.0.1", KService(AF4, SCTP, "10.0.0.1", 80)),
    # persistent: flag 0x1, timeout (defaulted by validation) and the netmask as a prefix
    (_svc_opts(persistent=True), "10.0.0.1",
     KService(AF4, TCP, "10.0.0.1", 80, 0, "wrr", 0x1, 300, 32)),
    (_svc_opts(persistent=True, timeout=60, netmask="255.255.255.0"), "10.0.0.1",
     KService(AF4, TCP, "10.0.0.1", 80, 0, "wrr", 0x1, 60, 24)),
    (_svc_opts(persistent=True, netmask="16"), "10.0.0.1",
     KService(AF4, TCP, "10.0.0.1", 80, 0, "wrr", 0x1, 300, 16)),
    # flags
    (_svc_opts(method="sh", flags="sh-fallback|sh-port"), "10.0.0.1",
     KService(AF4, TCP, "10.0.0.1", 80, 0, "sh", 0x18, 0, 32)),
    (_svc_opts(protocol="udp", flags="ops"), "10.0.0.1",
     KService(AF4, 17, "10.0.0.1", 80, 0, "wrr", 0x04)),
    (_svc_opts(method="sh", flags="sh-port", persistent=True), "10.0.0.1",
     KService(AF4, TCP, "10.0.0.1", 80, 0, "sh", 0x11, 300, 32)),
    # the resolved address is what counts, canonicalised
    (_svc_opts(host="web.example.com"), "10.0.0.7", KService(AF4, TCP, "10.0.0.7", 80)),
    (_svc_opts(host="2001:DB8:0::0001"), "2001:DB8:0::0001",
     KService(AF6, TCP, "2001:db8::1", 80, 0, "wrr", 0, 0, 128)),
    (_svc_opts(host="2001:db8::1", persistent=True, netmask=64), "2001:db8::1",
     KService(AF6, TCP, "2001:db8::1", 80, 0, "wrr", 0x1, 300, 64)),
    # fwmark: key (af, 0, "", 0, mark)
    (validate_service(ServiceOptions(fwmark=42)), "", KService(AF4, 0, "", 0, 42, "wrr", 0, 0, 32)),
    (validate_service(ServiceOptions(fwmark=42, family="ipv6")), "",
     KService(AF6, 0, "", 0, 42, "wrr", 0, 0, 128)),
    (validate_service(ServiceOptions(fwmark=7, host="2001:db8::1", method="rr")), "2001:db8::1",
     KService(AF6, 0, "", 0, 7, "rr", 0, 0, 128)),
])
def test_kservice(opts, address, expected):
    got = kservice(opts, address)
    assert got == expected
    assert got.dests == {}
    assert service_key(opts, address) == expected.key


@pytest.mark.parametrize("opts, address, key", [
    (_svc_opts(), "10.0.0.1", (AF4, TCP, "10.0.0.1", 80, 0)),
    (_svc_opts(host="::ffff:0:0"), "2001:0db8::0001", (AF6, TCP, "2001:db8::1", 80, 0)),
    (validate_service(ServiceOptions(fwmark=42)), "", (AF4, 0, "", 0, 42)),
    (validate_service(ServiceOptions(fwmark=42)), "10.0.0.1", (AF4, 0, "", 0, 42)),
    (validate_service(ServiceOptions(fwmark=42, family="ipv6")), "", (AF6, 0, "", 0, 42)),
])
def test_service_key(opts, address, key):
    assert service_key(opts, address) == key


def _be_opts(**kw) -> BackendOptions:
    return validate_backend(BackendOptions(**{"host": "10.1.0.1", "port": 8080, **kw}))


@pytest.mark.parametrize("opts, address, weight, af, expected", [
    (_be_opts(), "10.1.0.1", 100, AF4, KDest("10.1.0.1", 8080, NAT, 100)),
    (_be_opts(method="NAT"), "10.1.0.1", 0, AF4, KDest("10.1.0.1", 8080, NAT, 0)),
    (_be_opts(method="dr"), "10.1.0.1", 50, AF4, KDest("10.1.0.1", 8080, DR, 50)),
    (_be_opts(method="tunnel"), "10.1.0.1", 100, AF4, KDest("10.1.0.1", 8080, TUNNEL, 100)),
    (_be_opts(method="ipip"), "10.1.0.1", 100, AF4, KDest("10.1.0.1", 8080, TUNNEL, 100)),
    (_be_opts(method="tunnel", tunnel_type="gue", tunnel_port=6080, tunnel_flags="csum"),
     "10.1.0.1", 100, AF4,
     KDest("10.1.0.1", 8080, TUNNEL, 100, tun_type=1, tun_port=6080, tun_flags=1)),
    (_be_opts(method="ipip", tunnel_type="gre", tunnel_flags="remcsum"), "10.1.0.1", 100, AF4,
     KDest("10.1.0.1", 8080, TUNNEL, 100, tun_type=2, tun_port=0, tun_flags=2)),
    # tunnel options of a non-tunnel dest are not sent
    (_be_opts(method="nat", tunnel_type="gue", tunnel_port=6080, tunnel_flags="csum"),
     "10.1.0.1", 100, AF4, KDest("10.1.0.1", 8080, NAT, 100)),
    (_be_opts(upper_threshold=1000, lower_threshold=800), "10.1.0.1", 100, AF4,
     KDest("10.1.0.1", 8080, NAT, 100, u_thresh=1000, l_thresh=800)),
    (_be_opts(host="backend.example"), "10.1.0.5", 100, AF4, KDest("10.1.0.5", 8080, NAT, 100)),
    (_be_opts(host="2001:DB8::10"), "2001:DB8:0:0::10", 100, AF6,
     KDest("2001:db8::10", 8080, NAT, 100, af=AF6)),
])
def test_kdest(opts, address, weight, af, expected):
    assert kdest(opts, address, weight, af) == expected


def test_kservice_and_plan_round_trip():
    """Options -> kernel values -> plan against a kernel that already has them: nothing to do."""
    svc = kservice(_svc_opts(method="sh", flags="sh-port", persistent=True, netmask=24),
                   "10.0.0.1")
    svc.dests = {d.key: d for d in (kdest(_be_opts(method="dr"), "10.1.0.1", 100, AF4),
                                    kdest(_be_opts(host="10.1.0.2"), "10.1.0.2", 0, AF4))}
    kernel = KService(AF4, TCP, "10.0.0.1", 80, 0, "sh", 0x11, 300, 24,
                      {("10.1.0.1", 8080): KDest("10.1.0.1", 8080, DR, 100),
                       ("10.1.0.2", 8080): KDest("10.1.0.2", 8080, NAT, 0)},
                      stats={"conns": 5})
    assert plan({svc.key: svc}, {kernel.key: kernel}, {svc.key}) == []
