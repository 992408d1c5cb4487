"""Pure validation and normalisation of service and backend options, with GORB's error texts.

``decode_*`` turn an untyped mapping (a JSON body, a bus message body, a state file entry) into the
Structs of ``gorb.common.model``; ``validate_*`` check and normalise them. Both raise
``GorbError(INVALID, text)`` and nothing else; no I/O happens here (host names are resolved by the
caller, which passes the resulting IP literal as ``address``).

Deliberate deviations from GORB (gorb-spec §8), each an upstream bug:
- pulse ``args`` take numbers and digit strings alike for integer keys; other types are a 400;
- ``persistent`` is applied (timeout and netmask), the scheduler name is checked for form;
- flags may name the mh scheduler's flags and ``ops``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from typing import Any, TypeVar

import msgspec

from gorb.common import errors
from gorb.common.errors import GorbError, invalid
from gorb.common.model import (
    DEFAULT_PERSISTENCE_TIMEOUT,
    DEFAULT_PULSE_INTERVAL,
    DEFAULT_PULSE_TIMEOUT,
    DEFAULT_PULSE_TYPE,
    DEFAULT_SLOW_START,
    DEFAULT_SCHEDULER,
    DEFAULT_WEIGHT,
    FAMILIES,
    FORWARD_METHODS,
    PROTOCOLS,
    PULSE_TYPES,
    SERVICE_FLAGS,
    TUNNEL_FLAGS,
    TUNNEL_TYPES,
    BackendOptions,
    PulseOptions,
    ServiceOptions,
)

T = TypeVar("T")

# GORB's interval grammar (K:util/time.go): a signed integer and one unit, nothing composite.
_INTERVAL = re.compile(r"(?i)^([+-]?[0-9]+)(s|sec|seconds|m|min|minutes|h|hours)$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "sec": 1, "seconds": 1, "m": 60, "min": 60,
                 "minutes": 60, "h": 3600, "hours": 3600}
# IP_VS_SCHEDNAME_MAXLEN is 16 including the NUL.
_SCHEDULER = re.compile(r"^[a-z][a-z0-9_]{0,14}$")
_HTTP_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Object ids become map keys, Consul names and KV key segments: keep them path-safe.
_OBJECT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$")

# ASCII digits only: str.isdigit() also accepts "²", which int() refuses.
_DIGITS = re.compile(r"^[0-9]+$")
# Integer-valued pulse args (GORB's DynamicMap read them with an int default); ``expect`` also
# takes a list or a range.
_PULSE_INT_ARGS = ("port", "timeout")
_PULSE_STR_ARGS = ("method", "path", "host", "scheme", "body", "payload", "query", "qtype",
                   "answer")
_EXPECT = re.compile(r"^\s*\d{3}(\s*-\s*\d{3})?(\s*,\s*\d{3}(\s*-\s*\d{3})?)*\s*$")
_DURATION = re.compile(r"(?i)^(\d+(?:\.\d+)?)(ms|s|sec|seconds|m|min|minutes|h|hours)$")


def decode(raw: Mapping[str, Any] | None, cls: type[T]) -> T:
    """Typed decode of a mapping into ``cls``; a type error becomes a 400 with msgspec's text."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise invalid(f"expected a JSON object, got {type(raw).__name__}")
    try:
        return msgspec.convert(dict(raw), cls, strict=True)
    except msgspec.ValidationError as exc:
        raise invalid(str(exc)) from None


def validate_object_id(value: str) -> str:
    if not isinstance(value, str) or not _OBJECT_ID.match(value):
        raise invalid(f"invalid object id {value!r}: use 1-128 characters of A-Z a-z 0-9 _ . : @ -,"
                      " starting with a letter or digit")
    return value


def parse_interval(text: str) -> int:
    """GORB interval (``"5s"``, ``"1m"``, ``"2h"``) -> seconds."""
    m = _INTERVAL.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise invalid(errors.MSG_INTERVAL_FORMAT)
    value = int(m.group(1))
    if not -(2**31) <= value < 2**31:
        raise invalid(errors.MSG_INTERVAL_FORMAT)
    if value <= 0:
        raise invalid(errors.MSG_PULSE_INTERVAL)
    return int(value * _UNIT_SECONDS[m.group(2).lower()])


