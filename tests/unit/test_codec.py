"""The hand-written IPVS codec against pyroute2 as the reference: every request we encode is read
back with pyroute2's decoder, and dump replies built with pyroute2's encoder are read with ours.

pyroute2 quirks that show up in the expected values (services/ipvs_writer/netlink.py docstring,
shared/reference/sandbox.md):
- ``IPVS_SVC_ATTR_NETMASK`` is typed ``ip4addr``; for IPv6 the kernel wants a host-order u32
  prefix length, so pyroute2 shows those four bytes as a dotted quad ("64.0.0.0" on x86);
- ``IPVS_DEST_ATTR_TUN_PORT`` is declared host-order ``uint16`` but the kernel's is ``__be16``, so
  pyroute2 shows (and, encoding, expects) the byte-swapped port: ``socket.htons(6080)``.
"""

import socket
import struct

import pytest
from pyroute2.netlink.generic.ipvs import ipvsmsg

from gorb.services.ipvs_writer import codec
from gorb.services.ipvs_writer.table import KDest, KService, Op

pytestmark = pytest.mark.timeout(5)

FAMILY, SEQ = 42, 7
TCP, UDP, SCTP = 6, 17, 132
AF4, AF6 = socket.AF_INET, socket.AF_INET6
NAT, TUNNEL, DR = 0, 2, 3
OWNED_MASK = 0x3D  # PERSISTENT | ONEPACKET | SCHED1..3: never HASHED (0x2), which is the kernel's


def _v6_mask(prefix: int) -> str:
    """How pyroute2 (ip4addr) shows an IPv6 netmask: the host-order u32 prefix as a dotted quad."""
    return socket.inet_ntoa(struct.pack("=I", prefix))


# --- services and dests used in the tables -----------------------------------------------------

WEB = KService(AF4, TCP, "10.0.0.1", 80, 0, "wrr", 0, 0, 32)
WEB_P = KService(AF4, TCP, "10.0.0.1", 443, 0, "sh", 0x19, 300, 24)
DNS = KService(AF4, UDP, "10.0.0.53", 53, 0, "rr", 0, 0, 32)
SIP = KService(AF4, SCTP, "10.0.0.5", 5060, 0, "wlc", 0x04, 0, 32)
V6 = KService(AF6, TCP, "2001:db8::1", 8443, 0, "wrr", 0x1, 600, 64)
FW = KService(AF4, 0, "", 0, 42, "rr", 0, 0, 32)

NAT_D = KDest("10.1.0.1", 8080, NAT, 100, af=AF4)
DR_D = KDest("10.1.0.2", 80, DR, 0, u_thresh=1000, l_thresh=800, af=AF4)
IPIP_D = KDest("10.1.0.3", 80, TUNNEL, 5, af=AF4)
GUE_D = KDest("10.1.0.4", 80, TUNNEL, 50, tun_type=1, tun_port=6080, tun_flags=1, af=AF4)
GRE_D = KDest("10.1.0.5", 80, TUNNEL, 2**31 - 1, tun_type=2, tun_flags=2, af=AF4)
V6_D = KDest("2001:db8::10", 8443, NAT, 100, u_thresh=10, l_thresh=2, af=AF6)
FW_D = KDest("10.1.0.6", 0, DR, 1, af=AF4)

