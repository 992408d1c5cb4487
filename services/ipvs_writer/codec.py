"""Byte-level encoding of IPVS generic-netlink requests and decoding of replies (pure, no sockets).

Why not pyroute2's own encoder: it is slower per message (``tests/bench/README.md``, writer);
the IPVS uapi (``include/uapi/linux/ip_vs.h``) is small and stable, so the hot path packs it with
``struct``. ``tests/unit/test_codec.py`` decodes every message we encode with pyroute2's decoder
and decodes dumps that pyroute2 encoded with ours, comparing values, so the library remains the
reference.

Byte order: netlink is **host order** (headers, attribute headers and integer payloads); the
exceptions are the IPVS ports (``__be16``) and IPv4 netmasks (network order), and addresses
(network order by nature). ``Codec(order)`` takes the host order as ``"<"`` or ``">"`` so both
are tested; the module's functions are those of ``HOST``, this machine's.

One declarative table per message says which attribute carries which field of ``KService`` /
``KDest`` in which wire form (as Seesaw's ``ipvs`` package does with struct tags); encoding and
decoding both walk it, so the two cannot disagree on an attribute.

Wire layout: ``nlmsghdr`` (len u32, type u16, flags u16, seq u32, pid u32), ``genlmsghdr``
(cmd u8, version u8, reserved u16), then attributes (len u16, type u16, payload padded to 4).

Decoding is bound-checked: a message or attribute that runs past its buffer, an integer of the
wrong size, or a missing key attribute raises ``CodecError`` (a ``ValueError``), never
``struct.error`` or ``IndexError``; ``tests/unit/test_codec_fuzz.py`` feeds it arbitrary bytes.
"""

from __future__ import annotations

import socket
import struct
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gorb.common.model import OWNED_SERVICE_FLAGS
from gorb.services.ipvs_writer.layouts import DestLayouts
from gorb.services.ipvs_writer.table import KDest, KService, Op

NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

GENL_VERSION = 1
CMD = {
    "add_service": 1, "set_service": 2, "del_service": 3, "get_service": 4,
    "add_dest": 5, "set_dest": 6, "del_dest": 7, "get_dest": 8,
    "flush": 17,
}
ATTR_SERVICE, ATTR_DEST = 1, 2
# service attributes
SVC_AF, SVC_PROTOCOL, SVC_ADDR, SVC_PORT, SVC_FWMARK = 1, 2, 3, 4, 5
SVC_SCHED_NAME, SVC_FLAGS, SVC_TIMEOUT, SVC_NETMASK, SVC_STATS64 = 6, 7, 8, 9, 12
# dest attributes
DST_ADDR, DST_PORT, DST_FWD, DST_WEIGHT, DST_U_THRESH, DST_L_THRESH = 1, 2, 3, 4, 5, 6
DST_ACTIVE, DST_INACT, DST_PERSIST, DST_AF, DST_STATS64 = 7, 8, 9, 11, 12
DST_TUN_TYPE, DST_TUN_PORT, DST_TUN_FLAGS = 13, 14, 15
STATS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes", "cps", "inpps", "outpps", "inbps",
         "outbps")

HOST_ORDER = "<" if sys.byteorder == "little" else ">"
_BE16 = struct.Struct(">H")


class CodecError(ValueError):
    """Bytes that are not a well-formed IPVS netlink message."""


@dataclass(frozen=True)
class Field:
    """Attribute ``attr`` carries the value ``name`` of the object in wire form ``kind``:
    u8/u16/u32/u64 (host order), be16 (network order), addr (by the family), str
    (NUL-terminated), flags (the service's flags and the mask of the bits gorb owns), netmask
    (IPv4 a network-order mask, IPv6 a host-order prefix length: the kernel's ABI)."""

    attr: int
    name: str
    kind: str


SERVICE_KEY = (Field(SVC_AF, "af", "u16"), Field(SVC_PROTOCOL, "protocol", "u16"),
               Field(SVC_ADDR, "addr", "addr"), Field(SVC_PORT, "port", "be16"))
SERVICE_FWMARK_KEY = (Field(SVC_AF, "af", "u16"), Field(SVC_FWMARK, "fwmark", "u32"))
SERVICE_SETTINGS = (Field(SVC_SCHED_NAME, "sched", "str"), Field(SVC_FLAGS, "flags", "flags"),
                    Field(SVC_TIMEOUT, "timeout", "u32"), Field(SVC_NETMASK, "netmask", "netmask"))
