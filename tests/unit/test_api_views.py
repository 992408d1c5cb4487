"""The API's pure parts: GORB-style body decoding (case-insensitive keys, unknown keys ignored,
EOF, parser errors, typed values) and the GET response shapes built from the writer's views."""

from __future__ import annotations

import json
import socket

import msgspec
import pytest

from gorb.common import errors
from gorb.common.envelope import Envelope, encode
from gorb.common.errors import GorbError
from gorb.common.model import BackendOptions, PulseOptions, ServiceOptions
from gorb.common.validation import validate_backend
from gorb.services.api import views
from gorb.common.resolver import resolve_host

pytestmark = pytest.mark.timeout(10)


def _rejected(call, reason=None, contains=None) -> str:
    with pytest.raises(GorbError) as info:
        call()
    assert info.value.errno == errors.INVALID
    if reason is not None:
        assert info.value.reason == reason
    if contains is not None:
        assert contains in info.value.reason, info.value.reason
    return info.value.reason


def j(value) -> bytes:
    return json.dumps(value).encode()


# --- parsing ------------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [b"", b" ", b"\n\t \r\n"])
def test_an_empty_body_is_eof_like_go(raw):
    for decode in (views.decode_service, views.decode_backend, views.decode_service_patch,
                   views.decode_weight):
        _rejected(lambda: decode(raw), "EOF")


@pytest.mark.parametrize("raw, contains", [
    (b"{bad", "Expecting property name"),
    (b'{"port": 80', "Expecting"),
    (b"xyz", "Expecting value"),
    (b'{"port": 80} {"port": 81}', "Extra data"),   # Go ignored the rest; refused here
    (b'{"port": NaN}', "NaN is not JSON"),
    (b'{"port": Infinity}', "Infinity is not JSON"),
    (b'{"host": "\xff"}', "utf-8"),
    (b"[" * 100000 + b"]" * 100000, "nested deeper than"),
    (b'{"pulse": {"args": {"x": ' + b"[" * 70 + b"]" * 70 + b"}}}", "nested deeper than"),
    (b'{"pulse": {"args": {"x": 201579625529164103680}}}', "out of range"),
])
def test_bad_json_is_a_400_with_the_parsers_text(raw, contains):
    _rejected(lambda: views.decode_service(raw), contains=contains)


def test_what_the_bus_cannot_carry_is_made_carryable_or_refused():
    """Lone surrogates become U+FFFD (as in Go); the result always encodes as msgpack."""
    opts = views.decode_backend(b'{"host": "a\\ud800b", "pulse": {"args": {"\\udc00": '
                                b'"\\ud83d\\ude00", "n": 18446744073709551615}}}')
    assert opts.host == "a\ufffdb"
    assert opts.pulse.args == {"\ufffd": "\U0001f600", "n": 2**64 - 1}
    encode(Envelope.new("backend.create", {"options": msgspec.to_builtins(opts)}, "t"))
    patch = views.decode_service_patch(b'{"flags": "\\udfff", "pulse": {"args": {"a": [[[1]]]}}}')
    encode(Envelope.new("service.update", {"options": patch}, "t"))


@pytest.mark.parametrize("raw, kind", [(b"[1]", "array"), (b'"x"', "string"), (b"80", "number"),
                                       (b"true", "boolean")])
def test_a_body_that_is_not_an_object_is_a_400(raw, kind):
    assert _rejected(lambda: views.decode_service(raw)) == \
        f"json: cannot unmarshal {kind} into ServiceOptions"
    _rejected(lambda: views.decode_weight(raw), contains=kind)


# --- Go's key matching --------------------------------------------------------------------------

def test_keys_match_case_insensitively_and_unknown_keys_are_ignored():
    opts = views.decode_service(j({"HOST": "10.0.0.1", "Port": 80, "pRoToCoL": "udp",
                                   "Method": "rr", "bogus": [1, 2], "vsid": "x"}))
    assert opts == ServiceOptions(host="10.0.0.1", port=80, protocol="udp", method="rr")


def test_the_later_spelling_of_a_key_wins():
    assert views.decode_service(b'{"port": 80, "PORT": 81}').port == 81
    assert views.decode_service(b'{"PORT": 81, "port": 80}').port == 80
    # an exact duplicate after another spelling still counts as the later one
    assert views.decode_service(b'{"port": 1, "Port": 2, "port": 3}').port == 3


