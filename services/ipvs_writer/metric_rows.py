"""``metrics.rows``: the writer's side of ``/metrics`` as columns (``gorb.common.messages.MetricRows``).

A scrape at 10,000 backends used to build a nested view of every service and backend
(``state.dump``), 5 MB of msgpack; here the label strings travel only when they changed (the
asker names the ``generation`` it holds) and the numbers as flat lists, one per quantity.

What does not depend on the kernel or on pulse's last results (labels, the weight the writer
wants, the verdict) is computed once per ``ServiceRecord``: records are immutable and a commit
replaces only the records it changed, so a weight PATCH rebuilds one service's entry. The
columns of the kernel's counters and of the last checks are kept per service too, and rebuilt
for a service when its entry in the statistics snapshot or the observed checks
(``observed_version``) changed; a reply whose state, snapshot and checks are the last one's is
the last one's columns again. Generations start at a random number, so that an asker holding
the labels of a writer that has since restarted is sent the new ones. Rows are in the writer's order (services as created, each
one's backends as created); the API sorts them once per generation.
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any

import msgspec

from gorb.common.messages import (
    METRIC_ROWS_SCHEMA,
    BackendColumns,
    MetricLabels,
    MetricRows,
)
from gorb.common.pulse_messages import Outcome
from gorb.services.ipvs_writer.state import ServiceRecord, Services
from gorb.services.ipvs_writer.table import KService, SKey, kservice
from gorb.services.ipvs_writer.weights import weight

SERVICE_COUNTERS = ("conns", "inpkts", "outpkts", "inbytes", "outbytes")
BACKEND_STATS = SERVICE_COUNTERS + ("activeconns", "inactconns", "persistconns")


@dataclass
class _Static:
    """What a service record alone gives (built once per record)."""
    record: ServiceRecord
    key: SKey
    labels: list[str]
    backend_labels: list[list[str]]
    members: list[tuple[str, str]]
    dests: list[tuple[str, int]]
    weight: list[int]
    status: list[str]
    since: list[float]
    held_in: list[bool]
    dynamic: _Dynamic | None = None  # the last kernel and check columns (``_dynamic``)


def _static(vsid: str, record: ServiceRecord, held: set[str]) -> _Static:
    opts = record.options
    items = list(record.backends.items())
    return _Static(
        record, kservice(opts, record.address).key,
        [vsid, opts.host, str(opts.port), opts.protocol],
        [[vsid, rs, b.options.host, str(b.options.port)] for rs, b in items],
        [(vsid, rs) for rs, _ in items],
        [(b.address, b.options.port) for _, b in items],
        [weight(b.options.weight, b.health, rs in held) for rs, b in items],
        [b.health.status for _, b in items],
        [b.health.since for _, b in items],
        [rs in held for rs, _ in items])


class MetricRowsBuilder:
    """Answers ``metrics.rows`` for the engine; ``held(record)`` names fail-open's held-in
    backends of a service."""

    def __init__(self, held):
        self._held = held
        self._static: dict[str, _Static] = {}
        # random start: a restarted writer must not reuse the generation of other label rows
        self.generation = random.getrandbits(48)
        self._labels: MetricLabels | None = None
        self._label_parts: list[_Static] | None = None
        self._last: tuple[Any, ...] | None = None  # (services, live, observed_version, columns)

    def rows(self, services: Services, live: Mapping[SKey, KService],
             observed: Mapping[tuple[str, str], Outcome], observed_version: int,
             known: int) -> MetricRows:
        parts = self._parts(services)
        self._update_labels(parts)
        last = self._last
        if (last is not None and last[0] is services and last[1] is live
                and last[2] == observed_version):
            service_stats, columns = last[3]
        else:
            service_stats, columns = self._columns(parts, live, observed, observed_version)
            self._last = (services, live, observed_version, (service_stats, columns))
        return MetricRows(METRIC_ROWS_SCHEMA, self.generation,
                          None if known == self.generation else self._labels,
                          service_stats, columns)

    def _parts(self, services: Services) -> list[_Static]:
        cache, out = self._static, []
        for vsid, record in services.items():
            part = cache.get(vsid)
            if part is None or part.record is not record:
                part = cache[vsid] = _static(vsid, record, self._held(record))
            out.append(part)
        if len(cache) > len(services):
            for vsid in set(cache) - set(services):
                del cache[vsid]
        return out

    def _update_labels(self, parts: list[_Static]) -> None:
        """A new generation when the label rows differ from the last ones (not merely when a
        record changed: a weight PATCH keeps the labels)."""
        old = self._label_parts
        if old is not None and len(old) == len(parts) and all(a is b for a, b in zip(old, parts)):
            return
        labels = MetricLabels([p.labels for p in parts], [len(p.members) for p in parts],
                              [row for p in parts for row in p.backend_labels])
        self._label_parts = parts
        if labels != self._labels:
            self._labels = labels
            self.generation += 1

    @staticmethod
    def _columns(parts: list[_Static], live: Mapping[SKey, KService],
                 observed: Mapping[tuple[str, str], Outcome], observed_version: int
                 ) -> tuple[dict[str, list], BackendColumns]:
        kservices = [live.get(p.key) for p in parts]
        service_stats = _transpose([k.stats if k is not None else None for k in kservices],
                                   SERVICE_COUNTERS)
        dynamic = [_dynamic(p, k, observed, observed_version) for p, k in zip(parts, kservices)]

        def joined(column: Callable[[Any], list]) -> list:
            return list(chain.from_iterable(map(column, dynamic)))

        def static(name: str) -> list:
            return list(chain.from_iterable(getattr(p, name) for p in parts))

        return service_stats, BackendColumns(
            weight=static("weight"), status=static("status"), since=static("since"),
            held_in=static("held_in"),
            kernel_weight=joined(lambda d: d.kernel_weight),
            **{f"check_{name}": joined(lambda d, i=i: d.checks[i])
               for i, name in enumerate(CHECK_FIELDS)},
            stats={key: joined(lambda d, key=key: d.stats[key]) for key in BACKEND_STATS})


def wire(rows: MetricRows) -> dict[str, Any]:
    """``rows`` as msgpack-able builtins without copying its columns (``msgspec.to_builtins``
    would copy every list)."""
    labels = rows.labels
    return {"schema": rows.schema, "generation": rows.generation,
            "labels": None if labels is None else msgspec.structs.asdict(labels),
            "service_stats": rows.service_stats,
            "backends": msgspec.structs.asdict(rows.backends)}


CHECK_FIELDS = ("at", "ok", "latency", "health", "passes", "failures")


@dataclass
class _Dynamic:
    """One service's kernel and check columns, for one snapshot and one ``observed_version``."""
    kservice: KService | None
    observed_version: int
    kernel_weight: list
    checks: list[list]
    stats: dict[str, list]


