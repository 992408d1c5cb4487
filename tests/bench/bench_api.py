"""API benchmark (issue 3, item 6): PUT-backend and PATCH-weight through the REST API with 1, 8 and
32 concurrent clients, beside the bare writer over the bus, in one run inside the IPVS sandbox.

    tests/bench/run api             # boots the sandbox and runs this module

Setup: a fresh network namespace holds a real ``ipvs-writer`` and a real ``api`` process
(``python -m gorb.services.ipvs_writer`` / ``python -m gorb.services.api``, default log level, state file on
the guest's tmpfs) and this load generator, which re-executes itself inside the namespace. Four
services exist; each measurement creates ``--backends`` backends spread over them (PUT), then
sets each one's weight (PATCH), and the backends are deleted again (not timed) so that every
measurement starts from the same state.

Contenders, alternating which goes first, ``--rounds`` rounds:

- **API**: ``c`` clients (1, 8, 32), each a greenlet with its own keep-alive HTTP/1.1 connection,
  all in this one process (gevent sockets, requests pre-formatted, responses parsed by hand so
  that the client costs as little CPU as possible); each sends its next request when its previous
  one is answered. Every response must be ``200``.
- **writer**: one ``RequestClient`` (the same DEALER the API uses) keeping ``k`` = 1, 8, 32
  requests in flight, pipelined: the next is sent as soon as the oldest is answered. The bodies
  are exactly those the API sends for the same HTTP requests. With ``k`` = 1 this is the writer's
  single-op latency.

Throughput is requests / wall time of a measurement, latency from send to complete reply; each
figure is the median over rounds (of each round's p50/p99), the API/writer ratio the median of
the rounds' paired ratios. The guest has ONE virtual CPU shared by the client, the API and the
writer (and the kernel's IPVS work): the client's own CPU is part of every figure; CPU per
request of each process comes from /proc, the writer's group commits from inotify on the state
file. ``--host`` runs the same on the host (no sandbox) with the writer over
``tests.service.fake_kernel`` (``tests/bench/fake_writer.py``): the API and the writer then get
the host's cores, as in production, but the writer does none of the kernel's work.
``--api-log-level`` runs the API at another log level, ``--profile-api FILE`` under cProfile
(every clock read is a system call in the guest, so profiles there are skewed).

Targets (issue 3): API throughput >= 80% of the writer's at the same concurrency; API p99 <= 2x
the writer's single-op latency (see tests/bench/README.md for which percentile and why).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import gevent
import gevent.socket
import msgspec
import zmq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gorb.common import runtime  # noqa: E402
from gorb.common.transport import RequestClient, TransportTimeout  # noqa: E402
from gorb.services.api import views  # noqa: E402

PORT = 4672
SERVICES = 4
LEVELS = (1, 8, 32)
TICK = os.sysconf("SC_CLK_TCK")
THROUGHPUT_TARGET = 0.8
LATENCY_TARGET = 2.0


# --- the workload -------------------------------------------------------------------------------

def backend_ip(i: int) -> str:
    return f"10.79.{i // 250}.{i % 250 + 1}"


def workload(n: int) -> dict[str, list]:
    """The HTTP requests (bytes) and the identical bus requests for PUT, PATCH and DELETE of ``n``
    backends spread over the services."""
    out: dict[str, list] = {"put_http": [], "patch_http": [], "put_bus": [], "patch_bus": [],
                            "delete_bus": []}
    for i in range(n):
        vs, rs = f"s{i % SERVICES}", f"b{i}"
        put = json.dumps({"host": backend_ip(i), "port": 8080}).encode()
        patch = json.dumps({"weight": 50}).encode()
        out["put_http"].append(http_request("PUT", f"/service/{vs}/{rs}", put))
        out["patch_http"].append(http_request("PATCH", f"/service/{vs}/{rs}", patch))
        # What services/api/app.py sends for these bodies.
        out["put_bus"].append(("backend.create", {
            "service": vs, "backend": rs,
            "options": msgspec.to_builtins(views.decode_backend(put)), "address": ""}))
        out["patch_bus"].append(("backend.update", {"service": vs, "backend": rs,
                                                    "weight": views.decode_weight(patch)}))
        out["delete_bus"].append(("backend.delete", {"service": vs, "backend": rs}))
    return out


def http_request(method: str, path: str, body: bytes) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{PORT}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode() + body


# --- the HTTP client (gevent sockets; nothing is monkey-patched) ----------------------------------

class Conn:
    """One keep-alive HTTP/1.1 connection; responses must carry a Content-Length."""

    def __init__(self, addr: tuple[str, int]):
        self.sock = gevent.socket.create_connection(addr)
        self.sock.setsockopt(gevent.socket.IPPROTO_TCP, gevent.socket.TCP_NODELAY, 1)
        self.buf = bytearray(65536)  # the answer being received; grown, never shrunk
        self._body: memoryview | None = None  # the last large body handed out

    def roundtrip(self, data: bytes) -> tuple[int, bytes | memoryview]:
        """Status and body of one exchange (one at a time: nothing is pipelined). A large body
        is a view of this connection's buffer, valid until the next exchange: a 15 MB /metrics
        body is received into memory already there and not copied (fresh memory costs page
        faults, very dear in the guest; appending to bytes copied the whole body per read)."""
        if self._body is not None:
            self._body.release()  # the buffer may have to grow
            self._body = None
        self.sock.sendall(data)
        buf, have = self.buf, 0
        while (end := buf.find(b"\r\n\r\n", 0, have)) < 0:
            have = self._recv_into(have, have + 65536)
        head = bytes(self.buf[:end]).lower()
        status = int(head[9:12])
        at = head.find(b"\r\ncontent-length:")
        if at < 0:
            raise RuntimeError(f"response without Content-Length: {head!r}")
        eol = head.find(b"\r\n", at + 2)
        total = end + 4 + int(head[at + 17:eol if eol >= 0 else len(head)])
        while have < total:
            have = self._recv_into(have, total)
        if have != total:
            raise RuntimeError("bytes after the answer: nothing was asked for them")
        if total - end - 4 < 65536:
            return status, bytes(self.buf[end + 4:total])
        self._body = memoryview(self.buf)[end + 4:total]
        return status, self._body

    def _recv_into(self, have: int, need: int) -> int:
        """Receive after the ``have`` bytes already in the buffer, growing it to ``need``."""
        if len(self.buf) < need:
            self.buf.extend(bytes(max(need, 2 * len(self.buf)) - len(self.buf)))
        with memoryview(self.buf) as view:
            n = self.sock.recv_into(view[have:need])
        if not n:
            raise RuntimeError("the API closed a keep-alive connection")
        return have + n

    def close(self) -> None:
        self.sock.close()


def api_run(conns: list[Conn], reqs: list[bytes]) -> tuple[float, list[float]]:
    """``len(conns)`` clients sending ``reqs`` between them; (requests/s, latencies)."""
    n = len(reqs)
    lat = [0.0] * n
    nxt = iter(range(n))
    clock = time.perf_counter

    def client(conn: Conn) -> None:
        for i in nxt:
            t = clock()
            status, body = conn.roundtrip(reqs[i])
            lat[i] = clock() - t
            if status != 200:
                raise RuntimeError(f"the API answered {status} {body!r} to {reqs[i]!r}")

    t0 = clock()
    gevent.joinall([gevent.spawn(client, c) for c in conns], raise_error=True)
    return n / (clock() - t0), lat


# --- the bus client -----------------------------------------------------------------------------

def writer_run(client: RequestClient, reqs: list[tuple[str, dict]], k: int
               ) -> tuple[float, list[float]]:
    """``reqs`` sent with ``k`` in flight; (requests/s, latencies)."""
    n = len(reqs)
    lat = [0.0] * n
    inflight: deque[tuple[int, str, float]] = deque()
    clock = time.perf_counter
    t0 = clock()
    i = 0
    while i < n or inflight:
        while i < n and len(inflight) < k:
            t = clock()
            inflight.append((i, client.send(*reqs[i]), t))
            i += 1
        j, rid, t = inflight.popleft()
        reply = client.recv_reply(rid, timeout=60)
        lat[j] = clock() - t
        if not reply["ok"]:
            raise SystemExit(f"the writer refused {reqs[j]}: {reply}")
    return n / (clock() - t0), lat


# --- processes and CPU accounting ---------------------------------------------------------------

def cpu_ticks(pid: int | str) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def busy_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the machine (the guest's one CPU)."""
    vals = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = vals[3] + vals[4]
    return sum(vals) - idle, sum(vals)


