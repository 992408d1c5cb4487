"""The writer's views of its records (pure): what a read, an event and a reply show of a service
and a backend, with the kernel's live entry beside the desired one."""

from __future__ import annotations

import msgspec

from gorb.common.pulse_messages import Outcome
from gorb.services.ipvs_writer.desired import held
from gorb.services.ipvs_writer.state import BackendRecord, ServiceRecord
from gorb.services.ipvs_writer.collector import Live
from gorb.services.ipvs_writer.targets import effective_pulse
from gorb.services.ipvs_writer.weights import weight


def service_view(vsid: str, record: ServiceRecord, live: Live | None = None,
                 observed: dict | None = None) -> dict:
    observed = observed or {}
    return {
        "service": vsid,
        "options": msgspec.to_builtins(record.options),
        "address": record.address,
        "backends": {rs: backend_view(vsid, rs, b, record, live, observed.get((vsid, rs)))
                     for rs, b in record.backends.items()},
        "kernel": None if live is None else live.view,
    }


def service_summary(vsid: str, record: ServiceRecord, live: Live | None,
                    observed: dict) -> dict:
    """``service_view`` with each backend cut to what GET /service/<vs> shows of it (its
    health): a service of 1,000 backends is 50 kB on the bus instead of 500."""
    backends = {}
    for rs, b in record.backends.items():
        seen = observed.get((vsid, rs))
        backends[rs] = {"health": {"status": b.health.status, "since": b.health.since},
                        "check": None if seen is None else {"health": seen.health}}
    return {"service": vsid, "options": msgspec.to_builtins(record.options),
            "address": record.address, "backends": backends,
            "kernel": None if live is None else live.view}


def backend_view(vsid: str, rsid: str, b: BackendRecord, record: ServiceRecord,
                 live: Live | None = None, observed: Outcome | None = None) -> dict:
    """A backend as the writer sees it: options as given, the effective pulse, the weight it
    should have (``weight``), pulse's verdict (``health``), the last check (``check``) and the
    kernel's live entry (``kernel``)."""
    return {
        **_backend_static(vsid, rsid, b, record),
        "check": None if observed is None else msgspec.to_builtins(observed),
        "kernel": None if live is None else live.dests.get((b.address, b.options.port)),
    }


def _backend_static(vsid: str, rsid: str, b: BackendRecord, record: ServiceRecord) -> dict:
    """The part of ``backend_view`` that the records alone give, kept with the service record
    (its private ``__dict__``) per backend record, so GET /service/<vs> of a large service
    does not convert every backend's options at each read. Not kept under fail-open, where a
    backend's weight and ``held_in`` depend on the others' health; a draft that changes a
    backend of its own record in place puts a new backend record there, which misses."""
    cache = None
    if record.options.fail_open <= 0:
        cache = record.__dict__.setdefault("_backend_views", {})
        hit = cache.get(rsid)
        if hit is not None and hit[0] is b:
            return hit[1]
    keep = rsid in held(record)
    static = {
        "service": vsid,
        "backend": rsid,
        "options": msgspec.to_builtins(b.options),
        "pulse": msgspec.to_builtins(effective_pulse(record, b)),
        "address": b.address,
        "weight": weight(b.options.weight, b.health, keep),
        "health": {**msgspec.to_builtins(b.health), "held_in": keep},
    }
    if cache is not None:
        cache[rsid] = (b, static)
    return static
