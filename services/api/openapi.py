"""The OpenAPI 3.1 document served at ``GET /openapi.json``.

Request bodies come from the model itself (``msgspec.json.schema_components`` of ServiceOptions and
BackendOptions), so a field added to the model appears here without an edit; so do the replies of
the /store routes (discovery's ``SyncResult`` and ``StoreStatus`` of ``gorb.common.store_messages``);
the other responses and errors are written out below. With tokens configured (``document(auth=True)``)
every operation but ``/health`` requires the bearer scheme and documents 401 and 403. ``tests/service/test_api_wsgi.py`` walks the
bottle routes and this document and fails when a route or method is missing from either side.

What JSON Schema cannot say is said in the descriptions: keys match case-insensitively and unknown
keys are ignored (GORB's Go decoder), and some rules span fields (``port`` is required unless
``fwmark`` is set; ``timeout``/``netmask`` only with ``persistent``; ``host`` must resolve; a
backend's address family must be its service's) — those are 400s with GORB's texts.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec

from gorb.common.model import STATUSES, BackendOptions, ServiceOptions
from gorb.common.store_messages import StoreStatus, SyncResult

REF = "#/components/schemas/{name}"
OBJECT_ID = r"^[A-Za-z0-9][A-Za-z0-9_.:@-]{0,127}$"  # gorb.common.validation.validate_object_id


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": _ref("Error")}}}


def _ok_json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


EMPTY_OK = {"description": "Done. The body is empty (GORB)."}


def _links(*operations: str, backend: bool = False) -> dict[str, Any]:
    """OpenAPI links from a success to the operations on the same object (used by stateful
    testing: what was created can be read, changed and removed)."""
    params = {"vs": "$request.path.vs"}
    if backend:
        params["rs"] = "$request.path.rs"
    return {op: {"operationId": op, "parameters": dict(params)} for op in operations}


def _created(*operations: str, backend: bool = False) -> dict[str, Any]:
    return {**EMPTY_OK, "links": _links(*operations, backend=backend)}
E400 = _error("Invalid input: the path, the JSON body or a value in it (GORB's error texts, e.g. "
              "`endpoint information is missing`, `specified protocol is unknown`, `EOF`).")
E404 = _error("`unable to locate specified object`: no such service (or backend).")
E409 = _error("`specified object already exists`: the id, or the address, is taken.")
E413 = _error("The request body is over the limit (1 MiB).")
E408 = _error("The request body did not arrive within `api.idle_timeout`; the connection is "
              "closed.")
E500 = _error("`error while calling into IPVS: ...` (the kernel refused the change), "
              "`cannot save the desired state (...); nothing was changed` (the writer's state "
              "file could not be written: full or read-only file system), or `internal error` "
              "(a bug, logged with its traceback).")
E503 = _error("ipvs-writer did not answer in time; retry later.")
E401 = {**_error("No token, or one that is no client's (`[api.tokens]`): send "
                 "`Authorization: Bearer <token>`. Given before the route is looked up, so an "
                 "unknown path is a 401 too."),
        "headers": {"WWW-Authenticate": {
            "description": '`Bearer realm="gorb"`, with `error="invalid_token"` when a token '
                           "was sent but is wrong.",
            "schema": {"type": "string"}}}}
E403 = _error("The token's role is `read`: changing state (PUT, PATCH, DELETE, "
              "`GET /store/sync`) needs `admin`.")
SECURITY_SCHEMES = {"bearer": {
    "type": "http", "scheme": "bearer",
    "description": "A secret of `[api.tokens]` (role `read`: GET; `admin`: everything). "
                   "Without any token configured the API is open (GORB) and no operation "
                   "requires one."}}
E400_SYNC = _error("`sync refused: <why>`: applying the store would delete more than "
                   "`discovery.max_delete_share` of the services or backends, or anything at all "
                   "while the store is empty; nothing was applied (`?force=true` overrides). Or "
                   "`force` is not a boolean.")
E404_STORE = _error("`unable to locate specified object`: no configuration store is configured "
                    "(`discovery.kv_prefix` and `discovery.store_dir` are empty).")
E503_STORE = _error("discovery is not running or did not answer (35 s), or the writer or the "
                    "store (Consul) did not answer discovery; retry later.")
FORCE = {"name": "force", "in": "query", "required": False,
         "description": "Apply even if the safety rule would refuse the sync (deleting more than "
                        "`discovery.max_delete_share`, or everything because the store is empty). "
                        "`true`/`1`/`yes` or `false`/`0`/`no`.",
         "schema": {"type": "boolean", "default": False}}

VS = {"name": "vs", "in": "path", "required": True, "description": "Virtual service id.",
      "schema": {"type": "string", "pattern": OBJECT_ID}}
RS = {"name": "rs", "in": "path", "required": True,
      "description": "Backend id, unique within its service.",
      "schema": {"type": "string", "pattern": OBJECT_ID}}

STATS = {"anyOf": [{"type": "object", "additionalProperties": {"type": "integer"}},
                   {"type": "null"}],
         "description": "The kernel's counters (conns, inpkts, outpkts, inbytes, outbytes and "
                        "rates; for a backend also activeconns, inactconns, persistconns); null "
                        "when the kernel has no such entry or gave no counters."}

HAND_WRITTEN: dict[str, Any] = {
    "Error": {
        "type": "object",
        "properties": {"error": {"type": "string"}},
        "required": ["error"],
    },
    "ServiceList": {"type": "array", "items": {"type": "string"},
                    "description": "Service ids, sorted; `[]` when there are none."},
    "ServiceInfo": {
        "type": "object",
        "properties": {
            "options": _ref("ServiceOptions"),
            "health": {"type": "number", "minimum": 0, "maximum": 1,
                       "description": "Mean health of the backends; 1 without backends."},
            "backends": {"type": "array", "items": {"type": "string"}},
            "address": {"type": "string", "description": "The VIP the host resolved to."},
            "stats": STATS,
        },
        "required": ["options", "health", "backends", "address", "stats"],
    },
    "BackendMetrics": {
        "type": "object",
        "properties": {
            "status": {"type": "integer", "enum": [0, 1],
                       "description": "GORB's: 1 down, else 0 (up, or not checked yet)."},
            "status_name": {"type": "string", "enum": list(STATUSES)},
            "health": {"type": "number", "minimum": 0, "maximum": 1},
            "uptime": {"type": "integer", "minimum": 0, "description": "Seconds."},
            "last_check": {"anyOf": [{"type": "number"}, {"type": "null"}],
                           "description": "When the last check ended (Unix time); null before "
                                          "the first (and after a writer restart, until the "
                                          "next)."},
            "last_result": {"anyOf": [{"type": "object",
                                       "properties": {"ok": {"type": "boolean"},
                                                      "error": {"type": "string"},
                                                      "latency": {"type": "number"}}},
                                      {"type": "null"}],
                            "description": "What the last check found (latency in seconds)."},
        },
        "required": ["status", "status_name", "health", "uptime", "last_check", "last_result"],
    },
    "BackendInfo": {
        "type": "object",
        "properties": {
            "options": {"allOf": [_ref("BackendOptions")],
                        "description": "As stored, except (as in GORB) `weight` is the current "
                                       "weight and `pulse` the pulse in effect."},
            "metrics": _ref("BackendMetrics"),
            "address": {"type": "string"},
            "stats": STATS,
        },
        "required": ["options", "metrics", "address", "stats"],
    },
    "WeightUpdate": {
        "type": "object",
        "properties": {"weight": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}},
        "required": ["weight"],
        "description": "GORB decoded a whole BackendOptions and used only `weight`; other keys "
                       "are ignored. Unlike GORB, an omitted weight is a 400 `weight is "
                       "required` (GORB drained the backend to 0).",
    },
    "Health": {
        "type": "object",
        "properties": {"api": {"type": "string", "enum": ["ok"]},
                       "writer": {"type": "string", "enum": ["ok", "unavailable"]},
                       "error": {"type": "string"},
                       "auth": {"type": "string", "enum": ["on", "off"],
                                "description": "Whether tokens are required (`[api.tokens]`)."}},
        "required": ["api", "writer", "auth"],
    },
}

DECODING = ("JSON, decoded as GORB did: keys match case-insensitively, unknown keys are ignored, "
            "null means the default. An empty body is a 400 `EOF`.")


def _operation(summary: str, responses: dict[str, Any], params: list | None = None,
               body: dict[str, Any] | None = None, op_id: str = "") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "operationId": op_id, "responses": responses}
    if params:
        op["parameters"] = params
    if body is not None:
        op["requestBody"] = {"required": True, "description": DECODING,
                             "content": {"application/json": {"schema": body}}}
    return op


HOST = {"anyOf": [{"type": "string", "format": "ipv4"}, {"type": "string", "format": "ipv6"},
                  {"type": "string", "format": "hostname"}, {"type": "null"}]}


def _nullable(schema: dict[str, Any], defaults: bool = True) -> dict[str, Any]:
    """Every property may also be null, which means "as if absent" (Go's decoder)."""
    for name, prop in schema.get("properties", {}).items():
        default = prop.pop("default", None)
        if not any(alt.get("type") == "null" for alt in prop.get("anyOf", [])):
            prop = {"anyOf": [prop, {"type": "null"}]}
        if defaults and default is not None:
            prop["default"] = default
        schema["properties"][name] = prop
    return schema


def _request_schemas(components: dict[str, Any]) -> None:
    """Request-side schemas next to the stored shapes: what must be sent to be accepted, as far as
    a schema can say it (the rest is in the descriptions and answered with 400s)."""
    service = _nullable(copy.deepcopy(components["ServiceOptions"]))
    service["title"] = "ServiceCreate"
    service["description"] = ("A new virtual service (GORB's ServiceOptions). `port` is required "
                              "unless `fwmark` is set (then it must be 0); `host` omitted means "
                              "the first address of the writer's device (GORB -i); a host name "
                              "is resolved once, here (IPv4 first).")
    props = service.get("properties", {})
    if "host" in props:
        props["host"] = copy.deepcopy(HOST)
    if "port" in props and "fwmark" in props:
        service["anyOf"] = [
            {"required": ["port"], "properties": {"port": {"type": "integer", "minimum": 1}}},
            {"required": ["fwmark"], "properties": {"fwmark": {"type": "integer", "minimum": 1}}},
        ]
    components["ServiceCreate"] = service
    patch = _nullable(copy.deepcopy(components["ServiceOptions"]), defaults=False)
    patch["title"] = "ServicePatch"
    patch["description"] = ("Options to change; the rest stay. The service's kernel key (host, "
                            "port, protocol, fwmark, family) cannot change: 400.")
    components["ServicePatch"] = patch
    backend = _nullable(copy.deepcopy(components["BackendOptions"]))
    backend["title"] = "BackendCreate"
    backend["description"] = ("A new backend (GORB's BackendOptions). `host` is required, and "
                              "so is a `port` other than 0, except under a fwmark service (where "
                              "0, the default, keeps the client's port); `weight` <= 0 means "
                              "100 (GORB); a host name is resolved once, here.")
    props = backend.get("properties", {})
    if "host" in props:
        props["host"] = {"anyOf": HOST["anyOf"][:3]}
    backend["required"] = ["host"] if "host" in props else []
    components["BackendCreate"] = backend


STORE_REPLIES = ("SyncResult", "StoreStatus", "Change", "ObjectError", "DiffLists", "WriteLists")
CHANGE_OPS = ["service.create", "service.update", "service.delete", "backend.create",
              "backend.update", "backend.delete", "store.put", "store.delete"]


def _store_schemas(components: dict[str, Any]) -> None:
    """The /store replies as sent: every field always present, the closed sets as enums."""
    for name in STORE_REPLIES:
        schema = components[name]
        schema["required"] = list(schema["properties"])
        for prop in schema["properties"].values():
            prop.pop("default", None)
    sync, status = components["SyncResult"], components["StoreStatus"]
    sync["description"] = ("What one sync applied, in order (`applied`), and the objects it "
                           "left as they were (`errors`): `partial` when there are any.")
    sync["properties"]["status"]["enum"] = ["ok", "partial"]
    sync["properties"]["refused"] = {"type": "null"}
    status["description"] = ("A dry run of `/store/sync`: what it would change in gorb "
                             "(`services`, `backends`: store -> writer) and write back to the "
                             "store (`writes`: gorb -> Consul KV, keys relative to the prefix).")
    status["properties"]["status"]["enum"] = ["ok", "need sync", "refused"]
    status["properties"]["store"]["description"] = ("consul URL /v1/kv/<prefix>/, or "
                                                    "file://<store_dir>")
    components["Change"]["properties"]["op"]["enum"] = list(CHANGE_OPS)
    components["ObjectError"]["description"] = ("A store key or file, or a gorb object, left "
                                                "alone, and why.")


def _secure(paths: dict[str, Any]) -> None:
    """With tokens: every operation but /health needs one, and may answer 401 or 403."""
    for path, item in paths.items():
        for method, op in item.items():
            if method == "parameters":
                continue
            if path == "/health":
                op["security"] = []
                continue
            op["responses"].update({"401": copy.deepcopy(E401), "403": copy.deepcopy(E403)})


def _service_paths() -> dict[str, Any]:
    """GORB's routes: services and backends (the writer answers them: 500/503 possible)."""
    writer_errors = {"500": E500, "503": E503}
    return {
        "/service": {
            "get": _operation("List the virtual services", {
                "200": _ok_json("Service ids.", _ref("ServiceList")), **writer_errors},
                op_id="listServices"),
        },
        "/service/{vs}": {
            "parameters": [VS],
            "put": _operation("Create a virtual service", {
                "200": _created("getService", "updateService", "deleteService"),
                "400": E400, "409": E409, "408": E408, "413": E413, **writer_errors},
                body=_ref("ServiceCreate"), op_id="createService"),
            "get": _operation("Show a virtual service", {
                "200": _ok_json("GORB's ServiceInfo with `address` and `stats`.",
                                _ref("ServiceInfo")),
                "400": E400, "404": E404, **writer_errors}, op_id="getService"),
            "patch": _operation("Change a virtual service's options (scheduler, flags, "
                                "persistence, pulse defaults, ...)", {
                "200": EMPTY_OK, "400": E400, "404": E404, "408": E408, "413": E413, **writer_errors},
                body=_ref("ServicePatch"), op_id="updateService"),
            "delete": _operation("Remove a virtual service and all its backends", {
                "200": EMPTY_OK, "400": E400, "404": E404, **writer_errors},
                op_id="deleteService"),
        },
        "/service/{vs}/{rs}": {
            "parameters": [VS, RS],
            "put": _operation("Create a backend of a virtual service", {
                "200": _created("getBackend", "updateBackend", "deleteBackend", backend=True),
                "400": E400, "404": E404, "409": E409, "408": E408, "413": E413, **writer_errors},
                body=_ref("BackendCreate"), op_id="createBackend"),
            "get": _operation("Show a backend with its health metrics", {
                "200": _ok_json("GORB's BackendInfo with `address` and `stats`.",
                                _ref("BackendInfo")),
                "400": E400, "404": E404, **writer_errors}, op_id="getBackend"),
            "patch": _operation("Set a backend's weight", {
                "200": EMPTY_OK, "400": E400, "404": E404, "408": E408, "413": E413, **writer_errors},
                body=_ref("WeightUpdate"), op_id="updateBackend"),
            "delete": _operation("Remove a backend", {
                "200": EMPTY_OK, "400": E400, "404": E404, **writer_errors},
                op_id="deleteBackend"),
        },
    }


def _other_paths() -> dict[str, Any]:
    """/health, /metrics, the store's routes and this document."""
    return {
        "/health": {
            "get": _operation("Whether the API and the writer answer", {
                "200": _ok_json("Both answer.", _ref("Health")),
                "503": _ok_json("The writer does not answer.", _ref("Health")),
                "500": E500}, op_id="health"),
        },
        "/metrics": {
            "get": _operation("Prometheus metrics (GORB's, IPVS counters, gorb_up)", {
                "200": {"description": "Prometheus text exposition; `gorb_up 0` when the writer "
                                       "did not answer.",
                        "content": {"text/plain": {"schema": {"type": "string"}}}},
                "500": E500}, op_id="metrics"),
        },
        "/store/sync": {
            "get": _operation("Apply the configuration store now (qk4l)", {
                "200": _ok_json("The sync ran; what it applied.", _ref("SyncResult")),
                "400": E400_SYNC, "404": E404_STORE, "500": E500, "503": E503_STORE},
                params=[FORCE], op_id="storeSync"),
        },
        "/store/sync/status": {
            "get": _operation("What a store sync would change (qk4l's dry run)", {
                "200": _ok_json("The diff; nothing was changed.", _ref("StoreStatus")),
                "404": E404_STORE, "500": E500, "503": E503_STORE}, op_id="storeSyncStatus"),
        },
        "/openapi.json": {
            "get": _operation("This document", {
                "200": _ok_json("OpenAPI 3.1.", {"type": "object"}), "500": E500},
                op_id="openapi"),
        },
    }


def document(auth: bool = False) -> dict[str, Any]:
    """The document as this API serves it: ``auth`` (tokens configured) adds the bearer security
    requirement and the 401/403 responses; the scheme is declared either way."""
    _, components = msgspec.json.schema_components(
        (ServiceOptions, BackendOptions, SyncResult, StoreStatus), ref_template=REF)
    _request_schemas(components)
    _store_schemas(components)
    components.update(copy.deepcopy(HAND_WRITTEN))
    paths = {**_service_paths(), **_other_paths()}
    if auth:
        _secure(paths)
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "gorb", "version": "1",
                 "description": "GORB's REST API (IPVS virtual services and backends), "
                                "re-implemented. Success of PUT, PATCH and DELETE is 200 with an "
                                "empty body; every error is {\"error\": \"<text>\"}."},
        "paths": paths,
        "components": {"schemas": components, "securitySchemes": copy.deepcopy(SECURITY_SCHEMES)},
    }
    if auth:
        doc["security"] = [{"bearer": []}]
    return doc
