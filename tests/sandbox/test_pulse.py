"""Pulse on a real kernel: a real ``pulse-worker`` checks real servers in backend namespaces, and
what is asserted is the weight in the kernel's IPVS table and where real traffic goes.

- http with traffic (the issue's main story): a backend's server stops -> weight 0 in the kernel
  within interval + timeout (+ slack), requests through the VIP stop reaching it; it comes back
  -> its weight climbs in slow-start steps and traffic returns;
- every other check type against a real server, each down -> 0 and up -> its weight: tcp, https
  (self-signed certificate; a verifying check of the same server stays down), udp, dns (SERVFAIL
  as down), exec (a flag file, the check running as ``nobody``);
- a worker SIGKILLed under traffic and replaced: no kernel weight moves.

Layout: ``topology.build`` (client, lb holding the VIP, backends), the writer in the lb namespace
(``writer_factory``) and ONE ``python -m gorb.services.pulse_worker --index 0 --workers 1`` started
next to it with the writer's runtime dir. Weights are read from ``/proc/<writer>/net/ip_vs``
(``pulse_servers.KernelTable``: no fork, so a change is timed to ~20 ms), cross-checked with
``ipvsadm -Ln`` at every milestone. Every wait is ``tests.pace.wait_until``.

Timing bounds (interval 1 s, timeout 0.5 s, default jitter 0.1 and backoff cap 4 x interval):
down within ``interval * (1 + jitter) + timeout + SLACK``; the first step back within
``backoff_max * (1 + jitter) + timeout + SLACK`` (a down target is checked with backoff).
SLACK covers the worker's 100 ms result batching, the writer's apply and the guest's slowness:
it is a limit, scaled by the guest's pace (``tests/pace.py``); the configured times are not.
The exec check gets a 2 s timeout (and its bounds with it): spawning a program in the guest costs
~80 ms and several times that under load, and 500 ms timed out now and then.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import installed
from tests.pace import limit, wait_until
from tests.sandbox import topology
from tests.sandbox.pulse_servers import (
    KernelTable,
    Pacer,
    Request,
    Server,
    answered,
    dns_server,
    dns_servfail,
    http_server,
    https_server,
    ipvsadm_weights,
    self_signed,
    start_all,
    udp_server,
)
from tests.sandbox.topology import BACKEND_PORT, SERVER, VIP, VIP_PORT, Topology

INTERVAL, TIMEOUT, JITTER = 1.0, 0.5, 0.1
BACKOFF_MAX = 4 * INTERVAL     # the default cap of the delay between checks of a down target
SLACK = 0.5


def down_bound(timeout: float = TIMEOUT) -> float:
    """Seconds to weight 0: a (jittered) interval and the check's timeout, then the SLACK."""
    return limit(SLACK, fixed=INTERVAL * (1 + JITTER) + timeout)


def up_bound(timeout: float = TIMEOUT) -> float:
    """Seconds to the first step back: the backoff cap and the check's timeout, then the SLACK."""
    return limit(SLACK, fixed=BACKOFF_MAX * (1 + JITTER) + timeout)


DOWN_BOUND, UP_BOUND, STEP_BOUND = down_bound(), up_bound(), down_bound()
EXEC_TIMEOUT = 2.0  # a fork+exec costs ~80 ms in the guest, several under load: 500 ms flaked
SETTLE = 30.0                  # worker start (~interpreter + gevent in the guest) + first checks

MAIN_PULSE = {"type": "http", "interval": "1s", "timeout": "500ms", "slow_start": 3,
              "args": {"path": "/"}}
SHORT = {"interval": "1s", "timeout": "500ms", "slow_start": 0}


# --- fixtures -----------------------------------------------------------------------------------

@dataclass
class PulseWorker:
    proc: subprocess.Popen
    log: Path

    def kill(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=limit(15))

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"(no log: {exc})"


