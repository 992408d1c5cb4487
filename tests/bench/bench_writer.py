"""Writer benchmarks against ``ipvsadm -R``, side by side in one run (inside the IPVS sandbox).

    tests/bench/run writer          # boots the sandbox and runs this module

(a) backend add and weight-set rate: 2,000 dests (10 services x 200), sent to a running
    ``ipvs-writer`` as pipelined bus requests (each one validated, persisted, applied and
    answered), against ``ipvsadm -R`` restoring the same 2,000 entries; plus the bare kernel
    adapter (``Kernel.apply``, gorb's codec) beside pyroute2's own IPVS API doing the same ops
    (``tests/bench/pyroute2_ipvs.py``: one request per round trip, pipelined, batched, and the
    adapter with pyroute2's encoder). Each contender gets a fresh network namespace.
    Before it, encode-only cost per message: gorb's codec against pyroute2's encoder.
(b) convergence after a restart: 1,000 services x 10 backends in the state file;
    - empty kernel (host rebooted): writer process start -> ready (answering on the bus), and the
      converge step alone, against ``ipvsadm -R`` of the same 11,000 entries;
    - kernel already populated (writer restarted): process start -> ready.
Figures are printed as ops/s and ratios; rounds (7: there are eight contenders, and with 3 one
disturbed round moved a median by 2x) rotate the order of the contenders and the median is
reported. Targets: writer >= 1.0x ipvsadm -R on add and on set (issue 2); the bare
adapter >= 1.5x the fastest pyroute2 way on add and on set, or gorb's codec goes (issue 10, rule 2).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import msgspec
import zmq

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from gorb.common import runtime  # noqa: E402
from gorb.common.model import BackendOptions, ServiceOptions  # noqa: E402
from gorb.common.transport import RequestClient, TransportTimeout  # noqa: E402
from gorb.services.ipvs_writer import state  # noqa: E402


def sh(cmd: str, input: str | None = None) -> None:
    subprocess.run(cmd, shell=True, check=True, input=input, text=True,
                   stdout=subprocess.DEVNULL)


class Netns:
    def __init__(self, name: str):
        self.name = name
        sh(f"ip netns add {name}")
        sh(f"ip netns exec {name} ip link set lo up")

    def close(self) -> None:
        subprocess.run(f"ip netns pids {self.name} | xargs -r kill -9", shell=True)
        sh(f"ip netns del {self.name}")


def entries(services: int, per: int):
    for s in range(services):
        vip = f"10.78.{s // 250}.{s % 250 + 1}"
        yield vip, [f"10.79.{(s * per + d) // 250 % 250}.{(s * per + d) % 250 + 1}"
                    for d in range(per)]


def bus_requests(services: int, per: int) -> tuple[list, list, list]:
    """The writer's requests for ``entries``: the services, their backends, a weight for each."""
    svcs, creates, sets = [], [], []
    for s, (vip, dests) in enumerate(entries(services, per)):
        svcs.append(("service.create", {"service": f"s{s}", "options": {"host": vip, "port": 80}}))
        for d, ip in enumerate(dests):
            creates.append(("backend.create", {"service": f"s{s}", "backend": f"b{d}",
                                               "options": {"host": ip, "port": 8080}}))
            sets.append(("backend.update", {"service": f"s{s}", "backend": f"b{d}",
                                            "weight": 50}))
    return svcs, creates, sets


def ipvsadm_lines(services: int, per: int, weight: int, add: bool) -> str:
    lines = []
    for vip, dests in entries(services, per):
        if add:
            lines.append(f"-A -t {vip}:80 -s wrr")
        op = "-a" if add else "-e"
        lines += [f"{op} -t {vip}:80 -r {d}:8080 -m -w {weight}" for d in dests]
    return "\n".join(lines) + "\n"


def time_ipvsadm(ns: str, text: str) -> float:
    t = time.perf_counter()
    subprocess.run(["ip", "netns", "exec", ns, "ipvsadm", "-R"], input=text, text=True, check=True)
    return time.perf_counter() - t


