"""``GET /metrics``: GORB's Prometheus metrics and IPVS traffic counters, fresh from the writer.

The API holds no state, so ``WriterCollector`` asks the writer for ``state.dump`` with
``{"stats": true}`` (the desired state and one kernel dump) on every scrape; ``families`` turns that
reply into metric families and is pure. Nothing is cached, so a deleted service's series disappear
with it (GORB K exported them forever: gorb-spec §6).

GORB's gauges keep their names and K's label names (gorb-spec §6):

    gorb_service_health, gorb_service_backends             {name, host, port, protocol}
    gorb_service_backend_health, _status, _weight,
    gorb_service_backend_uptime_seconds                    {service_name, name, host, port}

``host`` is the host as configured (empty when the device's address is used), as in GORB. FIX
(§4.3, §8.5): ``gorb_service_backend_uptime_seconds`` is in seconds, not 1e-9 of them.

Added: ``gorb_up`` (1 when the writer answered this scrape; when it did not, the scrape still
succeeds with ``gorb_up 0`` and no gorb series), and the kernel's counters per service
(``gorb_ipvs_service_{connections,packets_in,packets_out,bytes_in,bytes_out}_total``, GORB's
service labels) and per backend (``gorb_ipvs_backend_…_total`` plus the
``gorb_ipvs_backend_{active,inactive,persistent}_connections`` gauges, GORB's backend labels).
Counters are emitted only for entries the kernel reported.

The API's own requests (``RequestMetrics``, kept in the process: the one thing /metrics does not
ask the writer), labelled by the route's pattern, never the raw path, so ids do not make series:

    gorb_api_requests_total{method, route, code}            e.g. route="/service/<vs>/<rs>"
    gorb_api_request_duration_seconds{method, route}        histogram, from the first byte read
                                                            to the last byte handed to gevent
Requests that match no route have ``route=""``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from gorb.services.api import views
from gorb.services.api.writer_client import WriterUnavailable

log = logging.getLogger(__name__)

SERVICE_LABELS = ["name", "host", "port", "protocol"]
BACKEND_LABELS = ["service_name", "name", "host", "port"]

# kernel stats key -> metric suffix, help
COUNTERS = [
    ("conns", "connections", "Connections scheduled"),
    ("inpkts", "packets_in", "Incoming packets"),
    ("outpkts", "packets_out", "Outgoing packets"),
    ("inbytes", "bytes_in", "Incoming bytes"),
    ("outbytes", "bytes_out", "Outgoing bytes"),
]
DEST_GAUGES = [
    ("activeconns", "active_connections", "Active connections of a backend"),
    ("inactconns", "inactive_connections", "Inactive connections of a backend"),
    ("persistconns", "persistent_connections", "Persistent connection templates of a backend"),
]


def _service_labels(vsid: str, view: Mapping[str, Any]) -> list[str]:
    opts = view["options"]
    return [vsid, opts.get("host", ""), str(opts.get("port", 0)), opts.get("protocol", "")]


def _backend_labels(vsid: str, rsid: str, view: Mapping[str, Any]) -> list[str]:
    opts = view["options"]
    return [vsid, rsid, opts.get("host", ""), str(opts.get("port", 0))]


def families(services: Mapping[str, Mapping[str, Any]] | None, now: float) -> list[Metric]:
    """Metric families for a ``state.dump`` reply's ``services`` (None: the writer did not answer);
    ``now`` is the wall clock, for uptimes."""
    up = GaugeMetricFamily("gorb_up", "1 if the API reached ipvs-writer for this scrape, else 0")
    up.add_metric([], 0 if services is None else 1)
    if services is None:
        return [up]
    s_health = GaugeMetricFamily("gorb_service_health", "Health of the load balancer service",
                                 labels=SERVICE_LABELS)
    s_backends = GaugeMetricFamily("gorb_service_backends",
                                   "Number of backends in the load balancer service",
                                   labels=SERVICE_LABELS)
    b_uptime = GaugeMetricFamily("gorb_service_backend_uptime_seconds",
                                 "Uptime in seconds of a backend service", labels=BACKEND_LABELS)
    b_health = GaugeMetricFamily("gorb_service_backend_health", "Health of a backend service",
                                 labels=BACKEND_LABELS)
    b_status = GaugeMetricFamily("gorb_service_backend_status",
                                 "Status of a backend service (0 up, 1 down)",
                                 labels=BACKEND_LABELS)
    b_weight = GaugeMetricFamily("gorb_service_backend_weight", "Weight of a backend service",
                                 labels=BACKEND_LABELS)
    b_held = GaugeMetricFamily("gorb_service_backend_held_in",
                               "1 when fail-open keeps a down backend in its service",
                               labels=BACKEND_LABELS)
    s_held = GaugeMetricFamily("gorb_service_fail_open_held",
                               "Down backends that fail-open keeps in the service",
                               labels=SERVICE_LABELS)
    b_ok = GaugeMetricFamily("gorb_service_backend_check_ok",
                             "1 if the last health check passed, 0 if it failed",
                             labels=BACKEND_LABELS)
    b_latency = GaugeMetricFamily("gorb_service_backend_check_latency_seconds",
                                  "Duration of the last health check", labels=BACKEND_LABELS)
    b_last = GaugeMetricFamily("gorb_service_backend_last_check_timestamp_seconds",
                               "When the last health check ended (Unix time)",
                               labels=BACKEND_LABELS)
    b_passes = GaugeMetricFamily("gorb_service_backend_consecutive_passes",
                                 "Health checks passed in a row", labels=BACKEND_LABELS)
    b_failures = GaugeMetricFamily("gorb_service_backend_consecutive_failures",
                                   "Health checks failed in a row", labels=BACKEND_LABELS)
    s_counters = {key: CounterMetricFamily(f"gorb_ipvs_service_{suffix}",
                                           f"{text} by the IPVS service", labels=SERVICE_LABELS)
                  for key, suffix, text in COUNTERS}
    b_counters = {key: CounterMetricFamily(f"gorb_ipvs_backend_{suffix}",
                                           f"{text} by the IPVS backend", labels=BACKEND_LABELS)
                  for key, suffix, text in COUNTERS}
    b_gauges = {key: GaugeMetricFamily(f"gorb_ipvs_backend_{suffix}", text, labels=BACKEND_LABELS)
                for key, suffix, text in DEST_GAUGES}
    for vsid in sorted(services):
        view = services[vsid]
        labels = _service_labels(vsid, view)
        backends = view.get("backends") or {}
        s_health.add_metric(labels, views.service_health(backends, now))
        s_backends.add_metric(labels, len(backends))
        s_held.add_metric(labels, sum(1 for b in backends.values()
                                      if (b.get("health") or {}).get("held_in")))
        stats = (view.get("kernel") or {}).get("stats") or {}
        for key, family in s_counters.items():
            if key in stats:
                family.add_metric(labels, stats[key])
        for rsid in sorted(backends):
            bview = backends[rsid]
            blabels = _backend_labels(vsid, rsid, bview)
            m = views.backend_metrics(bview, now)
            b_uptime.add_metric(blabels, m["uptime"])
            b_health.add_metric(blabels, m["health"])
            b_status.add_metric(blabels, m["status"])
            b_weight.add_metric(blabels, views.current_weight(bview))
            b_held.add_metric(blabels, 1 if m["held_in"] else 0)
            b_passes.add_metric(blabels, m["consecutive_passes"])
            b_failures.add_metric(blabels, m["consecutive_failures"])
            if m["last_result"] is not None:
                b_ok.add_metric(blabels, 1 if m["last_result"]["ok"] else 0)
                b_latency.add_metric(blabels, m["last_result"]["latency"] or 0.0)
                b_last.add_metric(blabels, m["last_check"] or 0.0)
            bstats = (bview.get("kernel") or {}).get("stats") or {}
            for key, family in b_counters.items():
                if key in bstats:
                    family.add_metric(blabels, bstats[key])
            for key, family in b_gauges.items():
                if key in bstats:
                    family.add_metric(blabels, bstats[key])
    return [up, s_health, s_backends, s_held, b_uptime, b_health, b_status, b_weight, b_held,
            b_ok, b_latency, b_last, b_passes, b_failures,
            *s_counters.values(), *b_counters.values(), *b_gauges.values()]


class WriterCollector(Collector):
    """A prometheus_client collector that asks the writer on every ``collect`` (every scrape)."""

    def __init__(self, client) -> None:
        self.client = client

    def collect(self) -> Iterable[Metric]:
        try:
            reply = self.client.request("state.dump", {"stats": True})
        except WriterUnavailable as exc:
            log.warning("metrics: %s", exc)
            return families(None, time.time())
        if not reply.get("ok"):
            log.error("metrics: the writer refused state.dump: %s", reply.get("reason"))
            return families(None, time.time())
        return families(reply["data"]["services"], time.time())


# Seconds: a request is one bus round trip to the writer (about a millisecond), up to the
# writer's timeout (5 s by default) when it does not answer.
DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                    5.0, 10.0)


class RequestMetrics:
    """The API's request counter and latency histogram, in ``registry``."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("gorb_api_requests", "HTTP requests served by the API",
                                ["method", "route", "code"], registry=registry)
        self.duration = Histogram("gorb_api_request_duration_seconds",
                                  "Time to serve an HTTP request", ["method", "route"],
                                  buckets=DURATION_BUCKETS, registry=registry)

    def observe(self, method: str, route: str, code: str, seconds: float) -> None:
        self.requests.labels(method, route, code).inc()
        self.duration.labels(method, route).observe(seconds)
