"""Pure core of the Consul registration: what the local agent should hold, given the writer's state.

GORB registered each virtual service as ``{"Name": vsID, "Address": VIP, "Port": port}`` and
nothing else (gorb-spec §5.1). gorb registers the same ID and Name, plus what GORB lacked (§8.18):

    ID, Name   the service id                  Address, Port   the VIP and its port
    Tags       [protocol, scheduler, "gorb"]   ("fwmark" for a firewall-mark service)
    Meta       {"protocol", "scheduler", "gorb_host": this host's name} (+ "fwmark")
    Check      one TTL check, id ``service:<id>``, carrying gorb's own view of the service:
               passing  every backend up (or not checked yet: unknown)
               warning  some backends down
               critical every backend down, or no backends at all

A registration is ours when it has the ``gorb`` tag and ``gorb_host`` = our host name: only those
are ever deregistered or replaced, so services registered by others are left alone. Consul
expects one agent per host; gorb hosts sharing one agent (a test bed) would register the same ID,
so a gorb registration of another host under our ID is reported as a conflict, never overwritten:
give them ``discovery.id_format = "{service}@{host}"`` (Name stays the service id, so the catalog
lists one instance of the service per gorb host). Inputs are the ``state.dump`` views of
``gorb.services.ipvs_writer.engine``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from gorb.services.discovery.consul_adapter import CRITICAL, PASSING, WARNING

TAG = "gorb"
META_HOST = "gorb_host"
TTL_FACTOR = 3  # a check expires (critical) after this many missed refreshes


@dataclass(frozen=True)
class Registration:
    service_id: str
    name: str
    address: str
    port: int
    tags: tuple[str, ...]
    meta: tuple[tuple[str, str], ...] = field(default=())

    @property
    def check_id(self) -> str:
        return check_id(self.service_id)

    def meta_dict(self) -> dict[str, str]:
        return dict(self.meta)


def check_id(service_id: str) -> str:
    """Consul's id for the only check of a service registration."""
    return f"service:{service_id}"


def ttl(check_interval: float) -> str:
    """The TTL of a check refreshed every ``check_interval`` seconds, as a Consul duration."""
    return f"{max(1, round(check_interval * TTL_FACTOR))}s"


DEFAULT_ID_FORMAT = "{service}"  # GORB: ID = Name = the service id


def service_id(vsid: str, hostname: str, id_format: str = DEFAULT_ID_FORMAT) -> str:
    return id_format.format(service=vsid, host=hostname)


def registration(vsid: str, view: dict[str, Any], hostname: str,
                 id_format: str = DEFAULT_ID_FORMAT) -> Registration:
    opts = view["options"]
    scheduler = opts.get("method") or "wrr"
    kind = "fwmark" if opts.get("fwmark") else (opts.get("protocol") or "tcp")
    meta = {"protocol": kind, "scheduler": scheduler, META_HOST: hostname}
    if opts.get("fwmark"):
        meta["fwmark"] = str(opts["fwmark"])
    return Registration(service_id(vsid, hostname, id_format), vsid, view.get("address") or "",
                        int(opts.get("port") or 0), (kind, scheduler, TAG),
                        tuple(sorted(meta.items())))


def desired(services: dict[str, dict[str, Any]], hostname: str,
            id_format: str = DEFAULT_ID_FORMAT) -> dict[str, Registration]:
    """``state.dump``'s ``services`` -> the registrations the agent should hold, by Consul ID
    (``Registration.name`` is the gorb service id)."""
    regs = (registration(vsid, view, hostname, id_format) for vsid, view in services.items())
    return {r.service_id: r for r in regs}


def check_status(view: dict[str, Any]) -> tuple[str, str]:
    """(Consul status, output) of one service from its backends' health."""
    backends = view.get("backends") or {}
    if not backends:
        return CRITICAL, "no backends"
    down = sorted(rs for rs, b in backends.items()
                  if (b.get("health") or {}).get("status") == "down")
    n = len(backends)
    if not down:
        return PASSING, f"{n} of {n} backends up"
    text = f"{n - len(down)} of {n} backends up; down: {', '.join(down)}"
    return (CRITICAL if len(down) == n else WARNING), text


def is_ours(entry: dict[str, Any], hostname: str) -> bool:
    return TAG in (entry.get("Tags") or ()) and (entry.get("Meta") or {}).get(META_HOST) == hostname


def matches(reg: Registration, entry: dict[str, Any]) -> bool:
    """Whether the agent's entry already is ``reg`` (the fields gorb sets)."""
    return (entry.get("Service") == reg.name
            and (entry.get("Address") or "") == reg.address
            and int(entry.get("Port") or 0) == reg.port
            and sorted(entry.get("Tags") or ()) == sorted(reg.tags)
            and (entry.get("Meta") or {}) == reg.meta_dict())


def other_gorb(entry: dict[str, Any], hostname: str) -> str | None:
    """The gorb host that registered ``entry``, if it is another one."""
    host = (entry.get("Meta") or {}).get(META_HOST)
    return host if TAG in (entry.get("Tags") or ()) and host and host != hostname else None


@dataclass
class AgentPlan:
    register: list[Registration]
    deregister: list[str]
    conflicts: dict[str, str] = field(default_factory=dict)  # ID -> the gorb host holding it


def agent_plan(want: dict[str, Registration], agent: dict[str, dict[str, Any]],
               hostname: str) -> AgentPlan:
    """Set difference between what the agent holds and what it should: missing or different
    registrations are (re-)made, ours that are no longer wanted are removed, and IDs another gorb
    host registered on the same agent are left to it."""
    conflicts = {sid: host for sid in want if sid in agent
                 for host in [other_gorb(agent[sid], hostname)] if host}
    register = [reg for sid, reg in sorted(want.items())
                if sid not in conflicts and (sid not in agent or not matches(reg, agent[sid]))]
    deregister = sorted(sid for sid, entry in agent.items()
                        if sid not in want and is_ours(entry, hostname))
    return AgentPlan(register, deregister, conflicts)
