"""The store's layout and documents: KV keys and files parsed key by key with isolated errors,
weight semantics, the marker, and rendering that parses back to the same options."""

from __future__ import annotations

import json

import pytest

from gorb.common.model import BackendOptions, ServiceOptions
from gorb.services.discovery import documents as docs

pytestmark = pytest.mark.timeout(5)


def j(obj) -> bytes:
    return json.dumps(obj).encode()


KV_CASES = [
    # (name, entries under gorb/, services, backends {(vs, rs): weight}, error keys)
    ("k layout", {"services/web": j({"host": "10.0.0.1", "port": 80}),
                  "backends/web/a": j({"host": "10.1.0.1", "port": 8080, "vsid": "web"})},
     {"web"}, {("web", "a"): 100}, set()),
    ("not json", {"services/web": b"{", "services/api": j({"port": 443})},
     {"api"}, {}, {"gorb/services/web"}),
    ("not an object", {"services/web": j([1, 2])}, set(), {}, {"gorb/services/web"}),
    ("gorb's texts", {"services/web": j({"port": 80, "protocol": "icmp"}),
                      "services/api": j({"host": "10.0.0.2"})},
     set(), {}, {"gorb/services/web", "gorb/services/api"}),
    ("type error", {"services/web": j({"port": "eighty"})}, set(), {}, {"gorb/services/web"}),
    ("bad id", {"services/-web": j({"port": 80})}, set(), {}, {"gorb/services/-web"}),
    ("backend of a missing service", {"backends/web/a": j({"host": "10.1.0.1", "port": 1})},
     set(), {}, {"gorb/backends/web/a"}),
    ("backend of a bad service: only the service is reported",
     {"services/web": b"x", "backends/web/a": j({"host": "10.1.0.1", "port": 1})},
     set(), {}, {"gorb/services/web"}),
    ("drained and negative weights",
     {"services/web": j({"port": 80}),
      "backends/web/a": j({"host": "10.1.0.1", "port": 1, "weight": 0}),
      "backends/web/b": j({"host": "10.1.0.2", "port": 1, "weight": -1}),
      "backends/web/c": j({"host": "10.1.0.3", "port": 1, "weight": 5})},
     {"web"}, {("web", "a"): 0, ("web", "c"): 5}, {"gorb/backends/web/b"}),
    ("outside the layout", {"services/web/x": b"{}", "other": b"{}", "backends/web": b"{}"},
     set(), {}, {"gorb/services/web/x", "gorb/other", "gorb/backends/web"}),
]


@pytest.mark.parametrize("name,entries,services,backends,errors", KV_CASES,
                         ids=[c[0] for c in KV_CASES])
def test_parse_kv(name, entries, services, backends, errors):
    out = docs.parse_kv("gorb", {f"gorb/{k}": v for k, v in entries.items()})
    assert set(out.services) == services
    assert {(vs, rs): b.weight for vs, bs in out.backends.items()
            for rs, b in bs.items()} == backends
    assert set(out.errors) == errors


def test_parse_kv_skips_folders_and_other_prefixes():
    out = docs.parse_kv("/gorb/", {"gorb/": None, "gorb/services/": None,
                                   "gorbx/services/web": j({"port": 80}),
                                   "gorb/services/web": j({"port": 80})})
    assert set(out.services) == {"web"} and out.errors == {}
    assert out.raw == {"services/web": j({"port": 80})}


def test_empty_and_marker():
    assert docs.parse_kv("gorb", {}).empty
    assert not docs.parse_kv("gorb", {"gorb/format": docs.render_marker()}).empty
    assert not docs.parse_kv("gorb", {"gorb/services/web": b"bad"}).empty  # a document exists
    assert docs.parse_files({}).empty
    assert not docs.parse_files({"format": b""}).empty


FILE_CASES = [
    ("document", {"web.json": j({"options": {"port": 80},
                                 "backends": {"a": {"host": "10.1.0.1", "port": 1}}})},
     {"web"}, {("web", "a")}, set()),
    ("ignored files", {"README": b"x", ".web.json.swp": b"x", "web.json~": b"x",
                       "api.json": j({"options": {"port": 1}})}, {"api"}, set(), set()),
    ("bad document", {"web.json": b"[", "api.json": j({"options": {"port": 1}, "extra": 1})},
     set(), set(), {"web.json", "api.json"}),
    ("bad backend isolated", {"web.json": j({"options": {"port": 80}, "backends": {
        "a": {"host": "10.1.0.1", "port": 1}, "b": {"port": 1}}})},
     {"web"}, {("web", "a")}, {"web.json: backend b"}),
    ("backends not an object", {"web.json": j({"options": {"port": 80}, "backends": [1]})},
     set(), set(), {"web.json"}),
]


@pytest.mark.parametrize("name,files,services,backends,errors", FILE_CASES,
                         ids=[c[0] for c in FILE_CASES])
def test_parse_files(name, files, services, backends, errors):
    out = docs.parse_files(files)
    assert set(out.services) == services
    assert {(vs, rs) for vs, bs in out.backends.items() for rs in bs} == backends
    assert set(out.errors) == errors


def test_rendered_documents_parse_back():
    import msgspec
    svc = msgspec.to_builtins(ServiceOptions(host="10.0.0.1", port=80, family="ipv4"))
    raw = docs.render_service(svc)
    assert b"null" not in raw and json.loads(raw)["port"] == 80
    assert msgspec.to_builtins(docs.parse_service(json.loads(raw))) == svc
    drained = msgspec.to_builtins(BackendOptions(host="10.1.0.1", port=1, weight=0))
    raw = docs.render_backend(drained)
    assert json.loads(raw)["weight"] == 0
    assert docs.parse_backend(json.loads(raw)).weight == 0


def test_keys():
    assert docs.service_key("web") == "services/web"
    assert docs.backend_key("web", "a") == "backends/web/a"
    assert docs.backends_folder("web") == "backends/web/"
