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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from gorb.common import config, logs, runtime
from gorb.services.ipvs_writer import state
from gorb.services.ipvs_writer.engine import Engine
from gorb.services.ipvs_writer.loop import WriterLoop
from gorb.services.ipvs_writer.netlink import IpvsUnavailable, Kernel, device_addresses

log = logging.getLogger("ipvs-writer")


def parse_args(argv: list[str] | None) -> tuple[config.Config, bool]:
    """The effective configuration (file, environment, flags) and --restore-previous."""
    p = argparse.ArgumentParser(prog="gorb-ipvs-writer", description="gorb's single IPVS writer")
    config.add_arguments(p)
    p.add_argument("--restore-previous", action="store_true",
                   help="if the state file is corrupt, set it aside and use <state-file>.prev")
    # Overrides of single settings, for tests and one-off runs.
    p.add_argument("--runtime-dir", help="directory of the ipc sockets (gorb.runtime_dir)")
    p.add_argument("--state-file", help="where the desired state is kept (writer.state_file)")
    p.add_argument("--reconcile-interval", type=float, help="seconds between drift repairs")
    p.add_argument("--max-batch", type=int, help="most requests group-committed at once")
    p.add_argument("--log-level", choices=["debug", "info", "warning"])
    args = p.parse_args(argv)
    try:
        cfg = config.from_args(args)
    except config.ConfigError as exc:
        p.exit(2, f"gorb-ipvs-writer: {exc}\n")
    for name, section in (("runtime_dir", cfg.gorb), ("log_level", cfg.gorb),
                          ("state_file", cfg.writer), ("reconcile_interval", cfg.writer),
                          ("max_batch", cfg.writer)):
        if getattr(args, name) is not None:
            setattr(section, name, getattr(args, name))
    return cfg, args.restore_previous


def main(argv: list[str] | None = None, kernel_factory: Callable[[], Any] = Kernel) -> int:
    """``kernel_factory`` builds the IPVS adapter (benchmarks on a host without IPVS pass
    ``tests.service.fake_kernel.FakeKernel``)."""
    cfg, restore_previous = parse_args(argv)
    logs.setup(cfg.gorb.log_level)
    path = Path(cfg.writer.state_file)
    store = state.Store(path, cfg.writer.journal_max_bytes)
    try:
        services = store.open(restore_previous=restore_previous)
        runtime.ensure_runtime_dir(cfg.gorb.runtime_dir)
        kernel = kernel_factory()
    except (state.StateFileError, ValueError, runtime.RuntimeDirError) as exc:
        log.error("%s", exc)
        return 2
    except IpvsUnavailable as exc:
        log.error("%s", exc)
        return 3

    def default_address() -> str:
        found = device_addresses(cfg.writer.device)
        return found[0] if found else ""

    engine = Engine(services, kernel, store, default_address)
    ops, failures = engine.start(flush=cfg.writer.flush)
    log.info("started with %d service(s) from %s; converged with %d op(s), %d failed",
             len(services), path, ops, len(failures))
    if engine.foreign:
        # After --restore-previous these may be what the lost last write had created.
        log.warning("the kernel has %d IPVS service(s) gorb does not own: left untouched "
                    "(remove with ipvsadm -D, or start with --flush)", engine.foreign)
    loop = WriterLoop(engine, zmq.Context.instance(), cfg.gorb.runtime_dir,
                      cfg.writer.reconcile_interval, cfg.writer.max_batch)

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
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
