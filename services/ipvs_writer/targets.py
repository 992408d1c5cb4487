"""From the desired state to pulse check targets (pure).

Each backend's effective pulse is its own pulse over its service's defaults
(``gorb.common.validation.resolve_pulse``); backends checked the same way at the same address and port
share one target. ``none`` needs no check: such a backend is simply up.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from gorb.common.check_spec import CheckSpec
from gorb.common.pulse_messages import Target
from gorb.common.validation import parse_duration, parse_interval, resolve_pulse
from gorb.services.ipvs_writer.state import BackendRecord, ServiceRecord, Services
from gorb.services.ipvs_writer.weights import SlowStart

Member = tuple[str, str]  # (service id, backend id)


@dataclass
class TargetGroup:
    target: Target
    members: list[Member] = field(default_factory=list)


def effective_pulse(service: ServiceRecord, backend: BackendRecord):
    return resolve_pulse(backend.options.pulse, service.options.pulse)


def slow_start(service: ServiceRecord, backend: BackendRecord) -> SlowStart:
    value = effective_pulse(service, backend).slow_start
    if isinstance(value, str):
        return SlowStart(checks=0, seconds=parse_duration(value, "slow_start", allow_zero=True))
    return SlowStart(checks=value)


def backend_target(service: ServiceRecord, backend: BackendRecord) -> Target | None:
    """The check of one backend (status unknown), or None for pulse type ``none``."""
    p = effective_pulse(service, backend)
    if p.type == "none":
        return None
    spec = CheckSpec.from_pulse(p, backend.address, backend.options.port)
    interval = float(parse_interval(p.interval))
    backoff = (parse_duration(p.backoff_max, "pulse backoff_max", allow_zero=True)
               if p.backoff_max is not None else 4 * interval)
    key = (f"{spec.key}|i{interval:g}|r{p.rise}|f{p.fall}|b{backoff:g}|j{p.jitter:g}")
    return Target(key, spec.type, spec.address, spec.port, spec.args, spec.timeout, interval,
                  p.rise, p.fall, backoff, p.jitter)


def targets(services: Services) -> dict[str, TargetGroup]:
    """Every check target of the desired state with the backends it stands for."""
    groups: dict[str, TargetGroup] = {}
    update_targets(groups, {}, services, services.keys())
    return groups


def _same_check(a: BackendRecord | None, b: BackendRecord | None) -> bool:
    """Whether two records of one backend (under equal service pulse defaults) are checked the
    same way: a weight or health change moves no target."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    return (a.address == b.address and a.options.port == b.options.port
            and a.options.pulse == b.options.pulse)


def update_targets(groups: dict[str, TargetGroup], old: Services, new: Services,
                   vsids: Iterable[str]) -> set[str]:
    """Bring ``groups`` (built from ``old``) up to ``new``, looking only at the services in
    ``vsids`` and, within a service whose pulse defaults did not change, only at the backends
    whose check changed: a weight change costs a comparison per backend of its service.
    Returns the keys of the targets that appeared, went, or changed members."""
    changed: set[str] = set()
    for vsid in vsids:
        was, now = old.get(vsid), new.get(vsid)
        before = was.backends if was is not None else {}
        after = now.backends if now is not None else {}
        same_defaults = (was is not None and now is not None
                         and was.options.pulse == now.options.pulse)
        for rsid, backend in before.items():
            if same_defaults and _same_check(backend, after.get(rsid)):
                continue
            t = backend_target(was, backend)
            group = groups.get(t.key) if t is not None else None
            if group is not None and (vsid, rsid) in group.members:
                group.members.remove((vsid, rsid))
                changed.add(t.key)
                if not group.members:
                    del groups[t.key]
        for rsid, backend in after.items():
            if same_defaults and _same_check(before.get(rsid), backend):
                continue
            t = backend_target(now, backend)
            if t is None:
                continue
            group = groups.get(t.key)
            if group is None:
                group = groups[t.key] = TargetGroup(t)
            group.members.append((vsid, rsid))
            changed.add(t.key)
    return changed
