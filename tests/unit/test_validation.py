"""Validation of service, backend and pulse options: GORB's error texts, its defaults, and the
deliberate fixes (pulse args typed, persistence applied, fwmark and IPv6 services)."""

import pytest

from gorb.common import errors
from gorb.common.errors import HTTP_STATUS, GorbError
from gorb.common.model import BackendOptions, PulseOptions, ServiceOptions
from gorb.common.validation import (
    decode,
    expect_codes,
    flags_value,
    netmask_prefix,
    parse_interval,
    validate_backend,
    resolve_pulse,
    validate_pulse,
    validate_service,
)

pytestmark = pytest.mark.timeout(5)


def _rejected(call, reason=None) -> GorbError:
    """Run ``call``; it must raise a 400 GorbError (with exactly ``reason``, if given)."""
    with pytest.raises(GorbError) as info:
        call()
    exc = info.value
    assert exc.errno == errors.INVALID
    assert HTTP_STATUS[exc.errno] == 400
    if reason is not None:
        assert exc.reason == reason
    return exc


def _svc(**kw) -> ServiceOptions:
    return ServiceOptions(**{"host": "10.0.0.1", "port": 80, **kw})


def _be(**kw) -> BackendOptions:
    return BackendOptions(**{"host": "10.1.0.1", "port": 8080, **kw})


# --- GORB's error texts, verbatim --------------------------------------------------------------

@pytest.mark.parametrize("call, reason", [
    # service endpoint
    (lambda: validate_service(ServiceOptions(host="10.0.0.1")), "endpoint information is missing"),
    (lambda: validate_service(ServiceOptions()), "endpoint information is missing"),
    # service protocol: tcp/udp/sctp only
    (lambda: validate_service(_svc(protocol="icmp")), "specified protocol is unknown"),
    (lambda: validate_service(_svc(protocol="")), "specified protocol is unknown"),
    # flags: case-sensitive, an empty member is unknown
    (lambda: validate_service(_svc(flags="sh-port|bogus")), "specified flag is unknown"),
    (lambda: validate_service(_svc(flags="SH-PORT")), "specified flag is unknown"),
    (lambda: validate_service(_svc(flags="sh-fallback|")), "specified flag is unknown"),
    (lambda: flags_value("|"), "specified flag is unknown"),
    # service family against its address
    (lambda: validate_service(_svc(host="2001:db8::1", family="ipv4")),
     "incompatible address families"),
    (lambda: validate_service(_svc(host="", family="ipv6"), address="10.0.0.1"),
     "incompatible address families"),
    # backend endpoint
    (lambda: validate_backend(_be(host="")), "endpoint information is missing"),
    (lambda: validate_backend(_be(port=0)), "endpoint information is missing"),
    # backend forwarding method: GORB never accepted gateway/route/masq
    (lambda: validate_backend(_be(method="gateway")), "specified forwarding method is unknown"),
    (lambda: validate_backend(_be(method="masq")), "specified forwarding method is unknown"),
    (lambda: validate_backend(_be(method="route")), "specified forwarding method is unknown"),
    # backend family against the service's
    (lambda: validate_backend(_be(host="2001:db8::10"), service_family="ipv4"),
     "incompatible address families"),
    (lambda: validate_backend(_be(host="backend.example"), address="10.1.0.1",
                              service_family="ipv6"),
     "incompatible address families"),
    # pulse
    (lambda: validate_pulse(PulseOptions(type="icmp")), "specified pulse type is unknown"),
    (lambda: validate_backend(_be(pulse=PulseOptions(type="icmp"))),
     "specified pulse type is unknown"),
    (lambda: validate_pulse(PulseOptions(interval="0s")), "pulse interval must be positive"),
    (lambda: validate_pulse(PulseOptions(interval="60")), "invalid interval format"),
    (lambda: validate_backend(_be(pulse=PulseOptions(interval="1m30s"))),
     "invalid interval format"),
])
def test_gorb_error_texts(call, reason):
    _rejected(call, reason)


def test_error_texts_are_gorbs():
    assert (errors.MSG_ENDPOINT_MISSING, errors.MSG_UNKNOWN_PROTOCOL, errors.MSG_UNKNOWN_FLAG,
            errors.MSG_UNKNOWN_FORWARD, errors.MSG_UNKNOWN_PULSE, errors.MSG_PULSE_INTERVAL,
            errors.MSG_INTERVAL_FORMAT, errors.MSG_AF_MISMATCH) == (
        "endpoint information is missing", "specified protocol is unknown",
        "specified flag is unknown", "specified forwarding method is unknown",
        "specified pulse type is unknown", "pulse interval must be positive",
        "invalid interval format", "incompatible address families")


