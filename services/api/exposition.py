"""The writer's part of ``/metrics`` written as Prometheus text straight from ``metrics.rows``.

Pure (``now`` is passed in, no I/O). Three steps, each a function:

- ``Layout(labels)``: per label generation (``gorb.common.messages.MetricRows``), the render order
  (services by name, each one's backends by name, as prometheus_client's output had them) and
  the escaped, sorted label strings ``{host="…",…} `` of every row, made once and kept while the
  generation lasts, i.e. while no service or backend is added, removed or moved to another
  address (one string per row, shared by every family). So is each family's last text with the
  column it came from: a family whose values did not change since the last scrape is not written
  again.
- ``values(rows, now)``: one column per family in the writer's row order (None: no sample),
  GORB's formulas as ``views.backend_metrics`` has them (status 1 only when down, health the
  share of recent checks passed or 1/0 before any check, uptime whole seconds while up, the
  weight the kernel has, else the wanted one).
- ``render(layout, values)``: the text, family by family (a generator: the caller may yield
  between families), byte for byte what ``prometheus_client.generate_latest`` writes for the
  same samples (``library_families`` builds those, for the tests and the benchmark). Values are
  formatted by prometheus_client's own ``floatToGoString``, memoised (counters and gauges repeat
  the same few numbers); a negative zero prints as ``0.0``.

The families, in the order they are written (the order of the former ``families()``), are
``FAMILIES``: name, type, help, and whether its rows are services or backends.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from gorb.common.messages import MetricLabels, MetricRows

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

SERVICE, BACKEND = "service", "backend"
UP_NAME, UP_HELP = "gorb_up", "1 if the API reached ipvs-writer for this scrape, else 0"

# (name without _total, type, help, rows)
FAMILIES: list[tuple[str, str, str, str]] = [
    ("gorb_service_health", "gauge", "Health of the load balancer service", SERVICE),
    ("gorb_service_backends", "gauge", "Number of backends in the load balancer service", SERVICE),
    ("gorb_service_fail_open_held", "gauge", "Down backends that fail-open keeps in the service",
     SERVICE),
    ("gorb_service_backend_uptime_seconds", "gauge", "Uptime in seconds of a backend service",
     BACKEND),
    ("gorb_service_backend_health", "gauge", "Health of a backend service", BACKEND),
    ("gorb_service_backend_status", "gauge", "Status of a backend service (0 up, 1 down)",
     BACKEND),
    ("gorb_service_backend_weight", "gauge", "Weight of a backend service", BACKEND),
    ("gorb_service_backend_held_in", "gauge",
     "1 when fail-open keeps a down backend in its service", BACKEND),
    ("gorb_service_backend_check_ok", "gauge",
     "1 if the last health check passed, 0 if it failed", BACKEND),
    ("gorb_service_backend_check_latency_seconds", "gauge", "Duration of the last health check",
     BACKEND),
    ("gorb_service_backend_last_check_timestamp_seconds", "gauge",
     "When the last health check ended (Unix time)", BACKEND),
    ("gorb_service_backend_consecutive_passes", "gauge", "Health checks passed in a row",
     BACKEND),
    ("gorb_service_backend_consecutive_failures", "gauge", "Health checks failed in a row",
     BACKEND),
    *[(f"gorb_ipvs_service_{suffix}", "counter", f"{text} by the IPVS service", SERVICE)
      for _, suffix, text in COUNTERS],
    *[(f"gorb_ipvs_backend_{suffix}", "counter", f"{text} by the IPVS backend", BACKEND)
      for _, suffix, text in COUNTERS],
    *[(f"gorb_ipvs_backend_{suffix}", "gauge", text, BACKEND) for _, suffix, text in DEST_GAUGES],
]


def escape(value: str) -> str:
    """A label value as the text format quotes it (prometheus_client's escaping)."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _label_string(names: Sequence[str], values: Sequence[str]) -> str:
    pairs = sorted(zip(names, values))  # prometheus_client writes labels sorted by name
    return "{" + ",".join(f'{k}="{escape(v)}"' for k, v in pairs) + "}"


class Layout:
    """What one label generation gives: render order, label strings, line prefixes."""

    def __init__(self, generation: int, labels: MetricLabels):
        self.generation = generation
        services = labels.services
        starts, at = [], 0
        for size in labels.sizes:
            starts.append(at)
            at += size
        self.services = len(services)
        self.backends = len(labels.backends)
        self.sizes = list(labels.sizes)
        self.service_order = sorted(range(len(services)), key=lambda i: services[i][0])
        self.backend_order = [j for i in self.service_order
                              for j in sorted(range(starts[i], starts[i] + labels.sizes[i]),
                                              key=lambda j: labels.backends[j][1])]
        self._labels = {
            SERVICE: [_label_string(SERVICE_LABELS, services[i]) + " "
                      for i in self.service_order],
            BACKEND: [_label_string(BACKEND_LABELS, labels.backends[j]) + " "
                      for j in self.backend_order]}
        self.texts: dict[str, tuple[list[Any], bytes]] = {}  # family -> (its column, its text)

    def order(self, rows: str) -> list[int]:
        return self.service_order if rows == SERVICE else self.backend_order

    def labels(self, rows: str) -> list[str]:
        """``{labels} `` of every row (services or backends), in render order."""
        return self._labels[rows]

    def label_values(self, rows: str, labels: MetricLabels) -> list[list[str]]:
        """The label values of every row, in render order (for ``library_families``)."""
        table = labels.services if rows == SERVICE else labels.backends
        return [table[i] for i in self.order(rows)]


def values(rows: MetricRows, sizes: Sequence[int], now: float) -> dict[str, list[Any]]:
    """One value (or None: no sample) per row, in the writer's row order, for every family of
    ``FAMILIES`` (sample names: counters with ``_total``)."""
    b = rows.backends
    down = [s == "down" for s in b.status]
    health = [h if h is not None else (0.0 if d else 1.0) for h, d in zip(b.check_health, down)]
    if "up" in b.status:
        uptime = [max(0, int(now - t)) if s == "up" and t else 0
                  for s, t in zip(b.status, b.since)]
    else:
        uptime = [0] * len(down)
    s_health, s_held, at = [], [], 0
    for size in sizes:
        s_health.append(sum(health[at:at + size]) / size if size else 1.0)
        s_held.append(sum(1 for h in b.held_in[at:at + size] if h))
        at += size
    present = [ok is not None for ok in b.check_ok]
    out: dict[str, list[Any]] = {
        "gorb_service_health": s_health,
        "gorb_service_backends": list(sizes),
        "gorb_service_fail_open_held": s_held,
        "gorb_service_backend_uptime_seconds": uptime,
        "gorb_service_backend_health": health,
        "gorb_service_backend_status": [1 if d else 0 for d in down],
        "gorb_service_backend_weight": [w if k is None else k
                                        for k, w in zip(b.kernel_weight, b.weight)],
        "gorb_service_backend_held_in": [1 if h else 0 for h in b.held_in],
    }
    if any(present):
        out["gorb_service_backend_check_ok"] = [None if ok is None else 1 if ok else 0
                                                for ok in b.check_ok]
        out["gorb_service_backend_check_latency_seconds"] = [
            None if not p else v or 0.0 for p, v in zip(present, b.check_latency)]
        out["gorb_service_backend_last_check_timestamp_seconds"] = [
            None if not p else v or 0.0 for p, v in zip(present, b.check_at)]
        out["gorb_service_backend_consecutive_passes"] = [v or 0 for v in b.check_passes]
        out["gorb_service_backend_consecutive_failures"] = [v or 0 for v in b.check_failures]
    else:
        none, zeros = [None] * len(present), [0] * len(present)
        out["gorb_service_backend_check_ok"] = none
        out["gorb_service_backend_check_latency_seconds"] = none
        out["gorb_service_backend_last_check_timestamp_seconds"] = none
        out["gorb_service_backend_consecutive_passes"] = zeros
        out["gorb_service_backend_consecutive_failures"] = zeros
    for key, suffix, _ in COUNTERS:
        out[f"gorb_ipvs_service_{suffix}_total"] = rows.service_stats.get(key) or \
            [None] * len(sizes)
        out[f"gorb_ipvs_backend_{suffix}_total"] = b.stats.get(key) or [None] * len(down)
    for key, suffix, _ in DEST_GAUGES:
        out[f"gorb_ipvs_backend_{suffix}"] = b.stats.get(key) or [None] * len(down)
    return out


class _Formatted(dict):
    """value -> its text (``floatToGoString``), filled as values are met."""

    def __missing__(self, value: Any) -> str:
        text = floatToGoString(value)
        if len(self) < 100_000:  # counters move; keep the table bounded
            self[value] = text
        return text


_FORMATTED = _Formatted()


def _header(name: str, kind: str, help_: str) -> str:
    help_ = help_.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {name} {help_}\n# TYPE {name} {kind}\n"


def up(value: int) -> bytes:
    """The ``gorb_up`` family (1: the writer answered)."""
    return f"{_header(UP_NAME, 'gauge', UP_HELP)}{UP_NAME} {floatToGoString(value)}\n".encode()


def render(layout: Layout, columns: dict[str, list[Any]]) -> Iterator[bytes]:
    """The text of every family of ``FAMILIES`` (UTF-8), one part per family, ``gorb_up 1``
    first. A family's part is kept in ``layout`` and handed out again, the same object, while
    its column is unchanged: a render allocates only what moved (fresh memory is what costs most
    in the user-mode-linux guest: page faults)."""
    yield up(1)
    fmt = _FORMATTED.__getitem__
    for name, kind, help_, rows in FAMILIES:
        # prometheus_client names a counter's HELP and TYPE lines with _total too
        sample = f"{name}_total" if kind == "counter" else name
        column = columns[sample]
        last = layout.texts.get(sample)
        if last is not None and last[0] == column:  # unchanged since the last scrape
            yield last[1]
            continue
        ordered = list(map(column.__getitem__, layout.order(rows)))
        labels = layout.labels(rows)
        if None in ordered:
            kept = [(lab, v) for lab, v in zip(labels, ordered) if v is not None]
            labels, ordered = [lab for lab, _ in kept], [v for _, v in kept]
        n = len(ordered)
        # one join of [name, {labels} , value, newline, ...]: no string per line
        lines: list[str] = [sample, "", "", _NEWLINE] * n
        lines[1::4] = labels
        lines[2::4] = map(fmt, ordered)
        text = (_header(sample, kind, help_) + "".join(lines)).encode()
        layout.texts[sample] = (column, text)
        yield text


_NEWLINE = "\n"


def library_families(layout: Layout, labels: MetricLabels,
                     columns: dict[str, list[Any]]) -> list[Metric]:
    """The same samples as prometheus_client families (the library's renderer: tests, bench)."""
    up_family = GaugeMetricFamily(UP_NAME, UP_HELP)
    up_family.add_metric([], 1)
    out: list[Metric] = [up_family]
    for name, kind, help_, rows in FAMILIES:
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        family = cls(name, help_, labels=SERVICE_LABELS if rows == SERVICE else BACKEND_LABELS)
        column = columns[f"{name}_total" if kind == "counter" else name]
        for i, label_values in zip(layout.order(rows), layout.label_values(rows, labels)):
            if column[i] is not None:
                family.add_metric(label_values, column[i])
        out.append(family)
    return out