# Expected pyroute2 views of those services: key attributes, then the rest of a full entry.
SVC_KEY = {
    "WEB": {"IPVS_SVC_ATTR_AF": 2, "IPVS_SVC_ATTR_PROTOCOL": 6,
            "IPVS_SVC_ATTR_ADDR": "10.0.0.1", "IPVS_SVC_ATTR_PORT": 80},
    "WEB_P": {"IPVS_SVC_ATTR_AF": 2, "IPVS_SVC_ATTR_PROTOCOL": 6,
              "IPVS_SVC_ATTR_ADDR": "10.0.0.1", "IPVS_SVC_ATTR_PORT": 443},
    "DNS": {"IPVS_SVC_ATTR_AF": 2, "IPVS_SVC_ATTR_PROTOCOL": 17,
            "IPVS_SVC_ATTR_ADDR": "10.0.0.53", "IPVS_SVC_ATTR_PORT": 53},
    "SIP": {"IPVS_SVC_ATTR_AF": 2, "IPVS_SVC_ATTR_PROTOCOL": 132,
            "IPVS_SVC_ATTR_ADDR": "10.0.0.5", "IPVS_SVC_ATTR_PORT": 5060},
    "V6": {"IPVS_SVC_ATTR_AF": 10, "IPVS_SVC_ATTR_PROTOCOL": 6,
           "IPVS_SVC_ATTR_ADDR": "2001:db8::1", "IPVS_SVC_ATTR_PORT": 8443},
    "FW": {"IPVS_SVC_ATTR_AF": 2, "IPVS_SVC_ATTR_FWMARK": 42},
}
SVC_REST = {
    "WEB": {"IPVS_SVC_ATTR_SCHED_NAME": "wrr", "IPVS_SVC_ATTR_FLAGS": (0, OWNED_MASK),
            "IPVS_SVC_ATTR_TIMEOUT": 0, "IPVS_SVC_ATTR_NETMASK": "255.255.255.255"},
    "WEB_P": {"IPVS_SVC_ATTR_SCHED_NAME": "sh", "IPVS_SVC_ATTR_FLAGS": (0x19, OWNED_MASK),
              "IPVS_SVC_ATTR_TIMEOUT": 300, "IPVS_SVC_ATTR_NETMASK": "255.255.255.0"},
    "DNS": {"IPVS_SVC_ATTR_SCHED_NAME": "rr", "IPVS_SVC_ATTR_FLAGS": (0, OWNED_MASK),
            "IPVS_SVC_ATTR_TIMEOUT": 0, "IPVS_SVC_ATTR_NETMASK": "255.255.255.255"},
    "SIP": {"IPVS_SVC_ATTR_SCHED_NAME": "wlc", "IPVS_SVC_ATTR_FLAGS": (0x04, OWNED_MASK),
            "IPVS_SVC_ATTR_TIMEOUT": 0, "IPVS_SVC_ATTR_NETMASK": "255.255.255.255"},
    "V6": {"IPVS_SVC_ATTR_SCHED_NAME": "wrr", "IPVS_SVC_ATTR_FLAGS": (0x1, OWNED_MASK),
           "IPVS_SVC_ATTR_TIMEOUT": 600, "IPVS_SVC_ATTR_NETMASK": _v6_mask(64)},
    "FW": {"IPVS_SVC_ATTR_SCHED_NAME": "rr", "IPVS_SVC_ATTR_FLAGS": (0, OWNED_MASK),
           "IPVS_SVC_ATTR_TIMEOUT": 0, "IPVS_SVC_ATTR_NETMASK": "255.255.255.255"},
}
SERVICES = {"WEB": WEB, "WEB_P": WEB_P, "DNS": DNS, "SIP": SIP, "V6": V6, "FW": FW}


def _dkey(af, addr, port):
    return {"IPVS_DEST_ATTR_ADDR_FAMILY": af, "IPVS_DEST_ATTR_ADDR": addr,
            "IPVS_DEST_ATTR_PORT": port}


def _drest(fwd, weight, u=0, l=0, tun_type=0, tun_port_as_pyroute2_shows=0, tun_flags=0):
    return {"IPVS_DEST_ATTR_FWD_METHOD": fwd, "IPVS_DEST_ATTR_WEIGHT": weight,
            "IPVS_DEST_ATTR_U_THRESH": u, "IPVS_DEST_ATTR_L_THRESH": l,
            "IPVS_DEST_ATTR_TUN_TYPE": tun_type,
            "IPVS_DEST_ATTR_TUN_PORT": tun_port_as_pyroute2_shows,
            "IPVS_DEST_ATTR_TUN_FLAGS": tun_flags}