# --- intervals (gorb-spec §4.1) ----------------------------------------------------------------

@pytest.mark.parametrize("text, seconds", [
    ("600s", 600),
    ("2m", 120),
    ("24h", 86400),
    ("1m", 60),
    ("5sec", 5),
    ("5seconds", 5),
    ("3min", 180),
    ("3minutes", 180),
    ("2hours", 7200),
    ("5S", 5),            # units are case-insensitive
    ("1M", 60),
    ("+5s", 5),
    (" 10s ", 10),        # trimmed
    ("2147483647s", 2147483647),
])
def test_interval_valid(text, seconds):
    assert parse_interval(text) == seconds


@pytest.mark.parametrize("text, reason", [
    ("600", "invalid interval format"),
    ("foos", "invalid interval format"),
    ("24z", "invalid interval format"),
    ("1m30s", "invalid interval format"),
    ("5ms", "invalid interval format"),
    ("1d", "invalid interval format"),
    ("", "invalid interval format"),
    ("5 s", "invalid interval format"),
    ("1.5m", "invalid interval format"),
    ("2147483648s", "invalid interval format"),   # does not fit int32
    (None, "invalid interval format"),
    (60, "invalid interval format"),
    ("0s", "pulse interval must be positive"),
    ("-5s", "pulse interval must be positive"),
    ("-0m", "pulse interval must be positive"),
])
def test_interval_invalid(text, reason):
    _rejected(lambda: parse_interval(text), reason)


# --- flags --------------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, value", [
    ("", 0),
    ("sh-fallback", 0x08),
    ("sh-port", 0x10),
    ("sh-fallback|sh-port", 0x18),
    ("mh-fallback|mh-port", 0x18),
    ("flag-1|flag-2|flag-3", 0x38),
    ("flag-3", 0x20),
    ("ops", 0x04),
    ("sh-port|ops", 0x14),
    ("sh-port|sh-port", 0x10),
])
def test_flags_value(flags, value):
    assert flags_value(flags) == value


# --- service normalisation ----------------------------------------------------------------------

@pytest.mark.parametrize("opts, address, expected", [
    # protocol lower-cased, scheduler defaulted, family from the host
    (_svc(protocol="TCP"), "", _svc(protocol="tcp", family="ipv4")),
    (_svc(protocol="Udp"), "", _svc(protocol="udp", family="ipv4")),
    (_svc(protocol="SCTP"), "", _svc(protocol="sctp", family="ipv4")),
    (_svc(method=""), "", _svc(method="wrr", family="ipv4")),
    (_svc(method="sh", flags="sh-fallback|sh-port"), "",
     _svc(method="sh", flags="sh-fallback|sh-port", family="ipv4")),
    # host may be empty (device address) or a name: family then comes from the resolved address
    (_svc(host=""), "", _svc(host="", family="")),
    (_svc(host="web.example.com"), "", _svc(host="web.example.com", family="")),
    (_svc(host="web.example.com"), "2001:db8::1", _svc(host="web.example.com", family="ipv6")),
    (_svc(family="IPv4"), "", _svc(family="ipv4")),
    # IPv6 host
    (_svc(host="2001:DB8::1"), "", _svc(host="2001:DB8::1", family="ipv6")),
    (_svc(host="::1", family="ipv6"), "", _svc(host="::1", family="ipv6")),
    # persistence: timeout default 300, an explicit timeout kept, netmask kept as given
    (_svc(persistent=True), "", _svc(persistent=True, timeout=300, family="ipv4")),
    (_svc(persistent=True, timeout=60), "", _svc(persistent=True, timeout=60, family="ipv4")),
    (_svc(persistent=True, netmask=24), "",
     _svc(persistent=True, timeout=300, netmask=24, family="ipv4")),
    (_svc(persistent=True, netmask="255.255.255.0"), "",
     _svc(persistent=True, timeout=300, netmask="255.255.255.0", family="ipv4")),
    (_svc(host="2001:db8::1", persistent=True, netmask=64), "",
     _svc(host="2001:db8::1", persistent=True, timeout=300, netmask=64, family="ipv6")),
    # a non-persistent service may carry an empty netmask
    (_svc(netmask=""), "", _svc(netmask="", family="ipv4")),
    # fwmark services: port 0, family from the host or from `family`, ipv4 unless told
    (ServiceOptions(fwmark=42), "", ServiceOptions(fwmark=42)),
    (ServiceOptions(fwmark=42, family="ipv6"), "", ServiceOptions(fwmark=42, family="ipv6")),
    (ServiceOptions(fwmark=42, host="2001:db8::1"), "",
     ServiceOptions(fwmark=42, host="2001:db8::1", family="ipv6")),
    (ServiceOptions(fwmark=42, host="10.0.0.1"), "",
     ServiceOptions(fwmark=42, host="10.0.0.1", family="ipv4")),
])
def test_validate_service_normalises(opts, address, expected):
    assert validate_service(opts, address) == expected


