"""The writer's message family: commands and reads it answers, the reply, and the events it publishes.

Every request is an envelope (``gorb.common.envelope``) whose ``type`` is a key of ``REQUESTS`` and whose
``body`` decodes into the Struct named there; the reply's body is always a ``Reply``. Bodies::

    service.create  {"service": "web", "options": ServiceOptions, "address": "10.0.0.1"}
    service.update  {"service": "web", "options": {"method": "rr"}}  # PATCH: changed fields only
    service.delete  {"service": "web"}                               # removes its backends too
    service.get     {"service": "web"}           -> data: ServiceView
                    # "summary": true: each backend only as {"health": Health, "check":
                    # {"health": share} | null} (what GET /service/<vs> shows of it)
    service.list    {}                           -> data: {"services": ["web", ...]}
    backend.create  {"service": "web", "backend": "a", "options": BackendOptions,
                     "address": "10.1.0.1"}
    backend.update  {"service": "web", "backend": "a", "weight": 0}  # PATCH weight
    backend.delete  {"service": "web", "backend": "a"}
    backend.get     {"service": "web", "backend": "a"}   -> data: BackendView
    pulse.targets   see gorb.common.pulse_messages (a worker's check targets)
    state.dump      {"stats": false}             -> data: {"services": {id: ServiceView}}
                    # stats: true adds the kernel's live view (one dump) to every service
    metrics.rows    {"generation": 3}            -> data: MetricRows (``/metrics``, columnar)
                    # generation: of the label rows the asker holds (-1: none); the reply
                    # carries the labels only when the writer's generation differs

    Reply           {"ok": true, "errno": "ok", "reason": "", "data": {...} | null}

A mutation's reply (ok) carries what it changed, for the API's audit log: the objects touched,
by REST path, before and after (null: absent), as stored (options as validated, the address)::

    data: {"change": {"/service/web": {"before": {"options": {...}, "address": "10.0.0.1"},
                                       "after": null},
                      "/service/web/a": {"before": {...}, "after": null}}}   # service.delete

``address`` is the resolved IP of ``options.host`` (the sender resolves names and the ``-i``
default); when it is empty, ``options.host`` must itself be an IP literal.

Events on the PUB socket, topic = ``<family>.<ids>.<verb>`` so subscribers filter by prefix::

    service.web.created | service.web.updated | service.web.deleted     body: ServiceView or {}
    backend.web.a.created | backend.web.a.updated | backend.web.a.deleted body: BackendView or {}
    writer.reconciled   {"repaired": n, "errors": [...]}                 after drift was repaired
"""

from __future__ import annotations

from typing import Any

import msgspec

from gorb.common import errors
from gorb.common.model import BackendOptions, ServiceOptions
from gorb.common.pulse_messages import TargetsRequest


class ServiceCreate(msgspec.Struct, forbid_unknown_fields=True):
    service: str
    options: ServiceOptions
    address: str = ""


class ServiceUpdate(msgspec.Struct, forbid_unknown_fields=True):
    service: str
    options: dict[str, Any]  # only the fields to change


class ServiceRef(msgspec.Struct, forbid_unknown_fields=True):
    service: str


class ServiceGet(msgspec.Struct, forbid_unknown_fields=True):
    service: str
    summary: bool = False


class Empty(msgspec.Struct, forbid_unknown_fields=True):
    pass


class StateDump(msgspec.Struct, forbid_unknown_fields=True):
    stats: bool = False


class MetricRowsRequest(msgspec.Struct, forbid_unknown_fields=True):
    generation: int = -1


class MetricLabels(msgspec.Struct):
    """The label values of ``/metrics``' rows: the services in the writer's order, and after them,
    service by service in the same order, each one's backends in its order (``sizes[i]`` of
    them for service i). Strings exactly as the labels show them (port in decimal)::

        {"services": [["web", "10.0.0.1", "80", "tcp"], ...],    # name, host, port, protocol
         "sizes": [2, ...],
         "backends": [["web", "a", "10.1.0.1", "8080"], ...]}     # service_name, name, host, port
    """
    services: list[list[str]]
    sizes: list[int]
    backends: list[list[str]]


