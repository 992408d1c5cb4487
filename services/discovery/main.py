"""Entry point of ``discovery``: config, the loops of ``service.Discovery``; exit code.

Exit codes: 0 on SIGTERM/SIGINT, 2 for a configuration error (e.g. a Consul URL without scheme),
70 when a loop crashed (supervisord restarts the process; Consul registrations and the store are
re-checked from scratch by the new one, nothing is deregistered on the way).
"""

from __future__ import annotations

import argparse
import logging
import sys

import zmq.green as zmq

from gorb.common import config, logs, loops, runtime
from gorb.common.transport import TransportError
from gorb.services.discovery.service import Discovery

log = logging.getLogger("discovery")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gorb-discovery",
                                description="gorb's Consul registration and configuration store")
    config.add_arguments(p)
    p.add_argument("--runtime-dir", help="directory of the ipc sockets (gorb.runtime_dir)")
    args = p.parse_args(argv)
    logs.setup(logging.INFO)
    try:
        cfg = config.from_args(args)
        logging.getLogger().setLevel(cfg.gorb.log_level.upper())
        disc = Discovery(cfg.discovery, zmq.Context.instance(),
                         args.runtime_dir or cfg.gorb.runtime_dir)
    except (config.ConfigError, TransportError, ValueError, runtime.RuntimeDirError) as exc:
        p.exit(2, f"gorb-discovery: {exc}\n")
    return loops.run(disc.loops(), log, "discovery")


if __name__ == "__main__":
    sys.exit(main())
