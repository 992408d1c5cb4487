"""The writer's cost per group commit at c = 1 (one request per batch), by table size: the engine
over ``tests.service.fake_kernel`` with a real state file, on the host.

    tests/bench/run commit                      # this tree
    tests/bench/run commit --compare 5eb24d0    # beside another revision, interleaved

Each case: ``services`` services with pulse defaults (so the check-target table is live) and
``backends`` backends spread over them, then 100 PATCH weight and 100 PUT backend requests, each
its own batch (what the writer does for one client at a time); wall and CPU time per request.
``--compare REV`` checks REV out in a temporary git worktree and runs the same cases there, the
two trees alternating, ``--rounds`` times each. The kernel is faked: this is the writer's own
work per commit (staging, state file, plan, targets), which is what grows with the table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CASES = ((4, 600), (100, 10_000))

ONE = r'''
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from gorb.services.ipvs_writer import state
from gorb.services.ipvs_writer.engine import Engine
from tests.service.fake_kernel import FakeKernel
ns, nb = int(sys.argv[2]), int(sys.argv[3])
path = Path(tempfile.mkdtemp(prefix="gbcommit")) / "state.json"
e = Engine({}, FakeKernel(), lambda s: None, lambda: "127.0.0.1")
e.handle_batch([("service.create", {"service": f"s{s}", "options": {
    "host": f"10.78.{s // 250}.{s % 250 + 1}", "port": 80, "pulse": {"type": "tcp"}}})
    for s in range(ns)])
e.handle_batch([("backend.create", {"service": f"s{i % ns}", "backend": f"b{i}", "options": {
    "host": f"10.79.{i // 250}.{i % 250 + 1}", "port": 8080}, "address": ""}) for i in range(nb)])
e.targets()
e.persist = lambda s: state.save(path, s)
out = {}
for verb in ("patch", "put"):
    t, c, n = time.perf_counter(), time.process_time(), 100
    for i in range(n):
        if verb == "patch":
            req = ("backend.update", {"service": f"s{i % ns}", "backend": f"b{i}",
                                      "weight": 50 + i % 2})
        else:
            j = nb + i
            req = ("backend.create", {"service": f"s{j % ns}", "backend": f"b{j}", "options": {
                "host": f"10.80.{j // 250 % 250}.{j % 250 + 1}", "port": 8080}, "address": ""})
        [(reply, _)] = e.handle_batch([req])
        assert reply["ok"], reply
    out[verb] = ((time.perf_counter() - t) / n * 1e3, (time.process_time() - c) / n * 1e3)
print(json.dumps(out))
'''


def run(tree: Path, services: int, backends: int) -> dict:
    done = subprocess.run([sys.executable, "-c", ONE, str(tree), str(services), str(backends)],
                          capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(done.stdout)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--compare", metavar="REV", help="also measure this git revision")
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    trees = {"this tree": REPO}
    tmp = None
    if a.compare:
        tmp = Path(tempfile.mkdtemp(prefix="gbcommit-wt"))
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q",
                        str(tmp / "tree"), a.compare], check=True)
        trees = {a.compare: tmp / "tree", "this tree": REPO}
    try:
        print("ms per request, one request per commit (wall / CPU), "
              f"{a.rounds} round(s), trees alternating:")
        for services, backends in CASES:
            for r in range(a.rounds):
                for name, tree in trees.items():
                    f = run(tree, services, backends)
                    print(f"  {backends:>6} backends / {services:>3} services, {name:>10}, round "
                          f"{r + 1}: PATCH {f['patch'][0]:6.2f} / {f['patch'][1]:6.2f}   "
                          f"PUT {f['put'][0]:6.2f} / {f['put'][1]:6.2f}", flush=True)
    finally:
        if tmp is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force",
                            str(tmp / "tree")], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