DEST_KEY = {
    "NAT_D": _dkey(2, "10.1.0.1", 8080), "DR_D": _dkey(2, "10.1.0.2", 80),
    "IPIP_D": _dkey(2, "10.1.0.3", 80), "GUE_D": _dkey(2, "10.1.0.4", 80),
    "GRE_D": _dkey(2, "10.1.0.5", 80), "V6_D": _dkey(10, "2001:db8::10", 8443),
    "FW_D": _dkey(2, "10.1.0.6", 0),
}
DEST_REST = {
    "NAT_D": _drest(0, 100),
    "DR_D": _drest(3, 0, u=1000, l=800),
    "IPIP_D": _drest(2, 5),
    # TUN_PORT: the be16 port 6080 read by pyroute2 as a host-order u16
    "GUE_D": _drest(2, 50, tun_type=1, tun_port_as_pyroute2_shows=socket.htons(6080), tun_flags=1),
    "GRE_D": _drest(2, 2**31 - 1, tun_type=2, tun_flags=2),
    "V6_D": _drest(0, 100, u=10, l=2),
    "FW_D": _drest(3, 1),
}
DESTS = {"NAT_D": NAT_D, "DR_D": DR_D, "IPIP_D": IPIP_D, "GUE_D": GUE_D, "GRE_D": GRE_D,
         "V6_D": V6_D, "FW_D": FW_D}


def _plain(nla) -> dict:
    """The attributes of a decoded pyroute2 nla as {name: value}; the flags struct as a tuple."""
    out = {}
    for name, value in nla["attrs"]:
        assert name not in out, f"{name} sent twice"
        out[name] = (value["flags"], value["mask"]) if name == "IPVS_SVC_ATTR_FLAGS" else value
    return out


def _pyroute2(data: bytes) -> ipvsmsg:
    msg = ipvsmsg(data)
    msg.decode()
    return msg


# --- requests: our encoder, pyroute2's decoder --------------------------------------------------

SERVICE_OPS = [
    (verb, name, cmd)
    for name in ("WEB", "WEB_P", "DNS", "SIP", "V6", "FW")
    for verb, cmd in (("add_service", 1), ("set_service", 2), ("del_service", 3))
]


@pytest.mark.parametrize("verb, name, cmd", SERVICE_OPS,
                         ids=[f"{v}-{n}" for v, n, _ in SERVICE_OPS])
def test_service_requests_decode_with_pyroute2(verb, name, cmd):
    data = codec.encode_op(Op(verb, SERVICES[name]), family=FAMILY, seq=SEQ)
    msg = _pyroute2(data)
    assert dict(msg["header"]) == {"length": len(data), "type": FAMILY, "flags": 5,
                                   "sequence_number": SEQ, "pid": 0}
    assert (msg["cmd"], msg["version"]) == (cmd, 1)
    assert msg.get_attr("IPVS_CMD_ATTR_DEST") is None
    expected = dict(SVC_KEY[name])
    if verb != "del_service":  # a delete carries the key only
        expected.update(SVC_REST[name])
    assert _plain(msg.get_attr("IPVS_CMD_ATTR_SERVICE")) == expected


DEST_OPS = [
    (verb, svc, dest, cmd)
    for svc, dest in (("WEB", "NAT_D"), ("WEB", "DR_D"), ("DNS", "IPIP_D"), ("WEB", "GUE_D"),
                      ("SIP", "GRE_D"), ("V6", "V6_D"), ("FW", "FW_D"))
    for verb, cmd in (("add_dest", 5), ("set_dest", 6), ("del_dest", 7))
]


@pytest.mark.parametrize("verb, svc, dest, cmd", DEST_OPS,
                         ids=[f"{v}-{s}-{d}" for v, s, d, _ in DEST_OPS])
def test_dest_requests_decode_with_pyroute2(verb, svc, dest, cmd):
    data = codec.encode_op(Op(verb, SERVICES[svc], DESTS[dest]), family=FAMILY, seq=SEQ)
    msg = _pyroute2(data)
    assert dict(msg["header"]) == {"length": len(data), "type": FAMILY, "flags": 5,
                                   "sequence_number": SEQ, "pid": 0}
    assert (msg["cmd"], msg["version"]) == (cmd, 1)
    # the service is named by its key alone, whatever the verb
    assert _plain(msg.get_attr("IPVS_CMD_ATTR_SERVICE")) == SVC_KEY[svc]
    expected = dict(DEST_KEY[dest])
    if verb != "del_dest":
        expected.update(DEST_REST[dest])
    assert _plain(msg.get_attr("IPVS_CMD_ATTR_DEST")) == expected


