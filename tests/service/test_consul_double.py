"""The Consul double (tests/consul_double.py), driven only through the real py-consul client.

Each test talks HTTP over a socket the way gorb's discovery process will, so the double's answers
are checked as py-consul decodes them: indexes as strings, base64 values, 404 -> None or False.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import consul
import pytest
import requests
from consul.callback import CB

from tests.consul_double import ConsulDouble
from tests.pace import limit

pytestmark = pytest.mark.timeout(15)

REPO = Path(__file__).resolve().parents[2]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client_for(double: ConsulDouble, timeout: float | None = None) -> consul.Consul:
    """A client of ``double``; ``timeout`` (the behaviour under test) or a limit of 5 s."""
    c = consul.Consul(host=double.host, port=double.port,
                      connections_timeout=limit(5) if timeout is None else timeout)
    c.http.session.trust_env = False  # an HTTP_PROXY in the environment must not reach 127.0.0.1
    return c


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def double(clock):
    with ConsulDouble(clock=clock) as d:
        yield d


@pytest.fixture
def c(double) -> consul.Consul:
    return client_for(double)


def register_web(c: consul.Consul, sid: str = "web-1", **kwargs) -> bool:
    args = dict(address="10.0.0.1", port=80, tags=["tcp", "wrr"], meta={"gorb_host": "lb1"},
                check=consul.Check.ttl("10s"))
    args.update(kwargs)
    return c.agent.service.register("web", service_id=sid, **args)


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run fn in a thread; the dict gets 'result' or 'error' and 'at' (time.monotonic())."""
    out: dict = {}

    def run():
        try:
            out["result"] = fn(*args, **kwargs)
        except Exception as e:  # handed to the test thread
            out["error"] = e
        out["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


# ---- agent ---------------------------------------------------------------------------------------


def test_register_shows_service_with_tags_meta_and_a_critical_ttl_check(c, double):
    assert register_web(c) is True

    svc = c.agent.services()["web-1"]
    assert svc["ID"] == "web-1" and svc["Service"] == "web"
    assert (svc["Address"], svc["Port"]) == ("10.0.0.1", 80)
    assert svc["Tags"] == ["tcp", "wrr"] and svc["Meta"] == {"gorb_host": "lb1"}
    assert svc["Weights"] == {"Passing": 1, "Warning": 1}
    check = c.agent.checks()["service:web-1"]
    assert (check["Status"], check["Type"], check["ServiceID"]) == ("critical", "ttl", "web-1")
    assert check["Name"] == "Service 'web' check"
    assert double.services == c.agent.services()
    assert double.requests[0] == ("PUT", "/v1/agent/service/register", {})


def test_register_without_id_uses_name_and_a_given_status(c, double):
    assert c.agent.service.register("db", check={**consul.Check.ttl("5s"), "Status": "passing"})
    assert list(c.agent.services()) == ["db"]
    assert c.agent.checks()["service:db"]["Status"] == "passing"


def test_deregister_is_true_then_false_for_an_unknown_id(c, double):
    register_web(c)
    assert c.agent.service.deregister("web-1") is True
    assert c.agent.services() == {} and c.agent.checks() == {}
    assert c.agent.service.deregister("web-1") is False


def test_register_rejects_what_consul_rejects(c, double):
    with pytest.raises(consul.ConsulException, match="Key contains invalid characters"):
        register_web(c, meta={"gorb.host": "lb1"})  # Consul meta keys allow [a-zA-Z0-9_-] only
    with pytest.raises(consul.ConsulException, match="Missing service name"):
        c.agent.service.register("")
    with pytest.raises(consul.ConsulException, match="Interval must be > 0"):
        c.agent.service.register("web", check={"http": "http://10.0.0.1/"})
    assert double.services == {}


def test_reregistering_the_same_service_keeps_check_status_and_index(c, double):
    register_web(c)
    c.agent.check.ttl_pass("service:web-1")
    index, _ = c.health.service("web")
    assert register_web(c) is True
    again, nodes = c.health.service("web", passing=True)
    assert again == index and len(nodes) == 1  # nothing changed: no index, status kept


# ---- catalog and health --------------------------------------------------------------------------


def test_catalog_lists_the_service_and_consul_itself(c, double):
    register_web(c)
    _, services = c.catalog.services()
    assert services == {"consul": [], "web": ["tcp", "wrr"]}
    index, nodes = c.catalog.service("web")
    assert int(index) >= 1
    [node] = nodes
    assert (node["ServiceID"], node["ServiceAddress"], node["ServicePort"]) == ("web-1", "10.0.0.1", 80)
    assert node["ServiceMeta"] == {"gorb_host": "lb1"}
    assert c.catalog.service("web", tag="WRR")[1] == nodes  # tag filters ignore case
    assert c.catalog.service("web", tag="nat")[1] == []


def test_health_passing_follows_the_ttl_check(c, double):
    register_web(c)
    register_web(c, sid="web-2", address="10.0.0.2")
    assert c.health.service("web", passing=True)[1] == []

    assert c.agent.check.ttl_pass("service:web-1", notes="3/3 backends up") is True
    _, nodes = c.health.service("web", passing=True)
    assert [n["Service"]["ID"] for n in nodes] == ["web-1"]
    checks = {ch["CheckID"]: ch for ch in nodes[0]["Checks"]}
    assert checks["serfHealth"]["Status"] == "passing"
    assert checks["service:web-1"]["Output"] == "3/3 backends up"

    assert c.agent.check.ttl_warn("service:web-1") is True
    assert c.health.service("web", passing=True)[1] == []
    assert [ch["Status"] for ch in c.health.checks("web")[1]] == ["warning", "critical"]
    assert c.agent.check.ttl_fail("service:web-1") is True
    assert len(c.health.service("web")[1]) == 2  # without ?passing both are listed
    assert c.agent.check.ttl_pass("no-such-check") is False


def test_check_update_sets_status_and_output(c, double):
    register_web(c)
    update = '{"Status": "passing", "Output": "all good"}'
    assert c.http.put(CB.boolean(), "/v1/agent/check/update/service:web-1", data=update) is True
    assert double.checks["service:web-1"]["Output"] == "all good"
    assert len(c.health.service("web", passing=True)[1]) == 1
    with pytest.raises(consul.ConsulException, match="Invalid check status"):
        c.http.put(CB.boolean(), "/v1/agent/check/update/service:web-1", data='{"Status": "ok"}')


def test_a_ttl_check_not_refreshed_in_time_turns_critical(c, double, clock):
    register_web(c)
    c.agent.check.ttl_pass("service:web-1", notes="fine")
    index, _ = c.health.service("web", passing=True)
    clock.now += 9
    assert len(c.health.service("web", passing=True)[1]) == 1
    clock.now += 2
    later, nodes = c.health.service("web", passing=True)
    assert nodes == [] and int(later) > int(index)
    assert c.agent.checks()["service:web-1"]["Output"].startswith("TTL expired")


def test_maintenance_mode_takes_the_service_out_of_passing(c, double):
    register_web(c, check={**consul.Check.ttl("10s"), "Status": "passing"})
    assert c.agent.service.maintenance("web-1", True, "draining") is True
    assert c.health.service("web", passing=True)[1] == []
    assert c.agent.service.maintenance("web-1", False) is True
    assert len(c.health.service("web", passing=True)[1]) == 1


# ---- KV ------------------------------------------------------------------------------------------


def test_kv_put_get_recurse_and_keys_with_separator(c, double):
    assert c.kv.put("gorb/services/web", '{"port": 80}') is True
    assert c.kv.put("gorb/services/web/backends/b1", "10.0.0.1") is True
    assert c.kv.put("gorb/services/db", "x", flags=42) is True
    assert c.kv.put("other", "y") is True

    index, entry = c.kv.get("gorb/services/web")
    assert entry["Value"] == b'{"port": 80}' and entry["Flags"] == 0
    assert index == str(entry["ModifyIndex"])
    assert c.kv.get("gorb/services/db")[1]["Flags"] == 42
    assert c.kv.get("gorb/missing")[1] is None

    _, entries = c.kv.get("gorb/", recurse=True)
    assert [e["Key"] for e in entries] == ["gorb/services/db", "gorb/services/web",
                                           "gorb/services/web/backends/b1"]
    _, keys = c.kv.get("gorb/services/", keys=True, separator="/")
    assert keys == ["gorb/services/db", "gorb/services/web", "gorb/services/web/"]
    assert c.kv.get("nothing/", recurse=True)[1] is None


def test_kv_binary_values_round_trip_and_empty_is_none(c, double):
    blob = bytes(range(256))
    assert c.kv.put("bin", blob) is True
    assert c.kv.get("bin")[1]["Value"] == blob
    assert c.kv.put("dir/", None) is True
    assert c.kv.get("dir/")[1]["Value"] is None
    assert double.kv == {"bin": blob, "dir/": None}


def test_kv_delete_recurse_leaves_other_keys(c, double):
    for k in ("p/a", "p/b/c", "pq", "z"):
        c.kv.put(k, "v")
    assert c.kv.delete("p/", recurse=True) is True
    assert c.kv.get("p/", recurse=True)[1] is None
    assert sorted(double.kv) == ["pq", "z"]
    assert c.kv.delete("z") is True and c.kv.delete("z") is True  # deleting a missing key is fine


def test_kv_cas(c, double):
    assert c.kv.put("k", "1", cas=0) is True  # create-only: absent, so created
    assert c.kv.put("k", "2", cas=0) is False  # exists now
    _, entry = c.kv.get("k")
    m = entry["ModifyIndex"]
    assert c.kv.put("k", "2", cas=m - 1) is False  # stale
    assert c.kv.put("k", "2", cas=m) is True
    assert c.kv.put("k", "3", cas=m) is False  # m is stale now
    _, entry = c.kv.get("k")
    assert entry["Value"] == b"2" and entry["CreateIndex"] == m
    assert c.kv.delete("k", cas=m) is False
    assert c.kv.delete("k", cas=entry["ModifyIndex"]) is True
    assert double.kv == {}


# ---- blocking queries ----------------------------------------------------------------------------


def test_blocking_kv_get_is_woken_by_a_put(c, double):
    c.kv.put("cfg", "old")
    index, _ = c.kv.get("cfg")
    t, out = in_thread(client_for(double).kv.get, "cfg", index=index, wait="10s")
    time.sleep(0.3)
    assert t.is_alive()
    put_started = time.monotonic()
    c.kv.put("cfg", "new")
    put_done = time.monotonic()
    t.join(limit(5))
    new_index, entry = out["result"]
    assert entry["Value"] == b"new" and int(new_index) > int(index)
    assert put_started <= out["at"] < put_done + limit(0.1)
    assert ("GET", "/v1/kv/cfg", {"index": index, "wait": "10s"}) in double.requests


def test_blocking_kv_get_times_out_after_wait(c, double):
    c.kv.put("cfg", "v")
    index, _ = c.kv.get("cfg")
    started = time.monotonic()
    again, entry = c.kv.get("cfg", index=index, wait="1s")
    elapsed = time.monotonic() - started
    assert again == index and entry["Value"] == b"v"
    assert 1.0 <= elapsed < limit(0.25, fixed=1.0 + 1 / 16)  # wait plus at most wait/16 jitter


def test_blocking_prefix_ignores_writes_elsewhere_and_wakes_on_delete(c, double):
    c.kv.put("gorb/a", "1")
    c.kv.put("elsewhere", "1")
    index, _ = c.kv.get("gorb/", recurse=True)
    t, out = in_thread(client_for(double).kv.get, "gorb/", recurse=True, index=index, wait="300ms")
    time.sleep(0.05)
    c.kv.put("elsewhere", "2")
    t.join(limit(5))
    assert out["result"][0] == index  # timed out: the other key is not in this view

    t, out = in_thread(client_for(double).kv.get, "gorb/", recurse=True, index=index, wait="10s")
    time.sleep(0.1)
    c.kv.delete("gorb/a")
    t.join(limit(5))
    new_index, entries = out["result"]
    assert entries is None and int(new_index) > int(index)  # the tombstone carries the index


def test_blocking_catalog_service_is_woken_by_a_deregister(c, double):
    register_web(c)
    register_web(c, sid="web-2")
    index, nodes = c.catalog.service("web")
    assert len(nodes) == 2
    t, out = in_thread(client_for(double).catalog.service, "web", index=index, wait="10s")
    time.sleep(0.1)
    c.kv.put("unrelated", "x")
    c.agent.service.register("db")
    time.sleep(0.1)
    assert t.is_alive()  # writes elsewhere do not move this service's index
    c.agent.service.deregister("web-2")
    t.join(limit(5))
    new_index, nodes = out["result"]
    assert [n["ServiceID"] for n in nodes] == ["web-1"] and int(new_index) > int(index)


def test_blocking_health_is_woken_by_a_ttl_pass(c, double):
    register_web(c)
    index, _ = c.health.service("web", passing=True)
    t, out = in_thread(client_for(double).health.service, "web", passing=True, index=index, wait="10s")
    time.sleep(0.1)
    c.agent.check.ttl_pass("service:web-1")
    t.join(limit(5))
    assert len(out["result"][1]) == 1


def test_blocking_health_wakes_when_a_ttl_runs_out():
    with ConsulDouble() as double:  # the real clock: the double wakes itself at the expiry
        c = client_for(double)
        register_web(c, check=consul.Check.ttl("300ms"))
        c.agent.check.ttl_pass("service:web-1")
        index, nodes = c.health.service("web", passing=True)
        assert len(nodes) == 1
        started = time.monotonic()
        _, nodes = c.health.service("web", passing=True, index=index, wait="5s")
        assert nodes == [] and 0.25 <= time.monotonic() - started < limit(0.7, fixed=0.3)


def test_check_ttls_wakes_watchers_after_the_injected_clock_moves(c, double, clock):
    register_web(c)
    c.agent.check.ttl_pass("service:web-1")
    index, _ = c.health.service("web", passing=True)
    t, out = in_thread(client_for(double).health.service, "web", passing=True, index=index, wait="10s")
    time.sleep(0.1)
    clock.now += 60
    double.check_ttls()
    t.join(limit(5))
    assert out["result"][1] == []


def test_agent_service_blocks_on_its_content_hash(c, double):
    register_web(c)
    first = c.http.get(CB.json(), "/v1/agent/service/web-1")
    assert first["Port"] == 80
    params = [("hash", first["ContentHash"]), ("wait", "10s")]
    t, out = in_thread(client_for(double).http.get, CB.json(), "/v1/agent/service/web-1", params=params)
    time.sleep(0.1)
    assert t.is_alive()
    register_web(c, port=81)
    t.join(limit(5))
    assert out["result"]["Port"] == 81 and out["result"]["ContentHash"] != first["ContentHash"]


def test_a_bad_wait_is_a_bad_request(c, double):
    with pytest.raises(consul.ConsulException, match="Invalid wait time"):
        c.kv.get("k", index=5, wait="soon")


# ---- fault knobs ---------------------------------------------------------------------------------


def test_index_going_backwards_is_visible(c, double):
    for i in range(5):
        c.kv.put("k", str(i))
    before, _ = c.kv.get("k")
    double.index_backwards(to=2)
    after, _ = c.kv.get("k")
    assert int(after) < int(before)

    started = time.monotonic()  # a client still holding the old index blocks, then sees the drop
    index, _ = c.kv.get("k", index=before, wait="200ms")
    assert int(index) < int(before) and time.monotonic() - started >= 0.2

    c.kv.put("k", "next")
    assert c.kv.get("k")[0] == "3"  # writes go on from the restored index


def test_forget_agent_removes_registrations_and_wakes_watchers(c, double):
    register_web(c)
    c.kv.put("keep", "me")
    index, _ = c.catalog.service("web")
    t, out = in_thread(client_for(double).catalog.service, "web", index=index, wait="10s")
    time.sleep(0.1)
    double.forget_agent()
    t.join(limit(5))
    assert out["result"][1] == []
    assert c.agent.services() == {} and c.agent.checks() == {}
    assert c.catalog.services()[1] == {"consul": []}
    assert c.kv.get("keep")[1]["Value"] == b"me"  # KV lives on the servers, not the agent


def test_stop_refuses_connections_and_start_brings_the_same_data_back(c, double):
    register_web(c)
    c.kv.put("k", "v")
    index, _ = c.kv.get("k")
    port = double.port
    double.stop()
    with pytest.raises(requests.exceptions.ConnectionError):
        c.kv.get("k")
    with pytest.raises(requests.exceptions.ConnectionError):
        c.agent.services()

    double.start()
    assert double.port == port
    again, entry = c.kv.get("k")
    assert again == index and entry["Value"] == b"v"
    assert list(c.agent.services()) == ["web-1"]


def test_stop_breaks_a_blocked_query(c, double):
    c.kv.put("k", "v")
    index, _ = c.kv.get("k")
    t, out = in_thread(client_for(double).kv.get, "k", index=index, wait="10s")
    time.sleep(0.1)
    stopped = time.monotonic()
    double.stop()
    t.join(limit(5))
    assert isinstance(out["error"], requests.exceptions.ConnectionError)
    assert out["at"] - stopped < limit(1.0)


def test_faults_answer_errors_then_clear(c, double):
    double.fault("/v1/kv/", status=500, count=1)
    with pytest.raises(consul.ConsulException, match="500"):
        c.kv.get("k")
    assert c.kv.get("k")[1] is None
    double.fault("/v1/agent/", status=403, body="Permission denied")
    with pytest.raises(consul.ACLPermissionDenied):
        c.agent.services()
    double.clear_faults()
    assert c.agent.services() == {}


def test_a_slow_agent_trips_the_client_timeout(double):
    slow = client_for(double, timeout=0.2)
    double.fault("/v1/agent/services", status=None, delay=2.0)
    with pytest.raises(requests.exceptions.ReadTimeout):
        slow.agent.services()


def test_standalone_entry_serves_until_sigterm():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.consul_double", "--host", "127.0.0.1",
                             "--port", "0"], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        host, port = url.removeprefix("http://").rsplit(":", 1)
        c = consul.Consul(host=host, port=int(port), connections_timeout=limit(5))
        c.http.session.trust_env = False
        assert c.kv.put("hello", "world") is True
        assert c.kv.get("hello")[1]["Value"] == b"world"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(limit(5)) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
