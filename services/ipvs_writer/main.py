"""Entry point of ``ipvs-writer``: parse config, build the engine and the loop, run, exit code.

Exit codes: 0 on SIGTERM/SIGINT (kernel state is left in place: traffic keeps flowing),
2 for a configuration or state-file problem (the message says what to do), 3 when the kernel has
no IPVS, 70 for an unexpected internal error (supervisord restarts the writer).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import zmq

from common import runtime
from services.ipvs_writer import state
from services.ipvs_writer.engine import Engine
from services.ipvs_writer.loop import WriterLoop
from services.ipvs_writer.netlink import IpvsUnavailable, Kernel

log = logging.getLogger("ipvs-writer")


@dataclass
class WriterConfig:
    runtime_dir: str = "/run/gorb"
    state_file: str = "/var/lib/gorb/state.json"
    flush: bool = False
    restore_previous: bool = False
    reconcile_interval: float = 10.0
    max_batch: int = 1000
    log_level: str = "info"


def parse_args(argv: list[str] | None) -> WriterConfig:
    d = WriterConfig()
    p = argparse.ArgumentParser(prog="gorb-ipvs-writer", description="gorb's single IPVS writer")
    p.add_argument("--runtime-dir", default=d.runtime_dir, help="directory of the ipc sockets")
    p.add_argument("--state-file", default=d.state_file, help="where the desired state is kept")
    p.add_argument("-f", "--flush", action="store_true", help="flush all IPVS services at start")
    p.add_argument("--restore-previous", action="store_true",
                   help="if the state file is corrupt, set it aside and use <state-file>.prev")
    p.add_argument("--reconcile-interval", type=float, default=d.reconcile_interval,
                   help="seconds between drift repairs (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help="most requests group-committed at once (default %(default)s)")
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning"])
    return WriterConfig(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    logging.basicConfig(level=cfg.log_level.upper(),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    path = Path(cfg.state_file)
    try:
        services = state.load(path, restore_previous=cfg.restore_previous)
        runtime.ensure_runtime_dir(cfg.runtime_dir)
        kernel = Kernel()
    except (state.StateFileError, ValueError, runtime.RuntimeDirError) as exc:
        log.error("%s", exc)
        return 2
    except IpvsUnavailable as exc:
        log.error("%s", exc)
        return 3
    engine = Engine(services, kernel, lambda s: state.save(path, s))
    ops, failures = engine.start(flush=cfg.flush)
    log.info("started with %d service(s) from %s; converged with %d op(s), %d failed",
             len(services), path, ops, len(failures))
    if engine.foreign:
        # After --restore-previous these may be what the lost last write had created.
        log.warning("the kernel has %d IPVS service(s) gorb does not own: left untouched "
                    "(remove with ipvsadm -D, or start with --flush)", engine.foreign)
    loop = WriterLoop(engine, zmq.Context.instance(), cfg.runtime_dir, cfg.reconcile_interval,
                      cfg.max_batch)

    def stop(signum, _frame):
        log.info("signal %d: stopping, IPVS entries stay in place", signum)
        loop.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        loop.run()
    except Exception:
        log.exception("internal error: exiting for supervisord to restart the writer")
        return 70
    finally:
        loop.close()
        kernel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