def test_ipv6_netmask_is_a_host_order_prefix():
    """pyroute2 shows the IPv6 netmask as an IPv4 address; its bytes are the u32 prefix 64."""
    svc = _pyroute2(codec.encode_op(Op("add_service", V6), FAMILY, SEQ)) \
        .get_attr("IPVS_CMD_ATTR_SERVICE")
    shown = svc.get_attr("IPVS_SVC_ATTR_NETMASK")
    assert struct.unpack("=I", socket.inet_aton(shown)) == (64,)
    assert codec.netmask_bytes(64, AF6) == struct.pack("=I", 64)
    assert codec.netmask_bytes(128, AF6) == struct.pack("=I", 128)
    assert codec.netmask_bytes(24, AF4) == bytes([255, 255, 255, 0])
    assert codec.netmask_bytes(1, AF4) == bytes([128, 0, 0, 0])


def test_tun_port_is_big_endian_on_the_wire():
    """pyroute2 reads TUN_PORT as host order: its value is the byte-swapped port."""
    dest = _pyroute2(codec.encode_op(Op("add_dest", WEB, GUE_D), FAMILY, SEQ)) \
        .get_attr("IPVS_CMD_ATTR_DEST")
    shown = dest.get_attr("IPVS_DEST_ATTR_TUN_PORT")
    assert socket.ntohs(shown) == 6080
    assert struct.pack("=H", shown) == struct.pack(">H", 6080)


def test_service_and_dest_are_nested_attributes():
    msg = _pyroute2(codec.encode_op(Op("add_dest", WEB, NAT_D), FAMILY, SEQ))
    assert [(a.name, a.get_flags()) for a in msg["attrs"]] == [
        ("IPVS_CMD_ATTR_SERVICE", codec.NLA_F_NESTED), ("IPVS_CMD_ATTR_DEST", codec.NLA_F_NESTED)]


@pytest.mark.parametrize("svc, name", [(WEB, "WEB"), (V6, "V6"), (FW, "FW")])
def test_dump_dests_request(svc, name):
    data = codec.encode_dump_dests(svc, family=FAMILY, seq=SEQ)
    msg = _pyroute2(data)
    assert dict(msg["header"]) == {"length": len(data), "type": FAMILY, "flags": 0x301,
                                   "sequence_number": SEQ, "pid": 0}
    assert (msg["cmd"], msg["version"]) == (8, 1)
    assert _plain(msg.get_attr("IPVS_CMD_ATTR_SERVICE")) == SVC_KEY[name]
    assert msg.get_attr("IPVS_CMD_ATTR_DEST") is None


def test_requests_are_padded_to_four_bytes():
    for op in (Op("add_service", SIP), Op("add_dest", V6, V6_D), Op("del_dest", FW, FW_D)):
        data = codec.encode_op(op, FAMILY, SEQ)
        assert len(data) % 4 == 0
        assert struct.unpack_from("=I", data)[0] == len(data)


# --- dump replies: pyroute2's encoder, our decoder ----------------------------------------------

def _reply(kind: str, attrs: list, seq: int = 9, cmd: int = 1) -> bytes:
    """A dump-reply message as the kernel sends it (NLM_F_MULTI), encoded by pyroute2."""
    msg = ipvsmsg()
    msg["cmd"] = cmd
    msg["version"] = 1
    msg["header"]["type"] = FAMILY
    msg["header"]["flags"] = codec.NLM_F_MULTI
    msg["header"]["sequence_number"] = seq
    msg["attrs"] = [(kind, {"attrs": attrs})]
    msg.encode()
    data = bytes(msg.data)
    assert len(data) == msg["header"]["length"]
    return data


def _stats64(**values) -> tuple:
    return ("STATS64", {"attrs": [(f"IPVS_STATS_ATTR_{k.upper()}", v) for k, v in values.items()]})


def _svc_stats64(**values):
    name, value = _stats64(**values)
    return ("IPVS_SVC_ATTR_" + name, value)