class WriterProc:
    def __init__(self, ns: str, workdir: Path):
        self.ns, self.workdir = ns, workdir
        self.rundir = str(workdir / "run")
        self.proc: subprocess.Popen | None = None
        self.client: RequestClient | None = None

    def start(self) -> float:
        """Start the writer; seconds until it answers on the bus."""
        t = time.perf_counter()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, sys.executable, "-m", "gorb.services.ipvs_writer",
             "--runtime-dir", self.rundir, "--state-file", str(self.workdir / "state.json"),
             "--reconcile-interval", "3600", "--log-level", "debug"],
            cwd=REPO, stdout=open(self.workdir / "log", "ab"), stderr=subprocess.STDOUT)
        self.client = RequestClient(zmq.Context.instance(),
                                    runtime.endpoint(self.rundir, runtime.WRITER), "bench")
        while True:
            if self.proc.poll() is not None:
                raise SystemExit((self.workdir / "log").read_text())
            try:
                self.client.request("service.list", {}, timeout=0.5)
                return time.perf_counter() - t
            except TransportTimeout:
                pass

    def pipelined(self, requests: list[tuple[str, dict]], window: int = 800) -> float:
        """Seconds to have every request answered, ``window`` of them in flight (below the
        sockets' high-water mark of 1,000: past it the writer's ROUTER drops replies)."""
        assert self.client is not None
        t = time.perf_counter()
        inflight: deque[str] = deque()
        for type_, body in requests:
            if len(inflight) >= window:
                self._answered(inflight.popleft())
            inflight.append(self.client.send(type_, body))
        while inflight:
            self._answered(inflight.popleft())
        return time.perf_counter() - t

    def _answered(self, req_id: str) -> None:
        reply = self.client.recv_reply(req_id, timeout=120)
        if not reply["ok"]:
            raise SystemExit(f"writer refused a request: {reply}")

    def stop(self) -> None:
        if self.client:
            self.client.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def bench_rates(services: int, per: int, rounds: int) -> dict:
    n = services * per
    contenders = ["writer", "ipvsadm", "engine", "adapter", *PYROUTE2]
    res: dict[str, list[float]] = {f"{who}_{verb}": [] for who in contenders
                                   for verb in ("add", "set")}
    batches: list[dict] = []
    for r in range(rounds):
        k = r % len(contenders)
        order = contenders[k:] + contenders[:k]
        for who in order:
            ns = Netns(f"bench{who}{r}")
            work = Path(tempfile.mkdtemp(prefix="gb", dir="/tmp"))
            try:
                if who == "ipvsadm":
                    res["ipvsadm_add"].append(n / time_ipvsadm(ns.name, ipvsadm_lines(services, per, 100, True)))
                    res["ipvsadm_set"].append(n / time_ipvsadm(ns.name, ipvsadm_lines(services, per, 50, False)))
                elif who == "writer":
                    w = WriterProc(ns.name, work)
                    w.start()
                    svcs, creates, sets = bus_requests(services, per)
                    w.pipelined(svcs)
                    res["writer_add"].append(n / w.pipelined(creates))
                    res["writer_set"].append(n / w.pipelined(sets))
                    w.stop()
                    batches.append(batch_stats((work / "log").read_text()))
                elif who == "engine":
                    add_s, set_s = engine_run(ns.name, services, per, work)
                    res["engine_add"].append(n / add_s)
                    res["engine_set"].append(n / set_s)
                elif who == "adapter":
                    add_s, set_s = adapter_run(ns.name, services, per)
                    res["adapter_add"].append(n / add_s)
                    res["adapter_set"].append(n / set_s)
                else:
                    add_s, set_s = pyroute2_run(ns.name, PYROUTE2[who], services, per)
                    res[f"{who}_add"].append(n / add_s)
                    res[f"{who}_set"].append(n / set_s)
            finally:
                ns.close()
                shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"entries": n, "rounds": rounds, "ops_per_s": med,
            "ratio_add": med["engine_add"] / med["ipvsadm_add"],
            "ratio_set": med["engine_set"] / med["ipvsadm_set"],
            "ratio_bus_add": med["writer_add"] / med["ipvsadm_add"],
            "ratio_bus_set": med["writer_set"] / med["ipvsadm_set"],
            "codec_vs_pyroute2": {verb: {who: med[f"adapter_{verb}"] / med[f"{who}_{verb}"]
                                         for who in PYROUTE2} for verb in ("add", "set")},
            # per round, the bare adapter over the fastest pyroute2 way of that round
            "codec_vs_best_pyroute2_by_round": {
                verb: [res[f"adapter_{verb}"][r] / max(res[f"{who}_{verb}"][r] for who in PYROUTE2)
                       for r in range(rounds)] for verb in ("add", "set")},
            "all": res, "writer_batches": batches}