DEST_KEY = (Field(DST_AF, "af", "u16"), Field(DST_ADDR, "addr", "addr"),
            Field(DST_PORT, "port", "be16"))
DEST_SETTINGS = (Field(DST_FWD, "fwd", "u32"), Field(DST_WEIGHT, "weight", "u32"),
                 Field(DST_U_THRESH, "u_thresh", "u32"), Field(DST_L_THRESH, "l_thresh", "u32"),
                 Field(DST_TUN_TYPE, "tun_type", "u8"), Field(DST_TUN_PORT, "tun_port", "be16"),
                 Field(DST_TUN_FLAGS, "tun_flags", "u16"))
DEST_COUNTERS = (Field(DST_ACTIVE, "activeconns", "u32"), Field(DST_INACT, "inactconns", "u32"),
                 Field(DST_PERSIST, "persistconns", "u32"))
STATS64 = tuple(Field(i + 1, name, "u64") for i, name in enumerate(STATS))  # nested
# read only, from dumps: SVC_STATS64 / DST_STATS64 (nested STATS64) and DEST_COUNTERS

Packer = Callable[[object, int], bytes]  # (value, af) -> the whole attribute


class Codec:
    """The IPVS messages in the byte order ``order`` ("<" or ">") of the host."""

    def __init__(self, order: str = HOST_ORDER):
        if order not in "<>" or len(order) != 1:
            raise ValueError(f"byte order must be '<' or '>', not {order!r}")
        self.order = order
        self._hdr = struct.Struct(order + "IHHII")
        self._genl = struct.Struct(order + "BBH")
        self._nla = struct.Struct(order + "HH")
        self._err = struct.Struct(order + "i")
        self._flags = struct.Struct(order + "II")
        self._ints = {k: struct.Struct(order + c) for k, c in
                      (("u8", "B"), ("u16", "H"), ("u32", "I"), ("u64", "Q"))}
        self._ints["be16"] = _BE16
        self._packers: dict[tuple[Field, ...], tuple[tuple[str, Packer], ...]] = {}
        self._layouts = DestLayouts(self)

    # --- encoding -------------------------------------------------------------------------------

    def attr(self, kind: int, payload: bytes) -> bytes:
        n = self._nla.size + len(payload)
        return self._nla.pack(n, kind) + payload + b"\0" * (-n & 3)

    def nest(self, kind: int, parts: list[bytes]) -> bytes:
        return self.attr(kind | NLA_F_NESTED, b"".join(parts))

    def netmask_bytes(self, prefix: int, af: int) -> bytes:
        if af == socket.AF_INET:
            return ((0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF).to_bytes(4, "big")
        return self._ints["u32"].pack(prefix)

    def _packer(self, f: Field) -> Packer:
        """The function that makes ``f``'s whole attribute from a value (header included)."""
        if f.kind in self._ints:
            pack = self._ints[f.kind].pack
            head = self._nla.pack(self._nla.size + self._ints[f.kind].size, f.attr)
            pad = b"\0" * (-len(head + pack(0)) & 3)
            return lambda v, af: head + pack(v) + pad
        if f.kind == "flags":
            pack, mask = self._flags.pack, OWNED_SERVICE_FLAGS
            return lambda v, af: self.attr(f.attr, pack(v, mask))
        if f.kind == "addr":
            return lambda v, af: self.attr(f.attr, socket.inet_pton(af, v))
        if f.kind == "str":
            return lambda v, af: self.attr(f.attr, v.encode() + b"\0")
        if f.kind == "netmask":
            return lambda v, af: self.attr(f.attr, self.netmask_bytes(v, af))
        raise ValueError(f"unknown wire kind {f.kind!r}")

    def fields(self, table: tuple[Field, ...], obj: KService | KDest) -> list[bytes]:
        """The attributes of ``table`` for ``obj``, in table order."""
        packers = self._packers.get(table)
        if packers is None:
            packers = self._packers[table] = tuple((f.name, self._packer(f)) for f in table)
        af = obj.af
        return [pack(getattr(obj, name), af) for name, pack in packers]

    def _service_key(self, s: KService) -> list[bytes]:
        return self.fields(SERVICE_FWMARK_KEY if s.fwmark else SERVICE_KEY, s)

    def message(self, family: int, cmd: int, flags: int, seq: int, attrs: list[bytes]) -> bytes:
        body = self._genl.pack(cmd, GENL_VERSION, 0) + b"".join(attrs)
        return self._hdr.pack(self._hdr.size + len(body), family, flags, seq, 0) + body

    def op_attrs(self, op: Op) -> list[bytes]:
        """The attributes of one op's request: the key always, the settings unless deleting."""
        s = op.service
        if op.dest is None:
            parts = self._service_key(s)
            if op.verb != "del_service":
                parts += self.fields(SERVICE_SETTINGS, s)
            return [self.nest(ATTR_SERVICE, parts)]
        dest = self.fields(DEST_KEY, op.dest)
        if op.verb != "del_dest":
            dest += self.fields(DEST_SETTINGS, op.dest)
        return [self.nest(ATTR_SERVICE, self._service_key(s)), self.nest(ATTR_DEST, dest)]

    def encode_op(self, op: Op, family: int, seq: int) -> bytes:
        return self.message(family, CMD[op.verb], NLM_F_REQUEST | NLM_F_ACK, seq,
                            self.op_attrs(op))

    def service_key_attrs(self, s: KService) -> list[bytes]:
        return [self.nest(ATTR_SERVICE, self._service_key(s))]

    def encode_dump_dests(self, s: KService, family: int, seq: int) -> bytes:
        return self.message(family, CMD["get_dest"], NLM_F_REQUEST | NLM_F_DUMP, seq,
                            self.service_key_attrs(s))

    # --- decoding -------------------------------------------------------------------------------

    def messages(self, buf: bytes) -> Iterator[tuple[int, int, int, memoryview]]:
        """Split a receive buffer into (type, flags, seq, payload) per netlink message."""
        view = memoryview(buf)
        off = 0
        size = self._hdr.size
        while off < len(view):
            if off + size > len(view):
                raise CodecError(f"truncated netlink message: {len(view) - off} byte(s) left, "
                                 "less than a header")
            length, mtype, flags, seq, _pid = self._hdr.unpack_from(view, off)
            if length < size or off + length > len(view):
                raise CodecError(f"truncated netlink message: length {length} in "
                                 f"{len(view) - off} byte(s)")
            yield mtype, flags, seq, view[off + size:off + length]
            off += (length + 3) & ~3

    def ack_error(self, payload: memoryview) -> int:
        """The errno of an NLMSG_ERROR or NLMSG_DONE payload (0 = success)."""
        if len(payload) < self._err.size:
            raise CodecError(f"error code of {len(payload)} byte(s)")
        return -self._err.unpack_from(payload, 0)[0]

    def attrs(self, buf: memoryview) -> dict[int, memoryview]:
        """{type: payload} of the attributes in ``buf`` (the nested flag masked off)."""
        out = {}
        off = 0
        while off < len(buf):
            if off + self._nla.size > len(buf):
                raise CodecError(f"{len(buf) - off} stray byte(s) after the last attribute")
            n, kind = self._nla.unpack_from(buf, off)
            if n < self._nla.size or off + n > len(buf):
                raise CodecError(f"attribute {kind & NLA_TYPE_MASK} of length {n} in "
                                 f"{len(buf) - off} byte(s)")
            out[kind & NLA_TYPE_MASK] = buf[off + self._nla.size:off + n]
            off += (n + 3) & ~3
        return out

    def _value(self, f: Field, buf: memoryview, af: int) -> object:
        if f.kind in self._ints:
            s = self._ints[f.kind]
            if len(buf) != s.size:
                raise CodecError(f"{f.name}: {len(buf)} byte(s) for a {f.kind}")
            return s.unpack(buf)[0]
        if f.kind == "flags":
            if len(buf) != self._flags.size:
                raise CodecError(f"{f.name}: {len(buf)} byte(s) for flags and mask")
            return self._flags.unpack(buf)[0]
        if f.kind == "addr":
            need = 4 if af == socket.AF_INET else 16  # the kernel sends IPv4 in 16 bytes too
            if af not in (socket.AF_INET, socket.AF_INET6) or len(buf) < need:
                raise CodecError(f"{f.name}: {len(buf)} byte(s) of an address of family {af}")
            return socket.inet_ntop(af, bytes(buf[:need]))
        if f.kind == "str":
            try:
                return bytes(buf).rstrip(b"\0").decode()
            except UnicodeDecodeError:
                raise CodecError(f"{f.name}: not text") from None
        if f.kind == "netmask":
            if len(buf) != 4:
                raise CodecError(f"{f.name}: {len(buf)} byte(s)")
            if af == socket.AF_INET:
                return bin(int.from_bytes(buf, "big")).count("1")
            return self._ints["u32"].unpack(buf)[0]
        raise ValueError(f"unknown wire kind {f.kind!r}")

    def read(self, table: tuple[Field, ...], attrs: dict[int, memoryview], af: int,
             required: tuple[Field, ...] = ()) -> dict[str, object]:
        """{name: value} of the fields of ``table`` present in ``attrs``; CodecError if one of
        ``required`` is absent."""
        for f in required:
            if f.attr not in attrs:
                raise CodecError(f"no {f.name} attribute ({f.attr})")
        return {f.name: self._value(f, attrs[f.attr], af) for f in table if f.attr in attrs}

    def _stats(self, buf: memoryview | None) -> dict[str, int] | None:
        if buf is None:
            return None
        found = self.read(STATS64, self.attrs(buf), 0)
        return {name: int(found.get(name, 0)) for name in STATS}

    def _inner(self, genl_payload: memoryview, kind: int) -> dict[int, memoryview]:
        if len(genl_payload) < self._genl.size:
            raise CodecError(f"generic netlink header of {len(genl_payload)} byte(s)")
        outer = self.attrs(genl_payload[self._genl.size:])
        if kind not in outer:
            raise CodecError(f"no {'service' if kind == ATTR_SERVICE else 'dest'} attribute")
        return self.attrs(outer[kind])

    def decode_service(self, genl_payload: memoryview) -> KService:
        a = self._inner(genl_payload, ATTR_SERVICE)
        af = int(self.read(SERVICE_KEY[:1], a, 0, required=SERVICE_KEY[:1])["af"])
        fwmark = a.get(SVC_FWMARK)
        if fwmark is not None and self._value(SERVICE_FWMARK_KEY[1], fwmark, af):
            values = self.read(SERVICE_FWMARK_KEY, a, af)
            values.update(protocol=0, addr="", port=0)
        else:
            values = self.read(SERVICE_KEY, a, af, required=SERVICE_KEY)
            values["fwmark"] = 0
        values.update(self.read(SERVICE_SETTINGS, a, af))
        values.setdefault("netmask", 32 if af == socket.AF_INET else 128)
        values["flags"] = int(values.get("flags", 0)) & OWNED_SERVICE_FLAGS
        values.setdefault("sched", "")
        return KService(**values, stats=self._stats(a.get(SVC_STATS64)))

    def decode_dest(self, genl_payload: memoryview, service_af: int) -> KDest:
        """The dest in a dump's message: by its learned layout if it has one
        (``layouts.py``: one unpack), else read attribute by attribute and its layout learned."""
        fast = self._layouts.decode(genl_payload, service_af)
        if fast is not None:
            return fast
        dest = self.read_dest(genl_payload, service_af)
        self._layouts.learn(genl_payload)
        return dest

    def read_dest(self, genl_payload: memoryview, service_af: int) -> KDest:
        """``decode_dest`` attribute by attribute, every one bound-checked."""
        a = self._inner(genl_payload, ATTR_DEST)
        af = int(self.read(DEST_KEY[:1], a, 0).get("af", service_af))
        values = self.read(DEST_KEY, a, af, required=DEST_KEY[1:])
        values["af"] = af
        values.update(self.read(DEST_SETTINGS, a, af))
        values["fwd"] = int(values.get("fwd", 0)) & 0x7
        stats = self._stats(a.get(DST_STATS64)) or {}
        counters = self.read(DEST_COUNTERS, a, af)
        stats.update({f.name: int(counters.get(f.name, 0)) for f in DEST_COUNTERS})
        return KDest(**values, stats=stats)


HOST = Codec()

# The host's codec as module functions (what netlink.py and the tests call).
message = HOST.message
messages = HOST.messages
ack_error = HOST.ack_error
attrs = HOST.attrs
netmask_bytes = HOST.netmask_bytes
op_attrs = HOST.op_attrs
encode_op = HOST.encode_op
service_key_attrs = HOST.service_key_attrs
encode_dump_dests = HOST.encode_dump_dests
decode_service = HOST.decode_service
decode_dest = HOST.decode_dest