_PREFIX4 = "netmask prefix must be between 1 and 32"
_NOT_PERSISTENT = "timeout and netmask apply only to a persistent service"


@pytest.mark.parametrize("opts, reason", [
    (ServiceOptions(fwmark=42, port=80), "a fwmark service has no port"),
    (_svc(method="WRR"), "invalid scheduler name 'WRR'"),    # GORB passed it on: kernel ENOENT
    (_svc(method="a" * 16), f"invalid scheduler name {'a' * 16!r}"),  # IP_VS_SCHEDNAME_MAXLEN
    (_svc(method="w rr"), "invalid scheduler name 'w rr'"),
    (_svc(family="ipx"), "unknown address family 'ipx': use ipv4 or ipv6"),
    (ServiceOptions(fwmark=42, family="inet"), "unknown address family 'inet': use ipv4 or ipv6"),
    (_svc(host="bad host"), "invalid host 'bad host'"),
    (_svc(host="-web.example"), "invalid host '-web.example'"),
    # persistence parameters without `persistent`
    (_svc(timeout=60), _NOT_PERSISTENT),
    (_svc(netmask=24), _NOT_PERSISTENT),
    (_svc(netmask="255.255.255.0"), _NOT_PERSISTENT),
    # netmask out of range or malformed
    (_svc(persistent=True, netmask=0), _PREFIX4),
    (_svc(persistent=True, netmask=33), _PREFIX4),
    (_svc(persistent=True, netmask="33"), _PREFIX4),
    (_svc(persistent=True, netmask="255.0.255.0"), "invalid netmask '255.0.255.0'"),
    (_svc(persistent=True, netmask="300.0.0.0"), "invalid netmask '300.0.0.0'"),
    (_svc(persistent=True, netmask="bogus"), "invalid netmask 'bogus'"),
    (_svc(persistent=True, netmask=True), "netmask must be a prefix length or a dotted IPv4 mask"),
    (_svc(host="2001:db8::1", persistent=True, netmask=129),
     "netmask prefix must be between 1 and 128"),
    (_svc(host="2001:db8::1", persistent=True, netmask="ffff:ffff::"),
     "an IPv6 netmask is a prefix length"),
    (_svc(host="2001:db8::1", persistent=True, netmask="255.255.255.0"),
     "an IPv6 netmask is a prefix length"),
])
def test_validate_service_rejects(opts, reason):
    _rejected(lambda: validate_service(opts), reason)


@pytest.mark.parametrize("netmask, family, prefix", [
    (None, "ipv4", 32),
    ("", "ipv4", 32),
    (None, "ipv6", 128),
    (24, "ipv4", 24),
    ("24", "ipv4", 24),
    ("/24", "ipv4", 24),
    ("255.255.255.0", "ipv4", 24),
    ("255.255.255.255", "ipv4", 32),
    ("128.0.0.0", "ipv4", 1),
    (1, "ipv4", 1),
    (32, "ipv4", 32),
    (64, "ipv6", 64),
    ("64", "ipv6", 64),
    (128, "ipv6", 128),
])
def test_netmask_prefix(netmask, family, prefix):
    assert netmask_prefix(netmask, family) == prefix