def batch_stats(log: str) -> dict:
    """How the writer grouped the requests: batches, mean size, time in persist and apply."""
    sizes, persist, apply = [], 0.0, 0.0
    for m in re.finditer(r"batch of (\d+): persist ([\d.]+) ms, plan\+apply \d+ ops ([\d.]+) ms", log):
        sizes.append(int(m.group(1)))
        persist += float(m.group(2))
        apply += float(m.group(3))
    return {"batches": len(sizes), "mean_size": sum(sizes) / max(1, len(sizes)),
            "persist_ms": round(persist), "apply_ms": round(apply)}


def engine_run(ns: str, services: int, per: int, work: Path) -> tuple[float, float]:
    """Seconds for the writer's engine (decode, validate, stage, persist the state file, plan,
    netlink batch: the whole write path but the bus) to add, then set, the dests, in batches of
    250 requests as the loop groups them under load."""
    code = (
        "import sys,time,json; sys.path.insert(0,%r)\n"
        "from pathlib import Path\n"
        "from gorb.services.ipvs_writer import state\n"
        "from gorb.services.ipvs_writer.engine import Engine\n"
        "from gorb.services.ipvs_writer.netlink import Kernel\n"
        "from tests.bench.bench_writer import entries\n"
        "path=Path(%r); e=Engine({}, Kernel(), lambda s: state.save(path, s))\n"
        "adds=[]; sets=[]\n"
        "for s,(vip,dests) in enumerate(entries(%d,%d)):\n"
        "  r=e.handle_batch([('service.create',{'service':f's{s}','options':{'host':vip,'port':80}})])\n"
        "  assert r[0][0]['ok'], r\n"
        "  for d,ip in enumerate(dests):\n"
        "    adds.append(('backend.create',{'service':f's{s}','backend':f'b{d}','options':{'host':ip,'port':8080}}))\n"
        "    sets.append(('backend.update',{'service':f's{s}','backend':f'b{d}','weight':50}))\n"
        "def run(reqs):\n"
        "  t=time.perf_counter()\n"
        "  for i in range(0,len(reqs),250):\n"
        "    assert all(r[0]['ok'] for r in e.handle_batch(reqs[i:i+250]))\n"
        "  return time.perf_counter()-t\n"
        "print(json.dumps([run(adds), run(sets)]))\n"
        % (str(REPO), str(work / "engine-state.json"), services, per))
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    a, b = json.loads(out)
    return a, b


def adapter_run(ns: str, services: int, per: int) -> tuple[float, float]:
    """Seconds for the bare kernel adapter to add, then set, the dests in namespace ``ns``."""
    code = (
        "import sys,time,json; sys.path.insert(0,%r)\n"
        "from gorb.services.ipvs_writer.netlink import Kernel\n"
        "from gorb.services.ipvs_writer.table import KService,KDest,Op\n"
        "from tests.bench.bench_writer import entries\n"
        "k=Kernel(); svcs=[]; ops=[]; sets=[]\n"
        "for vip,dests in entries(%d,%d):\n"
        "  s=KService(2,6,vip,80,sched='wrr'); svcs.append(Op('add_service',s))\n"
        "  ops += [Op('add_dest',s,KDest(d,8080,0,100)) for d in dests]\n"
        "  sets += [Op('set_dest',s,KDest(d,8080,0,50)) for d in dests]\n"
        "k.apply(svcs); t=time.perf_counter(); r=k.apply(ops); a=time.perf_counter()-t\n"
        "t=time.perf_counter(); r2=k.apply(sets); b=time.perf_counter()-t\n"
        "assert not any(r) and not any(r2)\n"
        "print(json.dumps([a,b]))\n" % (str(REPO), services, per))
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code],
                         capture_output=True, text=True, check=True, cwd=REPO).stdout
    a, b = json.loads(out)
    return a, b