def _dest_stats64(**values):
    name, value = _stats64(**values)
    return ("IPVS_DEST_ATTR_" + name, value)


ZERO_STATS = dict.fromkeys(codec.STATS, 0)


def _hand_built(kind: int, inner: list[tuple[int, bytes]], seq: int = 9, cmd: int = 1) -> bytes:
    """A reply built with struct, for shapes pyroute2's encoder cannot produce."""
    def nla(t, payload):
        n = 4 + len(payload)
        return struct.pack("=HH", n, t) + payload + b"\0" * (-n & 3)
    body = struct.pack("=BBH", cmd, 1, 0) + nla(kind, b"".join(nla(t, p) for t, p in inner))
    return struct.pack("=IHHII", 16 + len(body), FAMILY, codec.NLM_F_MULTI, seq, 0) + body


SERVICE_REPLIES = [
    pytest.param(_reply("IPVS_CMD_ATTR_SERVICE", [
        ("IPVS_SVC_ATTR_AF", 2), ("IPVS_SVC_ATTR_PROTOCOL", 6),
        ("IPVS_SVC_ATTR_ADDR", "10.0.0.1"), ("IPVS_SVC_ATTR_PORT", 443),
        ("IPVS_SVC_ATTR_SCHED_NAME", "sh"),
        # the kernel reports HASHED (0x2) and a full mask; only the owned bits are kept
        ("IPVS_SVC_ATTR_FLAGS", {"flags": 0x1 | 0x2 | 0x18, "mask": 0xFFFFFFFF}),
        ("IPVS_SVC_ATTR_TIMEOUT", 300), ("IPVS_SVC_ATTR_NETMASK", "255.255.255.0"),
        _svc_stats64(conns=5, inpkts=10, outpkts=9, inbytes=2**40, outbytes=2**33 + 1, cps=1,
                     inpps=2, outpps=3, inbps=4, outbps=2**63),
    ]), KService(AF4, TCP, "10.0.0.1", 443, 0, "sh", 0x19, 300, 24),
        {"conns": 5, "inpkts": 10, "outpkts": 9, "inbytes": 2**40, "outbytes": 2**33 + 1,
         "cps": 1, "inpps": 2, "outpps": 3, "inbps": 4, "outbps": 2**63},
        id="ipv4-tcp-persistent"),
    pytest.param(_reply("IPVS_CMD_ATTR_SERVICE", [
        ("IPVS_SVC_ATTR_AF", 10), ("IPVS_SVC_ATTR_PROTOCOL", 17),
        ("IPVS_SVC_ATTR_ADDR", "2001:db8::1"), ("IPVS_SVC_ATTR_PORT", 53),
        ("IPVS_SVC_ATTR_SCHED_NAME", "wrr"),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": 0x2 | 0x1, "mask": 0xFFFFFFFF}),
        ("IPVS_SVC_ATTR_TIMEOUT", 600),
        ("IPVS_SVC_ATTR_NETMASK", _v6_mask(64)),  # the host-order u32 64, spelled as pyroute2 wants
        _svc_stats64(conns=1),
    ]), KService(AF6, UDP, "2001:db8::1", 53, 0, "wrr", 0x1, 600, 64),
        {**ZERO_STATS, "conns": 1}, id="ipv6-udp-netmask-64"),
    pytest.param(_reply("IPVS_CMD_ATTR_SERVICE", [
        ("IPVS_SVC_ATTR_AF", 2), ("IPVS_SVC_ATTR_FWMARK", 42),
        ("IPVS_SVC_ATTR_SCHED_NAME", "rr"),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": 0x2, "mask": 0xFFFFFFFF}),
        ("IPVS_SVC_ATTR_TIMEOUT", 0), ("IPVS_SVC_ATTR_NETMASK", "255.255.255.255"),
        _svc_stats64(),
    ]), KService(AF4, 0, "", 0, 42, "rr", 0, 0, 32), ZERO_STATS, id="ipv4-fwmark"),
    pytest.param(_reply("IPVS_CMD_ATTR_SERVICE", [
        ("IPVS_SVC_ATTR_AF", 2), ("IPVS_SVC_ATTR_PROTOCOL", 132),
        ("IPVS_SVC_ATTR_ADDR", "10.0.0.5"), ("IPVS_SVC_ATTR_PORT", 5060),
        ("IPVS_SVC_ATTR_SCHED_NAME", "wlc"), ("IPVS_SVC_ATTR_PE_NAME", "sip"),
        ("IPVS_SVC_ATTR_FLAGS", {"flags": 0x4 | 0x2, "mask": 0xFFFFFFFF}),
        ("IPVS_SVC_ATTR_STATS", {"attrs": [("IPVS_STATS_ATTR_CONNS", 77)]}),  # legacy: ignored
    ]), KService(AF4, SCTP, "10.0.0.5", 5060, 0, "wlc", 0x4, 0, 32), None,
        id="sctp-no-netmask-no-stats64"),
]


