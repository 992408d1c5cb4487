"""Writer benchmarks against ``ipvsadm -R``, side by side in one run (inside the IPVS sandbox).

    tests/bench/run writer          # boots the sandbox and runs this module

(a) backend add and weight-set rate: 2,000 dests (10 services x 200), sent to a running
    ``ipvs-writer`` as pipelined bus requests (each one validated, persisted, applied and
    answered), against ``ipvsadm -R`` restoring the same 2,000 entries; plus the bare kernel
    adapter (``Kernel.apply``) for reference. Each contender gets a fresh network namespace.
(b) convergence after a restart: 1,000 services x 10 backends in the state file;
    - empty kernel (host rebooted): writer process start -> ready (answering on the bus), and the
      converge step alone, against ``ipvsadm -R`` of the same 11,000 entries;
    - kernel already populated (writer restarted): process start -> ready.
Figures are printed as ops/s and ratios; rounds alternate the order of the contenders and the
median is reported. Targets (issue 2): writer >= 1.0x ipvsadm -R on add and on set.
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

    def pipelined(self, requests: list[tuple[str, dict]]) -> float:
        assert self.client is not None
        t = time.perf_counter()
        ids = [self.client.send(type_, body) for type_, body in requests]
        for i in ids:
            reply = self.client.recv_reply(i, timeout=120)
            if not reply["ok"]:
                raise SystemExit(f"writer refused a request: {reply}")
        return time.perf_counter() - t

    def stop(self) -> None:
        if self.client:
            self.client.close()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()


def bench_rates(services: int, per: int, rounds: int) -> dict:
    n = services * per
    res: dict[str, list[float]] = {k: [] for k in
                                   ("writer_add", "writer_set", "ipvsadm_add", "ipvsadm_set",
                                    "adapter_add", "adapter_set", "engine_add", "engine_set")}
    batches: list[dict] = []
    for r in range(rounds):
        order = ["writer", "ipvsadm", "engine", "adapter"]
        order = order[r % 4:] + order[:r % 4]
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
                    creates, sets = [], []
                    for s, (vip, dests) in enumerate(entries(services, per)):
                        w.pipelined([("service.create", {"service": f"s{s}",
                                                         "options": {"host": vip, "port": 80}})])
                        for d, ip in enumerate(dests):
                            creates.append(("backend.create", {"service": f"s{s}", "backend": f"b{d}",
                                                               "options": {"host": ip, "port": 8080}}))
                            sets.append(("backend.update", {"service": f"s{s}", "backend": f"b{d}",
                                                            "weight": 50}))
                    res["writer_add"].append(n / w.pipelined(creates))
                    res["writer_set"].append(n / w.pipelined(sets))
                    w.stop()
                    batches.append(batch_stats((work / "log").read_text()))
                elif who == "engine":
                    add_s, set_s = engine_run(ns.name, services, per, work)
                    res["engine_add"].append(n / add_s)
                    res["engine_set"].append(n / set_s)
                else:
                    add_s, set_s = adapter_run(ns.name, services, per)
                    res["adapter_add"].append(n / add_s)
                    res["adapter_set"].append(n / set_s)
            finally:
                ns.close()
                shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in res.items()}
    return {"entries": n, "rounds": rounds, "ops_per_s": med,
            "ratio_add": med["engine_add"] / med["ipvsadm_add"],
            "ratio_set": med["engine_set"] / med["ipvsadm_set"],
            "ratio_bus_add": med["writer_add"] / med["ipvsadm_add"],
            "ratio_bus_set": med["writer_set"] / med["ipvsadm_set"],
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
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--services", type=int, default=10)
    p.add_argument("--per", type=int, default=200)
    p.add_argument("--converge-services", type=int, default=1000)
    p.add_argument("--converge-per", type=int, default=10)
    a = p.parse_args()
    rates = bench_rates(a.services, a.per, a.rounds)
    m = rates["ops_per_s"]
    print(f"(a) {rates['entries']} dests, median of {rates['rounds']} rounds (ops/s):")
    for verb in ("add", "set"):
        print(f"    {verb}: ipvsadm -R {m['ipvsadm_' + verb]:.0f} | writer engine {m['engine_' + verb]:.0f}"
              f" ({rates['ratio_' + verb]:.2f}x) | writer over the bus, client in the same guest "
              f"{m['writer_' + verb]:.0f} ({rates['ratio_bus_' + verb]:.2f}x) | bare adapter "
              f"{m['adapter_' + verb]:.0f}")
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
    print(json.dumps({"rates": rates, "converge": conv}, default=str))
    ok = rates["ratio_add"] >= 1.0 and rates["ratio_set"] >= 1.0
    print("target writer engine >= 1.0x ipvsadm -R on add and set:", "MET" if ok else "NOT MET")
    return 0


if __name__ == "__main__":
    sys.exit(main())