# pyroute2's IPVS API doing the adapter's ops (tests/bench/pyroute2_ipvs.py): contender -> mode
# (the adapter with pyroute2's encoder first: it runs right after the bare adapter in a round)
PYROUTE2 = {"adapter_pyroute2": "adapter", "pyroute2_batch": "batch",
            "pyroute2_async": "async", "pyroute2_api": "api"}
PYROUTE2_LABELS = {
    "adapter_pyroute2": "Kernel.apply with pyroute2's encoder",
    "pyroute2_batch": "pyroute2 nlm_request_batch (256 per send)",
    "pyroute2_async": "pyroute2 AsyncIPVS.dest, 256 in flight",
    "pyroute2_api": "pyroute2 IPVS.dest, one per round trip",
}


def pyroute2_run(ns: str, mode: str, services: int, per: int) -> tuple[float, float]:
    """Seconds for pyroute2 (``mode``, see pyroute2_ipvs) to add, then set, the dests in ``ns``."""
    out = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "tests.bench.pyroute2_ipvs",
                          mode, str(services), str(per)],
                         stdout=subprocess.PIPE, text=True, check=True, cwd=REPO).stdout
    a, b = json.loads(out.splitlines()[-1])
    return a, b


def encode_micro(messages: int) -> dict:
    """Encode-only µs per message, gorb's codec against pyroute2's (no kernel, own process)."""
    out = subprocess.run([sys.executable, "-m", "tests.bench.pyroute2_ipvs", "micro",
                          str(messages)], capture_output=True, text=True, check=True, cwd=REPO).stdout
    return json.loads(out.splitlines()[-1])


