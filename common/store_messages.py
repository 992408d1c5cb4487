"""The store message family: requests the ``discovery`` process answers on its control socket.

The API's ``GET /store/sync`` and ``GET /store/sync/status`` (qk4l's routes) are these two requests,
sent as envelopes (``gorb.common.envelope``) to a ROUTER that ``discovery`` binds at
``ipc://<runtime_dir>/discovery/discovery.sock`` (``endpoint(runtime_dir)``). Replies use the one reply shape
of ``gorb.common.messages.Reply`` ``{"ok", "errno", "reason", "data"}``::

    store.sync    {"force": false}
        ok     {"ok": true, "errno": "ok", "reason": "",
                "data": {"status": "ok",                # "partial" when some objects failed
                         "applied": [Change, ...],      # what this sync changed, in order
                         "errors": [ObjectError, ...],  # objects left as they were, and why
                         "refused": null}}
        refused (would delete more than max_delete_share of the services or backends, or
        everything because the store is empty), nothing applied:
               {"ok": false, "errno": "invalid", "reason": "sync refused: ...",
                "data": {"status": "refused", "applied": [], "errors": [...],
                         "refused": "would delete 3 of 4 services ..."}}
    store.status  {}
        ok     {"ok": true, ..., "data": StoreStatus}   # a dry run of store.sync {"force": false}

    with no store configured (discovery.kv_prefix and discovery.store_dir empty), either request:
               {"ok": false, "errno": "not_found", "reason": "unable to locate specified object",
                "data": null}
    the writer or Consul not answering:
               {"ok": false, "errno": "unavailable", "reason": "...", "data": null}

    Change       {"op": "service.create", "service": "web", "backend": null}
                 op: service.create | service.update | service.delete | backend.create |
                     backend.update | backend.delete   (commands sent to ipvs-writer)
                     store.put | store.delete          (documents written back to Consul KV)
    ObjectError  {"object": "gorb/services/web", "reason": "specified protocol is unknown"}
    StoreStatus  {"status": "ok" | "need sync" | "refused",
                  "store": "consul://127.0.0.1:8500/gorb" | "file:///etc/gorb/services",
                  "services": {"create": ["web"], "update": [], "delete": []},
                  "backends": {"create": ["web/a"], "update": [], "delete": []},
                  "writes":   {"put": ["services/api"], "delete": []},   # store write-backs
                  "refused": null | "reason",
                  "errors": [ObjectError, ...]}

``services``/``backends`` is what a sync would change in the writer (store -> gorb); ``writes``
what it would write back to the store (gorb -> store, Consul only).
"""

from __future__ import annotations

import os

import msgspec

from gorb.common import messages
from gorb.common.runtime import DISCOVERY_DIR
from gorb.common.runtime import endpoint as _endpoint

# The control socket's name in the runtime directory (ipc://<runtime_dir>/discovery/discovery.sock).
DISCOVERY = "discovery"

STATUS_OK = "ok"
STATUS_PARTIAL = "partial"
STATUS_REFUSED = "refused"
STATUS_NEED_SYNC = "need sync"


def endpoint(runtime_dir: str | os.PathLike[str]) -> str:
    """``ipc://<runtime_dir>/discovery/discovery.sock``: discovery binds this ROUTER (in a
    directory of its own account, ``gorb.common.runtime``), the API connects."""
    return _endpoint(runtime_dir, DISCOVERY, subdir=DISCOVERY_DIR)


class SyncRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``store.sync``: apply the store now; ``force`` skips the delete-share safety rule."""

    force: bool = False


class StatusRequest(msgspec.Struct, forbid_unknown_fields=True):
    """``store.status``: what ``store.sync`` would do, changing nothing."""


class Change(msgspec.Struct, frozen=True):
    op: str
    service: str
    backend: str | None = None


class ObjectError(msgspec.Struct, frozen=True):
    object: str
    reason: str


class SyncResult(msgspec.Struct):
    status: str
    applied: list[Change] = []
    errors: list[ObjectError] = []
    refused: str | None = None


class DiffLists(msgspec.Struct):
    create: list[str] = []
    update: list[str] = []
    delete: list[str] = []


class WriteLists(msgspec.Struct):
    put: list[str] = []
    delete: list[str] = []


class StoreStatus(msgspec.Struct):
    status: str
    store: str
    services: DiffLists = msgspec.field(default_factory=DiffLists)
    backends: DiffLists = msgspec.field(default_factory=DiffLists)
    writes: WriteLists = msgspec.field(default_factory=WriteLists)
    refused: str | None = None
    errors: list[ObjectError] = []


REQUESTS: dict[str, type] = {
    "store.sync": SyncRequest,
    "store.status": StatusRequest,
}


def decode_request(type_: str, body: dict) -> SyncRequest | StatusRequest:
    """The typed body of a control request; GorbError(INVALID) on an unknown type or a bad body."""
    return messages.decode_request(type_, body, REQUESTS)