@functools.lru_cache(maxsize=65536)
def _parse_ip(address: str) -> tuple[str, str] | None:
    """(family, canonical text) of an IP literal, or None; cached: the writer asks often."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    return ("ipv4" if ip.version == 4 else "ipv6"), str(ip)


def ip_family(address: str) -> str:
    """``"ipv4"`` or ``"ipv6"`` for an IP literal; GorbError otherwise."""
    parsed = _parse_ip(address) if isinstance(address, str) else None
    if parsed is None:
        raise invalid(f"not an IP address: {address!r}")
    return parsed[0]


def canonical_ip(address: str) -> str:
    """The canonical text of an IP literal (``2001:DB8::0001`` -> ``2001:db8::1``)."""
    ip_family(address)
    return _parse_ip(address)[1]


def flags_value(flags: str) -> int:
    """``"sh-fallback|sh-port"`` -> bit value; GORB: case-sensitive, an empty member is unknown."""
    if flags == "":
        return 0
    value = 0
    for name in flags.split("|"):
        if name not in SERVICE_FLAGS:
            raise invalid(errors.MSG_UNKNOWN_FLAG)
        value |= SERVICE_FLAGS[name]
    return value


def netmask_prefix(netmask: str | int | None, family: str) -> int:
    """Persistence netmask as a prefix length: accepts a prefix (int or digits) or a dotted mask."""
    full = 32 if family == "ipv4" else 128
    if netmask is None or netmask == "":
        return full
    if isinstance(netmask, bool):
        raise invalid("netmask must be a prefix length or a dotted IPv4 mask")
    if isinstance(netmask, int) or (isinstance(netmask, str) and _DIGITS.match(netmask.lstrip("/"))):
        prefix = int(str(netmask).lstrip("/"))
    elif family == "ipv4":
        try:
            prefix = ipaddress.IPv4Network(f"0.0.0.0/{netmask}").prefixlen
        except ValueError:
            raise invalid(f"invalid netmask {netmask!r}") from None
    else:
        raise invalid("an IPv6 netmask is a prefix length")
    if not 1 <= prefix <= full:
        raise invalid(f"netmask prefix must be between 1 and {full}")
    return prefix


def validate_service(opts: ServiceOptions, address: str = "") -> ServiceOptions:
    """Check and normalise service options; ``address`` is the resolved VIP, if known.

    Order follows GORB: endpoint, protocol, flags; then what GORB never checked.
    """
    if opts.fwmark:
        if opts.port:
            raise invalid("a fwmark service has no port")
    elif opts.port == 0:
        raise invalid(errors.MSG_ENDPOINT_MISSING)
    protocol = opts.protocol.lower()
    if protocol not in PROTOCOLS:
        raise invalid(errors.MSG_UNKNOWN_PROTOCOL)
    if flags_value(opts.flags) & SERVICE_FLAGS["ops"] and protocol != "udp" and not opts.fwmark:
        raise invalid("one-packet scheduling (ops) applies only to udp services")
    method = opts.method or DEFAULT_SCHEDULER
    if not _SCHEDULER.match(method):
        raise invalid(f"invalid scheduler name {method!r}")
    family = opts.family.lower()
    if family and family not in FAMILIES:
        raise invalid(f"unknown address family {opts.family!r}: use ipv4 or ipv6")
    for candidate in (address, opts.host):
        if candidate and _is_ip(candidate):
            actual = ip_family(candidate)
            if family and family != actual:
                raise invalid(errors.MSG_AF_MISMATCH)
            family = actual
            break
    if opts.host and not _is_ip(opts.host) and not _is_hostname(opts.host):
        raise invalid(f"invalid host {opts.host!r}")
    timeout = opts.timeout
    if opts.persistent:
        timeout = timeout or DEFAULT_PERSISTENCE_TIMEOUT
        netmask_prefix(opts.netmask, family or "ipv4")
    elif opts.timeout or opts.netmask not in (None, ""):
        raise invalid("timeout and netmask apply only to a persistent service")
    if not 0 <= opts.fail_open <= 1:
        raise invalid("fail_open must be a share of the backends, between 0 and 1")
    return msgspec.structs.replace(opts, protocol=protocol, method=method, family=family,
                                   timeout=timeout, pulse=validate_pulse(opts.pulse))


def parse_duration(text: str, what: str, allow_zero: bool = False) -> float:
    """A duration such as ``"500ms"``, ``"2s"``, ``"1.5m"`` or ``"1h"`` -> seconds."""
    m = _DURATION.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise invalid(f"{what} must be a duration such as 500ms, 2s or 1m")
    value = float(m.group(1)) * _UNIT_SECONDS[m.group(2).lower()]
    if value < 0 or (value == 0 and not allow_zero) or value > 86400:
        raise invalid(f"{what} must be {'at least 0' if allow_zero else 'positive'} "
                      "and at most 24h")
    return value


def validate_pulse(pulse: PulseOptions | None) -> PulseOptions | None:
    """Check and normalise a pulse object as given (type lower-cased, args typed); fields left
    unset stay None so that a service's defaults can fill them (``resolve_pulse``)."""
    if pulse is None:
        return None
    ptype = pulse.type.lower() if pulse.type else None
    if ptype is not None and ptype not in PULSE_TYPES:
        raise invalid(errors.MSG_UNKNOWN_PULSE)
    interval = pulse.interval or None
    if interval is not None:
        parse_interval(interval)
    if pulse.timeout is not None:
        parse_duration(pulse.timeout, "pulse timeout")
    if pulse.backoff_max is not None:
        parse_duration(pulse.backoff_max, "pulse backoff_max", allow_zero=True)
    for name in ("rise", "fall"):
        value = getattr(pulse, name)
        if value is not None and not 1 <= value <= 100:
            raise invalid(f"pulse {name} must be between 1 and 100")
    if pulse.jitter is not None and not 0 <= pulse.jitter <= 1:
        raise invalid("pulse jitter must be between 0 and 1")
    slow = pulse.slow_start
    if isinstance(slow, str):
        slow = int(slow) if _DIGITS.match(slow) else slow
        if isinstance(slow, str):
            parse_duration(slow, "pulse slow_start", allow_zero=True)
    if isinstance(slow, int) and not 0 <= slow <= 10000:
        raise invalid("pulse slow_start must be between 0 and 10000 checks, or a duration")
    args = None if pulse.args is None else _pulse_args(dict(pulse.args))
    return msgspec.structs.replace(pulse, type=ptype, interval=interval, args=args,
                                   slow_start=slow)