@pytest.fixture
def pulse_worker():
    """``start(writer)``: a pulse worker (index 0 of 1) in the writer's namespace; stopped at
    teardown if still running."""
    made: list[PulseWorker] = []

    def start(writer) -> PulseWorker:
        log = Path(writer.workdir) / f"pulse-worker-{len(made) + 1}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", writer.ns, installed.python(), "-P", "-m",
                 "gorb.services.pulse_worker",
                 "--config", os.devnull, "--runtime-dir", writer.runtime_dir,
                 "--index", "0", "--workers", "1"],
                cwd="/", stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        made.append(PulseWorker(proc, log))
        return made[-1]

    yield start
    for w in made:
        if w.proc.poll() is None:
            w.proc.terminate()
            try:
                w.proc.wait(timeout=limit(15))
            except subprocess.TimeoutExpired:
                w.proc.kill()
                w.proc.wait()


@pytest.fixture
def lb(netns, writer_factory):
    """(topology, writer, kernel table): three backends with HTTP servers on 8080, the writer in
    the lb namespace."""
    topo = topology.build(netns, n_backends=3)
    started: list[Server] = []
    try:
        writer = writer_factory(ns=topo.lb)
        yield topo, writer, KernelTable(topo.lb, writer.proc.pid), started
    finally:
        for s in started:
            s.stop()
        topo.close()


# --- helpers ------------------------------------------------------------------------------------

def dest(topo: Topology, name: str, port: int = BACKEND_PORT) -> str:
    return f"{topo.addresses[name]}:{port}"


def create(writer, service: str, port: int, backends: dict[str, tuple[str, int]],
           pulse: dict, protocol: str = "tcp") -> None:
    writer.must("service.create", {"service": service, "options": {
        "host": VIP, "port": port, "protocol": protocol, "method": "rr", "pulse": pulse}})
    for name, (ip, bport) in backends.items():
        writer.must("backend.create", {"service": service, "backend": name, "options": {
            "host": ip, "port": bport, "method": "nat"}})


def view(writer, service: str, backend: str) -> dict:
    return writer.must("backend.get", {"service": service, "backend": backend})["data"]


def checked(writer, worker: PulseWorker, members: dict[tuple[str, str], str],
            timeout: float = SETTLE, since: float = 0.0) -> dict:
    """Poll until every (service, backend) has a check result (at wall time > ``since``) and the
    status wanted; their views."""
    def probe():
        if worker.proc.poll() is not None:
            raise AssertionError(f"pulse worker exited {worker.proc.returncode}:\n{worker.tail()}")
        views = {m: view(writer, *m) for m in members}
        ok = all(v["check"] is not None and v["check"]["at"] > since
                 and v["health"]["status"] == members[m] for m, v in views.items())
        return views if ok else None
    return wait_until(probe, timeout, lambda: f"checks {members}\nworker log:\n{worker.tail()}",
                      every=0.1)


def watch(kernel: KernelTable, want: dict[tuple[str, str], int], bound: float,
          t0: float) -> dict[tuple[str, str], float]:
    """Poll the kernel until each (service, dest) has its wanted weight; seconds from ``t0`` at
    which each was first seen so. It waits ``bound`` (what the test asserts) and a limit of 10 s
    more, so that a late change is reported with its time."""
    seen: dict[tuple[str, str], float] = {}

    def probe():
        table, now = kernel.read(), time.monotonic()
        for (svc, d), w in want.items():
            if (svc, d) not in seen and table[svc][d] == w:
                seen[(svc, d)] = now - t0
        return len(seen) == len(want)
    wait_until(probe, 10.0, lambda: f"kernel weights {want}; seen {seen}; table {kernel.read()}",
               every=0.02, fixed=bound)
    return seen


# --- 1. the main story: http pulse, real traffic ------------------------------------------------

