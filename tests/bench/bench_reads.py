"""Reads off the write path (issue 10, item 3): PATCH latency, in the writer and through the API,
alone and while clients read statistics, at 100 and 10,000 backends, in one run in the sandbox.

    tests/bench/run reads            # boots the sandbox and runs this module

Setup per table size, in a fresh network namespace: a real ``ipvs-writer`` and ``api``
(``bench_api.Gorb``), 10 services sharing the backends (pulse ``none``: no checks), created over
the bus. Then, ``--rounds`` times, in alternating order:

- **alone**: one client PATCHes backend weights through the API (``--patches`` requests, one
  at a time, keep-alive), nothing else running;
- **under reads**: the same PATCHes while ``--readers`` clients loop ``GET /metrics`` and
  ``GET /service/<vs>`` (alternately) as fast as the API answers them.

Figures: the writer's own commit latency (receive to reply, measured in the writer, read back
with the bus request ``writer.latency``) p50/p99, the PATCH latency through the API p50/p99, and
one scrape of ``/metrics`` alone (median of 5). Each figure is the median over rounds.

Targets (issue 10): the writer's commit p99 under reads <= 1.2x alone; the API's PATCH p99 under
reads <= 2x alone (the API's CPU is shared with the readers); a scrape at 10,000 backends
<= 100 ms. The guest has one virtual CPU: client, API, writer and the kernel share it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gevent
import msgspec

from tests.bench.bench_api import PORT, Conn, Gorb, http_request, pct

REPO = Path(__file__).resolve().parents[2]
SERVICES = 10


def populate(gorb: Gorb, backends: int) -> list[tuple[str, str]]:
    """10 services and ``backends`` backends over them, pipelined over the bus."""
    client = gorb.client
    for s in range(SERVICES):
        r = client.request("service.create", {"service": f"s{s}", "options": {
            "host": f"10.99.0.{s + 1}", "port": 80, "method": "wrr",
            "pulse": {"type": "none"}}}, timeout=60)
        assert r["ok"], r
    names = [(f"s{i % SERVICES}", f"b{i}") for i in range(backends)]
    pending = []
    for i, (vs, rs) in enumerate(names):
        pending.append(client.send("backend.create", {"service": vs, "backend": rs, "options": {
            "host": f"10.{100 + i // 65025}.{i // 255 % 255}.{i % 255 + 1}", "port": 8080,
            "weight": 100, "pulse": {"type": "none"}}}))
        if len(pending) >= 256 or i == len(names) - 1:
            for rid in pending:
                reply = client.recv_reply(rid, timeout=300)
                assert reply["ok"], reply
            pending = []
    return names


def patches(names: list[tuple[str, str]], n: int, round_: int) -> list[bytes]:
    step = max(1, len(names) // n)
    return [http_request("PATCH", f"/service/{vs}/{rs}",
                         msgspec.json.encode({"weight": 1 + (i + round_) % 99}))
            for i, (vs, rs) in enumerate(names[::step][:n])]


def run_patches(reqs: list[bytes]) -> list[float]:
    conn = Conn(("127.0.0.1", PORT))
    lat = []
    try:
        for req in reqs:
            t = time.perf_counter()
            status, body = conn.roundtrip(req)
            lat.append(time.perf_counter() - t)
            if status != 200:
                raise SystemExit(f"PATCH answered {status}: {body[:200]!r}")
    finally:
        conn.close()
    return lat


def reader(stop: list[bool], counts: dict) -> None:
    conn = Conn(("127.0.0.1", PORT))
    get = [http_request("GET", "/metrics", b""), http_request("GET", "/service/s0", b"")]
    i = 0
    try:
        while not stop[0]:
            status, _ = conn.roundtrip(get[i % 2])
            if status != 200:
                raise SystemExit(f"a read answered {status}")
            counts["reads"] += 1
            i += 1
    finally:
        conn.close()


def measure(gorb: Gorb, reqs: list[bytes], readers: int) -> dict:
    gorb.client.request("writer.latency", {"clear": True}, timeout=30)
    stop, counts = [False], {"reads": 0}
    greenlets = [gevent.spawn(reader, stop, counts) for _ in range(readers)]
    gevent.sleep(0.5 if readers else 0)  # the readers are going
    api = gevent.spawn(run_patches, reqs)
    api.join()
    stop[0] = True
    gevent.joinall(greenlets, raise_error=True)
    writer = gorb.client.request("writer.latency", {"clear": True}, timeout=30)["data"]["seconds"]
    lat = api.get()
    return {"api_p50": pct(lat, 50), "api_p99": pct(lat, 99), "writer_p50": pct(writer, 50),
            "writer_p99": pct(writer, 99), "reads": counts["reads"]}


def scrape(n: int = 5) -> float:
    times = []
    for _ in range(n):
        conn = Conn(("127.0.0.1", PORT))
        t = time.perf_counter()
        status, body = conn.roundtrip(http_request("GET", "/metrics", b""))
        times.append(time.perf_counter() - t)
        conn.close()
        assert status == 200 and b"gorb_" in body
    return statistics.median(times)


def bench(backends: int, rounds: int, n_patches: int, readers: int) -> dict:
    work = Path(tempfile.mkdtemp(prefix="gorb-reads-", dir="/tmp"))
    gorb = Gorb(work)
    try:
        names = populate(gorb, backends)
        scrape(1)  # warm the statistics snapshot
        runs: dict[str, list[dict]] = {"alone": [], "reads": []}
        for r in range(rounds):
            order = ["alone", "reads"] if r % 2 == 0 else ["reads", "alone"]
            for kind in order:
                runs[kind].append(measure(gorb, patches(names, n_patches, r),
                                          readers if kind == "reads" else 0))
        out = {kind: {k: statistics.median(m[k] for m in ms) for k in ms[0]}
               for kind, ms in runs.items()}
        out["scrape_s"] = scrape()
        return out
    finally:
        gorb.stop()
        subprocess.run(["ipvsadm", "-C"], check=False)  # the next size starts empty


def report(n: int, s: dict) -> bool:
    a, r = s["alone"], s["reads"]
    writer_ratio = r["writer_p99"] / a["writer_p99"]
    api_ratio = r["api_p99"] / a["api_p99"]
    print(f"\n{n} backends ({SERVICES} services), medians over rounds")
    print("| | writer commit p50 / p99 ms | PATCH via API p50 / p99 ms | reads done |")
    print("|---|---|---|---|")
    for name, m in (("alone", a), ("under reads", r)):
        print(f"| {name} | {m['writer_p50'] * 1e3:.2f} / {m['writer_p99'] * 1e3:.2f} | "
              f"{m['api_p50'] * 1e3:.2f} / {m['api_p99'] * 1e3:.2f} | {m['reads']:.0f} |")
    ok_w, ok_a = writer_ratio <= 1.2, api_ratio <= 2.0
    ok_s = s["scrape_s"] <= 0.1 or n < 10_000
    print(f"writer commit p99 under reads / alone: {writer_ratio:.2f}x (target <= 1.2x: "
          f"{'met' if ok_w else 'NOT met'})")
    print(f"PATCH p99 through the API under reads / alone: {api_ratio:.2f}x (target <= 2x: "
          f"{'met' if ok_a else 'NOT met'})")
    print(f"one /metrics scrape alone: {s['scrape_s'] * 1e3:.1f} ms"
          + (f" (target <= 100 ms: {'met' if ok_s else 'NOT met'})" if n >= 10_000 else ""))
    return ok_w and ok_a and ok_s


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="100,10000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--patches", type=int, default=300)
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if not a.in_netns:
        ns = f"benchreads{os.getpid()}"
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"],
                           check=True)
            return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m",
                                   "tests.bench.bench_reads", "--in-netns", *sys.argv[1:]],
                                  cwd=REPO).returncode
        finally:
            subprocess.run(f"ip netns pids {ns} | xargs -r kill -9", shell=True)
            subprocess.run(["ip", "netns", "del", ns])
    print(f"bench_reads: sizes {a.sizes}, {a.rounds} rounds, {a.patches} PATCHes, "
          f"{a.readers} readers; uname {os.uname().release}, {os.cpu_count()} CPU(s)", flush=True)
    results, ok = {}, True
    for n in (int(x) for x in a.sizes.split(",")):
        results[n] = bench(n, a.rounds, a.patches, a.readers)
        ok = report(n, results[n]) and ok
    print(json.dumps(results))
    print("targets:", "MET" if ok else "NOT MET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
