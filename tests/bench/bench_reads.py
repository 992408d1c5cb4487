"""Reads off the write path (issue 10, item 3): PATCH latency, in the writer and through the API,
alone and while clients read statistics, at 100 and 10,000 backends, in one run in the sandbox.

    tests/bench/run reads            # boots the sandbox and runs this module

Setup per table size, in a fresh network namespace: a real ``ipvs-writer`` and ``api``
(``bench_api.Gorb``), 10 services sharing the backends (pulse ``none``: no checks), created over
the bus. Then, ``--rounds`` times, in alternating order:

- **alone**: one client PATCHes backend weights through the API (``--patches`` requests, one
  at a time, keep-alive), nothing else running;
- **under reads**: the same PATCHes while ``--readers`` clients loop ``GET /metrics`` (with
  ``Accept-Encoding: gzip``, as Prometheus scrapes) and ``GET /service/<vs>`` (alternately) as
  fast as the API answers them.

Figures: the writer's own commit latency (receive to reply, measured in the writer, read back
with the bus request ``writer.latency``) p50/p99, the PATCH latency through the API p50/p99, and
one scrape of ``/metrics`` alone (median of 5, gzip as Prometheus asks, and without). Each figure is the median over rounds.

Renderers (``--render-sizes``, same run, no sockets): the writer's part of ``/metrics`` for
the same table (an engine over the fake kernel, every backend with kernel counters), rendered
(a) the former way, ``state.dump`` views -> msgpack -> ``metrics.families`` ->
prometheus_client's ``generate_latest``; (b) prometheus_client from the new rows
(``exposition.library_families``: the library beside the hand-written renderer, same data);
(c) ``exposition.render`` from the same rows, first with a new layout (label prefixes made),
then with the layout kept and every counter changed, then with nothing changed (what a scrape
costs while the cache is cold but the rows are the last ones). Each (b)/(c) figure starts from
the writer's ``metrics.rows`` through msgpack, as the API gets it. Median of ``--render-runs``.

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

from tests.bench.bench_api import PORT, Conn, Gorb, http_request, in_fresh_netns, pct

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
                raise SystemExit(f"PATCH answered {status}: {bytes(body[:200])!r}")
    finally:
        conn.close()
    return lat


def scrape_request(gzip: bool = True) -> bytes:
    """GET /metrics; with ``Accept-Encoding: gzip``, as Prometheus always sends it."""
    req = http_request("GET", "/metrics", b"")
    return req.replace(b"\r\n\r\n", b"\r\nAccept-Encoding: gzip\r\n\r\n", 1) if gzip else req


def reader(stop: list[bool], counts: dict) -> None:
    conn = Conn(("127.0.0.1", PORT))
    get = [("metrics", scrape_request()), ("service", http_request("GET", "/service/s0", b""))]
    i = 0
    try:
        while not stop[0]:
            kind, req = get[i % 2]
            t = time.perf_counter()
            status, _ = conn.roundtrip(req)
            if status != 200:
                raise SystemExit(f"a read answered {status}")
            counts[kind].append(time.perf_counter() - t)
            counts["reads"] += 1
            i += 1
    finally:
        conn.close()


def measure(gorb: Gorb, reqs: list[bytes], readers: int) -> dict:
    gorb.client.request("writer.latency", {"clear": True}, timeout=30)
    stop, counts = [False], {"reads": 0, "metrics": [], "service": []}
    greenlets = [gevent.spawn(reader, stop, counts) for _ in range(readers)]
    gevent.sleep(0.5 if readers else 0)  # the readers are going
    begun = time.perf_counter()
    api = gevent.spawn(run_patches, reqs)
    api.join()
    phase = time.perf_counter() - begun
    stop[0] = True
    gevent.joinall(greenlets, raise_error=True)
    writer = gorb.client.request("writer.latency", {"clear": True}, timeout=30)["data"]["seconds"]
    lat = api.get()
    reads = {f"{kind}_{q}": pct(counts[kind], q) if counts[kind] else 0.0
             for kind in ("metrics", "service") for q in (50, 99)}
    return {"api_p50": pct(lat, 50), "api_p99": pct(lat, 99), "writer_p50": pct(writer, 50),
            "writer_p99": pct(writer, 99), "reads": counts["reads"],
            "phase_s": phase, **reads}


def scrape(n: int = 5, gzip: bool = True) -> float:
    """Median seconds of ``n`` scrapes, each on a new connection, to the last byte received
    (gzip: the compressed body, as Prometheus receives it; its decompression is the
    scraper's)."""
    times = []
    for _ in range(n):
        conn = Conn(("127.0.0.1", PORT))
        t = time.perf_counter()
        status, body = conn.roundtrip(scrape_request(gzip))
        times.append(time.perf_counter() - t)
        conn.close()
        assert status == 200 and len(body) > 0
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
        out["scrape_plain_s"] = scrape(gzip=False)
        return out
    finally:
        gorb.stop()
        subprocess.run(["ipvsadm", "-C"], check=False)  # the next size starts empty


def render_bench(backends: int, runs: int) -> dict[str, float]:
    """Seconds per render of the writer's part of /metrics, each way (module docstring)."""
    import msgpack
    from prometheus_client import CollectorRegistry, generate_latest

    from gorb.common.messages import MetricRows
    from gorb.services.api import exposition, metrics
    from gorb.services.ipvs_writer.engine import Engine, Pinned
    from tests.service.fake_kernel import FakeKernel

    kernel = FakeKernel()
    engine = Engine({}, kernel, lambda services: None)
    reqs = [("service.create", {"service": f"s{s}", "options": {
        "host": f"10.99.0.{s + 1}", "port": 80, "pulse": {"type": "none"}}})
        for s in range(SERVICES)]
    reqs += [("backend.create", {"service": f"s{i % SERVICES}", "backend": f"b{i}", "options": {
        "host": f"10.{100 + i // 65025}.{i // 255 % 255}.{i % 255 + 1}", "port": 8080,
        "pulse": {"type": "none"}}}) for i in range(backends)]
    for j in range(0, len(reqs), 500):
        engine.handle_batch(reqs[j:j + 500])
    live = kernel.dump()

    def count(offset: int) -> None:  # every counter moves, as under traffic
        for svc in live.values():
            svc.stats = {k: 1000 + offset for k in ("conns", "inpkts", "outpkts", "inbytes",
                                                     "outbytes")}
            for i, d in enumerate(svc.dests.values()):
                d.stats = {"conns": i + offset, "inpkts": 10 * i + offset,
                           "outpkts": 9 * i + offset, "inbytes": 1500 * i + offset,
                           "outbytes": 1400 * i + offset, "activeconns": i % 7,
                           "inactconns": i % 5, "persistconns": 0}
        snapshots.taken()  # a new snapshot: the writer rebuilds its columns

    snapshots = engine.snapshots = _Fixed(live)  # the collector's snapshots, of ``live``
    count(0)
    now = time.time()

    def read(type_: str, body: dict) -> bytes:
        reply = engine.read(type_, body)
        if isinstance(reply, Pinned):  # the columns for new rows: the collector answers
            reply = engine.read(type_, body, reply)
        return msgspec.msgpack.encode(reply)

    def old_path() -> bytes:
        wire = read("state.dump", {"stats": True})
        fams = metrics.families(msgpack.unpackb(wire)["data"]["services"], now)
        return generate_latest(_fixed_registry(CollectorRegistry, fams))

    def rows(known: int) -> MetricRows:
        wire = read("metrics.rows", {"generation": known})
        return msgspec.convert(msgpack.unpackb(wire)["data"], MetricRows)

    first = rows(-1)
    labels = first.labels

    def library() -> bytes:
        r = rows(-1)
        layout = exposition.Layout(r.generation, r.labels)
        fams = exposition.library_families(layout, labels, exposition.values(r, layout.sizes, now))
        return generate_latest(_fixed_registry(CollectorRegistry, fams))

    def direct(layout: exposition.Layout | None) -> bytes:
        r = rows(-1 if layout is None else layout.generation)
        layout = layout or exposition.Layout(r.generation, r.labels)
        return b"".join(exposition.render(layout, exposition.values(r, layout.sizes, now)))

    kept = exposition.Layout(first.generation, labels)
    assert direct(kept) == library() == old_path(), "the renderers disagree"
    out: dict[str, list[float]] = {"old_path": [], "library": [], "direct_new_layout": [],
                                   "direct_counters_moved": [], "direct_unchanged": []}
    for run in range(runs):
        for name, fn in (("old_path", old_path), ("library", library),
                         ("direct_new_layout", lambda: direct(None)),
                         ("direct_counters_moved", lambda: direct(kept)),
                         ("direct_unchanged", lambda: direct(kept))):
            if name == "direct_counters_moved":
                count(run + 1)  # not timed
            t = time.perf_counter()
            body = fn()
            out[name].append(time.perf_counter() - t)
    result = {k: statistics.median(v) for k, v in out.items()}
    result["bytes"] = len(body)
    return result


class _Fixed:
    """The writer's ``Snapshots`` as if its collector had sent snapshots of ``table``: the
    collector's own cost (dump, columns, encoding) is not the writer's part measured here."""

    def __init__(self, table):
        self.table, self.layout, self.snap = table, None, None

    def usable(self):
        return self.snap

    def describe(self, generation, layout) -> None:
        self.layout = (generation, layout)
        self.taken()

    def taken(self) -> None:
        from gorb.services.ipvs_writer.collector import Snapshot
        self.snap = Snapshot.of(self.table, time.monotonic(), self.layout)


def _fixed_registry(cls, fams):
    reg = cls(auto_describe=False)

    class Fixed:
        def collect(self):
            return fams

    reg.register(Fixed())
    return reg


def report_render(n: int, r: dict[str, float]) -> None:
    print(f"\nthe writer's part of /metrics at {n} backends ({r['bytes'] / 1e6:.1f} MB), "
          "same rows, one run (median ms)")
    print("| renderer | ms |")
    print("|---|---|")
    for key, name in (("old_path", "before: state.dump views + families() + generate_latest"),
                      ("library", "prometheus_client from metrics.rows (library_families)"),
                      ("direct_new_layout", "exposition.render, new layout"),
                      ("direct_counters_moved", "exposition.render, layout kept, counters moved"),
                      ("direct_unchanged", "exposition.render, layout kept, nothing moved")):
        print(f"| {name} | {r[key] * 1e3:.1f} |")
    print(f"library / direct (counters moved): {r['library'] / r['direct_counters_moved']:.1f}x")


def report(n: int, s: dict) -> bool:
    a, r = s["alone"], s["reads"]
    writer_ratio = r["writer_p99"] / a["writer_p99"]
    api_ratio = r["api_p99"] / a["api_p99"]
    print(f"\n{n} backends ({SERVICES} services), medians over rounds")
    print("| | writer commit p50 / p99 ms | PATCH via API p50 / p99 ms | reads done (per s) "
          "| GET /metrics p50 / p99 ms | GET /service/s0 p50 / p99 ms |")
    print("|---|---|---|---|---|---|")
    for name, m in (("alone", a), ("under reads", r)):
        print(f"| {name} | {m['writer_p50'] * 1e3:.2f} / {m['writer_p99'] * 1e3:.2f} | "
              f"{m['api_p50'] * 1e3:.2f} / {m['api_p99'] * 1e3:.2f} | {m['reads']:.0f} "
              f"({m['reads'] / m['phase_s']:.1f}) | {m['metrics_50'] * 1e3:.1f} / "
              f"{m['metrics_99'] * 1e3:.1f} | {m['service_50'] * 1e3:.1f} / "
              f"{m['service_99'] * 1e3:.1f} |")
    ok_w, ok_a = writer_ratio <= 1.2, api_ratio <= 2.0
    ok_s = s["scrape_s"] <= 0.1 or n < 10_000
    print(f"writer commit p99 under reads / alone: {writer_ratio:.2f}x (target <= 1.2x: "
          f"{'met' if ok_w else 'NOT met'})")
    print(f"PATCH p99 through the API under reads / alone: {api_ratio:.2f}x (target <= 2x: "
          f"{'met' if ok_a else 'NOT met'})")
    print(f"one /metrics scrape alone (gzip, as Prometheus asks): {s['scrape_s'] * 1e3:.1f} ms"
          + (f" (target <= 100 ms: {'met' if ok_s else 'NOT met'})" if n >= 10_000 else "")
          + f"; without gzip {s['scrape_plain_s'] * 1e3:.1f} ms")
    return ok_w and ok_a and ok_s


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="100,10000")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--patches", type=int, default=300)
    p.add_argument("--readers", type=int, default=4)
    p.add_argument("--render-sizes", default="10000", help="'' to skip the renderer rows")
    p.add_argument("--render-runs", type=int, default=3)
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    if not a.in_netns:
        return in_fresh_netns("tests.bench.bench_reads")
    print(f"bench_reads: sizes {a.sizes}, {a.rounds} rounds, {a.patches} PATCHes, "
          f"{a.readers} readers; uname {os.uname().release}, {os.cpu_count()} CPU(s)", flush=True)
    results, ok = {}, True
    for n in (int(x) for x in a.render_sizes.split(",") if x):
        results[f"render_{n}"] = render_bench(n, a.render_runs)
        report_render(n, results[f"render_{n}"])
    for n in (int(x) for x in a.sizes.split(",")):
        results[n] = bench(n, a.rounds, a.patches, a.readers)
        ok = report(n, results[n]) and ok
    print(json.dumps(results))
    print("targets:", "MET" if ok else "NOT MET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