def test_http_pulse_takes_a_stopped_backend_out_of_kernel_and_traffic_and_climbs_it_back(
        lb, pulse_worker):
    topo, writer, kernel, started = lb
    svc = f"TCP {VIP}:{VIP_PORT}"
    dests = {name: dest(topo, name) for name in topo.backends}
    create(writer, "web", VIP_PORT, {n: (topo.addresses[n], BACKEND_PORT) for n in topo.backends},
           MAIN_PULSE)
    worker = pulse_worker(writer)
    checked(writer, worker, {("web", n): "up" for n in topo.backends})
    full = {svc: {d: 100 for d in dests.values()}}
    assert kernel.read() == ipvsadm_weights(topo.lb) == full

    victim, b2 = "b2", dests["b2"]
    pacer = Pacer.start(topo.client, pace=0.02, duration=60.0)
    try:
        time.sleep(1.0)  # traffic over all three first
        killed_at = time.monotonic()
        topo.servers[1].terminate()  # b2 stops listening
        topo.servers[1].wait(timeout=limit(10))
        detect = watch(kernel, {(svc, b2): 0}, DOWN_BOUND, killed_at)[(svc, b2)]
        zero_at = killed_at + detect
        table = kernel.read()
        assert table == {svc: {**full[svc], b2: 0}}, table
        assert ipvsadm_weights(topo.lb) == table
        down = view(writer, "web", victim)
        time.sleep(1.5)  # ~50 requests that can only go to b1 and b3

        restart_at = time.monotonic()
        started.append(http_server(topo.backends[victim], victim, BACKEND_PORT).start())
        listening_at = time.monotonic()
        climb: list[tuple[float, int]] = []

        def climbed():
            w = kernel.weight(svc, b2)
            if w != (climb[-1][1] if climb else 0):
                climb.append((time.monotonic() - listening_at, w))
            return w == 100
        wait_until(climbed, 5.0, "b2 back at weight 100", every=0.02,
                   fixed=UP_BOUND + 3 * STEP_BOUND)
        full_at = time.monotonic()
        assert kernel.read() == ipvsadm_weights(topo.lb) == full
        time.sleep(1.0)  # traffic at full weight
    finally:
        records = pacer.stop()
    back = view(writer, "web", victim)

    before = [r for r in records if r.end < killed_at]
    after_zero = [r for r in records if zero_at <= r.start and r.end < restart_at]
    window = [r for r in records if r.start < zero_at and r.end >= killed_at]
    first_step_at = listening_at + climb[0][0]
    returned = [r for r in records if r.start >= first_step_at]
    at_full = [r for r in records if r.start >= full_at]
    failures = [r for r in records if r.error]
    steps = [w for _, w in climb]
    print(f"\n[pulse http] detection {detect:.2f} s (bound {DOWN_BOUND:.2f}); "
          f"{len([r for r in window if r.error])} of {len(window)} requests in flight or sent "
          f"before the kernel change failed; climb after restart "
          f"{[(round(t, 2), w) for t, w in climb]} (first step bound {UP_BOUND:.2f}); "
          f"{len(records)} requests, {len(failures)} failed; answers {answered(records)}")

    # Down: in the kernel within the bound, and pulse says why.
    assert detect <= DOWN_BOUND, detect
    assert down["health"]["status"] == "down" and down["weight"] == 0
    assert down["kernel"]["weight"] == 0
    assert "connection refused" in down["check"]["error"], down["check"]
    # Traffic: all three answered before; every failure is a request that was in flight or sent
    # before the kernel had weight 0 (IPVS had scheduled it to b2); from then on none failed and
    # none reached b2, until it was restarted.
    assert before and not [r for r in before if r.error], before[-5:]
    assert set(answered(before)) == {"b1", "b2", "b3"}
    assert all(r.start < zero_at and r.end >= killed_at for r in failures), \
        [(round(r.start - killed_at, 3), r.error) for r in failures if r.start >= zero_at][:5]
    assert len(after_zero) >= 30, len(after_zero)
    assert set(answered(after_zero)) == {"b1", "b3"}, answered(after_zero)
    assert not [r for r in after_zero if r.error]
    # Up: the kernel weight climbs in slow_start (3) steps of the configured 100, each step one
    # passed check; the first within the backoff bound, then one per interval.
    assert steps == [34, 67, 100], climb
    assert climb[0][0] <= UP_BOUND, climb
    gaps = [b[0] - a[0] for a, b in zip(climb, climb[1:])]
    assert all(0.5 * INTERVAL <= g <= STEP_BOUND for g in gaps), gaps
    # Traffic returns to b2 once it has any weight (rr ignores the size of a non-zero weight)
    # and, at full weight, the rr rotation is even again.
    assert "b2" in answered(returned), answered(returned)
    counts = answered(at_full)
    assert set(counts) == {"b1", "b2", "b3"} and max(counts.values()) - min(counts.values()) <= 1, \
        counts
    assert back["health"]["status"] == "up" and back["health"]["level"] == 1.0
    assert back["check"]["ok"] is True and back["weight"] == 100
    assert worker.kill(signal.SIGTERM) == 0, worker.tail()


