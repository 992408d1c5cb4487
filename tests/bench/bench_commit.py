"""The writer's cost per group commit at c = 1 (one request per batch), by table size, with the
state kept by the whole-file save (``state.save``, what gorb did before the journal) and by the
snapshot + journal (``state.Store``), side by side in one run; and the restart's load of each.

    tests/bench/run commit                      # this tree
    tests/bench/run commit --compare 5eb24d0    # the whole-file save of another revision too
    tests/bench/run commit --cases 100 --rounds 1

Each case: services of 100 backends each (1, 100 and 1,000 of them: 100, 10,000 and 100,000
backends), pulse defaults on every service (so the check-target table is live); then 100 PATCH
weight and 100 PUT backend requests, each its own batch (what the writer does for one client at a
time): wall time per request (mean, p50, p99, max) and CPU per request. The kernel is faked: this
is the writer's own work per commit (staging, state file, plan, targets), which is what grows with
the table. Contenders, in a fresh process each, alternating:

- ``save``: the whole file written and fsynced at every commit;
- ``journal``: one record appended and fdatasynced per commit, compactions as they come (the
  limit is max(1 MiB, half the snapshot): at 100 backends one every ~30 commits, at 100,000 none
  within the 200 requests);
- ``journal+compact``: the same with the limit lowered to 20 records' worth, so that a
  background compaction (the whole snapshot written by a thread) runs every ~20 commits during
  the measurement: what compaction costs the commits that overlap it.

Restart: the load in a fresh process (5 rounds, alternating; min and median), of the whole file
as today's code reads it (``msgspec.json.decode`` into ``StateDocument``, the collector on), of
the same file by this tree's ``load``, and of a snapshot + journal whose journal has just reached
its limit (the slowest restart the journal allows: PATCH records of 100-backend services up to
max(1 MiB, half the snapshot)).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = {100: 1, 10_000: 100, 100_000: 1_000}  # backends: services (100 backends each)

ONE = r'''
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from gorb.services.ipvs_writer import state
from gorb.services.ipvs_writer.engine import Engine
from tests.service.fake_kernel import FakeKernel
ns, nb, how = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
work = Path(sys.argv[5])
path = work / "state.json"


def host(i):
    return f"10.{79 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}"


e = Engine({}, FakeKernel(), lambda s: None, lambda: "127.0.0.1")
e.handle_batch([("service.create", {"service": f"s{s}", "options": {
    "host": f"10.78.{s // 250}.{s % 250 + 1}", "port": 80, "pulse": {"type": "tcp"}}})
    for s in range(ns)])
for k in range(0, nb, 5000):
    e.handle_batch([("backend.create", {"service": f"s{i % ns}", "backend": f"b{i}", "options": {
        "host": host(i), "port": 8080}, "address": ""}) for i in range(k, min(nb, k + 5000))])
e.targets()
store = None
if how == "save":
    state.save(path, e.services)
    e.persist = lambda s: state.save(path, s)
else:
    state.save(path, e.services)  # a state file of today's gorb, migrated by open()
    store = state.Store(path)
    loaded = store.open()
    assert loaded == e.services
    e.services, e._targets = loaded, None  # as the writer starts: from the records loaded
    e.targets()
    if how == "journal+compact":
        record = len(state.journal.frame(state.journal.batch_payload(
            [("s0", state._encoded(e.services["s0"]))], [])))
        store._limit = lambda: 20 * record
    e.persist = store
out = {}
for verb in ("patch", "put"):
    walls, c = [], time.process_time()
    for i in range(100):
        if verb == "patch":
            req = ("backend.update", {"service": f"s{i % ns}", "backend": f"b{i}",
                                      "weight": 50 + i % 2})
        else:
            j = nb + i
            req = ("backend.create", {"service": f"s{j % ns}", "backend": f"b{j}", "options": {
                "host": f"10.90.{j // 250 % 250}.{j % 250 + 1}", "port": 8080}, "address": ""})
        t = time.perf_counter()
        [(reply, _)] = e.handle_batch([req])
        walls.append((time.perf_counter() - t) * 1e3)
        assert reply["ok"], reply
    out[verb] = {"walls": walls, "cpu": (time.process_time() - c) / 100 * 1e3}
if store is not None:
    out["generation"] = store._generation
    store._wait()
    # The slowest restart: PATCH records until the journal is at its limit.
    limit = state.Store._limit(store)  # the real one, also for journal+compact
    store._limit = lambda: 1 << 62
    i = 0
    while store._end < limit:
        e.handle_batch([("backend.update", {"service": f"s{i % ns}", "backend": f"b{i % nb}",
                                            "weight": 1 + i % 90})])
        i += 1
    out["journal_bytes"] = store._end
    assert state.load(path) == e.services
out["file_bytes"] = path.stat().st_size
print(json.dumps(out))
'''

LOAD = r'''
import gc, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import msgspec
from gorb.services.ipvs_writer import state
path, how = Path(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
if how == "today":  # the whole-file load as it was: one typed decode, the collector on
    services = msgspec.json.decode(path.read_bytes(), type=state.StateDocument).services
else:
    services = state.load(path)
print(time.perf_counter() - t, len(services))
'''


def commit_run(tree: Path, services: int, backends: int, how: str, work: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", ONE, str(tree), str(services), str(backends),
                           how, str(work)], capture_output=True, text=True, cwd=tree)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout)


def load_times(tree: Path, cases: dict[str, tuple[Path, str]], rounds: int = 5) -> dict:
    times: dict[str, list[float]] = {what: [] for what in cases}
    for _ in range(rounds):
        for what, (path, how) in cases.items():
            done = subprocess.run([sys.executable, "-c", LOAD, str(tree), str(path), how],
                                  capture_output=True, text=True, check=True, cwd=tree)
            times[what].append(float(done.stdout.split()[0]) * 1e3)
    return times


def summary(f: dict) -> str:
    def one(verb):
        w = sorted(f[verb]["walls"])
        return (f"{statistics.mean(w):6.2f} {w[49]:6.2f} {w[98]:6.2f} {w[-1]:6.2f} / "
                f"{f[verb]['cpu']:5.2f}")
    return f"PATCH {one('patch')}   PUT {one('put')}"


def pooled(runs: list[dict], verb: str) -> tuple[float, float, float, float]:
    """(mean, p50, p99, CPU) over every request of every round."""
    w = sorted(x for f in runs for x in f[verb]["walls"])
    return (statistics.mean(w), w[len(w) // 2], w[int(len(w) * 0.99) - 1],
            statistics.mean(f[verb]["cpu"] for f in runs))


def measure_case(backends: int, rounds: int, contenders, tmp: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name, _ in contenders}
    for r in range(rounds):
        for name, tree in contenders:
            work = tmp / f"{backends}-{r}-{name}"
            work.mkdir()
            f = commit_run(tree, CASES[backends], backends, name.split("@")[0], work)
            runs[name].append(f)
            extra = (f"  (generation {f['generation']}, journal then filled to "
                     f"{f['journal_bytes'] / 1e6:.1f} MB)" if "generation" in f else "")
            print(f"  {backends:>7} backends, {name:>16}, round {r + 1}: {summary(f)}{extra}",
                  flush=True)
    return runs


def measure_restart(backends: int, tmp: Path) -> None:
    restart = {"today's load, whole file": (tmp / f"{backends}-0-save", "today"),
               "this load, whole file": (tmp / f"{backends}-0-save", "load"),
               "this load, snapshot + full journal": (tmp / f"{backends}-0-journal", "load")}
    times = load_times(REPO, {w: (d / "state.json", how) for w, (d, how) in restart.items()})
    for what, (work, _) in restart.items():
        size = sum(q.stat().st_size for q in work.iterdir()
                   if q.name in ("state.json", "state.json.journal")) / 1e6
        print(f"  {backends:>7} backends, restart, {what:>34}: min {min(times[what]):7.1f} ms, "
              f"median {statistics.median(times[what]):7.1f} ms ({size:.1f} MB)", flush=True)


def print_pooled(all_runs: dict[int, dict[str, list[dict]]]) -> None:
    print("pooled over the rounds, PATCH / PUT: wall mean p50 p99 / CPU mean, ms; "
          "and PATCH mean over the smallest table's")
    first = min(all_runs)
    for backends, runs in sorted(all_runs.items()):
        for name, fs in runs.items():
            cells = []
            for verb in ("patch", "put"):
                mean, p50, p99, cpu = pooled(fs, verb)
                cells.append(f"{mean:6.2f} {p50:6.2f} {p99:6.2f} / {cpu:5.2f}")
            ratio = pooled(fs, "patch")[0] / pooled(all_runs[first][name], "patch")[0]
            print(f"  {backends:>7} backends, {name:>16}: {cells[0]}   {cells[1]}   "
                  f"x{ratio:.2f}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--compare", metavar="REV", help="also measure REV's whole-file save")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cases", default=",".join(map(str, CASES)),
                   help="backend counts, of " + ", ".join(map(str, CASES)))
    a = p.parse_args()
    contenders = [("save", REPO), ("journal", REPO), ("journal+compact", REPO)]
    tmp = Path(tempfile.mkdtemp(prefix="gbcommit"))
    if a.compare:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                        str(tmp / "tree"), a.compare], check=True)
        contenders.insert(0, (f"save@{a.compare}", tmp / "tree"))
    try:
        print("ms per request, one request per commit: wall mean p50 p99 max / CPU mean; "
              f"{a.rounds} round(s), contenders alternating")
        all_runs = {}
        for backends in map(int, a.cases.split(",")):
            all_runs[backends] = measure_case(backends, a.rounds, contenders, tmp)
            measure_restart(backends, tmp)
        print_pooled(all_runs)
    finally:
        if a.compare:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(tmp / "tree")], check=False)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