@pytest.mark.parametrize("netmask, family, reason", [
    (0, "ipv4", _PREFIX4),
    (33, "ipv4", _PREFIX4),
    ("0", "ipv4", _PREFIX4),
    (-1, "ipv4", _PREFIX4),
    ("0.0.0.0", "ipv4", _PREFIX4),
    (129, "ipv6", "netmask prefix must be between 1 and 128"),
    (0, "ipv6", "netmask prefix must be between 1 and 128"),
    ("255.255.0.255", "ipv4", "invalid netmask '255.255.0.255'"),
    ("ffff::", "ipv6", "an IPv6 netmask is a prefix length"),
    (False, "ipv4", "netmask must be a prefix length or a dotted IPv4 mask"),
])
def test_netmask_prefix_rejects(netmask, family, reason):
    _rejected(lambda: netmask_prefix(netmask, family), reason)


# --- backend normalisation ----------------------------------------------------------------------

# A backend's pulse is stored as given (unset fields stay None for its service's defaults).
_DEFAULT_PULSE = None


@pytest.mark.parametrize("opts, kw, expected", [
    (_be(), {}, _be(method="nat", weight=100, pulse=_DEFAULT_PULSE)),
    (_be(weight=0), {}, _be(weight=100, pulse=_DEFAULT_PULSE)),
    (_be(weight=-5), {}, _be(weight=100, pulse=_DEFAULT_PULSE)),
    (_be(weight=1), {}, _be(weight=1, pulse=_DEFAULT_PULSE)),
    (_be(weight=2**31 - 1), {}, _be(weight=2**31 - 1, pulse=_DEFAULT_PULSE)),
    (_be(method="NAT"), {}, _be(method="nat", weight=100, pulse=_DEFAULT_PULSE)),
    (_be(method="DR"), {}, _be(method="dr", weight=100, pulse=_DEFAULT_PULSE)),
    (_be(method="Tunnel"), {}, _be(method="tunnel", weight=100, pulse=_DEFAULT_PULSE)),
    (_be(method="IPIP"), {}, _be(method="ipip", weight=100, pulse=_DEFAULT_PULSE)),
    (_be(method=""), {}, _be(method="nat", weight=100, pulse=_DEFAULT_PULSE)),
    (_be(method="tunnel", tunnel_type="GUE", tunnel_port=6080, tunnel_flags="CSUM"), {},
     _be(method="tunnel", weight=100, tunnel_type="gue", tunnel_port=6080, tunnel_flags="csum",
         pulse=_DEFAULT_PULSE)),
    (_be(upper_threshold=10, lower_threshold=5), {},
     _be(weight=100, upper_threshold=10, lower_threshold=5, pulse=_DEFAULT_PULSE)),
    (_be(lower_threshold=5), {}, _be(weight=100, lower_threshold=5, pulse=_DEFAULT_PULSE)),
    # pulse normalised in place
    (_be(pulse=PulseOptions(type="HTTP", interval="")), {},
     _be(weight=100, pulse=PulseOptions(type="http"))),
    # IPv6 backends and family checks that pass
    (_be(host="2001:db8::10"), {"service_family": "ipv6"},
     _be(host="2001:db8::10", weight=100, pulse=_DEFAULT_PULSE)),
    (_be(host="backend.example"), {"address": "10.1.0.1", "service_family": "ipv4"},
     _be(host="backend.example", weight=100, pulse=_DEFAULT_PULSE)),
    (_be(host="backend.example"), {"service_family": "ipv6"},   # unresolved: nothing to check
     _be(host="backend.example", weight=100, pulse=_DEFAULT_PULSE)),
])
def test_validate_backend_normalises(opts, kw, expected):
    assert validate_backend(opts, **kw) == expected


@pytest.mark.parametrize("opts, reason", [
    (_be(tunnel_type="vxlan"), "unknown tunnel type 'vxlan': use ipip, gue or gre"),
    (_be(tunnel_type="gue"), "a gue tunnel needs tunnel_port"),
    (_be(tunnel_flags="checksum"), "unknown tunnel flags 'checksum': use nocsum, csum or remcsum"),
    (_be(upper_threshold=5, lower_threshold=10), "lower_threshold must not exceed upper_threshold"),
    (_be(host="bad host"), "invalid host 'bad host'"),
    (_be(pulse=PulseOptions(args={"port": "x"})), "pulse argument 'port' must be a non-negative integer"),
])
def test_validate_backend_rejects(opts, reason):
    _rejected(lambda: validate_backend(opts), reason)


# --- pulse --------------------------------------------------------------------------------------

def _effective(type_: str, interval: str, args) -> PulseOptions:
    """A fully resolved pulse: GORB's three fields plus gorb's defaults."""
    return PulseOptions(type_, interval, args, timeout="5s", rise=1, fall=1, backoff_max=None,
                        jitter=0.1, slow_start=10)


