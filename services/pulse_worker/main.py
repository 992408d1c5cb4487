"""Entry point of ``pulse-worker``: config, the bus sockets, the worker's loops; exit code.

``--index`` is this worker's number (supervisord passes ``%(process_num)d``) and ``--workers``
the count (default ``pulse.workers``). Exit codes: 0 on SIGTERM, 2 for a configuration error,
70 when a loop crashed (supervisord restarts the worker; its trackers are re-seeded from the
writer, so kernel weights do not move).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

import zmq.green as zmq

from gorb.common import config, logs, loops, runtime
from gorb.common.transport import Pusher, RequestClient, Subscriber
from gorb.services.pulse_worker.worker import Worker

log = logging.getLogger("pulse-worker")

# Every check allocates a greenlet and a handful of objects, so at CPython's default gen-0
# threshold (700) the collector runs every ~30 checks, with a full pass over the long-lived
# trackers twice a second at 10,000 targets: ~15% of the worker's CPU per check
# (tests/bench/README.md, pulse). Nothing here depends on prompt collection of cycles.
GC_THRESHOLDS = (20_000, 10, 10)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gorb-pulse-worker", description="gorb's health checker")
    config.add_arguments(p)
    p.add_argument("--index", type=int, default=0, help="this worker's number, from 0")
    p.add_argument("--workers", type=int, help="how many workers share the checks")
    p.add_argument("--runtime-dir", help="directory of the ipc sockets (gorb.runtime_dir)")
    args = p.parse_args(argv)
    try:
        cfg = config.from_args(args)
    except config.ConfigError as exc:
        p.exit(2, f"gorb-pulse-worker: {exc}\n")
    workers = args.workers or cfg.pulse.workers
    if not 0 <= args.index < workers:
        p.exit(2, f"gorb-pulse-worker: --index must be in [0, {workers})\n")
    rundir = args.runtime_dir or cfg.gorb.runtime_dir
    logs.setup(cfg.gorb.log_level)
    ctx = zmq.Context.instance()
    worker = Worker(
        args.index, workers,
        RequestClient(ctx, runtime.endpoint(rundir, runtime.WRITER), f"pulse-{args.index}"),
        Pusher(ctx, runtime.endpoint(rundir, runtime.HEALTH), f"pulse-{args.index}"),
        Subscriber(ctx, runtime.endpoint(rundir, runtime.EVENTS), ("pulse.",)))
    gc.set_threshold(*GC_THRESHOLDS)
    return loops.run(worker.loops(), log, "the worker")


if __name__ == "__main__":
    sys.exit(main())