def resolve_pulse(backend: PulseOptions | None, service: PulseOptions | None) -> PulseOptions:
    """The effective pulse of a backend: its own fields, else its service's, else the defaults.

    ``args`` are taken whole from the first level that has them (they belong to one check type).
    """
    out = {}
    for name in PulseOptions.__struct_fields__:
        value = getattr(backend, name, None) if backend is not None else None
        if value is None and service is not None:
            value = getattr(service, name)
        out[name] = value
    defaults = {"type": DEFAULT_PULSE_TYPE, "interval": DEFAULT_PULSE_INTERVAL,
                "timeout": DEFAULT_PULSE_TIMEOUT, "rise": 1, "fall": 1, "jitter": 0.1,
                "slow_start": DEFAULT_SLOW_START}
    for name, value in defaults.items():
        if out[name] is None:
            out[name] = value
    return PulseOptions(**out)


def expect_codes(expect: Any) -> frozenset[int]:
    """HTTP statuses that pass: 200, "200", "200-299", "200,204", [200, 204]."""
    if isinstance(expect, int) and not isinstance(expect, bool):
        return frozenset([expect])
    if isinstance(expect, list):
        return frozenset(expect)
    codes: set[int] = set()
    for part in expect.split(","):
        lo, _, hi = part.strip().partition("-")
        codes.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(codes)


def _pulse_args(args: dict[str, Any]) -> dict[str, Any]:
    for key in _PULSE_INT_ARGS:
        if key in args:
            args[key] = _int_arg(key, args[key])
    for key in _PULSE_STR_ARGS:
        if key in args and not isinstance(args[key], str):
            raise invalid(f"pulse argument {key!r} must be a string")
    if "method" in args and not _HTTP_TOKEN.match(args["method"]):
        raise invalid(f'net/http: invalid method "{args["method"]}"')
    if "port" in args and not 0 <= args["port"] <= 65535:
        raise invalid("pulse argument 'port' must be between 0 and 65535")
    if "expect" in args:
        args["expect"] = _expect_arg(args["expect"])
    if "tls_verify" in args and not isinstance(args["tls_verify"], bool):
        raise invalid("pulse argument 'tls_verify' must be true or false")
    if "argv" in args:
        argv = args["argv"]
        if (not isinstance(argv, list) or not argv
                or not all(isinstance(a, str) and a for a in argv)):
            raise invalid("pulse argument 'argv' must be a non-empty list of strings")
    if "rcode" in args and not isinstance(args["rcode"], (str, int)):
        raise invalid("pulse argument 'rcode' must be a name (NOERROR) or a number")
    return args


