"""Entry point of ``ipvs-writer``: parse config, build the engine and the loop, run, exit code.

Exit codes: 0 on SIGTERM/SIGINT (kernel state is left in place: traffic keeps flowing),
2 for a configuration or state-file problem (the message says what to do), 3 when the kernel has
no IPVS or the netlink receive buffer is too small (the message names the sysctl), 70 when the
kernel stalled (no answer within writer.kernel_timeout, lost or unreadable answers) or for an
unexpected internal error (supervisord restarts the writer, which adopts the kernel's table).
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
from gorb.services.ipvs_writer import reader, state
from gorb.services.ipvs_writer.engine import Engine
from gorb.services.ipvs_writer.loop import WriterLoop
from gorb.services.ipvs_writer.reader import Snapshots
from gorb.services.ipvs_writer.codec import CodecError
from gorb.services.ipvs_writer.netlink import (
    IpvsUnavailable,
    Kernel,
    KernelStalled,
    device_addresses,
)

log = logging.getLogger("ipvs-writer")
GIL_SWITCH_INTERVAL = 0.0005  # seconds (see main)
# this program's flags that set one key: {flag's dest: section}
OVERRIDES = {"runtime_dir": "gorb", "log_level": "gorb", "state_file": "writer",
             "reconcile_interval": "writer", "max_batch": "writer", "kernel_timeout": "writer",
             "stats_interval": "writer"}


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
    p.add_argument("--kernel-timeout", type=float,
                   help="seconds the kernel has to answer (writer.kernel_timeout)")
    p.add_argument("--stats-interval", type=float,
                   help="seconds between statistics snapshots (writer.stats_interval)")
    p.add_argument("--log-level", choices=["debug", "info", "warning"])
    args = p.parse_args(argv)
    try:
        cfg = config.from_args(args, overrides=OVERRIDES)
    except config.ConfigError as exc:
        p.exit(2, f"gorb-ipvs-writer: {exc}\n")
    return cfg, args.restore_previous


def kernel_of(cfg: config.Config) -> Kernel:
    return Kernel(timeout=cfg.writer.kernel_timeout)


def start_engine(cfg: config.Config, restore_previous: bool,
                 kernel_factory: Callable[[config.Config], Any],
                 reader_kernel: Callable[[config.Config, Any], Any] | None = None,
                 ) -> tuple[Engine, Any]:
    """The engine over the loaded state and the kernel, converged, with its statistics reader
    (``reader_kernel(cfg, kernel)`` makes the reader's adapter: by default a second one like
    ``kernel_factory``'s); raises what ``main`` maps to exit codes."""
    path = Path(cfg.writer.state_file)
    store = state.Store(path, cfg.writer.journal_max_bytes)
    services = store.open(restore_previous=restore_previous)
    runtime.ensure_runtime_dir(cfg.gorb.runtime_dir)
    kernel = kernel_factory(cfg)
    if reader_kernel is None and kernel_factory is kernel_of:  # the collector: a child process
        spawn = reader.spawn_process(cfg.writer.kernel_timeout, cfg.gorb.log_level)
    else:  # over a fake kernel, a thread of this process
        spawn = reader.spawn_thread(lambda: (reader_kernel or (lambda c, _k: kernel_factory(c)))(
            cfg, kernel))
    snapshots = Snapshots(spawn, cfg.writer.stats_interval)

    def default_address() -> str:
        found = device_addresses(cfg.writer.device)
        return found[0] if found else ""

    engine = Engine(services, kernel, store, default_address, snapshots=snapshots)
    ops, failures = engine.start(flush=cfg.writer.flush)
    log.info("started with %d service(s) from %s; converged with %d op(s), %d failed",
             len(services), path, ops, len(failures))
    if engine.foreign:
        # After --restore-previous these may be what the lost last write had created.
        log.warning("the kernel has %d IPVS service(s) gorb does not own: left untouched "
                    "(remove with ipvsadm -D, or start with --flush)", engine.foreign)
    snapshots.start()
    return engine, kernel


def main(argv: list[str] | None = None,
         kernel_factory: Callable[[config.Config], Any] = kernel_of,
         reader_kernel: Callable[[config.Config, Any], Any] | None = None) -> int:
    """``kernel_factory(cfg)`` builds the IPVS adapter (benchmarks on a host without IPVS pass
    one of ``tests.service.fake_kernel.FakeKernel``, and ``reader_kernel`` returning it)."""
    cfg, restore_previous = parse_args(argv)
    logs.setup(cfg.gorb.log_level)
    # The state's compaction thread (and over a fake kernel, the statistics collector) run
    # Python beside the loop: the loop that commits waits at most this long for the
    # interpreter lock (the default, 5 ms, would add up to 5 ms to a commit).
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    try:
        try:
            engine, kernel = start_engine(cfg, restore_previous, kernel_factory, reader_kernel)
            loop = WriterLoop(engine, zmq.Context.instance(), cfg.gorb.runtime_dir,
                              cfg.writer.reconcile_interval, cfg.writer.max_batch,
                              read_deadline=2 * cfg.writer.kernel_timeout
                              + 3 * cfg.writer.stats_interval)
        except CodecError:
            raise
        except (state.StateFileError, ValueError, runtime.RuntimeDirError) as exc:
            log.error("%s", exc)
            return 2
        except IpvsUnavailable as exc:  # RcvbufTooSmall too: its message names the sysctl
            log.error("%s", exc)
            return 3
        return run(loop, kernel)
    except (KernelStalled, CodecError) as exc:
        log.error("%s: exiting for supervisord to restart the writer, which adopts the "
                  "kernel's table", exc)
        return 70


def run(loop: WriterLoop, kernel: Any) -> int:
    """The loop until SIGTERM (0) or an internal error (70); KernelStalled propagates."""
    def stop(signum, _frame):
        log.info("signal %d: stopping, IPVS entries stay in place", signum)
        loop.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        loop.run()
    except (KernelStalled, CodecError):
        raise
    except Exception:
        log.exception("internal error: exiting for supervisord to restart the writer")
        return 70
    finally:
        loop.close()
        if loop.engine.snapshots is not None:
            loop.engine.snapshots.close()
        kernel.close()
        loop.engine.persist.close()  # the state.Store: a clean stop leaves the whole state
    return 0


if __name__ == "__main__":
    sys.exit(main())