class BackendColumns(msgspec.Struct):
    """One value per backend row of ``MetricLabels``, in its order::

        weight          the weight the writer wants it to have (configured weight and health)
        kernel_weight   the kernel's weight; null: the kernel has no entry
        status, since   pulse's verdict (up | down | unknown) and when it last changed
        held_in         fail-open keeps it in although down
        check_*         the last check (at, ok, latency, health: share of recent checks passed,
                        passes, failures in a row); null: none since the writer started
        stats           kernel counter (conns, inpkts, outpkts, inbytes, outbytes, activeconns,
                        inactconns, persistconns) -> values; null: the kernel has no entry
    """
    weight: list[int]
    kernel_weight: list[int | None]
    status: list[str]
    since: list[float]
    held_in: list[bool]
    check_at: list[float | None]
    check_ok: list[bool | None]
    check_latency: list[float | None]
    check_health: list[float | None]
    check_passes: list[int | None]
    check_failures: list[int | None]
    stats: dict[str, list[int | None]]


class MetricRows(msgspec.Struct):
    """``metrics.rows``: everything ``/metrics`` shows of the writer, as columns (schema 1).

    ``generation`` names the label rows: two replies with the same generation have the same rows
    in the same order, so the asker keeps the labels (and what it built from them) and the
    writer leaves them out (``labels`` null) when asked with the current generation.
    ``service_stats``: kernel counter (conns, inpkts, outpkts, inbytes, outbytes) -> one value per
    service row, null where the kernel has no entry."""
    schema: int
    generation: int
    labels: MetricLabels | None
    service_stats: dict[str, list[int | None]]
    backends: BackendColumns


METRIC_ROWS_SCHEMA = 1


class WriterLatency(msgspec.Struct, forbid_unknown_fields=True):
    """``writer.latency``: the writer's own receive-to-reply seconds of its recent mutations
    (benchmarks, diagnostics); ``clear`` empties the record after answering."""
    clear: bool = False


class BackendCreate(msgspec.Struct, forbid_unknown_fields=True):
    service: str
    backend: str
    options: BackendOptions
    address: str = ""


class BackendUpdate(msgspec.Struct, forbid_unknown_fields=True):
    service: str
    backend: str
    weight: int


class BackendRef(msgspec.Struct, forbid_unknown_fields=True):
    service: str
    backend: str


REQUESTS: dict[str, type] = {
    "service.create": ServiceCreate,
    "service.update": ServiceUpdate,
    "service.delete": ServiceRef,
    "service.get": ServiceGet,
    "service.list": Empty,
    "backend.create": BackendCreate,
    "backend.update": BackendUpdate,
    "backend.delete": BackendRef,
    "backend.get": BackendRef,
    "state.dump": StateDump,
    "metrics.rows": MetricRowsRequest,
    "pulse.targets": TargetsRequest,
    "writer.latency": WriterLatency,
}
# Requests that change the desired state (and so are batched, persisted and applied).
MUTATIONS = frozenset({"service.create", "service.update", "service.delete",
                       "backend.create", "backend.update", "backend.delete"})


class Reply(msgspec.Struct):
    ok: bool
    errno: str = errors.OK
    reason: str = ""
    data: Any = None


class Refused(Exception):
    """A peer answered a request with ``ok: false``: its errno and reason."""

    def __init__(self, type_: str, errno: str, reason: str):
        super().__init__(f"{type_} refused: {reason} ({errno})")
        self.errno, self.reason = errno, reason


def data_of(type_: str, reply: Any) -> Any:
    """The ``data`` of a reply to a ``type_`` request, checked against ``Reply``; ``Refused``
    when it says ``ok: false``, ``Refused`` (errno ``invalid``) when it is not a reply at all."""
    try:
        typed = msgspec.convert(reply, Reply)
    except msgspec.ValidationError as exc:
        raise Refused(type_, errors.INVALID, f"not a reply: {exc}") from None
    if not typed.ok:
        raise Refused(type_, typed.errno, typed.reason)
    return typed.data


def ok(data: Any = None) -> dict:
    return msgspec.to_builtins(Reply(True, data=data))


def fail(err: errors.GorbError) -> dict:
    return msgspec.to_builtins(Reply(False, err.errno, err.reason))


def decode_request(type_: str, body: dict, requests: dict[str, type] | None = None) -> Any:
    """The typed body of a request of one of ``requests`` (default: the writer's, ``REQUESTS``);
    GorbError(INVALID) on an unknown type or a bad body."""
    cls = (REQUESTS if requests is None else requests).get(type_)
    if cls is None:
        raise errors.invalid(f"unknown request type {type_!r}")
    try:
        return msgspec.convert(body, cls, strict=True)
    except msgspec.ValidationError as exc:
        raise errors.invalid(str(exc)) from None


def to_wire(obj: Any) -> Any:
    """A Struct (or anything msgspec knows) as plain msgpack-able values."""
    return msgspec.to_builtins(obj)
