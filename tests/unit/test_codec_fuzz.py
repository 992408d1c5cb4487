"""The codec's decoder fuzzed (hypothesis): whatever bytes come off the socket, decoding gives a
value or a ``CodecError``, never another exception; and the declarative tables round-trip in both
byte orders (netlink is host order, so a big-endian host must get the same values back)."""

from __future__ import annotations

import re
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gorb.services.ipvs_writer import codec
from gorb.services.ipvs_writer.codec import Codec, CodecError
from gorb.services.ipvs_writer.table import KDest, KService, Op

FAMILY, SEQ = 42, 7
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ORDERS = ["<", ">"]


def decode_all(c: Codec, buf: bytes) -> None:
    """Everything the writer does with a receive buffer."""
    for mtype, _flags, _seq, payload in c.messages(buf):
        if mtype in (codec.NLMSG_ERROR, codec.NLMSG_DONE):
            c.ack_error(payload)
            continue
        for decode in (c.decode_service, lambda p: c.decode_dest(p, socket.AF_INET)):
            try:
                decode(payload)
            except CodecError:
                pass


@FUZZ
@given(st.binary(max_size=512), st.sampled_from(ORDERS))
def test_arbitrary_bytes_give_a_codec_error_or_a_value(buf, order):
    try:
        decode_all(Codec(order), buf)
    except CodecError:
        pass


def _attr(c: Codec, kind: int, payload: bytes) -> bytes:
    return c.attr(kind, payload)


# attributes that look like the kernel's: known types, sizes near the right ones
_attrs = st.lists(st.tuples(st.integers(0, 16), st.binary(max_size=20)), max_size=12)


@FUZZ
@given(_attrs, _attrs, st.sampled_from([codec.ATTR_SERVICE, codec.ATTR_DEST, 0, 3]),
       st.sampled_from(ORDERS), st.integers(0, 8))
def test_well_framed_messages_with_bad_attributes(inner, stats, outer, order, cut):
    c = Codec(order)
    parts = [_attr(c, k, p) for k, p in inner]
    parts.append(c.nest(codec.SVC_STATS64, [_attr(c, k, p) for k, p in stats]))
    data = c.message(FAMILY, codec.CMD["get_service"], codec.NLM_F_MULTI, SEQ,
                     [c.nest(outer, parts)])
    for buf in (data, data[:len(data) - cut]):
        try:
            decode_all(c, buf)
        except CodecError:
            pass


# --- round trips in both byte orders --------------------------------------------------------------

_u32 = st.integers(0, 2**32 - 1)
_port = st.integers(0, 65535)


def _ip(draw, af: int) -> str:
    """An address as the kernel's inet_ntop spells it (what decoding gives back)."""
    addr = draw(st.ip_addresses(v=4 if af == socket.AF_INET else 6))
    return socket.inet_ntop(af, addr.packed)


@st.composite
def services(draw) -> KService:
    af = draw(st.sampled_from([socket.AF_INET, socket.AF_INET6]))
    bits = 32 if af == socket.AF_INET else 128
    if draw(st.booleans()):
        addr = _ip(draw, af)
        protocol, port, fwmark = draw(st.sampled_from([6, 17, 132])), draw(_port), 0
    else:
        addr, protocol, port, fwmark = "", 0, 0, draw(st.integers(1, 2**32 - 1))
    return KService(af, protocol, addr, port, fwmark, draw(st.sampled_from(["wrr", "rr", "sh"])),
                    draw(st.sampled_from([0, 0x1, 0x4, 0x19])), draw(_u32),
                    draw(st.integers(0 if af == socket.AF_INET6 else 1, bits)))


@st.composite
def dests(draw, af: int) -> KDest:
    return KDest(_ip(draw, af), draw(_port),
                 draw(st.sampled_from([0, 2, 3])), draw(st.integers(0, 2**31 - 1)), draw(_u32),
                 draw(_u32), draw(st.integers(0, 2)), draw(_port), draw(st.integers(0, 7)), af)


def _one(c: Codec, data: bytes) -> memoryview:
    ((_mtype, _flags, seq, payload),) = list(c.messages(data))
    assert seq == SEQ
    return payload


@FUZZ
@given(services(), st.sampled_from(ORDERS))
def test_a_service_round_trips_in_either_byte_order(svc, order):
    c = Codec(order)
    assert c.decode_service(_one(c, c.encode_op(Op("add_service", svc), FAMILY, SEQ))) == svc


@FUZZ
@given(st.data(), st.sampled_from(ORDERS))
def test_a_dest_round_trips_in_either_byte_order(data, order):
    c = Codec(order)
    svc = data.draw(services())
    dest = data.draw(dests(svc.af))
    got = c.decode_dest(_one(c, c.encode_op(Op("add_dest", svc, dest), FAMILY, SEQ)), svc.af)
    assert got == dest


