"""``ConsulAdapter`` and ``ConsulStore`` against the Consul double over HTTP: registrations with a
TTL check, KV trees, compare-and-set, one exception for every transport failure, and the watch
resetting its index when Consul's goes backwards. (Threads here; the process runs them as
greenlets.)"""

from __future__ import annotations

import threading
import time

import pytest

from gorb.services.discovery import documents as docs
from gorb.services.discovery.blocking import Backoff
from gorb.services.discovery.consul_adapter import ConsulAdapter, ConsulRefused, ConsulUnavailable
from gorb.services.discovery.reconcile import Step
from gorb.services.discovery.stores import ConsulStore, StoreConflict, StoreUnavailable
from tests.pace import limit, wait_until

pytestmark = pytest.mark.timeout(30)


def test_register_check_and_deregister(consul):
    a = ConsulAdapter(consul.url)
    check = a.ttl_check("30s", "warning", "gorb web", "1 of 2 backends up")
    a.register("web", "web", "10.0.0.1", 80, ["tcp", "wrr", "gorb"],
               {"protocol": "tcp", "scheduler": "wrr", "gorb_host": "lb1"}, check)
    s = a.agent_services()["web"]
    assert (s["Address"], s["Port"], s["Meta"]["gorb_host"]) == ("10.0.0.1", 80, "lb1")
    assert consul.checks["service:web"]["Status"] == "warning"
    assert a.check_status("service:web", "critical", "0 of 2 backends up") is True
    assert consul.checks["service:web"]["Output"] == "0 of 2 backends up"
    assert a.check_status("service:nope", "passing") is False
    a.deregister("web")
    a.deregister("web")  # unknown: fine
    assert a.agent_services() == {}


def test_kv_tree_get_and_cas(consul):
    a = ConsulAdapter(consul.url)
    assert a.kv_tree("gorb/")[1] == {}
    assert a.kv_put("gorb/services/web", b'{"port": 80}', cas=0) is True
    assert a.kv_put("gorb/services/web", b'{"port": 81}', cas=0) is False  # exists
    index, value = a.kv_get("gorb/services/web")
    assert value == b'{"port": 80}' and index > 0
    assert a.kv_put("gorb/services/web", b'{"port": 81}', cas=index) is True
    assert a.kv_delete("gorb/services/web", cas=index) is False  # stale
    assert a.kv_get("gorb/nope") == (0, None)
    got_index, tree = a.kv_tree("gorb/")
    assert tree == {"gorb/services/web": b'{"port": 81}'} and got_index >= index
    # a blocking query returns on a change
    done = {}
    t = threading.Thread(target=lambda: done.update(r=a.kv_tree("gorb/", got_index, "5s")))
    t.start()
    time.sleep(0.2)
    ConsulAdapter(consul.url).kv_put("gorb/services/api", b"{}")
    t.join(limit(3))
    assert set(done["r"][1]) == {"gorb/services/web", "gorb/services/api"}


def test_every_transport_failure_is_consul_unavailable(consul):
    a = ConsulAdapter(consul.url, timeout=0.5)
    consul.fault("/v1/agent/services", 500, count=1)
    with pytest.raises(ConsulUnavailable):
        a.agent_services()
    consul.fault("/v1/kv/", None, delay=2.0, count=1)  # an agent that does not answer in time
    with pytest.raises(ConsulUnavailable):
        a.kv_get("x")
    consul.fault("/v1/kv/", 403, "Permission denied", count=1)
    with pytest.raises(ConsulRefused):
        a.kv_put("x", b"1")
    consul.stop()
    with pytest.raises(ConsulUnavailable):
        a.kv_tree("gorb/")
    consul.start()
    assert a.agent_services() == {}


def test_store_writes_are_compare_and_set(consul):
    a = ConsulAdapter(consul.url)
    store = ConsulStore(a, a, "gorb")
    a.kv_put("gorb/services/web", b"v1")
    a.kv_put("gorb/backends/web/a", b"x")
    store.write(Step("store.put", "web", key="services/web", value=b"v2", expect=b"v1"))
    assert consul.kv["gorb/services/web"] == b"v2"
    with pytest.raises(StoreConflict):  # changed since the round read it
        store.write(Step("store.put", "web", key="services/web", value=b"v3", expect=b"v1"))
    store.write(Step("store.put", "web", key="services/web", value=b"v2", expect=b"v1"))  # same
    store.write(Step("store.delete", "web", key="services/web", expect=b"v2", tree=True))
    assert consul.kv == {}
    store.write(Step("store.put", "", key=docs.MARKER, value=docs.render_marker()))
    store.write(Step("store.put", "", key=docs.MARKER, value=b"other"))  # exists: left
    assert consul.kv == {"gorb/format": docs.render_marker()}
    consul.stop()
    with pytest.raises(StoreUnavailable):
        store.write(Step("store.put", "web", key="services/web", value=b"v", expect=None))
    consul.start()


class _Stop(Exception):
    pass


def test_watch_follows_changes_outages_and_an_index_going_backwards(consul):
    a = ConsulAdapter(consul.url)
    a.kv_put("gorb/services/web", b"{}")
    store = ConsulStore(a, ConsulAdapter(consul.url), "gorb", wait="1s")
    changes = []
    seen = threading.Event()

    def on_change():
        changes.append(time.monotonic())
        seen.set()
        if len(changes) >= 5:
            raise _Stop

    def watch():
        try:
            store.watch(on_change, Backoff(first=0.1, cap=0.2), time.sleep)
        except _Stop:
            pass

    t = threading.Thread(target=watch, daemon=True)
    t.start()

    def wait_change(n):
        wait_until(lambda: len(changes) >= n, 5, f"change {n} seen", every=0.02)

    wait_change(1)                                   # the first read
    a.kv_put("gorb/services/api", b"{}")
    wait_change(2)                                   # a change wakes the blocking query
    consul.stop()
    time.sleep(0.3)
    consul.start()
    wait_change(3)                                   # re-read after the outage
    before = [r for r in consul.requests if r.path == "/v1/kv/gorb/"]
    consul.index_backwards(to=2)
    a.kv_put("gorb/services/db", b"{}")              # index 3: below what the watch holds
    wait_change(4)                                   # within a wait: the change is seen...

    def reset_reads():
        after = [r for r in consul.requests if r.path == "/v1/kv/gorb/"][len(before):]
        return [r for r in after if r.query.get("index") is None]
    wait_until(reset_reads, 3, "a read without an index", every=0.02)  # ...the index reset to 0
    a.kv_put("gorb/services/dns", b"{}")
    wait_change(5)                                   # blocking again from the lower index
    t.join(limit(2))
    assert not t.is_alive()