# --- 2. every check type against a real server --------------------------------------------------

def test_each_check_type_takes_its_real_server_down_to_0_and_back(lb, pulse_worker, tmp_path):
    topo, writer, kernel, started = lb
    ns = topo.backends
    ip = topo.addresses
    flag = Path(f"/tmp/gorb-pulse-exec-{os.getpid()}.up")  # /tmp is 1777: nobody can test it
    flag.touch(mode=0o644)
    cert, key = self_signed(tmp_path, ip["b2"])
    https = https_server(ns["b2"], "b2-tls", 8443, cert, key)
    udp = udp_server(ns["b3"], 9002)
    dns = dns_server(ns["b1"], 5353, "www.gorb.test.", "10.77.99.9")
    started.extend(start_all([https, udp, dns]))
    tcp = Server(ns["b1"], SERVER, ["b1", str(BACKEND_PORT)], proc=topo.servers[0])
    started.append(tcp)  # restarted below: stopped at teardown whichever process it is

    # service -> (protocol, VIP port, backend, backend port, pulse)
    cases = {
        "tcp": ("tcp", 1001, "b1", BACKEND_PORT, {"type": "tcp"}),
        "https": ("tcp", 1443, "b2", 8443, {"type": "https",
                                            "args": {"path": "/", "body": "b2-tls"}}),
        "udp": ("udp", 1002, "b3", 9002, {"type": "udp",
                                          "args": {"payload": "ping", "expect": "pong ping"}}),
        "dns": ("udp", 53, "b1", 5353, {"type": "dns", "args": {"query": "www.gorb.test",
                                                                "answer": "10.77.99.9"}}),
        # Up only while the flag exists AND the program is not root: root may write any file,
        # so "not writable" (a shell builtin: no second fork) proves the check runs as nobody.
        "exec": ("tcp", 1003, "b3", BACKEND_PORT,
                 {"type": "exec", "timeout": f"{EXEC_TIMEOUT:g}s",
                  "args": {"argv": ["sh", "-c", f"test -e {flag} && ! test -w {flag}"]}}),
        # The same TLS server checked with verification: its self-signed certificate must fail,
        # which shows the https check really does TLS (and that the other one skips verifying).
        "https-verify": ("tcp", 1444, "b2", 8443, {"type": "https",
                                                   "args": {"path": "/", "tls_verify": True}}),
    }
    keys = {}
    for service, (proto, port, be, bport, pulse) in cases.items():
        create(writer, service, port, {be: (ip[be], bport)}, {**SHORT, **pulse}, protocol=proto)
        keys[service] = (f"{proto.upper()} {VIP}:{port}", f"{ip[be]}:{bport}")
    types = [s for s in cases if s != "https-verify"]
    worker = pulse_worker(writer)
    try:
        views = checked(writer, worker, {(s, cases[s][2]): "up" for s in types}
                        | {("https-verify", "b2"): "down"})
        assert "certificate verify failed" in views[("https-verify", "b2")]["check"]["error"], \
            views[("https-verify", "b2")]["check"]
        expect = {svc: {d: (0 if s == "https-verify" else 100)} for s, (svc, d) in keys.items()}
        assert kernel.read() == ipvsadm_weights(topo.lb) == expect

        # Down: every server stops (dns answers SERVFAIL, exec's flag goes) at about once.
        t0: dict[str, float] = {}
        for service, action in (("tcp", tcp.stop), ("https", https.stop), ("udp", udp.stop),
                                ("dns", lambda: dns_servfail(dns, True)), ("exec", flag.unlink)):
            t0[service] = time.monotonic()
            action()
        base = min(t0.values())
        seen = watch(kernel, {keys[s]: 0 for s in types}, down_bound(EXEC_TIMEOUT), base)
        detect = {s: seen[keys[s]] - (t0[s] - base) for s in types}
        downs = {s: view(writer, s, cases[s][2]) for s in types}
        # A check in flight when its server stopped fails as the stop found it (an https
        # handshake cut: "Connection reset by peer"); the next ones, on a port nobody listens
        # to, must name the cause: wait for one (a check interval or two).
        for s in ("tcp", "https"):
            downs[s] = wait_until(lambda s=s: view(writer, s, cases[s][2]), SLACK,
                                  f"{s}'s check to say connection refused", every=0.1,
                                  fixed=INTERVAL * (1 + JITTER) + TIMEOUT,
                                  until=lambda v: "connection refused" in v["check"]["error"])
        assert ipvsadm_weights(topo.lb) == {svc: {d: 0} for svc, d in keys.values()}

        # Up: everything back.
        t1: dict[str, float] = {}
        for service, action in (("tcp", tcp.start), ("https", https.start), ("udp", udp.start),
                                ("dns", lambda: dns_servfail(dns, False)),
                                ("exec", lambda: flag.touch(mode=0o644))):
            action()
            t1[service] = time.monotonic()  # after the server listens again
        base = min(t1.values())
        seen = watch(kernel, {keys[s]: 100 for s in types}, up_bound(EXEC_TIMEOUT), base)
        recover = {s: seen[keys[s]] - (t1[s] - base) for s in types}
        ups = checked(writer, worker, {(s, cases[s][2]): "up" for s in types}, timeout=5.0)
        assert kernel.read() == ipvsadm_weights(topo.lb) == expect
    finally:
        flag.unlink(missing_ok=True)

    timeouts = {s: EXEC_TIMEOUT if s == "exec" else TIMEOUT for s in types}
    print(f"\n[pulse types] detection (s, bound {DOWN_BOUND:.2f}, exec "
          f"{down_bound(EXEC_TIMEOUT):.2f}): { {s: round(t, 2) for s, t in detect.items()} }; "
          f"recovery (s, bound {UP_BOUND:.2f}, exec {up_bound(EXEC_TIMEOUT):.2f}): "
          f"{ {s: round(t, 2) for s, t in recover.items()} }; "
          f"errors: { {s: v['check']['error'] for s, v in downs.items()} }")
    for s in types:
        assert detect[s] <= down_bound(timeouts[s]), (s, detect)
        assert recover[s] <= up_bound(timeouts[s]), (s, recover)
        assert downs[s]["health"]["status"] == "down" and downs[s]["check"]["ok"] is False, downs[s]
        assert ups[(s, cases[s][2])]["check"]["ok"] is True
    errors = {s: v["check"]["error"] for s, v in downs.items()}
    assert "connection refused" in errors["tcp"], errors
    assert "connection refused" in errors["https"], errors
    assert "connection refused" in errors["udp"], errors  # ICMP port unreachable
    assert "rcode SERVFAIL" in errors["dns"], errors
    assert errors["exec"].startswith("exit 1"), errors
    assert view(writer, "https-verify", "b2")["weight"] == 0
    assert worker.kill(signal.SIGTERM) == 0, worker.tail()


