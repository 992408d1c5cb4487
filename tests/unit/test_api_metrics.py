"""``gorb.services.api.metrics.families``: GORB's metric names and labels, seconds for uptime, IPVS
counters, and ``gorb_up`` from a writer ``state.dump`` reply (pure: no writer, no registry)."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gorb.services.api.metrics import WriterMetrics, families
from gorb.services.api.writer_client import WriterUnavailable

pytestmark = pytest.mark.timeout(10)


NOW = 1_700_000_000.0


def _backend(rs, host, weight, kernel_weight=None, stats=None, health=None, check=None):
    return {"service": "web", "backend": rs, "address": host,
            "options": {"host": host, "port": 8080, "method": "nat", "weight": weight},
            "weight": weight, "health": health or {"status": "unknown", "since": 0.0},
            "check": check,
            "kernel": None if kernel_weight is None else
            {"weight": kernel_weight, "fwd": 0, "stats": stats}}


DUMP = {
    "web": {"service": "web", "address": "10.0.0.100",
            "options": {"host": "", "port": 80, "protocol": "tcp"},
            "kernel": {"scheduler": "wrr", "stats": {"conns": 10, "inpkts": 20, "outpkts": 30,
                                                     "inbytes": 40, "outbytes": 50, "cps": 1}},
            "backends": {
                "a": _backend("a", "10.1.0.1", 100, kernel_weight=40,
                              stats={"conns": 4, "inpkts": 5, "outpkts": 6, "inbytes": 7,
                                     "outbytes": 8, "activeconns": 2, "inactconns": 1,
                                     "persistconns": 0}),
                "b": _backend("b", "10.1.0.2", 50, health={"status": "down", "since": NOW - 5},
                              check={"at": NOW - 1, "ok": False, "health": 0.0}),
            }},
    "dns": {"service": "dns", "address": "10.0.0.53",
            "options": {"host": "10.0.0.53", "port": 53, "protocol": "udp"},
            "kernel": None, "backends": {}},
}


def scrape(services):
    reg = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self):
            return families(services, NOW)

    reg.register(Fixed())
    text = generate_latest(reg).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def svc_labels(name, host, port, protocol):
    return tuple(sorted({"name": name, "host": host, "port": port, "protocol": protocol}.items()))


def be_labels(service, name, host, port):
    return tuple(sorted({"service_name": service, "name": name, "host": host,
                         "port": port}.items()))


def test_gorbs_service_gauges_with_ks_labels():
    _, s = scrape(DUMP)
    web, dns = svc_labels("web", "", "80", "tcp"), svc_labels("dns", "10.0.0.53", "53", "udp")
    assert s[("gorb_up", ())] == 1
    assert s[("gorb_service_backends", web)] == 2
    assert s[("gorb_service_backends", dns)] == 0
    assert s[("gorb_service_health", web)] == 0.5   # a up (initial metrics), b down
    assert s[("gorb_service_health", dns)] == 1     # no backends: healthy (GORB K)


def test_gorbs_backend_gauges_use_the_current_weight_and_real_seconds():
    health = {"status": "up", "since": NOW - 3600}
    dump = {"web": {**DUMP["web"], "backends": {
        "a": _backend("a", "10.1.0.1", 100, kernel_weight=40, health=health,
                      check={"at": NOW - 1, "ok": True, "health": 1.0})}}}
    _, s = scrape(dump)
    a = be_labels("web", "a", "10.1.0.1", "8080")
    assert s[("gorb_service_backend_uptime_seconds", a)] == 3600  # GORB showed 3.6e-06
    assert s[("gorb_service_backend_weight", a)] == 40
    assert s[("gorb_service_backend_status", a)] == 0
    assert s[("gorb_service_backend_health", a)] == 1


def test_a_down_backend_and_the_configured_weight_without_a_kernel_entry():
    _, s = scrape(DUMP)
    b = be_labels("web", "b", "10.1.0.2", "8080")
    assert s[("gorb_service_backend_status", b)] == 1
    assert s[("gorb_service_backend_health", b)] == 0
    assert s[("gorb_service_backend_weight", b)] == 50


def test_ipvs_counters_per_service_and_backend():
    _, s = scrape(DUMP)
    web = svc_labels("web", "", "80", "tcp")
    a = be_labels("web", "a", "10.1.0.1", "8080")
    assert s[("gorb_ipvs_service_connections_total", web)] == 10
    assert s[("gorb_ipvs_service_packets_in_total", web)] == 20
    assert s[("gorb_ipvs_service_packets_out_total", web)] == 30
    assert s[("gorb_ipvs_service_bytes_in_total", web)] == 40
    assert s[("gorb_ipvs_service_bytes_out_total", web)] == 50
    assert s[("gorb_ipvs_backend_connections_total", a)] == 4
    assert s[("gorb_ipvs_backend_packets_in_total", a)] == 5
    assert s[("gorb_ipvs_backend_packets_out_total", a)] == 6
    assert s[("gorb_ipvs_backend_bytes_in_total", a)] == 7
    assert s[("gorb_ipvs_backend_bytes_out_total", a)] == 8
    assert s[("gorb_ipvs_backend_active_connections", a)] == 2
    assert s[("gorb_ipvs_backend_inactive_connections", a)] == 1
    assert s[("gorb_ipvs_backend_persistent_connections", a)] == 0
    # no kernel entry, no counters (rather than made-up zeros)
    dns = svc_labels("dns", "10.0.0.53", "53", "udp")
    assert ("gorb_ipvs_service_connections_total", dns) not in s
    assert ("gorb_ipvs_backend_connections_total",
            be_labels("web", "b", "10.1.0.2", "8080")) not in s


def test_a_writer_that_did_not_answer_is_gorb_up_0_and_nothing_else():
    text, s = scrape(None)
    assert s == {("gorb_up", ()): 0}
    assert "gorb_service" not in text


def test_deleted_services_leave_no_series_behind():
    _, before = scrape(DUMP)
    _, after = scrape({"dns": DUMP["dns"]})
    assert any(labels and dict(labels).get("name") == "web" for _, labels in before)
    assert not any(dict(labels).get("name") == "web" or dict(labels).get("service_name") == "web"
                   for _, labels in after)


class _Client:
    def __init__(self, reply=None, error=None):
        self.reply, self.error, self.asked = reply, error, []

    def request(self, type_, body):
        self.asked.append((type_, body))
        if self.error:
            raise self.error
        return self.reply


ROWS = {"schema": 1, "generation": 7,
        "labels": {"services": [["dns", "10.0.0.53", "53", "udp"]], "sizes": [0], "backends": []},
        "service_stats": {k: [None] for k in ("conns", "inpkts", "outpkts", "inbytes",
                                              "outbytes")},
        "backends": {"weight": [], "kernel_weight": [], "status": [], "since": [],
                     "held_in": [], "check_at": [], "check_ok": [], "check_latency": [],
                     "check_health": [], "check_passes": [], "check_failures": [],
                     "stats": {}}}


def test_the_writer_part_asks_for_rows_on_every_render_naming_the_labels_it_holds():
    client = _Client({"ok": True, "errno": "ok", "reason": "", "data": ROWS})
    metrics = WriterMetrics(client)
    first = b"".join(metrics.chunks(NOW)).decode()
    client.reply = {**client.reply, "data": {**ROWS, "labels": None}}  # the writer leaves
    second = b"".join(metrics.chunks(NOW)).decode()                               # them out: kept
    assert client.asked == [("metrics.rows", {"generation": -1}),
                            ("metrics.rows", {"generation": 7})]
    assert first == second and 'gorb_service_backends{host="10.0.0.53",name="dns"' in first


def test_labels_of_an_unknown_generation_are_asked_for_again():
    client = _Client({"ok": True, "errno": "ok", "reason": "", "data": {**ROWS, "labels": None}})
    [up] = list(WriterMetrics(client).chunks(NOW))  # never sent labels: a writer bug
    assert client.asked == [("metrics.rows", {"generation": -1})] * 2
    assert up.endswith(b"gorb_up 0.0\n")


@pytest.mark.parametrize("client", [
    _Client(error=WriterUnavailable("no answer")),
    _Client({"ok": False, "errno": "internal", "reason": "boom", "data": None}),
])
def test_the_collector_reports_gorb_up_0_when_the_writer_fails(client):
    [up] = list(WriterMetrics(client).chunks(NOW))
    assert up.splitlines()[-1] == b"gorb_up 0.0"


def test_pulse_details_and_fail_open_in_metrics():
    dump = {"web": {**DUMP["web"], "backends": {
        "a": _backend("a", "10.1.0.1", 100, health={"status": "down", "since": NOW - 9,
                                                  "held_in": True},
                      check={"at": NOW - 2, "ok": False, "health": 0.0, "latency": 0.25,
                             "passes": 0, "failures": 4}),
        "b": _backend("b", "10.1.0.2", 100)}}}
    _, s = scrape(dump)
    a, b = be_labels("web", "a", "10.1.0.1", "8080"), be_labels("web", "b", "10.1.0.2", "8080")
    assert s[("gorb_service_backend_held_in", a)] == 1
    assert s[("gorb_service_backend_held_in", b)] == 0
    assert s[("gorb_service_fail_open_held", svc_labels("web", "", "80", "tcp"))] == 1
    assert s[("gorb_service_backend_check_ok", a)] == 0
    assert s[("gorb_service_backend_check_latency_seconds", a)] == 0.25
    assert s[("gorb_service_backend_last_check_timestamp_seconds", a)] == NOW - 2
    assert s[("gorb_service_backend_consecutive_failures", a)] == 4
    assert s[("gorb_service_backend_consecutive_passes", a)] == 0
    assert ("gorb_service_backend_check_ok", b) not in s  # never checked: no sample