def test_null_leaves_a_field_at_its_default_and_a_null_body_is_all_defaults():
    assert views.decode_service(b'{"port": 80, "protocol": null, "host": null}') == \
        ServiceOptions(port=80)
    assert views.decode_service(b"null") == ServiceOptions()
    assert views.decode_backend(b"null") == BackendOptions()


def test_an_empty_protocol_means_tcp_as_in_gorb():
    assert views.decode_service(b'{"port": 80, "protocol": ""}').protocol == "tcp"
    assert views.decode_service_patch(b'{"protocol": ""}') == {"protocol": "tcp"}


def test_nested_pulse_keys_fold_but_args_keep_their_keys():
    opts = views.decode_backend(j({"Host": "10.1.0.1", "PORT": 8080, "PULSE": {
        "TYPE": "http", "Interval": "5s", "ARGS": {"Path": "/hc", "expect": "204"}}}))
    assert opts.pulse == PulseOptions(type="http", interval="5s",
                                      args={"Path": "/hc", "expect": "204"})


@pytest.mark.parametrize("raw, where", [
    (b'{"port": "80"}', "$.port"),
    (b'{"port": 70000}', "$.port"),
    (b'{"port": -1}', "$.port"),
    (b'{"port": 80.5}', "$.port"),
    (b'{"port": 1e100}', "$.port"),
    (b'{"port": true}', "$.port"),
    (b'{"port": 80, "persistent": "yes"}', "$.persistent"),
    (b'{"port": 80, "host": 10}', "$.host"),
])
def test_wrong_types_are_a_400_naming_the_field(raw, where):
    _rejected(lambda: views.decode_service(raw), contains=where)


def test_an_integral_number_counts_as_an_integer_as_in_json_schema():
    opts = views.decode_service(b'{"port": 80.0, "fwmark": 0.0, "fail_open": 1.0, '
                                b'"pulse": {"rise": 2.0, "jitter": 1.0}}')
    assert (opts.port, opts.fwmark, opts.pulse.rise) == (80, 0, 2)
    assert type(opts.port) is int and type(opts.pulse.rise) is int
    assert type(opts.fail_open) is float and type(opts.pulse.jitter) is float


def test_a_wrong_type_inside_pulse_is_a_400():
    _rejected(lambda: views.decode_backend(b'{"pulse": {"type": 5}}'), contains="$.pulse.type")
    _rejected(lambda: views.decode_backend(b'{"pulse": []}'), contains="$.pulse")


@pytest.mark.parametrize("args, want", [
    ({"expect": 200}, 200),        # GORB dropped the connection on this one (§2.5)
    ({"expect": "200"}, 200),
    ({"port": 54321}, 54321),
    ({"port": "54321"}, 54321),
])
def test_pulse_int_args_take_numbers_or_digit_strings(args, want):
    opts = views.decode_backend(j({"host": "10.1.0.1", "port": 1, "pulse": {"args": args}}))
    (key,) = args
    assert validate_backend(opts).pulse.args[key] == want


@pytest.mark.parametrize("args", [{"expect": True}, {"port": "80a"}, {"port": [1]},
                                  {"path": 5}])
def test_bad_pulse_args_are_a_400_not_a_dropped_connection(args):
    opts = views.decode_backend(j({"host": "10.1.0.1", "port": 1, "pulse": {"args": args}}))
    _rejected(lambda: validate_backend(opts))


# --- PATCH bodies -------------------------------------------------------------------------------

def test_a_service_patch_keeps_only_the_named_options_typed():
    assert views.decode_service_patch(j({"METHOD": "rr", "Flags": "sh-port", "x": 1})) == \
        {"method": "rr", "flags": "sh-port"}
    assert views.decode_service_patch(b"{}") == {}
    _rejected(lambda: views.decode_service_patch(b'{"port": "80"}'), contains="$.port")
    _rejected(lambda: views.decode_service_patch(b"null"), contains="null")


@pytest.mark.parametrize("raw, want", [
    (b'{"weight": 5}', 5),
    (b'{"WEIGHT": 0}', 0),
    (b'{"weight": 10.0}', 10),
    (b'{"weight": 7, "host": 5, "port": "x"}', 7),  # the rest is ignored, as GORB used only weight
    (b'{"Weight": 1, "weight": 2}', 2),
])
def test_a_weight_patch_reads_the_weight(raw, want):
    assert views.decode_weight(raw) == want