def _dynamic(part: _Static, k: KService | None, observed: Mapping[tuple[str, str], Outcome],
             observed_version: int) -> _Dynamic:
    """``part``'s columns from the kernel entry ``k`` and the checks; the last ones again when
    neither changed (a commit to another service, a snapshot that kept this service's entry)."""
    last = part.dynamic
    if last is not None and last.kservice is k and last.observed_version == observed_version:
        return last
    n = len(part.dests)
    kdests = [None] * n if k is None else list(map(k.dests.get, part.dests))
    checks = list(map(observed.get, part.members)) if observed else []
    if any(c is not None for c in checks):
        check_columns = [[getattr(c, name) if c is not None else None for c in checks]
                         for name in CHECK_FIELDS]
    else:
        check_columns = [[None] * n] * len(CHECK_FIELDS)
    part.dynamic = _Dynamic(
        k, observed_version, [d.weight if d is not None else None for d in kdests],
        check_columns,
        _transpose([d.stats if d is not None else None for d in kdests], BACKEND_STATS))
    return part.dynamic


def _transpose(stats: list[dict | None], keys: tuple[str, ...]) -> dict[str, list]:
    """{key: [each row's stats[key], null for a row without stats or without that key]}."""
    absent = (None,) * len(keys)
    pick = operator.itemgetter(*keys)
    try:
        rows = [pick(s) if s is not None else absent for s in stats]
    except KeyError:  # a partial stats map (never from the kernel's dump): the slow way
        rows = [tuple(s.get(k) for k in keys) if s is not None else absent for s in stats]
    if not rows:
        return {k: [] for k in keys}
    return {k: list(col) for k, col in zip(keys, zip(*rows))}