@pytest.mark.parametrize("data, expected, stats", SERVICE_REPLIES)
def test_decode_service_reply(data, expected, stats):
    ((mtype, flags, seq, payload),) = list(codec.messages(data))
    assert (mtype, flags, seq) == (FAMILY, codec.NLM_F_MULTI, 9)
    got = codec.decode_service(payload)
    assert got == expected
    assert (got.key, got.sched, got.flags, got.timeout, got.netmask) == (
        expected.key, expected.sched, expected.flags, expected.timeout, expected.netmask)
    assert got.stats == stats
    assert got.dests == {}


def test_decode_service_kernel_shaped_ipv4_address():
    """The kernel sends the address as a 16-byte union nf_inet_addr even for IPv4; pyroute2's
    encoder only writes 4 bytes for AF_INET, so this one is built with struct."""
    data = _hand_built(codec.ATTR_SERVICE, [
        (codec.SVC_AF, struct.pack("=H", 2)), (codec.SVC_PROTOCOL, struct.pack("=H", 6)),
        (codec.SVC_ADDR, socket.inet_aton("192.0.2.7") + bytes(12)),
        (codec.SVC_PORT, struct.pack(">H", 8080)),
        (codec.SVC_SCHED_NAME, b"wrr\0"), (codec.SVC_FLAGS, struct.pack("=II", 0x2, 0xFFFFFFFF)),
        (codec.SVC_TIMEOUT, struct.pack("=I", 0)), (codec.SVC_NETMASK, b"\xff\xff\xff\xff"),
    ])
    ((_, _, _, payload),) = list(codec.messages(data))
    got = codec.decode_service(payload)
    assert got == KService(AF4, TCP, "192.0.2.7", 8080, 0, "wrr", 0, 0, 32)
    assert got.stats is None