def _expect_arg(value: Any) -> int | str | list[int]:
    """GORB's ``expect`` is one status; gorb also takes a list, or "200-299" / "200,204"."""
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and not isinstance(v, bool) and 100 <= v <= 599
                                for v in value):
            raise invalid("pulse argument 'expect' must list HTTP statuses (100-599)")
        return value
    if isinstance(value, str) and _EXPECT.match(value) and not _DIGITS.match(value):
        if all(100 <= c <= 599 for c in expect_codes(value)) and expect_codes(value):
            return value
        raise invalid("pulse argument 'expect' must hold HTTP statuses (100-599)")
    if isinstance(value, str) and value and not _DIGITS.match(value) and value.strip("-")[:1].isalpha():
        return value  # a udp check's reply substring; check_pulse refuses it for http
    return _int_arg("expect", value)


def check_pulse(pulse: PulseOptions) -> PulseOptions:
    """Check what only the resolved pulse of a backend shows (its type may come from its
    service): the args each check type needs, and args that do not fit the type."""
    args = pulse.args or {}
    if pulse.type == "dns" and not isinstance(args.get("query"), str):
        raise invalid("a dns check needs a 'query' name in its args")
    if pulse.type == "exec" and "argv" not in args:
        raise invalid("an exec check needs an 'argv' list in its args")
    expect = args.get("expect")
    if pulse.type in ("http", "https") and isinstance(expect, str) and not _EXPECT.match(expect):
        raise invalid("pulse argument 'expect' must be HTTP statuses for an http check")
    if pulse.type == "udp" and expect is not None and not isinstance(expect, str):
        raise invalid("pulse argument 'expect' of a udp check is a text the reply must contain")
    return pulse


def validate_backend(opts: BackendOptions, address: str = "", service_family: str = "",
                     fwmark_service: bool = False) -> BackendOptions:
    """Check and normalise backend options as created by ``PUT /service/<vs>/<rs>``.

    Under a fwmark service port 0 is allowed: the kernel then keeps the client's port."""
    if not opts.host or (opts.port == 0 and not fwmark_service):
        raise invalid(errors.MSG_ENDPOINT_MISSING)
    method = opts.method.lower() or "nat"
    if method not in FORWARD_METHODS:
        raise invalid(errors.MSG_UNKNOWN_FORWARD)
    if opts.host and not _is_ip(opts.host) and not _is_hostname(opts.host):
        raise invalid(f"invalid host {opts.host!r}")
    ip = address or (opts.host if _is_ip(opts.host) else "")
    if ip and service_family and ip_family(ip) != service_family:
        raise invalid(errors.MSG_AF_MISMATCH)
    weight = opts.weight if opts.weight > 0 else DEFAULT_WEIGHT
    tunnel_type = opts.tunnel_type.lower()
    if tunnel_type not in TUNNEL_TYPES:
        raise invalid(f"unknown tunnel type {opts.tunnel_type!r}: use ipip, gue or gre")
    if tunnel_type == "gue" and not opts.tunnel_port:
        raise invalid("a gue tunnel needs tunnel_port")
    tunnel_flags = opts.tunnel_flags.lower()
    if tunnel_flags not in TUNNEL_FLAGS:
        raise invalid(f"unknown tunnel flags {opts.tunnel_flags!r}: use nocsum, csum or remcsum")
    if opts.lower_threshold and opts.upper_threshold and opts.lower_threshold > opts.upper_threshold:
        raise invalid("lower_threshold must not exceed upper_threshold")
    return msgspec.structs.replace(opts, method=method, weight=weight, tunnel_type=tunnel_type,
                                   tunnel_flags=tunnel_flags, pulse=validate_pulse(opts.pulse))


def validate_weight(weight: Any) -> int:
    """A weight set by PATCH or pulse: 0 (drained) up to the kernel's INT_MAX."""
    if isinstance(weight, bool) or not isinstance(weight, int) or not 0 <= weight < 2**31:
        raise invalid("weight must be an integer between 0 and 2147483647")
    return weight


def _int_arg(key: str, value: Any) -> int:
    if isinstance(value, bool) or value is None:
        raise invalid(f"pulse argument {key!r} must be a non-negative integer")
    if isinstance(value, int) and value >= 0:
        return value
    if isinstance(value, float) and value.is_integer() and 0 <= value < 2**31:
        return int(value)
    if isinstance(value, str) and _DIGITS.match(value):
        return int(value)
    raise invalid(f"pulse argument {key!r} must be a non-negative integer")


def _is_ip(text: str) -> bool:
    return _parse_ip(text) is not None


_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _is_hostname(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    return 0 < len(name) <= 253 and all(_LABEL.match(part) for part in name.split("."))


__all__ = [
    "GorbError", "decode", "validate_object_id", "parse_interval", "ip_family", "canonical_ip",
    "flags_value", "netmask_prefix", "validate_service", "validate_pulse", "validate_backend",
    "validate_weight", "resolve_pulse", "parse_duration", "expect_codes", "check_pulse",
]
