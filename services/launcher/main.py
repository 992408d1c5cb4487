"""``gorb``: run gorb's supervised system in the foreground, and control it.

    gorb run [--config PATH] [-l ADDR] [-i DEV] [-f] [-c URL]
             [--runtime-dir DIR] [--state-dir DIR] [--log-dir DIR] [--guest auto|never|always]
    gorb ctl [--runtime-dir DIR | --config PATH] [SUPERVISORCTL-ARGS...]

``run`` writes the effective configuration to ``<runtime-dir>/gorb.toml`` (file, environment and
flags merged: every program reads only that) and supervisord's config rendered from
``supervisord/supervisord.conf.in`` to ``<runtime-dir>/supervisord.conf``, then becomes supervisord
(exec) in the foreground: Ctrl-C or SIGTERM stops every program in reverse priority order and
exits. Programs run with this Python (the venv gorb is installed in).

Started as root with the account ``gorb.user`` present, the programs drop privileges
(``accounts.py``): the runtime dir becomes ``root:<user>`` 0750 (with ``discovery/`` of the
account's own, 0700) and ``gorb.toml`` ``root:<user>`` 0640, since it may hold secrets.

The API's audit log is ``<log-dir>/audit.log`` unless ``api.audit_log`` says otherwise (a relative
path is taken in the log dir, "" turns it off). ``run`` creates it, the account's and 0640 when
dropping (the log dir itself stays root's: the API may append to its audit log, nothing else).

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
import shutil
import sys
from pathlib import Path

import msgspec

from gorb.common import config, runtime
from gorb.services.launcher import accounts, conf, guest, kernel

AUDIT_FILE_NAME = "audit.log"  # in --log-dir, unless api.audit_log says otherwise


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


def effective(args: argparse.Namespace, euid: int | None = None,
              warn=None) -> tuple[config.Config, conf.Layout]:
    """The configuration ``run`` hands to every program, and where its files go (and who runs
    them: ``warn`` gets the one warning line of a missing account)."""
    cfg = config.from_args(args)
    if args.runtime_dir:
        cfg.gorb.runtime_dir = args.runtime_dir
    if args.state_dir:
        cfg.writer.state_file = str(Path(args.state_dir) / conf.STATE_FILE_NAME)
    cfg.gorb.runtime_dir = os.path.abspath(cfg.gorb.runtime_dir)
    cfg.writer.state_file = os.path.abspath(cfg.writer.state_file)
    log_dir = os.path.abspath(args.log_dir)
    if cfg.api.audit_log is msgspec.UNSET:
        cfg.api.audit_log = AUDIT_FILE_NAME
    if cfg.api.audit_log:
        cfg.api.audit_log = os.path.join(log_dir, cfg.api.audit_log)  # absolute: kept as is
    account, warning = accounts.plan(cfg.gorb.user, os.geteuid() if euid is None else euid)
    if warning and warn:
        warn(warning)
    setpriv = conf.Layout.setpriv
    if account is not None:
        setpriv = shutil.which("setpriv") or ""
        if not setpriv:
            raise ValueError(f"setpriv (util-linux) is needed to run programs as {account.name!r}"
                             " (gorb.user): install util-linux, or set gorb.user = \"\"")
    layout = conf.Layout(runtime_dir=cfg.gorb.runtime_dir, log_dir=log_dir,
                         ctl_inet=args.ctl_inet, account=account, setpriv=setpriv)
    conf.render(cfg, layout)  # a path supervisord cannot carry is a configuration error too
    return cfg, layout


def prepare(cfg: config.Config, layout: conf.Layout) -> None:
    """Create the directories, write gorb.toml and supervisord.conf (OSError, RuntimeDirError,
    ValueError for a runtime dir the account cannot reach)."""
    account = layout.account
    for d in (layout.log_dir, str(Path(cfg.writer.state_file).parent)):
        Path(d).mkdir(parents=True, exist_ok=True)
    if account is None:
        runtime.ensure_runtime_dir(layout.runtime_dir, 0o770)
    else:
        rt = runtime.ensure_runtime_dir(layout.runtime_dir, 0o750, owner=(0, account.gid))
        blocked = accounts.unreachable(str(rt), account)
        if blocked:
            raise ValueError(f"{blocked} is closed to user {account.name!r} (gorb.user), who "
                             f"must reach the sockets in {rt}: allow it to enter (chmod o+x, or "
                             "group) or choose another --runtime-dir")
        runtime.ensure_runtime_dir(rt / runtime.DISCOVERY_DIR, 0o700,
                                   owner=(account.uid, account.gid))
    if cfg.api.audit_log:
        prepare_audit_log(Path(cfg.api.audit_log), layout)
    _write_private(layout.config_file, config.dump(cfg), account)
    _write_private(layout.supervisord_conf, conf.render(cfg, layout), None)


def prepare_audit_log(path: Path, layout: conf.Layout) -> None:
    """Create the audit log (0640, the account's when dropping: the API appends to it). One that
    exists in the log dir is given to the account (a run as root before left it root's); one
    elsewhere is left as it is: the API says so if it cannot open it."""
    account = layout.account
    path.parent.mkdir(parents=True, exist_ok=True)
    blocked = account and accounts.unreachable(str(path.parent), account)
    if blocked:
        raise ValueError(f"{blocked} is closed to user {account.name!r} (gorb.user), whose api "
                         f"appends to the audit log {path}: allow it to enter (chmod o+x, or "
                         "group) or set api.audit_log elsewhere")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o640)
    except FileExistsError:
        if account is None or path.parent != Path(layout.log_dir) or path.is_symlink() \
                or not path.is_file():
            return
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        if account is not None:
            os.fchown(fd, account.uid, account.gid)
            os.fchmod(fd, 0o640)
    finally:
        os.close(fd)


def _write_private(path: Path, text: str, account: accounts.Account | None) -> None:
    """``text`` into ``path``: 0640 and group ``account``'s when given (it must read it), else
    0600. Written whole, then renamed, so no program reads half a file or an old mode."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if account is not None:
            os.fchown(fd, -1, account.gid)
            os.fchmod(fd, 0o640)
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


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
    warnings: list[str] = []
    try:
        cfg, layout = effective(args, warn=warnings.append)
    except (config.ConfigError, ValueError) as exc:
        print(f"gorb run: {exc}", file=sys.stderr)
        return 2
    if args.guest == "always" or (args.guest == "auto" and not kernel.has_ipvs()):
        why = ("--guest always" if args.guest == "always" else
               f"this kernel has no IPVS ({kernel.PROC_FILE} is missing and modprobe ip_vs failed)")
        return guest.run(cfg, layout, why, mem=args.guest_mem)
    for text in warnings:  # here only: in guest mode the guest's gorb run says it
        print(f"gorb run: warning: {text}", file=sys.stderr, flush=True)
    try:
        prepare(cfg, layout)
    except (OSError, ValueError, runtime.RuntimeDirError) as exc:
        print(f"gorb run: {exc}", file=sys.stderr)
        return 2
    exec_supervisord(layout)
    return 1  # not reached
