"""The model of a virtual service and a backend: field names, types, defaults and kernel constants.

These Structs are the JSON bodies of the REST API (GORB's ``ServiceOptions`` and ``BackendOptions``,
gorb-spec §2.3-2.4) and the bodies of writer commands on the bus. Everything GORB had keeps its
name and default; what GORB never had sits beside it with a default that changes nothing:

    ServiceOptions  host port protocol method flags persistent      (GORB)
                    fwmark family timeout netmask pulse fail_open   (gorb)
    BackendOptions  host port method weight pulse                   (GORB)
                    tunnel_type tunnel_port tunnel_flags
                    upper_threshold lower_threshold                 (gorb)

Decoding and validation live in ``gorb.common.validation``; this module has no logic beyond constants.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=0xFFFFFFFF)]
Weight = Annotated[int, msgspec.Meta(ge=-(2**31), le=2**31 - 1)]

# --- kernel constants (include/uapi/linux/ip_vs.h) -------------------------------------------

PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132}
FAMILIES = {"ipv4": 2, "ipv6": 10}  # AF_INET, AF_INET6

IP_VS_SVC_F_PERSISTENT = 0x0001
IP_VS_SVC_F_HASHED = 0x0002  # set by the kernel itself; never ours to compare
IP_VS_SVC_F_ONEPACKET = 0x0004
IP_VS_SVC_F_SCHED1 = 0x0008
IP_VS_SVC_F_SCHED2 = 0x0010
IP_VS_SVC_F_SCHED3 = 0x0020

# GORB's flag names (gorb-spec §2.3) plus the mh names and one-packet scheduling.
SERVICE_FLAGS = {
    "sh-fallback": IP_VS_SVC_F_SCHED1,
    "sh-port": IP_VS_SVC_F_SCHED2,
    "mh-fallback": IP_VS_SVC_F_SCHED1,
    "mh-port": IP_VS_SVC_F_SCHED2,
    "flag-1": IP_VS_SVC_F_SCHED1,
    "flag-2": IP_VS_SVC_F_SCHED2,
    "flag-3": IP_VS_SVC_F_SCHED3,
    "ops": IP_VS_SVC_F_ONEPACKET,
}
# Bits of the service flags word that gorb sets and therefore compares with the kernel.
OWNED_SERVICE_FLAGS = (IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_ONEPACKET | IP_VS_SVC_F_SCHED1
                       | IP_VS_SVC_F_SCHED2 | IP_VS_SVC_F_SCHED3)

# Forwarding methods: GORB's names -> IP_VS_CONN_F_* values.
FORWARD_METHODS = {"nat": 0, "tunnel": 2, "ipip": 2, "dr": 3}
FORWARD_NAMES = {0: "nat", 2: "tunnel", 3: "dr", 1: "local", 4: "bypass"}

TUNNEL_TYPES = {"ipip": 0, "gue": 1, "gre": 2}
TUNNEL_FLAGS = {"nocsum": 0, "csum": 1, "remcsum": 2}

# The fields that make up a service's kernel key: the writer refuses to change them in place
# (a PATCH may not), so the store's sync turns a change of one into a delete and a re-create.
KEY_FIELDS = ("host", "port", "protocol", "fwmark", "family")

# A backend's health status names (pulse's verdicts, the writer's record, the API's views).
UP, DOWN, UNKNOWN = "up", "down", "unknown"
STATUSES = (UP, DOWN, UNKNOWN)

DEFAULT_SCHEDULER = "wrr"  # GORB: "since Pulse will dynamically reweight backends"
DEFAULT_WEIGHT = 100
DEFAULT_PERSISTENCE_TIMEOUT = 300  # ipvsadm's default for -p without a value
DEFAULT_PULSE_TYPE = "tcp"
DEFAULT_PULSE_INTERVAL = "1m"

PULSE_TYPES = ("none", "tcp", "http", "https", "udp", "dns", "exec")
DEFAULT_PULSE_TIMEOUT = "5s"        # GORB K's fixed client timeout
DEFAULT_SLOW_START = 10             # passed checks to climb back to full weight (GORB: 100)


class PulseOptions(msgspec.Struct, omit_defaults=False):
    """GORB's ``pulse`` object ``{"type": "tcp", "interval": "1m", "args": {...} | null}`` and
    what GORB's TODO asked for beside it. On a service, ``pulse`` holds the defaults of its
    backends; a backend's own ``pulse`` fields override them one by one (a field left at null
    takes the service's value, then the default shown here).

        timeout       "5s"   a check taking longer fails
        rise / fall   1 / 1  consecutive passes / failures before the status changes
        backoff_max   null   while down, the delay doubles after each failure up to this
                             (null: 4 x interval; "0s": no backoff)
        jitter        0.1    each delay is spread by up to this share of itself
        slow_start    10     passed checks (an integer) or a duration ("30s") over which a
                             recovered backend climbs back to its weight
    """

    type: str | None = None
    interval: str | None = None
    args: dict[str, Any] | None = None
    timeout: str | None = None
    rise: int | None = None
    fall: int | None = None
    backoff_max: str | None = None
    jitter: float | None = None
    slow_start: int | str | None = None


class ServiceOptions(msgspec.Struct):
    """Body of ``PUT /service/<vs>``; ``host`` is kept as given (``""`` = the device's address).

    ``fwmark`` > 0 makes a firewall-mark service: then ``port`` must be 0, ``protocol`` is not
    used, and ``family`` (or the family of ``host``, if given) picks IPv4 or IPv6.
    ``timeout`` (seconds) and ``netmask`` (prefix length, or a dotted IPv4 mask) apply only with
    ``persistent``; ``timeout`` 0 means the ipvsadm default of 300 s.
    """

    host: str = ""
    port: Port = 0
    protocol: str = "tcp"
    method: str = DEFAULT_SCHEDULER
    flags: str = ""
    persistent: bool = False
    fwmark: U32 = 0
    family: str = ""
    timeout: U32 = 0
    netmask: str | int | None = None
    pulse: PulseOptions | None = None   # defaults for the pulse of every backend of the service
    fail_open: float = 0.0              # never take fewer than this share of backends out (0-1)


class BackendOptions(msgspec.Struct):
    """Body of ``PUT /service/<vs>/<rs>``. ``weight`` <= 0 on create means 100 (GORB)."""

    host: str = ""
    port: Port = 0
    method: str = "nat"
    weight: Weight = 0
    pulse: PulseOptions | None = None
    tunnel_type: str = "ipip"
    tunnel_port: Port = 0
    tunnel_flags: str = "nocsum"
    upper_threshold: U32 = 0
    lower_threshold: U32 = 0
