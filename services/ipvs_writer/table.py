"""The kernel's view of IPVS as plain values, and ``plan(desired, actual) -> ops``.

This is the pure core of the writer: no sockets, no clocks. ``KService``/``KDest`` hold exactly
what gorb sets and compares in the kernel (statistics ride along but never take part in a
comparison). ``plan`` is set difference, as in PyBal: what is desired and missing is added, what
differs is ``set`` (never delete + add, which would drop connections), and a service is deleted only
when the caller names it in ``owned`` — so entries gorb does not own are never touched. A service
gorb owns owns its whole backend list: a dest added to it by hand is removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from gorb.common.model import (
    FAMILIES,
    FORWARD_METHODS,
    IP_VS_SVC_F_PERSISTENT,
    PROTOCOLS,
    TUNNEL_FLAGS,
    TUNNEL_TYPES,
    BackendOptions,
    ServiceOptions,
)
from gorb.common.validation import canonical_ip, flags_value, netmask_prefix

SKey = tuple[int, int, str, int, int]  # (af, protocol, addr, port, fwmark)
DKey = tuple[str, int]  # (addr, port)

TUNNEL = FORWARD_METHODS["tunnel"]


@dataclass
class KDest:
    addr: str
    port: int
    fwd: int = 0
    weight: int = 0
    u_thresh: int = 0
    l_thresh: int = 0
    tun_type: int = 0
    tun_port: int = 0
    tun_flags: int = 0
    af: int = 2
    stats: dict | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> DKey:
        return (self.addr, self.port)

    def same_as(self, other: KDest) -> bool:
        """Equal in everything gorb sets; tunnel attributes count only for tunnel dests."""
        mine = (self.fwd, self.weight, self.u_thresh, self.l_thresh)
        theirs = (other.fwd, other.weight, other.u_thresh, other.l_thresh)
        if self.fwd == TUNNEL:
            mine += (self.tun_type, self.tun_port, self.tun_flags)
            theirs += (other.tun_type, other.tun_port, other.tun_flags)
        return mine == theirs


@dataclass
class KService:
    af: int
    protocol: int
    addr: str
    port: int
    fwmark: int = 0
    sched: str = "wrr"
    flags: int = 0  # only the bits gorb owns (gorb.common.model.OWNED_SERVICE_FLAGS)
    timeout: int = 0
    netmask: int = 32  # persistence granularity as a prefix length
    dests: dict[DKey, KDest] = field(default_factory=dict)
    stats: dict | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> SKey:
        return (self.af, self.protocol, self.addr, self.port, self.fwmark)

    def same_as(self, other: KService) -> bool:
        return ((self.sched, self.flags, self.timeout, self.netmask)
                == (other.sched, other.flags, other.timeout, other.netmask))

    def without_dests(self) -> KService:
        return KService(self.af, self.protocol, self.addr, self.port, self.fwmark, self.sched,
                        self.flags, self.timeout, self.netmask)


Verb = Literal["add_service", "set_service", "del_service", "add_dest", "set_dest", "del_dest"]


@dataclass(frozen=True)
class Op:
    verb: Verb
    service: KService
    dest: KDest | None = None

    def __str__(self) -> str:
        s = self.service
        where = f"fwmark {s.fwmark}" if s.fwmark else f"{_hostport(s.addr, s.port)}/{s.protocol}"
        if self.dest is None:
            return f"{self.verb} {where}"
        return f"{self.verb} {where} -> {_hostport(self.dest.addr, self.dest.port)}"


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def service_key(opts: ServiceOptions, address: str) -> SKey:
    """The kernel key of a validated service; ``address`` is its resolved VIP."""
    family = opts.family or ("ipv6" if ":" in address else "ipv4")
    af = FAMILIES[family]
    if opts.fwmark:
        return (af, 0, "", 0, opts.fwmark)
    return (af, PROTOCOLS[opts.protocol], canonical_ip(address), opts.port, 0)


def kservice(opts: ServiceOptions, address: str) -> KService:
    """The kernel service for validated options (no dests)."""
    af, protocol, addr, port, fwmark = service_key(opts, address)
    family = "ipv4" if af == 2 else "ipv6"
    flags = flags_value(opts.flags)
    timeout = 0
    netmask = 32 if af == 2 else 128
    if opts.persistent:
        flags |= IP_VS_SVC_F_PERSISTENT
        timeout = opts.timeout
        netmask = netmask_prefix(opts.netmask, family)
    return KService(af, protocol, addr, port, fwmark, opts.method, flags, timeout, netmask)


def kdest(opts: BackendOptions, address: str, weight: int, af: int) -> KDest:
    """The kernel dest for validated backend options at an effective ``weight``."""
    fwd = FORWARD_METHODS[opts.method]
    tunnel = fwd == TUNNEL
    return KDest(
        addr=canonical_ip(address), port=opts.port, fwd=fwd, weight=weight,
        u_thresh=opts.upper_threshold, l_thresh=opts.lower_threshold,
        tun_type=TUNNEL_TYPES[opts.tunnel_type] if tunnel else 0,
        tun_port=opts.tunnel_port if tunnel else 0,
        tun_flags=TUNNEL_FLAGS[opts.tunnel_flags] if tunnel else 0,
        af=af,
    )


def plan(desired: dict[SKey, KService], actual: dict[SKey, KService],
         owned: set[SKey] | frozenset[SKey] = frozenset()) -> list[Op]:
    """Ops that take ``actual`` to ``desired``.

    ``owned`` names services gorb created and no longer wants (deleted ones): those present in
    ``actual`` are deleted. Every other service in ``actual`` but not in ``desired`` is left alone.
    """
    ops: list[Op] = []
    for key, want in desired.items():
        have = actual.get(key)
        if have is None:
            ops.append(Op("add_service", want.without_dests()))
            ops.extend(Op("add_dest", want, d) for d in want.dests.values())
            continue
        if not want.same_as(have):
            ops.append(Op("set_service", want.without_dests()))
        for dkey, d in have.dests.items():
            if dkey not in want.dests:
                ops.append(Op("del_dest", want, d))
        for dkey, d in want.dests.items():
            cur = have.dests.get(dkey)
            if cur is None:
                ops.append(Op("add_dest", want, d))
            elif not d.same_as(cur):
                ops.append(Op("set_dest", want, d))
    for key in sorted(owned):
        if key not in desired and key in actual:
            ops.append(Op("del_service", actual[key].without_dests()))
    return ops
