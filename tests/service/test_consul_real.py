"""``ConsulAdapter`` and ``ConsulStore`` against a REAL Consul agent, when there is one.

Runs only when ``CONSUL_HTTP_ADDR`` is set (Consul's own variable: ``127.0.0.1:8500``,
``http://host:8500`` or ``https://...``; ``CONSUL_HTTP_SSL=true`` makes a bare address https,
``CONSUL_HTTP_TOKEN`` is the ACL token, which needs service:write, agent check write and key:write
on the test prefix). Everything else in gorb's tests talks to the Consul double
(``tests/consul_double.py``); this checks the double's assumptions against the real thing: wire
shapes of register / deregister / agent services, TTL check updates (and an unknown check),
KV with compare-and-set, recurse, and blocking queries with ``X-Consul-Index``.

Every service id and key is unique to the run (``gorb-test-<random>``) and removed afterwards,
so it can run against a shared dev agent.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

import consul as client
import pytest

from gorb.services.discovery import documents as docs
from gorb.services.discovery.blocking import Backoff
from gorb.services.discovery.consul_adapter import ConsulAdapter
from gorb.services.discovery.reconcile import Step
from gorb.services.discovery.stores import ConsulStore, StoreConflict
from tests.pace import limit, wait_until

ADDR = os.environ.get("CONSUL_HTTP_ADDR", "")
TOKEN = os.environ.get("CONSUL_HTTP_TOKEN", "")

pytestmark = [
    pytest.mark.skipif(not ADDR, reason="CONSUL_HTTP_ADDR is not set: no real Consul agent to "
                                        "test against (the Consul double covers these calls in "
                                        "test_discovery_adapter.py)"),
    pytest.mark.timeout(60),
]


def agent_url() -> str:
    if "://" in ADDR:
        return ADDR
    ssl = os.environ.get("CONSUL_HTTP_SSL", "").lower() in ("1", "true")
    return f"{'https' if ssl else 'http'}://{ADDR}"


@pytest.fixture
def run_id():
    return f"gorb-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def adapter():
    a = ConsulAdapter(agent_url(), TOKEN)
    yield a
    a.close()


@pytest.fixture
def raw():
    """py-consul directly, for what the adapter does not read (agent checks) and for cleanup."""
    url = ConsulAdapter(agent_url()).url
    return client.Consul(host=url.host, port=url.port, scheme=url.scheme, token=TOKEN or None)


@pytest.fixture
def prefix(run_id, raw):
    yield run_id
    raw.kv.delete(f"{run_id}/", recurse=True)


def test_register_update_the_check_and_deregister(adapter, raw, run_id):
    sid = f"web@{run_id}"
    meta = {"protocol": "tcp", "scheduler": "wrr", "gorb_host": run_id}
    check = adapter.ttl_check("30s", "warning", f"gorb {sid}", "1 of 2 backends up")
    try:
        adapter.register(sid, "web", "10.0.0.1", 80, ["tcp", "wrr", "gorb"], meta, check)
        s = adapter.agent_services()[sid]
        assert (s["ID"], s["Service"], s["Address"], s["Port"]) == (sid, "web", "10.0.0.1", 80)
        assert sorted(s["Tags"]) == ["gorb", "tcp", "wrr"] and s["Meta"] == meta
        checks = raw.agent.checks()
        cid = f"service:{sid}"
        assert checks[cid]["Status"] == "warning" and checks[cid]["ServiceID"] == sid
        assert adapter.check_status(cid, "critical", "0 of 2 backends up") is True
        checks = raw.agent.checks()
        assert (checks[cid]["Status"], checks[cid]["Output"]) == ("critical",
                                                                  "0 of 2 backends up")
        assert adapter.check_status(cid, "passing", "2 of 2 backends up") is True
        assert raw.agent.checks()[cid]["Status"] == "passing"
        # an unknown check: False (re-register), never an exception the registrar would retry
        assert adapter.check_status(f"service:nope-{run_id}", "passing") is False
        # registering the same again (every full cycle after an agent restart) is accepted
        adapter.register(sid, "web", "10.0.0.1", 80, ["tcp", "wrr", "gorb"], meta, check)
    finally:
        adapter.deregister(sid)
    assert sid not in adapter.agent_services()
    assert f"service:{sid}" not in raw.agent.checks()
    adapter.deregister(sid)  # unknown now: fine


def test_kv_get_put_cas_delete_and_recurse(adapter, prefix):
    key = f"{prefix}/services/web"
    assert adapter.kv_tree(f"{prefix}/")[1] == {}
    assert adapter.kv_get(key) == (0, None)
    assert adapter.kv_put(key, b'{"port": 80}', cas=0) is True
    assert adapter.kv_put(key, b'{"port": 81}', cas=0) is False  # exists
    index, value = adapter.kv_get(key)
    assert value == b'{"port": 80}' and index > 0
    assert adapter.kv_put(key, b'{"port": 81}', cas=index) is True
    assert adapter.kv_put(key, b'{"port": 82}', cas=index) is False  # stale
    assert adapter.kv_delete(key, cas=index) is False                # stale
    assert adapter.kv_put(f"{prefix}/backends/web/a", b"{}") is True
    got_index, tree = adapter.kv_tree(f"{prefix}/")
    assert tree == {key: b'{"port": 81}', f"{prefix}/backends/web/a": b"{}"}
    assert got_index >= index
    new_index, _ = adapter.kv_get(key)
    assert adapter.kv_delete(key, cas=new_index) is True
    assert adapter.kv_get(key) == (0, None)


def test_a_blocking_query_returns_on_a_change_or_after_its_wait(adapter, prefix):
    adapter.kv_put(f"{prefix}/services/web", b"{}")
    index, _ = adapter.kv_tree(f"{prefix}/")
    t0 = time.monotonic()
    same, _ = adapter.kv_tree(f"{prefix}/", index, "1s")  # nothing changes: the wait runs out
    assert time.monotonic() - t0 >= 0.9 and same == index
    done: dict = {}

    def block():
        done["r"] = adapter.kv_tree(f"{prefix}/", index, "10s")

    t = threading.Thread(target=block)
    t.start()
    time.sleep(0.3)
    other = ConsulAdapter(agent_url(), TOKEN)
    other.kv_put(f"{prefix}/services/api", b"{}")
    t.join(limit(5))
    assert not t.is_alive(), "the blocking query did not return on the change"
    new_index, tree = done["r"]
    assert new_index > index and set(tree) == {f"{prefix}/services/web", f"{prefix}/services/api"}


def test_store_writes_are_compare_and_set_and_the_watch_sees_them(adapter, prefix):
    store = ConsulStore(adapter, ConsulAdapter(agent_url(), TOKEN), prefix, wait="2s")
    adapter.kv_put(f"{prefix}/services/web", b"v1")
    adapter.kv_put(f"{prefix}/backends/web/a", b"x")
    store.write(Step("store.put", "web", key="services/web", value=b"v2", expect=b"v1"))
    with pytest.raises(StoreConflict):
        store.write(Step("store.put", "web", key="services/web", value=b"v3", expect=b"v1"))
    store.write(Step("store.put", "", key=docs.MARKER, value=docs.render_marker()))
    store.write(Step("store.delete", "web", key="services/web", expect=b"v2", tree=True))
    assert adapter.kv_tree(f"{prefix}/")[1] == {f"{prefix}/format": docs.render_marker()}

    class Stop(Exception):
        pass

    changes: list[float] = []

    def on_change():
        changes.append(time.monotonic())
        if len(changes) >= 2:
            raise Stop

    def watch():
        try:
            store.watch(on_change, Backoff(first=0.1, cap=0.5), time.sleep)
        except Stop:
            pass

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    wait_until(lambda: changes, 5, "the watch's first read")
    adapter.kv_put(f"{prefix}/services/api", b'{"host": "10.0.0.2", "port": 443}')
    t.join(limit(5))
    assert len(changes) == 2 and not t.is_alive(), "the watch did not see the change"
    objects = store.read()
    assert set(objects.services) == {"api"} and objects.marker