# --- 3. a worker killed under traffic moves no weight -------------------------------------------

def test_sigkill_of_the_worker_under_traffic_changes_no_kernel_weight(lb, pulse_worker):
    topo, writer, kernel, _ = lb
    svc = f"TCP {VIP}:{VIP_PORT}"
    dests = {name: dest(topo, name) for name in topo.backends}
    create(writer, "web", VIP_PORT, {n: (topo.addresses[n], BACKEND_PORT) for n in topo.backends},
           {**MAIN_PULSE, "rise": 2, "fall": 2})
    worker = pulse_worker(writer)
    checked(writer, worker, {("web", n): "up" for n in topo.backends})
    topo.servers[2].terminate()  # b3 down for good
    topo.servers[2].wait(timeout=limit(10))
    watch(kernel, {(svc, dests["b3"]): 0}, 2 * DOWN_BOUND, time.monotonic())
    expected = {svc: {dests["b1"]: 100, dests["b2"]: 100, dests["b3"]: 0}}
    assert kernel.read() == ipvsadm_weights(topo.lb) == expected

    samples: list[dict] = []
    done = threading.Event()

    def sample():
        while not done.is_set():
            samples.append(kernel.read())
            time.sleep(0.02)
    sampler = threading.Thread(target=sample, name="kernel-sampler", daemon=True)
    pacer = Pacer.start(topo.client, pace=0.02, duration=60.0)
    sampler.start()
    ipvsadm_samples = []
    try:
        time.sleep(1.0)
        ipvsadm_samples.append(ipvsadm_weights(topo.lb))
        killed_at, killed_wall = time.monotonic(), time.time()
        assert worker.kill(signal.SIGKILL) == -signal.SIGKILL
        ipvsadm_samples.append(ipvsadm_weights(topo.lb))
        replacement = pulse_worker(writer)
        # The replacement has checked every target a few times (b3 with backoff: at least once).
        fresh: dict[str, dict] = {}

        def checked_again() -> bool:
            ipvsadm_samples.append(ipvsadm_weights(topo.lb))
            views = {n: view(writer, "web", n) for n in topo.backends}
            fresh.clear()
            fresh.update({n: v["check"] for n, v in views.items()
                          if v["check"] is not None and v["check"]["at"] > killed_wall})
            if (len(fresh) == 3 and fresh["b1"]["checks"] >= 3 and fresh["b2"]["checks"] >= 3
                    and fresh["b3"]["checks"] >= 2):
                return True
            assert replacement.proc.poll() is None, replacement.tail()
            return False
        wait_until(checked_again, 40, lambda: f"the replacement's checks: {fresh}\n"
                   f"{replacement.tail()}", every=0.3)
        settled_at = time.monotonic()
        ipvsadm_samples.append(ipvsadm_weights(topo.lb))
    finally:
        done.set()
        sampler.join(timeout=limit(5))
        records = pacer.stop()
    print(f"\n[pulse worker kill] replacement checked everything {settled_at - killed_at:.2f} s "
          f"after the SIGKILL; {len(samples)} /proc samples and {len(ipvsadm_samples)} ipvsadm "
          f"samples; {len(records)} requests, answers {answered(records)}; "
          f"replacement's last checks: "
          f"{ {n: (c['status'], c['checks']) for n, c in fresh.items()} }")

    changed = [s for s in samples if s != expected]
    assert not changed, changed[:3]
    assert len(samples) >= 50, len(samples)
    assert all(s == expected for s in ipvsadm_samples), ipvsadm_samples
    assert fresh["b3"]["status"] == "down" and fresh["b3"]["ok"] is False
    assert fresh["b1"]["status"] == fresh["b2"]["status"] == "up"
    # Traffic all along: never to b3, nothing failed, the rr rotation between b1 and b2 even.
    failed: list[Request] = [r for r in records if r.error]
    assert not failed, failed[:5]
    counts = answered(records)
    assert set(counts) == {"b1", "b2"} and abs(counts["b1"] - counts["b2"]) <= 1, counts
    assert len(records) >= 100, len(records)
    assert replacement.kill(signal.SIGTERM) == 0, replacement.tail()