class Cpu:
    """CPU seconds used by each of the processes (and the whole guest) over a measurement."""

    def __init__(self, pids: dict[str, int | str]):
        self.pids = pids

    def __enter__(self):
        self.start = {k: cpu_ticks(p) for k, p in self.pids.items()}
        self.busy0 = busy_ticks()
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = {k: (cpu_ticks(p) - self.start[k]) / TICK for k, p in self.pids.items()}
        b1 = busy_ticks()
        self.busy = (b1[0] - self.busy0[0]) / max(1, b1[1] - self.busy0[1])


class Commits:
    """Counts the writer's group commits: each batch of mutations is one atomic rename of a new
    state file over ``state.json`` (``gorb.services.ipvs_writer.state.save``), seen with inotify."""

    IN_MOVED_TO = 0x80

    def __init__(self, state_file: Path):
        libc = ctypes.CDLL(None, use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or libc.inotify_add_watch(self.fd, str(state_file.parent).encode(),
                                                 self.IN_MOVED_TO) < 0:
            raise OSError(ctypes.get_errno(), "inotify")
        self.name = state_file.name.encode()

    def take(self) -> int:
        """Commits since the last call."""
        n = 0
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return n
            at = 0
            while at < len(data):
                _wd, _mask, _cookie, size = struct.unpack_from("iIII", data, at)
                n += data[at + 16:at + 16 + size].rstrip(b"\0") == self.name
                at += 16 + size


class Gorb:
    """ipvs-writer and api in this (fresh) namespace, files under ``work``."""

    def __init__(self, work: Path, api_log_level: str = "", profile_api: str = "",
                 writer_module: str = "gorb.services.ipvs_writer"):
        self.work = work
        self.rundir = work / "run"
        cfg = work / "gorb.toml"
        cfg.write_text(f'[gorb]\nruntime_dir = "{self.rundir}"\n'
                       f'[api]\nlisten = "127.0.0.1:{PORT}"\nwriter_timeout = 60.0\n'
                       f'[writer]\nstate_file = "{work}/state.json"\ndevice = "lo"\n'
                       'reconcile_interval = 3600.0\n')
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.writer = subprocess.Popen(
            [sys.executable, "-m", writer_module, "--config", str(cfg)], cwd=REPO,
            env=env, stdout=open(work / "writer.log", "ab"), stderr=subprocess.STDOUT)
        self.client = RequestClient(zmq.Context.instance(),
                                    runtime.endpoint(str(self.rundir), runtime.WRITER), "bench")
        self._wait(self.writer, "writer.log", lambda: self.client.request(
            "service.list", {}, timeout=0.5))
        prof = ["-m", "cProfile", "-o", profile_api] if profile_api else []
        level = ["--log-level", api_log_level] if api_log_level else []
        self.api = subprocess.Popen(
            [sys.executable, *prof, "-m", "gorb.services.api", "--config", str(cfg), *level], cwd=REPO,
            env=env, stdout=open(work / "api.log", "ab"), stderr=subprocess.STDOUT)
        self._wait(self.api, "api.log", self._health)

    def _health(self) -> None:
        conn = Conn(("127.0.0.1", PORT))
        try:
            status, body = conn.roundtrip(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        finally:
            conn.close()
        if status != 200:
            raise SystemExit(f"/health: {status} {body!r}")

    def _wait(self, proc: subprocess.Popen, log: str, probe) -> None:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit((self.work / log).read_text())
            try:
                probe()
                return
            except (TransportTimeout, OSError, RuntimeError):
                time.sleep(0.1)

    def stop(self) -> None:
        self.client.close()
        for p in (self.api, self.writer):
            if p.poll() is None:
                p.terminate()
                p.wait()


# --- the benchmark ------------------------------------------------------------------------------

def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


def bench(n: int, rounds: int, levels: tuple[int, ...], api_log_level: str = "",
          profile_api: str = "", writer_module: str = "gorb.services.ipvs_writer") -> dict:
    work = Path(tempfile.mkdtemp(prefix="gbapi", dir="/tmp"))
    gorb = Gorb(work, api_log_level, profile_api, writer_module)
    pids = {"api": gorb.api.pid, "writer": gorb.writer.pid, "client": "self"}
    commits = Commits(work / "state.json")
    reqs = workload(n)
    addr = ("127.0.0.1", PORT)
    # "op/contender/level" -> per-round rates, p50s, p99s and busy shares; summed CPU and commits
    res: dict[str, dict] = {}
    try:
        for s in range(SERVICES):
            reply = gorb.client.request("service.create", {"service": f"s{s}", "options": {
                "host": f"10.78.0.{s + 1}", "port": 80}}, timeout=30)
            assert reply["ok"], reply
        # Warm-up (not counted): both paths, both verbs.
        warm = workload(min(n, 64))
        conns = [Conn(addr) for _ in range(8)]
        api_run(conns, warm["put_http"])
        api_run(conns, warm["patch_http"])
        writer_run(gorb.client, warm["delete_bus"], 8)
        writer_run(gorb.client, warm["put_bus"], 8)
        writer_run(gorb.client, warm["patch_bus"], 8)
        writer_run(gorb.client, warm["delete_bus"], 8)
        for c in conns:
            c.close()
        for r in range(rounds):
            for li, level in enumerate(levels):
                order = ["api", "writer"] if (r + li) % 2 == 0 else ["writer", "api"]
                for who in order:
                    conns = [Conn(addr) for _ in range(level)] if who == "api" else []
                    for op in ("put", "patch"):
                        commits.take()
                        with Cpu(pids) as cpu:
                            if who == "api":
                                rate, lat = api_run(conns, reqs[f"{op}_http"])
                            else:
                                rate, lat = writer_run(gorb.client, reqs[f"{op}_bus"], level)
                        cell = res.setdefault(f"{op}/{who}/{level}", {
                            "rates": [], "p50": [], "p99": [], "busy": [], "commits": 0,
                            "cpu": {k: 0.0 for k in pids}})
                        cell["commits"] += commits.take()
                        cell["rates"].append(rate)
                        cell["p50"].append(pct(lat, 50) * 1e3)
                        cell["p99"].append(pct(lat, 99) * 1e3)
                        cell["busy"].append(cpu.busy)
                        for k, v in cpu.used.items():
                            cell["cpu"][k] += v
                        print(f"  round {r + 1} {op:5} {who:6} x{level:<2}: {rate:7.0f} req/s, "
                              f"p50 {pct(lat, 50) * 1e3:6.2f} ms, p99 {pct(lat, 99) * 1e3:6.2f} ms",
                              flush=True)
                    for conn in conns:
                        conn.close()
                    writer_run(gorb.client, reqs["delete_bus"], 32)
    finally:
        gorb.stop()
        api_log = (work / "api.log").read_text()
        shutil.rmtree(work, ignore_errors=True)
    summary_floor = floor(reqs, levels)
    errors = [line for line in api_log.splitlines() if " ERROR " in line or " WARNING " in line]
    if errors:
        raise SystemExit("the API logged problems:\n" + "\n".join(errors[:20]))
    summary = {}
    for key, cell in res.items():
        total = n * len(cell["rates"])
        summary[key] = {
            "rate": statistics.median(cell["rates"]), "rates": cell["rates"],
            "p50_ms": statistics.median(cell["p50"]), "p99_ms": statistics.median(cell["p99"]),
            "p50s": cell["p50"], "p99s": cell["p99"],
            "cpu_us_per_req": {k: v / total * 1e6 for k, v in cell["cpu"].items()},
            "cpu_busy": statistics.median(cell["busy"]),
            "mean_batch": total / max(1, cell["commits"])}
    summary["floor"] = summary_floor
    return summary


def floor(reqs: dict, levels: tuple[int, ...]) -> dict:
    """The API's HTTP layer alone (``tests/bench/stub_api.py``: the same app and server, a writer
    client that answers at once): CPU per request of that process, the floor under the API's."""
    port = PORT + 1
    log = tempfile.TemporaryFile()  # its access lines: a pipe nobody reads would fill up
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.stub_api", str(port)], cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    out = {}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                Conn(("127.0.0.1", port)).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise SystemExit(log.read().decode(errors="replace")) from None
                time.sleep(0.1)
        # 4 x the workload: the CPU figures count 10 ms ticks.
        swap = [r.replace(f":{PORT}\r\n".encode(), f":{port}\r\n".encode())
                for r in reqs["patch_http"]] * 4
        for level in levels:
            conns = [Conn(("127.0.0.1", port)) for _ in range(level)]
            api_run(conns, swap[:64])  # warm-up
            with Cpu({"api": proc.pid, "client": "self"}) as cpu:
                rate, _ = api_run(conns, swap)
            for c in conns:
                c.close()
            out[level] = {"rate": rate,
                          "cpu_us_per_req": {k: v / len(swap) * 1e6 for k, v in cpu.used.items()}}
    finally:
        proc.terminate()
        proc.wait()
        log.close()
    return out


def report(s: dict, n: int, rounds: int, levels: tuple[int, ...], host: bool = False) -> bool:
    print(f"\n{n} backends over {SERVICES} services per measurement, {rounds} rounds; every "
          f"figure is the median of the rounds' (p50/p99: of each round's {n} requests).")
    if host:
        print(f"On the host ({os.cpu_count()} CPUs shared by the load generator, the API and the "
              "writer), the writer over tests.service.fake_kernel: no IPVS, so the writer's cost "
              "per request is that of the real process without the kernel's work.\n")
    else:
        print("The load generator, the API and the writer share the guest's ONE virtual CPU: the "
              "client's own CPU is inside every figure (second table).\n")
    head = (f"{'op':5} {'c':>2} | {'API req/s':>9} {'p50 ms':>7} {'p99 ms':>7} | "
            f"{'writer req/s':>12} {'p50 ms':>7} {'p99 ms':>7} | {'API/writer':>10} "
            f"{'p99/1-op p50':>12} {'p99/1-op p99':>12}")
    print(head)
    print("-" * len(head))
    ok = True
    verdicts = []
    for op in ("put", "patch"):
        single = s[f"{op}/writer/1"]
        for level in levels:
            a, w = s[f"{op}/api/{level}"], s[f"{op}/writer/{level}"]
            # Paired by round (the two ran back to back): robust to the host's load drifting.
            thr = statistics.median(x / y for x, y in zip(a["rates"], w["rates"]))
            r50 = a["p99_ms"] / single["p50_ms"]
            r99 = a["p99_ms"] / single["p99_ms"]
            own = w["p99_ms"] / single["p99_ms"]
            print(f"{op:5} {level:>2} | {a['rate']:9.0f} {a['p50_ms']:7.2f} {a['p99_ms']:7.2f} | "
                  f"{w['rate']:12.0f} {w['p50_ms']:7.2f} {w['p99_ms']:7.2f} | {thr:10.2f} "
                  f"{r50:12.2f} {r99:12.2f}")
            t_ok = thr >= THROUGHPUT_TARGET
            l_ok = r99 <= LATENCY_TARGET
            ok = ok and t_ok and l_ok
            verdicts.append(
                f"  {op:5} c={level:<2} throughput {thr:4.0%} of the writer's: "
                f"{'met' if t_ok else 'NOT met'}; p99 {r99:5.2f}x the writer's single-op p99: "
                f"{'met' if l_ok else 'NOT met'} ({r50:.2f}x its p50; the writer itself with "
                f"{level} in flight: p99 {own:.2f}x)")
    print("\nc: concurrent HTTP clients for the API, requests in flight for the writer. "
          "API/writer: median of the rounds' req/s ratios at the same c.\np99/1-op p50, "
          "p99/1-op p99: the API's p99 at c over the writer's single-op latency (its p50 and p99 "
          "with one request at a time).")
    print("\nCPU per request (us, /proc utime+stime, 10 ms ticks), how busy the machine's CPUs were, "
          "and the writer's mean batch (requests per group commit):")
    head = (f"{'op':5} {'c':>2} | {'API path: api':>13} {'writer':>6} {'client':>6} {'sum':>5} "
            f"{'busy':>5} {'batch':>5} | {'bus path: writer':>16} {'client':>6} {'sum':>5} "
            f"{'busy':>5} {'batch':>5}")
    print(head)
    print("-" * len(head))
    for op in ("put", "patch"):
        for level in levels:
            a, w = s[f"{op}/api/{level}"], s[f"{op}/writer/{level}"]
            ca, cw = a["cpu_us_per_req"], w["cpu_us_per_req"]
            print(f"{op:5} {level:>2} | {ca['api']:13.0f} {ca['writer']:6.0f} {ca['client']:6.0f} "
                  f"{sum(ca.values()):5.0f} {a['cpu_busy']:5.0%} {a['mean_batch']:5.1f} | "
                  f"{cw['writer']:16.0f} {cw['client']:6.0f} {sum(cw.values()):5.0f} "
                  f"{w['cpu_busy']:5.0%} {w['mean_batch']:5.1f}")
    fl = s.get("floor", {})
    if fl:
        print("\nThe HTTP layer alone (tests/bench/stub_api.py: the same app and server, a writer "
              "client answering at once, no bus), PATCH:")
        for level, f in fl.items():
            print(f"  c={level:<2}: {f['rate']:6.0f} req/s, CPU per request: api "
                  f"{f['cpu_us_per_req']['api']:5.0f} us, client {f['cpu_us_per_req']['client']:4.0f} us")
    print(f"\nTargets (issue 3): API throughput >= {THROUGHPUT_TARGET:.0%} of the writer's at the "
          f"same c; API p99 <= {LATENCY_TARGET:g}x the writer's single-op p99:")
    print("\n".join(verdicts))
    return ok


def in_fresh_netns(module: str) -> int:
    """Run ``python -m module --in-netns <our arguments>`` in a fresh namespace (lo up), so that
    everything, load generator included, runs there; its exit status."""
    ns = f"bench{module.rsplit('_', 1)[-1]}{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", module,
                               "--in-netns", *sys.argv[1:]], cwd=REPO).returncode
    finally:
        subprocess.run(f"ip netns pids {ns} | xargs -r kill -9", shell=True)
        subprocess.run(["ip", "netns", "del", ns])


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backends", type=int, default=500, help="backends per measurement")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--levels", default=",".join(map(str, LEVELS)))
    p.add_argument("--api-log-level", choices=["debug", "info", "warning"],
                   help="the API's log level (default: the configuration's, info)")
    p.add_argument("--profile-api", metavar="FILE",
                   help="run the API under cProfile and write its stats to FILE")
    p.add_argument("--host", action="store_true",
                   help="run on this host with the writer over tests.service.fake_kernel "
                        "(no IPVS needed; the processes get the host's cores)")
    p.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args()
    levels = tuple(int(x) for x in a.levels.split(","))
    if not a.in_netns:
        return in_fresh_netns("tests.bench.bench_api")
    print(f"bench_api: {a.backends} backends, {a.rounds} rounds, clients {levels}; "
          f"uname {os.uname().release}, {os.cpu_count()} CPU(s)"
          f"{', host, fake kernel' if a.host else ' in the guest'}", flush=True)
    summary = bench(a.backends, a.rounds, levels, a.api_log_level or "",
                    str(Path(a.profile_api).resolve()) if a.profile_api else "",
                    "tests.bench.fake_writer" if a.host else "gorb.services.ipvs_writer")
    ok = report(summary, a.backends, a.rounds, levels, a.host)
    print(json.dumps(summary))
    print("targets:", "MET" if ok else "NOT MET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