@pytest.mark.parametrize("raw", [b"{}", b'{"weight": null}', b"null", b'{"host": "x"}'])
def test_a_weight_patch_without_a_weight_is_a_400_not_a_drain(raw):
    _rejected(lambda: views.decode_weight(raw), "weight is required")


@pytest.mark.parametrize("raw", [b'{"weight": "5"}', b'{"weight": 10.5}', b'{"weight": -1}',
                                 b'{"weight": true}', b'{"weight": 2147483648}'])
def test_a_weight_that_is_not_a_weight_is_a_400(raw):
    _rejected(lambda: views.decode_weight(raw), contains="weight")


# --- response shapes ------------------------------------------------------------------------------

NOW = 1_700_000_000.0


def _bview(rs="a", weight=100, kernel_weight=None, stats=None, health=None, check=None,
           host="10.1.0.1", want=None, pulse=None):
    """A writer BackendView (services/ipvs_writer/engine.py backend_view)."""
    return {"service": "web", "backend": rs, "address": host,
            "options": {"host": host, "port": 8080, "method": "nat", "weight": weight,
                        "pulse": None},
            "pulse": pulse, "weight": weight if want is None else want,
            "health": health or {"status": "unknown", "since": 0.0, "level": 1.0, "passes": 0,
                                 "up_at": 0.0, "held_in": False},
            "check": check,
            "kernel": None if kernel_weight is None else
            {"weight": kernel_weight, "fwd": 0, "stats": stats}}


def _sview(backends=(), kernel=None):
    return {"service": "web", "address": "10.0.0.1",
            "options": {"host": "", "port": 80, "protocol": "tcp", "method": "wrr"},
            "backends": {b["backend"]: b for b in backends}, "kernel": kernel}


def _check(ok=True, health=1.0, at=NOW - 3, error="", latency=0.002, status="up"):
    return {"key": "tcp|10.1.0.1|8080", "ok": ok, "status": status, "at": at, "latency": latency,
            "error": error, "checks": 10, "passes": 3, "failures": 0, "health": health}


UNCHECKED = {"status": 0, "status_name": "unknown", "health": 1.0, "uptime": 0,
             "last_check": None, "last_result": None, "checks": 0, "consecutive_passes": 0,
             "consecutive_failures": 0, "held_in": False}


def test_a_backend_not_checked_yet_reports_gorbs_initial_pulse_metrics():
    """GORB's fresh pulse: Up, health 1, uptime 0 (its API showed health 0 there: §8.6)."""
    assert views.backend_metrics(_bview(), NOW) == UNCHECKED
    old_writer = _bview()
    del old_writer["health"], old_writer["check"]  # a writer view without pulse fields
    assert views.backend_metrics(old_writer, NOW) == UNCHECKED


def test_an_up_backend_reports_its_uptime_in_seconds_and_the_last_check():
    m = views.backend_metrics(_bview(health={"status": "up", "since": NOW - 90.7},
                                     check=_check(health=0.75)), NOW)
    assert m == {"status": 0, "status_name": "up", "health": 0.75, "uptime": 90,
                 "last_check": NOW - 3,
                 "last_result": {"ok": True, "error": "", "latency": 0.002},
                 "checks": 10, "consecutive_passes": 3, "consecutive_failures": 0,
                 "held_in": False}


def test_a_backend_held_in_by_fail_open_says_so():
    m = views.backend_metrics(_bview(health={"status": "down", "since": NOW - 5,
                                             "held_in": True},
                                     check=_check(ok=False, status="down")), NOW)
    assert (m["status_name"], m["held_in"], m["consecutive_failures"]) == ("down", True, 0)


def test_a_down_backend_is_status_1_with_no_uptime():
    m = views.backend_metrics(_bview(health={"status": "down", "since": NOW - 50},
                                     check=_check(ok=False, health=0.2, error="refused")), NOW)
    assert (m["status"], m["status_name"], m["health"], m["uptime"]) == (1, "down", 0.2, 0)
    assert m["last_result"] == {"ok": False, "error": "refused", "latency": 0.002}
    # after a writer restart the last check is gone, the verdict is not
    m = views.backend_metrics(_bview(health={"status": "down", "since": NOW - 50}), NOW)
    assert (m["status"], m["health"], m["last_check"]) == (1, 0.0, None)


