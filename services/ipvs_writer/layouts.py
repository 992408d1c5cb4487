"""The dest decoder's fast path: one ``struct.unpack`` per dest of a dump.

The kernel writes every dest of a dump with the same attributes in the same order
(``ip_vs_genl_fill_dest``), so after the first one the layout is known: ``DestLayouts.learn``
records, from a message the bound-checked decoder (``codec.Codec.decode_dest``) has just read,
the position and value of every attribute header and the position of every value, as one
``struct`` format; ``decode`` unpacks a message of the same length in one call and uses it only
if every header is the one learned (else the slow path reads it, as any message it has not seen
the layout of). What the fast path returns equals the slow path's result
(``tests/unit/test_codec_fuzz.py``). At 10,000 dests this is what keeps a statistics dump cheap
(``tests/bench/README.md``, reads).
"""

from __future__ import annotations

import operator
import socket
import struct
from typing import TYPE_CHECKING

from gorb.services.ipvs_writer.table import KDest

if TYPE_CHECKING:
    from gorb.services.ipvs_writer.codec import Codec

_INT = {"u8": "B", "u16": "H", "u32": "I", "u64": "Q", "be16": "H"}
_SIZE = {"u8": 1, "u16": 2, "u32": 4, "u64": 8, "be16": 2}
MAX_LAYOUTS = 16
# KDest's constructor fields after (addr, port), in order, and their defaults
_SETTINGS = ("fwd", "weight", "u_thresh", "l_thresh", "tun_type", "tun_port", "tun_flags")


def _picker(indexes: list[int]):
    """vals -> the tuple of vals[i] for ``indexes`` (``itemgetter`` gives a bare value for one
    index and cannot take none)."""
    if len(indexes) > 1:
        return operator.itemgetter(*indexes)
    return lambda vals: tuple(vals[i] for i in indexes)


class _Template:
    """One learned layout: ``struct`` unpacks the whole message; ``headers`` picks the header
    values, which must be ``expected``; the rest are the indexes of each value in the result
    (None: the attribute is absent, the slow path's default applies)."""

    def __init__(self, fmt: struct.Struct, headers: list[tuple[int, tuple[int, int]]],
                 leaves: dict[tuple[str, str], int], has_stats: bool):
        from gorb.services.ipvs_writer import codec as c

        self.struct = fmt
        self.headers = _picker([j for i, _ in headers for j in (i, i + 1)])
        self.expected = tuple(v for _, pair in headers for v in pair)
        self.af = leaves.get(("dest", "af"))
        self.addr = leaves[("dest", "addr")]
        self.port = leaves[("dest", "port")]
        self.settings = [leaves.get(("dest", name)) for name in _SETTINGS]
        self.tun_port = self.settings[_SETTINGS.index("tun_port")] is not None
        stats = ([(name, leaves.get(("stats", name))) for name in c.STATS]
                 if has_stats else [])
        stats += [(f.name, leaves.get(("dest", f.name))) for f in c.DEST_COUNTERS]
        present = [(name, i) for name, i in stats if i is not None]
        self.zeros = {name: 0 for name, i in stats if i is None}
        self.names = tuple(name for name, _ in present)
        self.values = _picker([i for _, i in present])

    def decode(self, payload: memoryview, service_af: int, swap) -> KDest | None:
        vals = self.struct.unpack_from(payload)
        if self.headers(vals) != self.expected:
            return None
        af = vals[self.af] if self.af is not None else service_af
        raw = vals[self.addr]
        need = 4 if af == socket.AF_INET else 16
        if af not in (socket.AF_INET, socket.AF_INET6) or len(raw) < need:
            return None
        settings = [0 if i is None else vals[i] for i in self.settings]
        settings[0] &= 0x7  # fwd: the forwarding method's bits only
        if self.tun_port:
            settings[5] = swap(settings[5])  # network order
        stats = dict(zip(self.names, self.values(vals)))
        if self.zeros:
            stats.update(self.zeros)
        return KDest(socket.inet_ntop(af, raw[:need]), swap(vals[self.port]), *settings, af,
                     stats=stats)


class DestLayouts:
    """The layouts of dest messages seen so far, by message length."""

    def __init__(self, codec: Codec):
        self.codec = codec
        self._by_length: dict[int, _Template | None] = {}
        little = codec.order == "<"
        self._swap = (lambda v: ((v & 0xFF) << 8) | (v >> 8)) if little else (lambda v: v)

    def decode(self, payload: memoryview, service_af: int) -> KDest | None:
        """The dest in ``payload`` if its layout is a learned one; else None."""
        template = self._by_length.get(len(payload))
        if template is None:
            return None
        return template.decode(payload, service_af, self._swap)

    def learn(self, payload: memoryview) -> None:
        """Record the layout of ``payload``, a dest message the slow path decoded."""
        n = len(payload)
        if n in self._by_length or len(self._by_length) >= MAX_LAYOUTS:
            return
        self._by_length[n] = _learn(self.codec, payload)


def _learn(codec: Codec, payload: memoryview) -> _Template | None:
    from gorb.services.ipvs_writer import codec as c

    tables = {"dest": {f.attr: f for f in c.DEST_KEY + c.DEST_SETTINGS + c.DEST_COUNTERS},
              "stats": {f.attr: f for f in c.STATS64}}
    fmt: list[str] = [codec.order, "4x"]  # the generic netlink header: not read
    headers: list[tuple[int, tuple[int, int]]] = []  # (index of its length, (length, type))
    leaves: dict[tuple[str, str], int] = {}  # (level, field name) -> index of its value
    nests: set[str] = set()
    count = 0  # values the format unpacks so far

    def emit(code: str, values: int) -> int:
        nonlocal count
        fmt.append(code)
        count += values
        return count - values

    def walk(off: int, end: int, level: str) -> bool:
        while off < end:
            size, kind = codec._nla.unpack_from(payload, off)
            headers.append((emit("HH", 2), (size, kind)))
            attr, body = kind & c.NLA_TYPE_MASK, size - 4
            field = tables.get(level, {}).get(attr)
            if (level, attr) in (("outer", c.ATTR_DEST), ("dest", c.DST_STATS64)):
                nests.add(level)
                if not walk(off + 4, off + size, "dest" if level == "outer" else "stats"):
                    return False
            elif field is not None and field.kind in _INT and body == _SIZE[field.kind]:
                leaves[(level, field.name)] = emit(_INT[field.kind], 1)
            elif field is not None and field.kind == "addr":
                leaves[(level, field.name)] = emit(f"{body}s", 1)
            elif field is not None:
                return False  # a kind or size the fast path does not read: the slow path's
            elif body:
                emit(f"{body}x", 0)
            pad = min(-size & 3, end - off - size)
            if pad:
                emit(f"{pad}x", 0)
            off += size + pad
        return True

    if not walk(4, len(payload), "outer") or ("dest", "addr") not in leaves \
            or ("dest", "port") not in leaves:
        return None
    compiled = struct.Struct("".join(fmt))
    if compiled.size != len(payload):
        return None
    return _Template(compiled, headers, leaves, "dest" in nests)
