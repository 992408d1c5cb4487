"""``gorb``: run gorb's supervised system in the foreground, and control it.

    gorb run [--config PATH] [-l ADDR] [-i DEV] [-f] [-c URL]
             [--runtime-dir DIR] [--state-dir DIR] [--log-dir DIR] [--guest auto|never|always]
    gorb ctl [--runtime-dir DIR | --config PATH] [SUPERVISORCTL-ARGS...]

``run`` writes the effective configuration to ``<runtime-dir>/gorb.toml`` (file, environment and
flags merged: every program reads only that) and supervisord's config rendered from
``supervisord/supervisord.conf.in`` to ``<runtime-dir>/supervisord.conf``, then becomes supervisord
(exec) in the foreground: Ctrl-C or SIGTERM stops every program in reverse priority order and
exits. Programs run with this Python (the checkout's venv) from the tree's root.

When this kernel has no IPVS (``--guest auto``, the default) ``run`` starts the same system inside
a user-mode-linux guest instead and relays the API to 127.0.0.1 (``services/launcher/guest.py``).

``ctl`` is ``supervisorctl -c <runtime-dir>/supervisord.conf ARGS`` (status, start, stop, restart,
tail -f ...); it works the same in both modes.

Exit codes: 2 for a configuration or directory that cannot be used (the message says which),
1 when the guest cannot be started, else supervisord's or supervisorctl's.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gorb.common import config, runtime
from gorb.services.launcher import conf, guest, kernel

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gorb", description="gorb, an IPVS control plane")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,ctl}")
    run = sub.add_parser("run", help="run every gorb process under supervisord, in the foreground")
    config.add_arguments(run)
    run.add_argument("--runtime-dir", help=f"sockets and generated files (gorb.runtime_dir, "
                                           f"default {conf.DEFAULT_RUNTIME_DIR})")
    run.add_argument("--state-dir", help="directory of the writer's state file (default: the "
                                         "directory of writer.state_file, /var/lib/gorb)")
    run.add_argument("--log-dir", default=conf.DEFAULT_LOG_DIR,
                     help="supervisord's and every program's logs (default %(default)s)")
    run.add_argument("--guest", choices=["auto", "never", "always"], default="auto",
                     help="run inside a user-mode-linux guest: when this kernel has no IPVS "
                          "(auto, the default), never, or always")
    run.add_argument("--guest-mem", default="1G", help="the guest's memory (default %(default)s)")
    run.add_argument("--ctl-inet", default="", metavar="HOST:PORT",
                     help="also serve supervisorctl over TCP (the guest mode uses it inside)")
    ctl = sub.add_parser("ctl", help="supervisorctl against the running gorb",
                         description="Runs supervisorctl -c <runtime-dir>/supervisord.conf ARGS.")
    ctl.add_argument("--config", help="take gorb.runtime_dir from this TOML file")
    ctl.add_argument("--runtime-dir", help=f"the instance's runtime dir (default "
                                           f"{conf.DEFAULT_RUNTIME_DIR})")
    ctl.add_argument("args", nargs=argparse.REMAINDER, help="status, restart api, ... (default: "
                                                            "the interactive shell)")
    return parser


def effective(args: argparse.Namespace) -> tuple[config.Config, conf.Layout]:
    """The configuration ``run`` hands to every program, and where its files go."""
    cfg = config.from_args(args)
    if args.runtime_dir:
        cfg.gorb.runtime_dir = args.runtime_dir
    if args.state_dir:
        cfg.writer.state_file = str(Path(args.state_dir) / conf.STATE_FILE_NAME)
    cfg.gorb.runtime_dir = os.path.abspath(cfg.gorb.runtime_dir)
    cfg.writer.state_file = os.path.abspath(cfg.writer.state_file)
    layout = conf.Layout(runtime_dir=cfg.gorb.runtime_dir, log_dir=os.path.abspath(args.log_dir),
                         ctl_inet=args.ctl_inet)
    conf.render(cfg, layout)  # a path supervisord cannot carry is a configuration error too
    return cfg, layout


def prepare(cfg: config.Config, layout: conf.Layout) -> None:
    """Create the directories, write gorb.toml and supervisord.conf (OSError, RuntimeDirError)."""
    runtime.ensure_runtime_dir(layout.runtime_dir)
    for d in (layout.log_dir, str(Path(cfg.writer.state_file).parent)):
        Path(d).mkdir(parents=True, exist_ok=True)
    layout.config_file.write_text(config.dump(cfg))
    layout.supervisord_conf.write_text(conf.render(cfg, layout))


def exec_supervisord(layout: conf.Layout) -> None:
    """Become supervisord. GORB_* variables are dropped: they are already in gorb.toml, and a
    program re-reading them would undo a flag given to ``run``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GORB_")}
    argv = [sys.executable, "-m", "supervisor.supervisord", "-c", str(layout.supervisord_conf)]
    os.execve(sys.executable, argv, env)


def ctl(args: argparse.Namespace) -> int:
    try:
        runtime_dir = args.runtime_dir or config.load(args.config).gorb.runtime_dir
    except config.ConfigError as exc:
        print(f"gorb ctl: {exc}", file=sys.stderr)
        return 2
    path = conf.Layout(runtime_dir=runtime_dir).supervisord_conf
    if not path.exists():
        print(f"gorb ctl: no {path}: is `gorb run --runtime-dir {runtime_dir}` running?",
              file=sys.stderr)
        return 2
    rest = args.args[1:] if args.args[:1] == ["--"] else args.args
    argv = [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(path), *rest]
    os.execv(sys.executable, argv)
    return 1  # not reached


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "ctl":
        return ctl(args)
    try:
        cfg, layout = effective(args)
    except (config.ConfigError, ValueError) as exc:
        print(f"gorb run: {exc}", file=sys.stderr)
        return 2
    if args.guest == "always" or (args.guest == "auto" and not kernel.has_ipvs()):
        why = ("--guest always" if args.guest == "always" else
               f"this kernel has no IPVS ({kernel.PROC_FILE} is missing and modprobe ip_vs failed)")
        return guest.run(cfg, layout, why, mem=args.guest_mem)
    try:
        prepare(cfg, layout)
    except (OSError, runtime.RuntimeDirError) as exc:
        print(f"gorb run: {exc}", file=sys.stderr)
        return 2
    exec_supervisord(layout)
    return 1  # not reached