def test_an_unexpected_status_reads_as_unknown():
    m = views.backend_metrics(_bview(health={"status": "weird", "since": NOW}), NOW)
    assert (m["status"], m["status_name"]) == (0, "unknown")


def test_backend_info_shows_the_kernels_current_weight_and_stats():
    stats = {"conns": 3, "activeconns": 1, "inactconns": 2}
    info = views.backend_info(_bview(weight=100, kernel_weight=0, stats=stats), NOW)
    assert info["options"]["weight"] == 0
    assert info["options"]["host"] == "10.1.0.1"
    assert info["stats"] == stats
    assert info["address"] == "10.1.0.1"
    assert set(info) == {"options", "metrics", "address", "stats"}


def test_backend_info_without_a_kernel_entry_shows_the_weight_the_writer_wants():
    assert views.backend_info(_bview(weight=30, want=15), NOW)["options"]["weight"] == 15
    view = _bview(weight=30)
    del view["weight"]
    info = views.backend_info(view, NOW)
    assert (info["options"]["weight"], info["stats"]) == (30, None)


def test_backend_info_shows_the_pulse_in_effect_as_gorb_did():
    pulse = {"type": "tcp", "interval": "1m", "args": None}
    assert views.backend_info(_bview(pulse=pulse), NOW)["options"]["pulse"] == pulse


def test_service_info_has_gorbs_shape_with_sorted_backends():
    info = views.service_info(_sview([_bview("b"), _bview("a")],
                                     kernel={"scheduler": "wrr", "stats": {"conns": 9}}), NOW)
    assert info == {"options": {"host": "", "port": 80, "protocol": "tcp", "method": "wrr"},
                    "health": 1.0, "backends": ["a", "b"], "address": "10.0.0.1",
                    "stats": {"conns": 9}}


def test_a_service_without_backends_is_healthy_and_lists_an_empty_array():
    info = views.service_info(_sview(), NOW)
    assert (info["health"], info["backends"], info["stats"]) == (1.0, [], None)


def test_service_health_is_the_mean_of_its_backends():
    backends = [_bview("a", health={"status": "up", "since": NOW}, check=_check(health=1.0)),
                _bview("b", health={"status": "down", "since": NOW}, check=_check(health=0.0)),
                _bview("c", health={"status": "up", "since": NOW}, check=_check(health=0.5)),
                _bview("d")]  # not checked yet: healthy (GORB's initial pulse metrics)
    assert views.service_info(_sview(backends), NOW)["health"] == pytest.approx(2.5 / 4)


def test_encode_is_gorbs_tab_indented_json_without_a_trailing_newline():
    assert views.encode({"error": "x"}) == b'{\n\t"error": "x"\n}'
    assert views.encode([]) == b"[]"


# --- host names ---------------------------------------------------------------------------------

def _gai(table):
    def getaddrinfo(host, port, family, kind):
        if host not in table:
            raise socket.gaierror(table.get("*", socket.EAI_NONAME), "Name or service not known")
        return [(fam, kind, 6, "", (addr, 0)) for fam, addr in table[host]]
    return getaddrinfo


def test_a_name_resolves_to_its_first_address_ipv4_first():
    gai = _gai({"v6first": [(socket.AF_INET6, "2001:db8::1"), (socket.AF_INET, "10.0.0.7"),
                            (socket.AF_INET, "10.0.0.8")],
                "v6only": [(socket.AF_INET6, "2001:DB8::0002")]})
    assert resolve_host("v6first", getaddrinfo=gai) == "10.0.0.7"
    assert resolve_host("v6only", getaddrinfo=gai) == "2001:db8::2"


def test_an_ip_literal_is_not_looked_up():
    def boom(*_):
        raise AssertionError("looked up")
    assert resolve_host("2001:DB8::1", getaddrinfo=boom) == "2001:db8::1"
    assert resolve_host("10.0.0.1", getaddrinfo=boom) == "10.0.0.1"


def test_an_unknown_name_is_gos_no_such_host():
    _rejected(lambda: resolve_host("nosuch", getaddrinfo=_gai({})), "lookup nosuch: no such host")


def test_other_resolver_failures_say_what_happened():
    gai = _gai({"*": socket.EAI_AGAIN})
    assert _rejected(lambda: resolve_host("flaky", getaddrinfo=gai)).startswith("lookup flaky: ")