DEST_REPLIES = [
    pytest.param(_reply("IPVS_CMD_ATTR_DEST", [
        ("IPVS_DEST_ATTR_ADDR_FAMILY", 2), ("IPVS_DEST_ATTR_ADDR", "10.1.0.1"),
        ("IPVS_DEST_ATTR_PORT", 8080), ("IPVS_DEST_ATTR_FWD_METHOD", 0),
        ("IPVS_DEST_ATTR_WEIGHT", 100), ("IPVS_DEST_ATTR_U_THRESH", 0),
        ("IPVS_DEST_ATTR_L_THRESH", 0), ("IPVS_DEST_ATTR_ACTIVE_CONNS", 3),
        ("IPVS_DEST_ATTR_INACT_CONNS", 4), ("IPVS_DEST_ATTR_PERSIST_CONNS", 5),
        _dest_stats64(conns=12, inbytes=2**40, outbps=7),
        ("IPVS_DEST_ATTR_TUN_TYPE", 0), ("IPVS_DEST_ATTR_TUN_PORT", 0),
        ("IPVS_DEST_ATTR_TUN_FLAGS", 0),
    ], cmd=5), AF4, KDest("10.1.0.1", 8080, NAT, 100, af=AF4),
        {**ZERO_STATS, "conns": 12, "inbytes": 2**40, "outbps": 7,
         "activeconns": 3, "inactconns": 4, "persistconns": 5}, id="ipv4-nat"),
    pytest.param(_reply("IPVS_CMD_ATTR_DEST", [
        ("IPVS_DEST_ATTR_ADDR_FAMILY", 10), ("IPVS_DEST_ATTR_ADDR", "2001:db8::10"),
        ("IPVS_DEST_ATTR_PORT", 443), ("IPVS_DEST_ATTR_FWD_METHOD", 2),
        ("IPVS_DEST_ATTR_WEIGHT", 50), ("IPVS_DEST_ATTR_U_THRESH", 1000),
        ("IPVS_DEST_ATTR_L_THRESH", 800), ("IPVS_DEST_ATTR_TUN_TYPE", 1),
        # pyroute2 packs this host-order: give it the swapped port so the wire holds be16 6080
        ("IPVS_DEST_ATTR_TUN_PORT", socket.htons(6080)), ("IPVS_DEST_ATTR_TUN_FLAGS", 1),
        _dest_stats64(inpkts=2**50),
    ], cmd=5), AF6,
        KDest("2001:db8::10", 443, TUNNEL, 50, 1000, 800, tun_type=1, tun_port=6080, tun_flags=1,
              af=AF6),
        {**ZERO_STATS, "inpkts": 2**50, "activeconns": 0, "inactconns": 0, "persistconns": 0},
        id="ipv6-gue-csum-thresholds"),
    pytest.param(_reply("IPVS_CMD_ATTR_DEST", [
        # an IPv4 dest under an IPv6 service (heterogeneous tunnel dests are allowed)
        ("IPVS_DEST_ATTR_ADDR_FAMILY", 2), ("IPVS_DEST_ATTR_ADDR", "198.18.2.1"),
        ("IPVS_DEST_ATTR_PORT", 80), ("IPVS_DEST_ATTR_FWD_METHOD", 0x100 | 3),
        ("IPVS_DEST_ATTR_WEIGHT", 0), ("IPVS_DEST_ATTR_ACTIVE_CONNS", 1),
    ], cmd=5), AF6, KDest("198.18.2.1", 80, DR, 0, af=AF4),
        {"activeconns": 1, "inactconns": 0, "persistconns": 0}, id="dr-fwd-masked-no-stats64"),
]


@pytest.mark.parametrize("data, service_af, expected, stats", DEST_REPLIES)
def test_decode_dest_reply(data, service_af, expected, stats):
    ((mtype, flags, seq, payload),) = list(codec.messages(data))
    assert (mtype, flags, seq) == (FAMILY, codec.NLM_F_MULTI, 9)
    got = codec.decode_dest(payload, service_af)
    assert got == expected
    assert (got.key, got.af, got.tun_type, got.tun_port, got.tun_flags) == (
        expected.key, expected.af, expected.tun_type, expected.tun_port, expected.tun_flags)
    assert got.stats == stats


def test_decode_dest_without_family_uses_the_services():
    """Kernels before heterogeneous dests send no ADDR_FAMILY; pyroute2 cannot encode an address
    without it (its ADDR type is resolved through that attribute), so this is built with struct."""
    data = _hand_built(codec.ATTR_DEST, [
        (codec.DST_ADDR, socket.inet_pton(AF6, "2001:db8::20")),
        (codec.DST_PORT, struct.pack(">H", 80)), (codec.DST_FWD, struct.pack("=I", 0)),
        (codec.DST_WEIGHT, struct.pack("=I", 7)),
    ], cmd=5)
    ((_, _, _, payload),) = list(codec.messages(data))
    got = codec.decode_dest(payload, AF6)
    assert got == KDest("2001:db8::20", 80, NAT, 7, af=AF6)
    assert got.stats == {"activeconns": 0, "inactconns": 0, "persistconns": 0}


@pytest.mark.parametrize("op", [
    Op("add_service", WEB_P), Op("add_service", V6), Op("add_service", FW), Op("add_service", SIP),
], ids=["ipv4", "ipv6", "fwmark", "sctp"])
def test_service_request_reads_back_as_a_reply(op):
    """Our request and a kernel reply share the attribute layout: decode what we encode."""
    ((_, _, _, payload),) = list(codec.messages(codec.encode_op(op, FAMILY, SEQ)))
    assert codec.decode_service(payload) == op.service


