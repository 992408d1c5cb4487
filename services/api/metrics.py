"""``GET /metrics``: GORB's Prometheus metrics and IPVS traffic counters, from the writer.

The API holds no state of its own but this cache. ``WriterMetrics`` asks the writer for
``metrics.rows`` (columns; the label strings only when they changed) and writes the text with
``exposition`` (label prefixes kept across scrapes while the set of services and backends is
unchanged). ``Scrapes`` keeps the whole body (writer part, then the process's own collectors and
request metrics) and renders it in a greenlet of its own that yields between families, so a
scrape of 10,000 backends never holds the process for the length of a render and scrapes that
arrive together share one render.

Staleness: a body is served for ``ttl`` seconds after its render began (``writer.stats_interval``,
default 1 s: the writer's statistics snapshot is refreshed at that pace and cannot be fresher);
from ``ttl`` minus twice the last render's duration a scrape that finds it still fresh starts the
next render in the background. So what a scrape shows is at most ``ttl`` plus one render older
than the writer's state. A change made through this API that adds or removes series (PUT and
DELETE of a service or backend, a store sync) drops the body: the next scrape waits for a
render begun after it, so it never shows a deleted object. A PATCH does not: PATCHes come in
runs, and each one re-rendering for every scraper was what starved them. Nothing else is kept, so a
deleted service's series disappear with it (GORB K exported them forever: gorb-spec §6).

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

``families`` is the same from a ``state.dump`` reply as prometheus_client families: the
reference the fast path is checked against (tests/unit/test_api_exposition.py).

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
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import gevent
import msgspec
from gevent.event import AsyncResult
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import CollectorRegistry

from gorb.common.messages import MetricRows
from gorb.services.api import exposition
from gorb.services.api.exposition import BACKEND_LABELS, COUNTERS, DEST_GAUGES, SERVICE_LABELS
from gorb.services.api import views
from gorb.services.api.writer_client import WriterUnavailable

log = logging.getLogger(__name__)

def _service_labels(vsid: str, view: Mapping[str, Any]) -> list[str]:
    opts = view["options"]
    return [vsid, opts.get("host", ""), str(opts.get("port", 0)), opts.get("protocol", "")]


def _backend_labels(vsid: str, rsid: str, view: Mapping[str, Any]) -> list[str]:
    opts = view["options"]
    return [vsid, rsid, opts.get("host", ""), str(opts.get("port", 0))]


# the reference renderer's families, in output order: (key, kind, name, help, labels)
_FAMILIES = (
    ("s_health", "gauge", "gorb_service_health", "Health of the load balancer service", "s"),
    ("s_backends", "gauge", "gorb_service_backends",
     "Number of backends in the load balancer service", "s"),
    ("s_held", "gauge", "gorb_service_fail_open_held",
     "Down backends that fail-open keeps in the service", "s"),
    ("b_uptime", "gauge", "gorb_service_backend_uptime_seconds",
     "Uptime in seconds of a backend service", "b"),
    ("b_health", "gauge", "gorb_service_backend_health", "Health of a backend service", "b"),
    ("b_status", "gauge", "gorb_service_backend_status",
     "Status of a backend service (0 up, 1 down)", "b"),
    ("b_weight", "gauge", "gorb_service_backend_weight", "Weight of a backend service", "b"),
    ("b_held", "gauge", "gorb_service_backend_held_in",
     "1 when fail-open keeps a down backend in its service", "b"),
    ("b_ok", "gauge", "gorb_service_backend_check_ok",
     "1 if the last health check passed, 0 if it failed", "b"),
    ("b_latency", "gauge", "gorb_service_backend_check_latency_seconds",
     "Duration of the last health check", "b"),
    ("b_last", "gauge", "gorb_service_backend_last_check_timestamp_seconds",
     "When the last health check ended (Unix time)", "b"),
    ("b_passes", "gauge", "gorb_service_backend_consecutive_passes",
     "Health checks passed in a row", "b"),
    ("b_failures", "gauge", "gorb_service_backend_consecutive_failures",
     "Health checks failed in a row", "b"),
    *((f"s_{key}", "counter", f"gorb_ipvs_service_{suffix}", f"{text} by the IPVS service", "s")
      for key, suffix, text in COUNTERS),
    *((f"b_{key}", "counter", f"gorb_ipvs_backend_{suffix}", f"{text} by the IPVS backend", "b")
      for key, suffix, text in COUNTERS),
    *((f"g_{key}", "gauge", f"gorb_ipvs_backend_{suffix}", text, "b")
      for key, suffix, text in DEST_GAUGES),
)


def families(services: Mapping[str, Mapping[str, Any]] | None, now: float) -> list[Metric]:
    """Metric families for a ``state.dump`` reply's ``services`` (None: the writer did not answer);
    ``now`` is the wall clock, for uptimes."""
    up = GaugeMetricFamily("gorb_up", "1 if the API reached ipvs-writer for this scrape, else 0")
    up.add_metric([], 0 if services is None else 1)
    if services is None:
        return [up]
    fams = {key: (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(
                name, help_, labels=SERVICE_LABELS if which == "s" else BACKEND_LABELS)
            for key, kind, name, help_, which in _FAMILIES}
    for vsid in sorted(services):
        _add_service(fams, vsid, services[vsid], now)
    return [up, *fams.values()]


def _add_service(fams: dict[str, Metric], vsid: str, view: Mapping[str, Any],
                 now: float) -> None:
    labels = _service_labels(vsid, view)
    backends = view.get("backends") or {}
    fams["s_health"].add_metric(labels, views.service_health(backends, now))
    fams["s_backends"].add_metric(labels, len(backends))
    fams["s_held"].add_metric(labels, sum(1 for b in backends.values()
                                          if (b.get("health") or {}).get("held_in")))
    stats = (view.get("kernel") or {}).get("stats") or {}
    for key, _, _ in COUNTERS:
        if key in stats:
            fams[f"s_{key}"].add_metric(labels, stats[key])
    for rsid in sorted(backends):
        _add_backend(fams, _backend_labels(vsid, rsid, backends[rsid]), backends[rsid], now)


def _add_backend(fams: dict[str, Metric], labels: list[str], bview: Mapping[str, Any],
                 now: float) -> None:
    m = views.backend_metrics(bview, now)
    fams["b_uptime"].add_metric(labels, m["uptime"])
    fams["b_health"].add_metric(labels, m["health"])
    fams["b_status"].add_metric(labels, m["status"])
    fams["b_weight"].add_metric(labels, views.current_weight(bview))
    fams["b_held"].add_metric(labels, 1 if m["held_in"] else 0)
    fams["b_passes"].add_metric(labels, m["consecutive_passes"])
    fams["b_failures"].add_metric(labels, m["consecutive_failures"])
    if m["last_result"] is not None:
        fams["b_ok"].add_metric(labels, 1 if m["last_result"]["ok"] else 0)
        fams["b_latency"].add_metric(labels, m["last_result"]["latency"] or 0.0)
        fams["b_last"].add_metric(labels, m["last_check"] or 0.0)
    bstats = (bview.get("kernel") or {}).get("stats") or {}
    for prefix, table in (("b_", COUNTERS), ("g_", DEST_GAUGES)):
        for key, _, _ in table:
            if key in bstats:
                fams[prefix + key].add_metric(labels, bstats[key])


class WriterMetrics:
    """The writer's part of the text: asks ``metrics.rows`` at each ``chunks`` and keeps the
    ``exposition.Layout`` of the last label generation."""

    def __init__(self, client) -> None:
        self.client = client
        self.layout: exposition.Layout | None = None

    def rows(self) -> MetricRows | None:
        """The writer's rows with this generation's labels known (None: it did not answer)."""
        for known in (-1 if self.layout is None else self.layout.generation, -1):
            try:
                reply = self.client.request("metrics.rows", {"generation": known})
            except WriterUnavailable as exc:
                log.warning("metrics: %s", exc)
                return None
            if not reply.get("ok"):
                log.error("metrics: the writer refused metrics.rows: %s", reply.get("reason"))
                return None
            rows = msgspec.convert(reply["data"], MetricRows)
            if rows.labels is not None:
                self.layout = exposition.Layout(rows.generation, rows.labels)
            if self.layout is not None and self.layout.generation == rows.generation:
                return rows
        log.error("metrics: the writer sent no labels for generation %s", rows.generation)
        return None

    def chunks(self, now: float) -> Iterator[bytes]:
        """The text, family by family (``now``: the wall clock, for uptimes)."""
        rows = self.rows()
        if rows is None:
            yield exposition.up(0)
            return
        layout = self.layout
        yield from exposition.render(layout, exposition.values(rows, layout.sizes, now))


@dataclass
class Body:
    """One rendered ``/metrics`` body: its parts as they were rendered (served as they are,
    never joined into one copy) and, once a scraper has asked for gzip, the same compressed."""
    parts: list[bytes]
    gzip: list[bytes] | None = None

    def length(self, gzip: bool = False) -> int:
        return sum(map(len, self.gzip if gzip else self.parts))


class Scrapes:
    """The ``/metrics`` body, rendered by ``render`` in a greenlet of its own and served for
    ``ttl`` seconds (see the module's docstring); ``invalidate`` drops it. Once a scraper has
    asked for gzip (Prometheus always does), each render is compressed too, part by part,
    yielding in between: 15 MB of text are about 1 MB to send."""

    def __init__(self, render: Callable[[], Iterable[str | bytes]], ttl: float,
                 clock: Callable[[], float] = time.monotonic):
        self.render = render
        self.ttl = ttl
        self.clock = clock
        self.renders = 0
        self.gzip_wanted = False
        self._epoch = 0  # bumped by invalidate: a body of an older epoch is not served
        self._body: tuple[int, float, Body] | None = None  # (epoch, render start, body)
        self._running: tuple[int, AsyncResult] | None = None
        self._took = 0.0  # the last render's duration

    def invalidate(self) -> None:
        self._epoch += 1
        self._body = None

    def get(self, gzip: bool = False) -> Body:
        """The body to serve (``gzip``: the scraper accepts it; the body may still have no
        compressed copy, the first time)."""
        self.gzip_wanted = self.gzip_wanted or gzip
        while True:
            now = self.clock()
            body = self._body
            if body is not None and body[0] == self._epoch and now - body[1] < self.ttl:
                if now - body[1] >= self.ttl - 2 * self._took and self._running is None:
                    self._start()  # the next one, before this one expires
                return body[2]
            running = self._running or self._start()
            result = running[1].get()
            if running[0] == self._epoch:  # else it began before a change: render again
                return result

    def _start(self) -> tuple[int, AsyncResult]:
        running = self._running = (self._epoch, AsyncResult())
        gevent.spawn(self._run, *running).name = "metrics-render"
        return running

    def _run(self, epoch: int, done: AsyncResult) -> None:
        started = self.clock()
        try:
            body = Body([])
            for part in self.render():
                body.parts.append(part if isinstance(part, bytes) else part.encode())
                gevent.sleep(0)  # let other requests in between families
            if self.gzip_wanted:
                body.gzip = _compress(body.parts)
        except Exception as exc:  # a bug: the waiting scrapes answer 500
            log.exception("metrics: rendering failed")
            self._running = None
            done.set_exception(exc)
            return
        self.renders += 1
        self._took = self.clock() - started
        if epoch == self._epoch:
            self._body = (epoch, started, body)
        self._running = None
        done.set(body)


def _compress(parts: list[bytes]) -> list[bytes]:
    """``parts`` as one gzip stream (level 1: the text is repetitive, speed matters more)."""
    z = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    out = []
    for part in parts:
        out.append(z.compress(part))
        gevent.sleep(0)
    out.append(z.flush())
    return [o for o in out if o]


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
