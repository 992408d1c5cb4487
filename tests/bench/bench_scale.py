"""The whole writer at 100,000 backends (issue 10, item 6), beside ``ipvsadm -R`` of the same set,
in one run inside the IPVS sandbox.

    tests/bench/run scale           # boots the sandbox (2 GiB) and runs this module

1,000 services x 100 backends (``--services``, ``--per``), each contender in a fresh network
namespace (``bench_writer``'s building blocks):

- add and set: a running ``ipvs-writer`` taking the 100,000 ``backend.create`` then
  ``backend.update`` requests pipelined over the bus (800 in flight), and the writer's engine in
  one process (the write path without the bus, in batches of 250), against ``ipvsadm -R``
  restoring the same lines (``-a``, then ``-e``);
- converge: the state file of the same 101,000 entries, writer process start -> answering with
  an empty kernel (a reboot) and with the kernel already populated (a restart), against
  ``ipvsadm -R`` of the set.

One round (the set is large; the machine is shared, so ratios from the same run are what count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from tests.bench.bench_writer import (
    Netns,
    WriterProc,
    bench_converge,
    bus_requests,
    engine_run,
    ipvsadm_lines,
    time_ipvsadm,
)


def writer_rates(services: int, per: int) -> tuple[float, float]:
    """(add, set) requests per second of a running writer over the bus."""
    ns = Netns("scalew")
    work = Path(tempfile.mkdtemp(prefix="gs", dir="/tmp"))
    try:
        w = WriterProc(ns.name, work)
        w.start()
        svcs, creates, sets = bus_requests(services, per)
        w.pipelined(svcs)
        n = len(creates)
        add = n / w.pipelined(creates)
        set_ = n / w.pipelined(sets)
        w.stop()
        return add, set_
    finally:
        ns.close()
        shutil.rmtree(work, ignore_errors=True)


def ipvsadm_rates(services: int, per: int) -> tuple[float, float]:
    ns = Netns("scalei")
    try:
        n = services * per
        add = n / time_ipvsadm(ns.name, ipvsadm_lines(services, per, 100, True))
        set_ = n / time_ipvsadm(ns.name, ipvsadm_lines(services, per, 50, False))
        return add, set_
    finally:
        ns.close()


def engine_rates(services: int, per: int) -> tuple[float, float]:
    ns = Netns("scalee")
    work = Path(tempfile.mkdtemp(prefix="gse", dir="/tmp"))
    try:
        add_s, set_s = engine_run(ns.name, services, per, work)
        return services * per / add_s, services * per / set_s
    finally:
        ns.close()
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--services", type=int, default=1000)
    p.add_argument("--per", type=int, default=100)
    a = p.parse_args()
    n = a.services * a.per
    print(f"bench_scale: {a.services} services x {a.per} backends = {n} dests", flush=True)
    out = {"ipvsadm": ipvsadm_rates(a.services, a.per),
           "writer": writer_rates(a.services, a.per),
           "engine": engine_rates(a.services, a.per)}
    print("| ops/s | add | set | ratio to ipvsadm -R (add / set) |")
    print("|---|---|---|---|")
    base = out["ipvsadm"]
    for who, label in (("ipvsadm", "ipvsadm -R"), ("engine", "writer engine"),
                       ("writer", "writer over the bus")):
        add, set_ = out[who]
        print(f"| {label} | {add:,.0f} | {set_:,.0f} | {add / base[0]:.2f}x / "
              f"{set_ / base[1]:.2f}x |", flush=True)
    conv = bench_converge(a.services, a.per)
    out["converge"] = conv
    print(f"converge {conv['entries']} entries: writer start->ready, empty kernel "
          f"{conv['writer_empty_kernel_s']:.1f} s; populated kernel "
          f"{conv['writer_populated_kernel_s']:.1f} s; engine converge alone "
          f"{conv['engine_converge_s']:.1f} s; ipvsadm -R {conv['ipvsadm_restore_s']:.1f} s "
          f"(ipvsadm / writer, empty kernel: {conv['ratio_start_to_ready_vs_ipvsadm']:.2f}x)")
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
