"""Pure core of the configuration store: its layout, its documents, and parsing them key by key.

Consul KV layout under ``discovery.kv_prefix`` (e.g. ``gorb``); values are JSON objects::

    <prefix>/format              {"version": 1}    written by gorb; see "empty store" below
    <prefix>/services/<vs>       ServiceOptions, the body of PUT /service/<vs>
                                 {"host": "10.0.0.1", "port": 80, "method": "wrr"}
    <prefix>/backends/<vs>/<rs>  BackendOptions, the body of PUT /service/<vs>/<rs>
                                 {"host": "10.1.0.1", "port": 8080, "method": "nat", "weight": 100}

File store (``discovery.store_dir``, read-only, e.g. a git checkout), one document per service::

    <dir>/<vs>.json              {"options": ServiceOptions, "backends": {"<rs>": BackendOptions}}
    <dir>/format                 optional marker, as the KV one

Rules, each a deliberate fix of GORB's store (gorb-spec §5.2-5.3, §8.19):
- backends live under their service (``backends/<vs>/<rs>``, per-service ids as in qk4l), not in a
  global namespace linked by a ``vsid`` field (a ``vsid`` field is ignored);
- one bad key never aborts a round: each key that is not JSON, not an object, fails validation
  (GORB's texts) or names a bad id is reported in ``errors`` and its object is left alone
  (neither created, changed nor deleted); a backend whose service document is missing or bad is
  left alone too. Keys outside the layout are reported and ignored, as are files not named
  ``<vs>.json`` or ``format`` (editor swap files, READMEs) and keys without a value (folders);
- ``weight``: absent means 100 as on create; 0 means drained (GORB's PATCH), so a drain made over
  REST survives the round trip through the store; negative is an error;
- the store is "empty" when it has no service document (good or bad) and no ``format`` marker:
  an empty store never deletes anything unless forced (``gorb.services.discovery.reconcile``). gorb
  writes the marker with its first write-back, so removing the last service over REST on one
  host still removes it from the others.

Documents gorb writes are the writer's normalised options, keys sorted, without null fields.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gorb.common.errors import GorbError, invalid
from gorb.common.model import DEFAULT_WEIGHT, BackendOptions, ServiceOptions
from gorb.common.validation import decode, validate_backend, validate_object_id, validate_service

FORMAT_VERSION = 1
MARKER = "format"
SERVICES = "services"
BACKENDS = "backends"
FILE_SUFFIX = ".json"


@dataclass
class StoreObjects:
    """A store's content, parsed. ``raw`` keeps each object's bytes, keyed by its relative key
    (``services/web``, ``backends/web/a``), so write-backs can check what they overwrite."""

    services: dict[str, ServiceOptions] = field(default_factory=dict)
    backends: dict[str, dict[str, BackendOptions]] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # key or file -> reason
    names: dict[str, str] = field(default_factory=dict)   # relative key -> key or file name
    bad_services: set[str] = field(default_factory=set)
    bad_backends: set[tuple[str, str]] = field(default_factory=set)
    marker: bool = False

    @property
    def empty(self) -> bool:
        return not self.services and not self.bad_services and not self.marker

    def name(self, rel: str) -> str:
        """How errors name an object: its full key, or its file (and backend)."""
        return self.names.get(rel, rel)


def service_key(vsid: str) -> str:
    return f"{SERVICES}/{vsid}"


def backend_key(vsid: str, rsid: str) -> str:
    return f"{BACKENDS}/{vsid}/{rsid}"


def backends_folder(vsid: str) -> str:
    return f"{BACKENDS}/{vsid}/"


# --- rendering ---------------------------------------------------------------------------------

def _dumps(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def _without_nulls(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if v is not None}


def render_service(options: dict[str, Any]) -> bytes:
    return _dumps(_without_nulls(options))


def render_backend(options: dict[str, Any]) -> bytes:
    doc = _without_nulls(options)
    doc["weight"] = options.get("weight", DEFAULT_WEIGHT)  # always explicit: 0 is a drain
    return _dumps(doc)


def render_marker() -> bytes:
    return _dumps({"version": FORMAT_VERSION})


# --- parsing -----------------------------------------------------------------------------------

def _json_object(value: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise invalid(f"expected a JSON object, got {type(doc).__name__}")
    return doc


def parse_service(doc: Mapping[str, Any]) -> ServiceOptions:
    """A service document -> ServiceOptions, checked for form (names resolve later)."""
    opts = decode(doc, ServiceOptions)
    validate_service(opts)
    return opts


def parse_backend(doc: Mapping[str, Any]) -> BackendOptions:
    """A backend document -> BackendOptions; weight absent -> 100, 0 kept (drained)."""
    if not isinstance(doc, Mapping):
        raise invalid(f"expected a JSON object, got {type(doc).__name__}")
    doc = {k: v for k, v in doc.items() if k != "vsid"}  # GORB K's link field: the key says it
    doc.setdefault("weight", DEFAULT_WEIGHT)
    opts = decode(doc, BackendOptions)
    if opts.weight < 0:
        raise invalid("weight must be 0 (drained) or more")
    # Port 0 is checked later, against the service (a fwmark service's backends may have it).
    validate_backend(opts, fwmark_service=True)
    return opts


def _add_service(out: StoreObjects, key: str, vsid: str, doc_bytes: bytes | None,
                 doc: Mapping[str, Any] | None = None) -> bool:
    try:
        validate_object_id(vsid)
        if doc is None:
            doc = _json_object(doc_bytes or b"")
        out.services[vsid] = parse_service(doc)
    except GorbError as err:
        out.errors[key] = err.reason
        out.bad_services.add(vsid)
        return False
    out.names[service_key(vsid)] = key
    if doc_bytes is not None:
        out.raw[service_key(vsid)] = doc_bytes
    return True


def _add_backend(out: StoreObjects, key: str, vsid: str, rsid: str, doc_bytes: bytes | None,
                 doc: Any = None) -> None:
    try:
        validate_object_id(rsid)
        if doc is None:
            doc = _json_object(doc_bytes or b"")
        opts = parse_backend(doc)
    except GorbError as err:
        out.errors[key] = err.reason
        out.bad_backends.add((vsid, rsid))
        return
    out.backends.setdefault(vsid, {})[rsid] = opts
    out.names[backend_key(vsid, rsid)] = key
    if doc_bytes is not None:
        out.raw[backend_key(vsid, rsid)] = doc_bytes


def _drop_orphans(out: StoreObjects, key_of) -> None:
    """Backends whose service has no good document are left alone (reported if no document)."""
    for vsid in list(out.backends):
        if vsid in out.services:
            continue
        for rsid in out.backends.pop(vsid):
            out.raw.pop(backend_key(vsid, rsid), None)
            out.bad_backends.add((vsid, rsid))
            if vsid not in out.bad_services:
                out.errors[key_of(vsid, rsid)] = f"no document for its service {vsid!r}"


def parse_kv(prefix: str, entries: Mapping[str, bytes | None]) -> StoreObjects:
    """Consul KV entries under ``<prefix>/`` (full keys) -> StoreObjects; errors per key."""
    out = StoreObjects()
    head = prefix.strip("/") + "/"
    for key in sorted(entries):
        value = entries[key]
        if not key.startswith(head) or value is None or key.endswith("/"):
            continue
        parts = key[len(head):].split("/")
        if parts == [MARKER]:
            out.marker = True
        elif len(parts) == 2 and parts[0] == SERVICES and parts[1]:
            _add_service(out, key, parts[1], value)
        elif len(parts) == 3 and parts[0] == BACKENDS and parts[1] and parts[2]:
            _add_backend(out, key, parts[1], parts[2], value)
        else:
            out.errors[key] = ("not part of gorb's layout (services/<vs>, backends/<vs>/<rs>, "
                               "format): ignored")
    _drop_orphans(out, lambda vs, rs: f"{head}{backend_key(vs, rs)}")
    return out


def parse_files(files: Mapping[str, bytes]) -> StoreObjects:
    """A store directory's files (name -> content) -> StoreObjects; errors per file (and per
    backend inside a file). Only ``<vs>.json`` and ``format`` are read."""
    out = StoreObjects()
    for name in sorted(files):
        if name == MARKER:
            out.marker = True
            continue
        if name.startswith(".") or not name.endswith(FILE_SUFFIX):
            continue
        vsid = name[:-len(FILE_SUFFIX)]
        try:
            doc = _json_object(files[name])
            unknown = set(doc) - {"options", "backends"}
            if unknown:
                raise invalid(f"unknown field(s) {', '.join(sorted(unknown))}: a "
                                           'document is {"options": {...}, "backends": {...}}')
            backends = doc.get("backends") or {}
            if not isinstance(backends, dict):
                raise invalid("backends must be an object of id -> options")
        except GorbError as err:
            out.errors[name] = err.reason
            out.bad_services.add(vsid)
            continue
        if not _add_service(out, name, vsid, None, doc.get("options") or {}):
            continue
        for rsid in sorted(backends):
            _add_backend(out, f"{name}: backend {rsid}", vsid, rsid, None, backends[rsid])
    return out