@pytest.mark.parametrize("svc, dest", [(WEB, GUE_D), (SIP, GRE_D), (V6, V6_D), (WEB, DR_D)])
def test_dest_request_reads_back_as_a_reply(svc, dest):
    ((_, _, _, payload),) = list(codec.messages(codec.encode_op(Op("set_dest", svc, dest),
                                                                FAMILY, SEQ)))
    assert codec.decode_dest(payload, svc.af) == dest


# --- buffers: several messages, acks, truncation ------------------------------------------------

def _done(seq: int) -> bytes:
    return struct.pack("=IHHII", 20, codec.NLMSG_DONE, codec.NLM_F_MULTI, seq, 0) + bytes(4)


def _ack(seq: int, err: int, orig_type: int = FAMILY) -> bytes:
    """NLMSG_ERROR: header, int32 -errno, the request's 16-byte header (NETLINK_CAP_ACK)."""
    orig = struct.pack("=IHHII", 64, orig_type, 5, seq, 0)
    return struct.pack("=IHHII", 36, codec.NLMSG_ERROR, 0x100, seq, 1234) \
        + struct.pack("=i", -err) + orig


def test_several_messages_back_to_back():
    web = SERVICE_REPLIES[0].values[0]
    v6 = SERVICE_REPLIES[1].values[0]
    fw = SERVICE_REPLIES[2].values[0]
    buf = web + v6 + fw + _done(9)
    got = list(codec.messages(buf))
    assert [(t, f, s) for t, f, s, _ in got] == [
        (FAMILY, 2, 9), (FAMILY, 2, 9), (FAMILY, 2, 9), (codec.NLMSG_DONE, 2, 9)]
    assert [len(p) for _, _, _, p in got] == [len(web) - 16, len(v6) - 16, len(fw) - 16, 4]
    keys = [codec.decode_service(p).key for t, _, _, p in got if t == FAMILY]
    assert keys == [(AF4, TCP, "10.0.0.1", 443, 0), (AF6, UDP, "2001:db8::1", 53, 0),
                    (AF4, 0, "", 0, 42)]


def test_dest_dump_buffer():
    buf = b"".join(p.values[0] for p in DEST_REPLIES[:2]) + _done(9)
    dests = [codec.decode_dest(p, AF4) for t, _, _, p in codec.messages(buf) if t == FAMILY]
    assert [d.key for d in dests] == [("10.1.0.1", 8080), ("2001:db8::10", 443)]
    assert [d.af for d in dests] == [AF4, AF6]


@pytest.mark.parametrize("err", [0, 1, 2, 3, 17, 22, 95])
def test_ack_error(err):
    buf = _ack(7, err)
    ((mtype, flags, seq, payload),) = list(codec.messages(buf))
    assert (mtype, flags, seq) == (codec.NLMSG_ERROR, 0x100, 7)
    assert len(payload) == 20
    assert codec.ack_error(payload) == err


def test_acks_of_a_batch_in_one_buffer():
    buf = _ack(1, 0) + _ack(2, 17) + _ack(3, 0) + _ack(4, 2)
    got = {seq: codec.ack_error(p) for t, _, seq, p in codec.messages(buf)
           if t == codec.NLMSG_ERROR}
    assert got == {1: 0, 2: 17, 3: 0, 4: 2}


@pytest.mark.parametrize("buf", [
    SERVICE_REPLIES[0].values[0][:-4],                        # body cut short
    SERVICE_REPLIES[0].values[0] + SERVICE_REPLIES[1].values[0][:40],
    _ack(7, 0)[:-1],
    struct.pack("=IHHII", 15, FAMILY, 0, 1, 0) + bytes(4),    # length shorter than a header
    struct.pack("=IHHII", 0, FAMILY, 0, 1, 0),
], ids=["cut-body", "second-cut", "ack-cut", "length-below-header", "length-zero"])
def test_truncated_buffer_raises(buf):
    with pytest.raises(ValueError, match="truncated netlink message"):
        list(codec.messages(buf))


def test_empty_buffer_has_no_messages():
    assert list(codec.messages(b"")) == []