def test_the_two_orders_differ_exactly_where_netlink_is_host_order():
    svc = KService(socket.AF_INET, 6, "10.0.0.1", 80, 0, "wrr", 0, 300, 24)
    little = Codec("<").encode_op(Op("add_service", svc), FAMILY, SEQ)
    big = Codec(">").encode_op(Op("add_service", svc), FAMILY, SEQ)
    assert len(little) == len(big) and little != big
    assert big[:4] == little[:4][::-1]  # nlmsg_len
    port = struct.pack(">H", 80)  # be16 in both
    assert little.count(port) == big.count(port) >= 1
    assert socket.inet_aton("10.0.0.1") in little and socket.inet_aton("10.0.0.1") in big
    assert bytes([255, 255, 255, 0]) in little and bytes([255, 255, 255, 0]) in big  # mask: BE
    assert Codec(codec.HOST_ORDER).encode_op(Op("add_service", svc), FAMILY, SEQ) == \
        codec.encode_op(Op("add_service", svc), FAMILY, SEQ)


@pytest.mark.parametrize("order", ["=", "", "<>", "!"])
def test_an_unknown_byte_order_is_refused(order):
    with pytest.raises(ValueError):
        Codec(order)


@pytest.mark.parametrize("attr, payload, message", [
    (codec.SVC_AF, b"\x02", "af: 1 byte(s) for a u16"),
    (codec.SVC_PORT, b"\x00\x50\x00", "port: 3 byte(s) for a be16"),
    (codec.SVC_ADDR, b"\x0a\x00", "addr: 2 byte(s) of an address"),
])
def test_a_short_attribute_is_a_codec_error_naming_it(attr, payload, message):
    c = codec.HOST
    good = {codec.SVC_AF: struct.pack("=H", 2), codec.SVC_PROTOCOL: struct.pack("=H", 6),
            codec.SVC_ADDR: socket.inet_aton("10.0.0.1"), codec.SVC_PORT: struct.pack(">H", 80)}
    good[attr] = payload
    data = c.message(FAMILY, 1, 0, SEQ, [c.nest(codec.ATTR_SERVICE,
                                                [c.attr(k, v) for k, v in good.items()])])
    with pytest.raises(CodecError, match=re.escape(message)):
        c.decode_service(_one(c, data))


def test_a_service_without_its_address_is_a_codec_error():
    c = codec.HOST
    data = c.message(FAMILY, 1, 0, SEQ, [c.nest(codec.ATTR_SERVICE, [
        c.attr(codec.SVC_AF, struct.pack("=H", 2)), c.attr(codec.SVC_PROTOCOL,
                                                           struct.pack("=H", 6))])])
    with pytest.raises(CodecError, match="no addr attribute"):
        c.decode_service(_one(c, data))


# --- the dest decoder's fast path (layouts.py) equals the slow one -------------------------------

def _dump_dest(c: Codec, d: KDest, counters: tuple[int, int, int], stats: list[int] | None,
               extra: bool) -> bytes:
    """A dest as a dump's message carries it: key, settings, counters, the stats nest."""
    u32, u64 = struct.Struct(c.order + "I"), struct.Struct(c.order + "Q")
    parts = c.fields(codec.DEST_KEY, d) + c.fields(codec.DEST_SETTINGS, d)
    parts += [c.attr(f.attr, u32.pack(v)) for f, v in zip(codec.DEST_COUNTERS, counters)]
    if extra:  # the 32-bit stats nest (attribute 10), which gorb does not read
        parts.append(c.nest(10, [c.attr(1, u32.pack(5))]))
    if stats is not None:
        parts.append(c.nest(codec.DST_STATS64, [c.attr(i + 1, u64.pack(v))
                                                for i, v in enumerate(stats)]))
    return c.message(FAMILY, codec.CMD["get_dest"], codec.NLM_F_MULTI, SEQ,
                     [c.nest(codec.ATTR_DEST, parts)])


_counters = st.tuples(_u32, _u32, _u32)
_stats = st.none() | st.lists(st.integers(0, 2**64 - 1), min_size=10, max_size=10)


@FUZZ
@given(st.data(), st.sampled_from(ORDERS), st.booleans(), st.integers(0, 400))
def test_the_learned_layout_decodes_as_the_slow_path(data, order, extra, flip):
    c = Codec(order)
    af = data.draw(st.sampled_from([socket.AF_INET, socket.AF_INET6]))
    stats = data.draw(_stats)
    first = _one(c, _dump_dest(c, data.draw(dests(af)), data.draw(_counters), stats, extra))
    assert c.decode_dest(first, af) == c.read_dest(first, af)  # learns the layout
    for _ in range(3):  # others of the same layout: one unpack each
        msg = _dump_dest(c, data.draw(dests(af)), data.draw(_counters),
                         None if stats is None else data.draw(_stats.filter(bool)), extra)
        payload = _one(c, msg)
        fast = c._layouts.decode(payload, af)
        assert fast is not None
        slow = c.read_dest(payload, af)
        assert (fast, fast.stats) == (slow, slow.stats)
    # one byte changed anywhere: the fast path's answer, if it gives one, is the slow path's
    changed = bytearray(payload)
    changed[flip % len(changed)] ^= 0xFF
    view = memoryview(bytes(changed))
    try:
        slow = c.read_dest(view, af)
    except CodecError:
        slow = None
    fast = c._layouts.decode(view, af)
    assert fast is None or (fast, fast.stats) == (slow, slow.stats)
