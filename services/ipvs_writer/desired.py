"""From the desired state to the kernel (pure): the table each service record asks for, and the
ops that take the kernel from one desired state to the next."""

from __future__ import annotations

from collections.abc import Iterable

from gorb.services.ipvs_writer.state import ServiceRecord, Services
from gorb.services.ipvs_writer.table import KService, Op, SKey, kdest, kservice, plan
from gorb.services.ipvs_writer.weights import held_in, weight


def held(record: ServiceRecord) -> set[str]:
    """Backends of the service kept in by fail-open although pulse says they are down."""
    if record.options.fail_open <= 0:
        return set()
    return held_in([(rs, b.options.weight, b.health) for rs, b in record.backends.items()],
                   record.options.fail_open)


def ktable(record: ServiceRecord, rsids: Iterable[str] | None = None) -> KService:
    """The kernel service (with dests) a service record asks for: each dest at the weight its
    configured weight and its health give (``weights``); only the backends ``rsids`` that it
    has, when given."""
    svc = kservice(record.options, record.address)
    keep = held(record)
    backends = record.backends
    for rs in backends if rsids is None else rsids:
        b = backends.get(rs)
        if b is None:
            continue
        d = kdest(b.options, b.address, weight(b.options.weight, b.health, rs in keep), svc.af)
        svc.dests[d.key] = d
    return svc


def desired_table(services: Services) -> dict[SKey, KService]:
    return {t.key: t for t in map(ktable, services.values())}


def _changed_dests(was: ServiceRecord, now: ServiceRecord) -> tuple[KService, KService] | None:
    """The kernel tables of ``was`` and ``now`` restricted to the backends whose record changed,
    when nothing else can differ (same service options and address, no fail-open, which weighs a
    backend by the health of the others); None when the whole service must be compared."""
    if (was.options != now.options or was.address != now.address
            or was.options.fail_open > 0):
        return None
    changed = [rs for rs in was.backends.keys() | now.backends.keys()
               if was.backends.get(rs) is not now.backends.get(rs)]
    return ktable(was, changed), ktable(now, changed)


def ops_between(old: Services, new: Services, vsids: set[str]) -> list[Op]:
    """Kernel ops taking the touched services from ``old`` to ``new`` (kernel assumed == old).

    A service whose own options did not change is compared only on the backends whose records
    changed (records are immutable and a draft keeps the unchanged ones), so a weight change
    costs a lookup per backend of its service, not a kernel view of each."""
    want: dict[SKey, KService] = {}
    have: dict[SKey, KService] = {}
    for v in vsids:
        was, now = old.get(v), new.get(v)
        pair = _changed_dests(was, now) if was is not None and now is not None else None
        if pair is not None:
            h, w = pair
        else:
            h = ktable(was) if was is not None else None
            w = ktable(now) if now is not None else None
        if h is not None:
            have[h.key] = h
        if w is not None:
            want[w.key] = w
    return plan(want, have, owned=set(have) - set(want))