@pytest.mark.parametrize("pulse, expected", [
    (None, _effective("tcp", "1m", None)),
    (PulseOptions(), _effective("tcp", "1m", None)),
    (PulseOptions(type="", interval=""), _effective("tcp", "1m", None)),
    (PulseOptions(type="HTTP", interval="5s"), _effective("http", "5s", None)),
    (PulseOptions(type="None"), _effective("none", "1m", None)),
    (PulseOptions(type="TCP", interval="2H"), _effective("tcp", "2H", None)),
    (PulseOptions(args={}), _effective("tcp", "1m", {})),
])
def test_validate_pulse_normalises(pulse, expected):
    assert resolve_pulse(validate_pulse(pulse), None) == expected


def test_backend_pulse_fields_override_the_services_one_by_one():
    service = validate_pulse(PulseOptions(type="http", interval="5s", rise=3,
                                          args={"path": "/hc"}))
    backend = validate_pulse(PulseOptions(interval="10s", fall=2))
    got = resolve_pulse(backend, service)
    assert (got.type, got.interval, got.rise, got.fall, got.args) == ("http", "10s", 3, 2,
                                                                      {"path": "/hc"})
    assert resolve_pulse(None, None).type == "tcp"


@pytest.mark.parametrize("pulse, reason", [
    (PulseOptions(timeout="0s"), "pulse timeout must be positive and at most 24h"),
    (PulseOptions(timeout="soon"), "pulse timeout must be a duration such as 500ms, 2s or 1m"),
    (PulseOptions(rise=0), "pulse rise must be between 1 and 100"),
    (PulseOptions(fall=101), "pulse fall must be between 1 and 100"),
    (PulseOptions(jitter=1.5), "pulse jitter must be between 0 and 1"),
    (PulseOptions(slow_start=-1), "pulse slow_start must be between 0 and 10000 checks, or a duration"),
    (PulseOptions(slow_start="later"), "pulse slow_start must be a duration such as 500ms, 2s or 1m"),
    (PulseOptions(args={"expect": "200-"}), "pulse argument 'expect' must be a non-negative integer"),
    (PulseOptions(args={"expect": [200, 99]}), "pulse argument 'expect' must list HTTP statuses (100-599)"),
    (PulseOptions(args={"argv": []}), "pulse argument 'argv' must be a non-empty list of strings"),
    (PulseOptions(args={"tls_verify": "yes"}), "pulse argument 'tls_verify' must be true or false"),
])
def test_pulse_controls_rejected(pulse, reason):
    _rejected(lambda: validate_pulse(pulse), reason)


@pytest.mark.parametrize("expect, codes", [
    (200, {200}), ("200", {200}), ("200-204", {200, 201, 202, 203, 204}),
    ("200,302", {200, 302}), ([200, 204], {200, 204}),
])
def test_expect_accepts_codes_lists_and_ranges(expect, codes):
    args = validate_pulse(PulseOptions(args={"expect": expect})).args
    assert expect_codes(args["expect"]) == codes


def test_slow_start_takes_checks_or_a_duration():
    assert validate_pulse(PulseOptions(slow_start="7")).slow_start == 7
    assert validate_pulse(PulseOptions(slow_start="30s")).slow_start == "30s"


# The upstream DynamicMap bug (gorb-spec §2.5): GORB panicked on JSON numbers and only worked with
# digit strings. gorb takes both and normalises them to int.
@pytest.mark.parametrize("args, expected", [
    ({"expect": 200}, {"expect": 200}),
    ({"expect": "200"}, {"expect": 200}),
    ({"expect": 200.0}, {"expect": 200}),
    ({"port": 54321}, {"port": 54321}),
    ({"port": "54321"}, {"port": 54321}),
    ({"port": 0}, {"port": 0}),
    ({"port": "65535"}, {"port": 65535}),
    ({"timeout": 2}, {"timeout": 2}),
    ({"timeout": "2"}, {"timeout": 2}),
    ({"method": "GET", "path": "/health", "expect": "404", "port": "8080", "host": "10.1.0.9",
      "scheme": "https"},
     {"method": "GET", "path": "/health", "expect": 404, "port": 8080, "host": "10.1.0.9",
      "scheme": "https"}),
    ({"method": "PROPFIND"}, {"method": "PROPFIND"}),
    ({"custom": [1, 2]}, {"custom": [1, 2]}),     # unknown keys pass through untouched
])
def test_pulse_args_typed(args, expected):
    got = validate_pulse(PulseOptions(type="http", args=args))
    assert got.args == expected
    assert all(type(got.args[k]) is int for k in ("port", "expect", "timeout") if k in got.args)


