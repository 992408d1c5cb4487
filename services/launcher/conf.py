"""Where one gorb instance keeps its files, and its supervisord.conf rendered from the template.

``supervisord/supervisord.conf.in`` (package data of ``gorb.supervisord``) is the template (``string.Template``: ``${name}``, ``$$`` for a
literal dollar); every key is commented there. Rendering is pure: a ``Layout`` and the effective
``Config`` in, the text out. Paths are made absolute and refused (ValueError) if they hold what
supervisord's parser cannot carry: whitespace, ``;`` or ``%``.
"""

from __future__ import annotations

import os
import string
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from gorb.common.config import Config, GorbSection
from gorb.services.launcher.accounts import Account, setpriv_prefix

TEMPLATE = resources.files("gorb.supervisord") / "supervisord.conf.in"

DEFAULT_LOG_DIR = "/var/log/gorb"
DEFAULT_RUNTIME_DIR = GorbSection().runtime_dir
STATE_FILE_NAME = "state.json"  # inside --state-dir
# The programs of the template, in start order (pulse-worker is a group of pulse.workers processes).
PROGRAMS = ("ipvs-writer", "api", "pulse-worker", "discovery")


@dataclass(frozen=True)
class Layout:
    """The directories and interpreter of one instance (runtime_dir is gorb.runtime_dir)."""

    runtime_dir: str
    log_dir: str = DEFAULT_LOG_DIR
    python: str = sys.executable
    ctl_inet: str = ""  # "host:port": supervisord also serves supervisorctl over TCP there
    account: Account | None = None  # drop api, pulse-worker, discovery to it (accounts.py)
    setpriv: str = "/usr/bin/setpriv"

    @property
    def config_file(self) -> Path:
        """The effective configuration every program reads."""
        return Path(self.runtime_dir) / "gorb.toml"

    @property
    def supervisord_conf(self) -> Path:
        return Path(self.runtime_dir) / "supervisord.conf"

    @property
    def socket(self) -> Path:
        """supervisord's unix socket (supervisorctl's serverurl)."""
        return Path(self.runtime_dir) / "supervisor.sock"


def _path(value: str, what: str) -> str:
    value = os.path.abspath(value)
    if any(c.isspace() or c in ";%" for c in value):
        # supervisord splits on whitespace, cuts at " ;", and expands "%" once in some keys and
        # twice in others (stdout_logfile), so no escaping works everywhere: refuse.
        raise ValueError(f"{what} {value!r}: supervisord.conf cannot hold a path with whitespace, "
                         "';' or '%'")
    return value


def prefix(layout: Layout, program: str) -> str:
    """What goes in front of ``program``'s command: setpriv's words when dropping, else ""."""
    if layout.account is None:
        return ""
    words = setpriv_prefix(_path(layout.setpriv, "setpriv"), layout.account, program)
    return " ".join(words) + " "


def render(cfg: Config, layout: Layout, template: str | None = None) -> str:
    """supervisord.conf for ``cfg`` laid out as ``layout``; ValueError for an unusable path."""
    text = TEMPLATE.read_text() if template is None else template
    values = {
        **{f"{name.replace('-', '_')}_prefix": prefix(layout, name) for name in PROGRAMS},
        "runtime_dir": _path(layout.runtime_dir, "runtime dir"),
        "log_dir": _path(layout.log_dir, "log dir"),
        "config": _path(str(layout.config_file), "config file"),
        "python": _path(layout.python, "python"),
        "pulse_workers": str(cfg.pulse.workers),
        "inet": "" if layout.ctl_inet else ";",
        "ctl_inet": layout.ctl_inet or "127.0.0.1:9001",
    }
    return string.Template(text).substitute(values)


def render_ctl_only(layout: Layout, why: str) -> str:
    """A supervisord.conf that only points supervisorctl at ``layout.socket`` (the guest mode's).

    ``why`` becomes the opening comment: where the real supervisord is.
    """
    lines = [f"; {line}" if line else ";" for line in why.splitlines()]
    return "\n".join([
        *lines,
        "; This file only tells supervisorctl (and `gorb ctl`) where to connect.",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{_path(str(layout.socket), 'socket')} ; relayed to the guest",
        "prompt=gorb                 ; interactive prompt (default supervisor)",
        "",
    ])
