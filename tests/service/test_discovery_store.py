"""The discovery process with the read-only file store (a directory of ``<vs>.json`` documents, as
a git checkout provides): applied at start and on change, bad files isolated, the safety rule,
and ``store.sync`` / ``store.status`` on the control socket. No Consul here."""

from __future__ import annotations

import json
import os
import time

import pytest

from tests.pace import wait_until
from tests.service.test_discovery_consul import OK, hosts, svc  # noqa: F401

pytestmark = pytest.mark.timeout(40)


def write(directory, name: str, doc) -> None:
    """Write a document the way a checkout does: to a temporary name, then renamed."""
    tmp = directory / f".{name}.tmp"
    tmp.write_bytes(doc if isinstance(doc, bytes) else json.dumps(doc).encode())
    os.replace(tmp, directory / name)


@pytest.fixture
def store_dir(base):
    d = base / "services"
    d.mkdir()
    return d


def test_file_store_applies_documents_and_isolates_bad_files(hosts, store_dir):  # noqa: F811
    write(store_dir, "web.json", {"options": {"host": "10.0.0.1", "port": 80},
                                  "backends": {"a": {"host": "10.1.0.1", "port": 8080},
                                               "b": {"host": "10.1.0.2"}}})
    write(store_dir, "broken.json", b"{")
    write(store_dir, "README", b"hello")
    h = hosts(store_dir=str(store_dir), store_poll=0.2)
    # the service and its backend are separate requests: wait for both, not the first
    views = wait_until(lambda: (v := h.views()) and "a" in v.get("web", {}).get("backends", {})
                       and v, 8, "the file's service and its good backend")
    assert set(views) == {"web"} and set(views["web"]["backends"]) == {"a"}
    assert (2, 6, "10.0.0.1", 80, 0) in h.writer_objs.kernel.table
    status = h.ask("store.status", {})["data"]
    assert status["store"] == f"file://{store_dir}"
    assert status["status"] == "ok"
    assert {e["object"] for e in status["errors"]} == {"broken.json", "web.json: backend b"}
    # a change to the file is applied; a new file too
    write(store_dir, "web.json", {"options": {"host": "10.0.0.1", "port": 80, "method": "rr"},
                                  "backends": {"a": {"host": "10.1.0.1", "port": 8080,
                                                     "weight": 0}}})
    write(store_dir, "api.json", {"options": {"host": "10.0.0.2", "port": 443}})
    wait_until(lambda: set(h.views()) == {"web", "api"}
               and h.views()["web"]["options"]["method"] == "rr"
               and h.views()["web"]["backends"]["a"]["options"]["weight"] == 0,
               8, "file changes applied")


def test_file_store_is_authoritative_and_read_only(hosts, store_dir):  # noqa: F811
    for i in (1, 2, 3):
        write(store_dir, f"s{i}.json", {"options": {"host": f"10.0.0.{i}", "port": 80}})
    h = hosts(store_dir=str(store_dir), store_poll=0.2)
    wait_until(lambda: set(h.views()) == {"s1", "s2", "s3"}, 8, "the files' services")
    # a REST change is not written anywhere; the next sync reverts it
    assert h.writer.request("service.create", svc("extra", "10.0.0.9")) == OK
    status = h.ask("store.status", {})["data"]
    assert status["services"]["delete"] == ["extra"] and status["writes"] == {"put": [],
                                                                              "delete": []}
    assert sorted(os.listdir(store_dir)) == ["s1.json", "s2.json", "s3.json"]
    reply = h.ask("store.sync", {})
    assert reply["ok"] and reply["data"]["applied"] == [
        {"op": "service.delete", "service": "extra", "backend": None}]
    # deleting one file is applied; emptying the directory is refused unless forced
    (store_dir / "s3.json").unlink()
    wait_until(lambda: set(h.views()) == {"s1", "s2"}, 8, "one file removed")
    for name in ("s1.json", "s2.json"):
        (store_dir / name).unlink()
    wait_until(lambda: h.ask("store.status", {})["data"]["status"] == "refused", 8,
               "the sync refused")
    time.sleep(0.6)
    assert set(h.views()) == {"s1", "s2"}
    assert h.ask("store.sync", {"force": True})["data"]["status"] == "ok"
    assert h.views() == {}


def test_missing_directory_is_unavailable_not_empty(hosts, base):  # noqa: F811
    h = hosts(store_dir=str(base / "nowhere"), store_poll=0.2)
    assert h.writer.request("service.create", svc("web", "10.0.0.1")) == OK
    reply = h.ask("store.status", {})
    assert reply["ok"] is False and reply["errno"] == "unavailable"
    assert "cannot list" in reply["reason"]
    time.sleep(0.6)
    assert set(h.views()) == {"web"}


def test_no_store_answers_not_found(hosts):  # noqa: F811
    h = hosts()
    for type_ in ("store.sync", "store.status"):
        assert h.ask(type_, {"force": True} if type_ == "store.sync" else {}) == {
            "ok": False, "errno": "not_found", "reason": "unable to locate specified object",
            "data": None}