def test_pulse_args_number_and_digit_string_agree():
    as_number = validate_pulse(PulseOptions(type="http", args={"expect": 200, "port": 8080}))
    as_string = validate_pulse(PulseOptions(type="http", args={"expect": "200", "port": "8080"}))
    assert as_number == as_string == PulseOptions("http", None, {"expect": 200, "port": 8080})


def test_pulse_args_are_copied():
    args = {"expect": "200"}
    validate_pulse(PulseOptions(type="http", args=args))
    assert args == {"expect": "200"}


@pytest.mark.parametrize("args, reason", [
    ({"expect": True}, "pulse argument 'expect' must be a non-negative integer"),
    ({"expect": False}, "pulse argument 'expect' must be a non-negative integer"),
    ({"expect": None}, "pulse argument 'expect' must be a non-negative integer"),
    ({"expect": 200.5}, "pulse argument 'expect' must be a non-negative integer"),
    ({"expect": "2oo"}, "pulse argument 'expect' must be a non-negative integer"),
    ({"expect": ""}, "pulse argument 'expect' must be a non-negative integer"),
    ({"expect": "-1"}, "pulse argument 'expect' must be a non-negative integer"),
    ({"expect": "200.0"}, "pulse argument 'expect' must be a non-negative integer"),
    ({"expect": []}, "pulse argument 'expect' must list HTTP statuses (100-599)"),
    ({"port": True}, "pulse argument 'port' must be a non-negative integer"),
    ({"port": "80a"}, "pulse argument 'port' must be a non-negative integer"),
    ({"port": 80.5}, "pulse argument 'port' must be a non-negative integer"),
    ({"port": float("nan")}, "pulse argument 'port' must be a non-negative integer"),
    ({"timeout": None}, "pulse argument 'timeout' must be a non-negative integer"),
    ({"timeout": "2s"}, "pulse argument 'timeout' must be a non-negative integer"),
    ({"port": 65536}, "pulse argument 'port' must be between 0 and 65535"),
    ({"port": "70000"}, "pulse argument 'port' must be between 0 and 65535"),
    ({"port": -1}, "pulse argument 'port' must be a non-negative integer"),
    ({"timeout": -5}, "pulse argument 'timeout' must be a non-negative integer"),
    ({"expect": -1.0}, "pulse argument 'expect' must be a non-negative integer"),
    ({"path": 5}, "pulse argument 'path' must be a string"),
    ({"path": None}, "pulse argument 'path' must be a string"),
    ({"path": ["/health"]}, "pulse argument 'path' must be a string"),
    ({"host": 1}, "pulse argument 'host' must be a string"),
    ({"scheme": True}, "pulse argument 'scheme' must be a string"),
    ({"method": 1}, "pulse argument 'method' must be a string"),
    ({"method": "GE T"}, 'net/http: invalid method "GE T"'),
    ({"method": ""}, 'net/http: invalid method ""'),
])
def test_pulse_args_rejected(args, reason):
    _rejected(lambda: validate_pulse(PulseOptions(type="http", args=args)), reason)


# str.isdigit() is true for non-ASCII digits such as "²" that int() refuses: they must be a 400,
# never a ValueError escaping validation.
@pytest.mark.parametrize("call", [
    lambda: validate_pulse(PulseOptions(type="http", args={"port": "²"})),
    lambda: validate_service(_svc(persistent=True, netmask="²")),
], ids=["pulse-port", "netmask"])
def test_non_ascii_digits_are_a_400(call):
    _rejected(call)


# --- decode: strict JSON types --------------------------------------------------------------------