def bench_converge(services: int, per: int) -> dict:
    n = services * (per + 1)
    records = {}
    for s, (vip, dests) in enumerate(entries(services, per)):
        records[f"s{s}"] = state.ServiceRecord(
            msgspec.convert({"host": vip, "port": 80, "family": "ipv4", "method": "wrr"},
                            ServiceOptions), vip,
            {f"b{d}": state.BackendRecord(msgspec.convert(
                {"host": ip, "port": 8080, "weight": 100, "pulse": {"type": "tcp", "interval": "1m"}},
                BackendOptions), ip) for d, ip in enumerate(dests)})
    out = {"entries": n}
    ns = Netns("benchconv")
    work = Path(tempfile.mkdtemp(prefix="gc", dir="/tmp"))
    try:
        state.save(work / "state.json", records)
        w = WriterProc(ns.name, work)
        out["writer_empty_kernel_s"] = w.start()
        w.stop()
        log = (work / "log").read_text()
        out["writer_log"] = [line for line in log.splitlines() if "converged" in line]
        out["writer_populated_kernel_s"] = w.start()
        w.stop()
        out["writer_log"] += [line for line in (work / "log").read_text().splitlines()
                              if "converged" in line][1:]
    finally:
        ns.close()
    ns = Netns("benchconvb")
    try:
        out["ipvsadm_restore_s"] = time_ipvsadm(ns.name, ipvsadm_lines(services, per, 100, True))
    finally:
        ns.close()
    ns = Netns("benchconvc")
    try:
        res = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c",
                        "import sys; sys.path.insert(0,%r)\n"
                        "from pathlib import Path\n"
                        "from gorb.services.ipvs_writer import state\n"
                        "from gorb.services.ipvs_writer.engine import Engine\n"
                        "from gorb.services.ipvs_writer.netlink import Kernel\n"
                        "import time; t=time.perf_counter()\n"
                        "e=Engine(state.load(Path(%r)), Kernel(), lambda s: None)\n"
                        "ops, fails = e.start(); assert not fails\n"
                        "print(time.perf_counter()-t)" % (str(REPO), str(work / "state.json"))],
                       check=True, cwd=REPO, capture_output=True, text=True)
        out["engine_converge_s"] = float(res.stdout.split()[-1])
    finally:
        ns.close()
        shutil.rmtree(work, ignore_errors=True)
    out["ratio_start_to_ready_vs_ipvsadm"] = out["ipvsadm_restore_s"] / out["writer_empty_kernel_s"]
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--services", type=int, default=10)
    p.add_argument("--per", type=int, default=200)
    p.add_argument("--converge-services", type=int, default=1000)
    p.add_argument("--converge-per", type=int, default=10)
    p.add_argument("--micro-messages", type=int, default=2000)
    a = p.parse_args()
    micro = encode_micro(a.micro_messages)
    us = micro["us_per_message"]
    print(f"(micro) encode only, {micro['messages']} dest messages (add + set), median of "
          f"{micro['repeats']} passes (µs/message): gorb codec {us['gorb']:.1f} | pyroute2 from "
          f"values (IPVSDest + dump_key/dump_nla + encode) {us['pyroute2']:.1f} "
          f"({micro['ratio_to_gorb']['pyroute2']:.0f}x) | pyroute2 ipvsmsg.encode() alone "
          f"{us['pyroute2_encode']:.1f} ({micro['ratio_to_gorb']['pyroute2_encode']:.0f}x); "
          f"ratios: median of each pass's")
    rates = bench_rates(a.services, a.per, a.rounds)
    m = rates["ops_per_s"]
    print(f"(a) {rates['entries']} dests, median of {rates['rounds']} rounds (ops/s):")
    for verb in ("add", "set"):
        print(f"    {verb}: ipvsadm -R {m['ipvsadm_' + verb]:.0f} | writer engine {m['engine_' + verb]:.0f}"
              f" ({rates['ratio_' + verb]:.2f}x) | writer over the bus, client in the same guest "
              f"{m['writer_' + verb]:.0f} ({rates['ratio_bus_' + verb]:.2f}x) | bare adapter "
              f"{m['adapter_' + verb]:.0f}")
        for who, label in PYROUTE2_LABELS.items():
            print(f"        {label}: {m[f'{who}_{verb}']:.0f} (bare adapter / this = "
                  f"{rates['codec_vs_pyroute2'][verb][who]:.2f}x)")
    for b in rates["writer_batches"]:
        print(f"    writer grouped {b['batches']} batches of {b['mean_size']:.0f} requests on average; "
              f"{b['persist_ms']} ms persisting, {b['apply_ms']} ms planning+applying")
    conv = bench_converge(a.converge_services, a.converge_per)
    print(f"(b) converge {a.converge_services} services x {a.converge_per} backends "
          f"({conv['entries']} entries):")
    print(f"    writer start->ready, empty kernel:     {conv['writer_empty_kernel_s']:.2f} s")
    print(f"    writer start->ready, populated kernel: {conv['writer_populated_kernel_s']:.2f} s")
    print(f"    engine converge alone (load state + dump + apply, in-process): "
          f"{conv['engine_converge_s']:.2f} s")
    print(f"    ipvsadm -R of the same set:           {conv['ipvsadm_restore_s']:.2f} s")
    print(f"    ipvsadm time / writer start->ready (empty kernel) = "
          f"{conv['ratio_start_to_ready_vs_ipvsadm']:.2f}x")
    print(json.dumps({"micro": micro, "rates": rates, "converge": conv}, default=str))
    ok = rates["ratio_add"] >= 1.0 and rates["ratio_set"] >= 1.0
    print("target writer engine >= 1.0x ipvsadm -R on add and set:", "MET" if ok else "NOT MET")
    worst = {verb: min(v.values()) for verb, v in rates["codec_vs_pyroute2"].items()}
    ok = all(x >= 1.5 for x in worst.values())
    print(f"rule 2: bare adapter >= 1.5x the fastest pyroute2 way on add and set "
          f"({worst['add']:.2f}x / {worst['set']:.2f}x; by round, over that round's fastest: "
          + " / ".join(", ".join(f"{x:.2f}" for x in rates["codec_vs_best_pyroute2_by_round"][v])
                       for v in ("add", "set")) + "):",
          "MET (keep the codec)" if ok else "NOT MET (pyroute2's encoder would do)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
