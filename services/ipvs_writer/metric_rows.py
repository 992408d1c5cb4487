"""``metrics.rows``: the writer's side of ``/metrics`` as columns (``gorb.common.messages.MetricRows``).

A scrape at 10,000 backends used to build a nested view of every service and backend
(``state.dump``), 5 MB of msgpack; here the label strings travel only when they changed (the
asker names the ``generation`` it holds) and the numbers as flat lists, one per quantity.

What does not depend on the kernel or on pulse's last results (labels, the weight the writer
wants, the verdict) is computed once per ``ServiceRecord``: records are immutable and a commit
replaces only the records it changed, so a weight PATCH rebuilds one service's entry. The
kernel's columns are not built here: the statistics collector (``collector.py``) builds them
for the rows ``layout()`` describes and sends them encoded, and the reply carries them as they
came (``msgspec.Raw``). The columns of the last checks are kept per service and rebuilt when
the observed checks (``observed_version``) changed; a reply whose state, snapshot and checks
are the last one's is the last one's columns again. Generations start at a random number, so that an asker holding
the labels of a writer that has since restarted is sent the new ones. Rows are in the writer's order (services as created, each
one's backends as created); the API sorts them once per generation.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
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
from gorb.services.ipvs_writer.collector import Layout, Snapshot
from gorb.services.ipvs_writer.state import ServiceRecord, Services
from gorb.services.ipvs_writer.table import SKey, kservice
from gorb.services.ipvs_writer.weights import weight



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
    checks: tuple[int, list[list]] | None = None  # (observed_version, the check columns)


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
    backends of a service. ``layout(services)`` first (the rows the kernel's columns must
    follow), then ``rows`` with a snapshot whose columns follow that layout."""

    def __init__(self, held):
        self._held = held
        self._static: dict[str, _Static] = {}
        # random start: a restarted writer must not reuse the generation of other label rows
        self.generation = random.getrandbits(48)
        self._labels: MetricLabels | None = None
        self._label_parts: list[_Static] | None = None
        self._parts: list[_Static] = []
        self._last: tuple[Any, ...] | None = None  # (services, snapshot, observed_version, columns)

    def layout(self, services: Services) -> tuple[int, Layout]:
        """(generation, the rows: each service's kernel key with its dests, in order)."""
        self._parts = parts = self._parts_of(services)
        self._update_labels(parts)
        return self.generation, [(p.key, p.dests) for p in parts]

    def rows(self, services: Services, snapshot: Snapshot,
             observed: Mapping[tuple[str, str], Outcome], observed_version: int,
             known: int) -> MetricRows:
        """The reply, after ``layout(services)`` (``snapshot.generation`` is its generation)."""
        last = self._last
        if (last is not None and last[0] is services and last[1] is snapshot
                and last[2] == observed_version):
            columns = last[3]
        else:
            columns = self._columns(self._parts, snapshot, observed, observed_version)
            self._last = (services, snapshot, observed_version, columns)
        return MetricRows(METRIC_ROWS_SCHEMA, self.generation,
                          None if known == self.generation else self._labels,
                          snapshot.service_stats, columns)

    def _parts_of(self, services: Services) -> list[_Static]:
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
    def _columns(parts: list[_Static], snapshot: Snapshot,
                 observed: Mapping[tuple[str, str], Outcome], observed_version: int
                 ) -> BackendColumns:
        checks = [_checks(p, observed, observed_version) for p in parts]

        def static(name: str) -> list:
            return list(chain.from_iterable(getattr(p, name) for p in parts))

        return BackendColumns(
            weight=static("weight"), status=static("status"), since=static("since"),
            held_in=static("held_in"), kernel_weight=snapshot.kernel_weight,
            **{f"check_{name}": list(chain.from_iterable(c[i] for c in checks))
               for i, name in enumerate(CHECK_FIELDS)},
            stats=snapshot.stats)


def wire(rows: MetricRows) -> dict[str, Any]:
    """``rows`` as msgpack-able builtins without copying its columns (``msgspec.to_builtins``
    would copy every list)."""
    labels = rows.labels
    return {"schema": rows.schema, "generation": rows.generation,
            "labels": None if labels is None else msgspec.structs.asdict(labels),
            "service_stats": rows.service_stats,
            "backends": msgspec.structs.asdict(rows.backends)}


CHECK_FIELDS = ("at", "ok", "latency", "health", "passes", "failures")


def _checks(part: _Static, observed: Mapping[tuple[str, str], Outcome],
            observed_version: int) -> list[list]:
    """``part``'s check columns; the last ones again while the checks did not change."""
    last = part.checks
    if last is not None and last[0] == observed_version:
        return last[1]
    n = len(part.dests)
    checks = list(map(observed.get, part.members)) if observed else []
    if any(c is not None for c in checks):
        columns = [[getattr(c, name) if c is not None else None for c in checks]
                   for name in CHECK_FIELDS]
    else:
        columns = [[None] * n] * len(CHECK_FIELDS)
    part.checks = (observed_version, columns)
    return columns