@pytest.mark.parametrize("raw, cls, expected", [
    (None, ServiceOptions, ServiceOptions()),
    ({}, BackendOptions, BackendOptions()),
    ({"host": "10.0.0.1", "port": 80, "protocol": "udp", "method": "sh",
      "flags": "sh-port", "persistent": True},
     ServiceOptions, ServiceOptions("10.0.0.1", 80, "udp", "sh", "sh-port", True)),
    ({"port": 80, "persistent": True, "netmask": 24}, ServiceOptions,
     ServiceOptions(port=80, persistent=True, netmask=24)),
    ({"port": 80, "persistent": True, "netmask": "255.255.255.0"}, ServiceOptions,
     ServiceOptions(port=80, persistent=True, netmask="255.255.255.0")),
    ({"fwmark": 4294967295, "family": "ipv6"}, ServiceOptions,
     ServiceOptions(fwmark=4294967295, family="ipv6")),
    ({"port": 65535}, ServiceOptions, ServiceOptions(port=65535)),
    ({"port": 80, "future_field": 1}, ServiceOptions, ServiceOptions(port=80)),  # ignored
    ({"host": "10.1.0.1", "port": 80, "weight": -1,
      "pulse": {"type": "http", "interval": "5s", "args": {"expect": 200, "path": "/"}}},
     BackendOptions,
     BackendOptions(host="10.1.0.1", port=80, weight=-1,
                    pulse=PulseOptions("http", "5s", {"expect": 200, "path": "/"}))),
    ({"pulse": None}, BackendOptions, BackendOptions(pulse=None)),
    ({"pulse": {}}, BackendOptions, BackendOptions(pulse=PulseOptions())),
])
def test_decode(raw, cls, expected):
    assert decode(raw, cls) == expected


@pytest.mark.parametrize("raw, cls, reason", [
    ({"port": "80"}, ServiceOptions, "Expected `int`, got `str` - at `$.port`"),
    ({"port": 70000}, ServiceOptions, "Expected `int` <= 65535 - at `$.port`"),
    ({"port": -1}, ServiceOptions, "Expected `int` >= 0 - at `$.port`"),
    ({"port": True}, ServiceOptions, "Expected `int`, got `bool` - at `$.port`"),
    ({"port": 80.0}, ServiceOptions, "Expected `int`, got `float` - at `$.port`"),
    ({"persistent": "true"}, ServiceOptions, "Expected `bool`, got `str` - at `$.persistent`"),
    ({"protocol": None}, ServiceOptions, "Expected `str`, got `null` - at `$.protocol`"),
    ({"netmask": 24.0}, ServiceOptions,
     "Expected `int | str | null`, got `float` - at `$.netmask`"),
    ({"fwmark": -1}, ServiceOptions, "Expected `int` >= 0 - at `$.fwmark`"),
    ({"timeout": 2**32}, ServiceOptions, "Expected `int` <= 4294967295 - at `$.timeout`"),
    ({"host": 1}, BackendOptions, "Expected `str`, got `int` - at `$.host`"),
    ({"weight": "100"}, BackendOptions, "Expected `int`, got `str` - at `$.weight`"),
    ({"weight": 2**31}, BackendOptions, "Expected `int` <= 2147483647 - at `$.weight`"),
    ({"tunnel_port": 65536}, BackendOptions, "Expected `int` <= 65535 - at `$.tunnel_port`"),
    ({"pulse": "tcp"}, BackendOptions, "Expected `object | null`, got `str` - at `$.pulse`"),
    ({"pulse": {"interval": 60}}, BackendOptions,
     "Expected `str | null`, got `int` - at `$.pulse.interval`"),
    ({"pulse": {"args": [1]}}, BackendOptions,
     "Expected `object | null`, got `array` - at `$.pulse.args`"),
    ([("port", 80)], ServiceOptions, "expected a JSON object, got list"),
    ("port=80", BackendOptions, "expected a JSON object, got str"),
])
def test_decode_rejects_wrong_types(raw, cls, reason):
    _rejected(lambda: decode(raw, cls), reason)


@pytest.mark.parametrize("raw, cls, validate", [
    ({"host": "10.0.0.1", "port": 80, "protocol": "TCP", "method": ""}, ServiceOptions,
     validate_service),
    ({"host": "10.1.0.1", "port": 80, "method": "DR", "weight": 0,
      "pulse": {"type": "HTTP", "args": {"expect": "200"}}}, BackendOptions, validate_backend),
])
def test_decode_then_validate_is_idempotent(raw, cls, validate):
    once = validate(decode(raw, cls))
    assert validate(once) == once


def test_one_packet_scheduling_is_only_for_udp():
    assert validate_service(ServiceOptions(host="10.0.0.1", port=53, protocol="udp",
                                           flags="ops")).flags == "ops"
    _rejected(lambda: validate_service(ServiceOptions(host="10.0.0.1", port=80, flags="ops")))
