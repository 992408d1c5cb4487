"""gorb's configuration: one TOML file read by every process, typed and defaulted here only.

Precedence, lowest first: the defaults below, the TOML file (``--config``, default
``/etc/gorb/gorb.toml`` if it exists), environment variables ``GORB_<SECTION>_<KEY>`` (for
containers, e.g. ``GORB_API_LISTEN=:8080``), then command-line flags, GORB's kept as aliases:

    -l/--listen  api.listen          -i/--device  writer.device
    -f/--flush   writer.flush        -c/--consul  discovery.consul

Unknown sections or keys in the file are an error (a typo must not silently do nothing).
Objects receive their section; nothing else in gorb reads the environment.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import msgspec

DEFAULT_PATH = "/etc/gorb/gorb.toml"


class GorbSection(msgspec.Struct, forbid_unknown_fields=True):
    runtime_dir: str = "/run/gorb"      # ipc sockets and supervisord's socket (root:<user>)
    log_level: str = "info"             # debug | info | warning
    user: str = "gorb"                  # account of api, pulse-worker and discovery when gorb
                                        # starts as root ("" = no drop); the writer keeps root's
                                        # uid with CAP_NET_ADMIN only


class ApiToken(msgspec.Struct, forbid_unknown_fields=True):
    """One API client, ``[api.tokens] NAME = { secret = "...", role = "admin" }``: exactly one of
    ``secret`` (inline) and ``secret_file`` (a file whose content, less its trailing newline, is
    the secret; read by the API process only, at start, so ``dump`` keeps the path, not the
    secret). UNSET, not "", means absent, so that ``secret = ""`` is told from no secret and
    neither is written back by ``dump``."""
    ROLES: ClassVar[tuple[str, ...]] = ("read", "admin")  # read: GET/HEAD; admin: all routes

    role: str
    secret: str | msgspec.UnsetType = msgspec.UNSET
    secret_file: str | msgspec.UnsetType = msgspec.UNSET

    def problem(self) -> str:
        """Why this table cannot be used, or "" (the secret file is not read here)."""
        if self.role not in self.ROLES:
            return f"role must be read or admin, not {self.role!r}"
        has_secret = self.secret is not msgspec.UNSET
        if has_secret == (self.secret_file is not msgspec.UNSET):
            return "needs exactly one of secret and secret_file"
        if has_secret and not self.secret:
            return "the secret is empty"
        if not has_secret and not self.secret_file:
            return "secret_file is empty"
        return ""


class ApiSection(msgspec.Struct, forbid_unknown_fields=True):
    listen: str = ":4672"               # GORB -l: host:port; ":4672" = every address
    writer_timeout: float = 5.0         # seconds to wait for the writer's answer (then 503)
    idle_timeout: float = 60.0          # seconds a connection may wait for or send a request
    max_connections: int = 512          # client connections served at once (then the backlog;
                                        # each is a descriptor: supervisord's minfds is 1024)
    tokens: dict[str, ApiToken] = {}    # bearer tokens by client name; none = open API (GORB)
    tls_cert: str = ""                  # PEM certificate (chain) file: serve HTTPS; "" = HTTP
    tls_key: str = ""                   # PEM private key file of tls_cert (both or neither)
    # JSON lines, one per mutating request; "" = no audit. Unset: ``gorb run`` writes
    # <--log-dir>/audit.log (a relative path is taken in --log-dir too); a program started on
    # its own audits nothing.
    audit_log: str | msgspec.UnsetType = msgspec.UNSET

    def __post_init__(self) -> None:
        """What can be checked without reading a file (every process loads this section; only
        the API reads secret files and certificates): raised as a ValidationError that
        ``load`` turns into a ConfigError naming the file."""
        for name, token in self.tokens.items():
            problem = token.problem()
            if problem:
                raise ValueError(f"api.tokens.{name}: {problem}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("api.tls_cert and api.tls_key must be set together")


class WriterSection(msgspec.Struct, forbid_unknown_fields=True):
    state_file: str = "/var/lib/gorb/state.json"
    device: str = "eth0"                # GORB -i: its first address is the default VIP
    flush: bool = False                 # GORB -f: flush all IPVS services at start
    reconcile_interval: float = 10.0    # seconds between drift repairs
    max_batch: int = 1000               # most requests group-committed at once
    kernel_timeout: float = 5.0         # seconds the kernel has to answer a netlink exchange;
                                        # then the writer exits 70 (restarted, adopts the table)
    stats_interval: float = 1.0         # seconds between the statistics snapshots read by GET
                                        # and /metrics (dumped off the write path, while read);
                                        # the API serves one /metrics body for this long
    journal_max_bytes: int = 1 << 20    # compact the state journal past max(this, snapshot / 2)


class PulseSection(msgspec.Struct, forbid_unknown_fields=True):
    workers: int = 2                    # pulse-worker processes (supervisord numprocs)


class DiscoverySection(msgspec.Struct, forbid_unknown_fields=True):
    consul: str = ""                    # GORB -c: Consul agent URL; "" disables registration
    token: str = ""                     # Consul ACL token (CONSUL_HTTP_TOKEN is not read)
    kv_prefix: str = ""                 # shared configuration in Consul KV, e.g. "gorb"; "" = none
    store_dir: str = ""                 # read-only store: a directory of <vs>.json; "" = none
    max_delete_share: float = 0.5       # a store sync deleting more of the services is refused
    check_interval: float = 10.0        # seconds between Consul check refreshes (TTL = 3x)
    hostname: str = ""                  # Meta gorb_host of the registrations; "" = gethostname()
    id_format: str = "{service}"        # Consul service ID; "{service}@{host}" on a shared agent
    retry_max: float = 5.0              # cap (seconds) of the backoff while Consul is unreachable
    store_poll: float = 5.0             # seconds between reads of store_dir


class Config(msgspec.Struct, forbid_unknown_fields=True):
    gorb: GorbSection = msgspec.field(default_factory=GorbSection)
    api: ApiSection = msgspec.field(default_factory=ApiSection)
    writer: WriterSection = msgspec.field(default_factory=WriterSection)
    pulse: PulseSection = msgspec.field(default_factory=PulseSection)
    discovery: DiscoverySection = msgspec.field(default_factory=DiscoverySection)


class ConfigError(Exception):
    """The configuration cannot be used; the message says where and why."""


# GORB's one-letter flags -> (section, key)
GORB_FLAGS = {"listen": ("api", "listen"), "device": ("writer", "device"),
              "flush": ("writer", "flush"), "consul": ("discovery", "consul")}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every gorb program accepts: ``--config`` and GORB's aliases."""
    parser.add_argument("--config", help=f"TOML configuration file (default {DEFAULT_PATH} if "
                                         "it exists)")
    parser.add_argument("-l", "--listen", help="API listen address (GORB -l), e.g. :4672")
    parser.add_argument("-i", "--device", help="device whose first address is the default VIP")
    parser.add_argument("-f", "--flush", action="store_true", default=None,
                        help="flush all IPVS services when the writer starts (GORB -f)")
    parser.add_argument("-c", "--consul", help="Consul agent URL (GORB -c)")


def _coerce(text: str, kind: type) -> Any:
    if kind is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"not a boolean: {text!r}")
    return kind(text)


def load(path: str | None = None, env: Mapping[str, str] | None = None,
         flags: Mapping[str, Any] | None = None,
         overrides: Mapping[tuple[str, str], Any] | None = None) -> Config:
    """The effective configuration; raises ConfigError naming the file or variable at fault.

    ``overrides``: {(section, key): value} from a program's own flags (``--runtime-dir``...),
    applied last and, like everything else, before the checks (None values are skipped)."""
    env = os.environ if env is None else env
    raw: dict[str, dict[str, Any]] = {}
    if path or Path(DEFAULT_PATH).exists():
        p = Path(path or DEFAULT_PATH)
        try:
            raw = msgspec.toml.decode(p.read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read {p}: {exc.strerror}") from None
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ConfigError(f"{p}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: not a TOML table")
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path or DEFAULT_PATH}: {exc}") from None
    for section_name in Config.__struct_fields__:
        section = getattr(cfg, section_name)
        for key in section.__struct_fields__:
            var = f"GORB_{section_name}_{key}".upper()
            if var in env:
                value = getattr(section, key)
                kind = str if value is msgspec.UNSET else type(value)
                try:
                    setattr(section, key, _coerce(env[var], kind))
                except ValueError as exc:
                    raise ConfigError(f"environment {var}: {exc}") from None
    for name, value in (flags or {}).items():
        if value is None or name not in GORB_FLAGS:
            continue
        section_name, key = GORB_FLAGS[name]
        setattr(getattr(cfg, section_name), key, value)
    for (section_name, key), value in (overrides or {}).items():
        if value is not None:
            setattr(getattr(cfg, section_name), key, value)
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    if cfg.gorb.log_level not in ("debug", "info", "warning"):
        raise ConfigError(f"gorb.log_level must be debug, info or warning, not "
                          f"{cfg.gorb.log_level!r}")
    parse_listen(cfg.api.listen)
    if cfg.pulse.workers < 1:
        raise ConfigError("pulse.workers must be at least 1")
    if not cfg.writer.reconcile_interval > 0:
        raise ConfigError("writer.reconcile_interval must be positive")
    if not cfg.writer.stats_interval > 0:
        raise ConfigError("writer.stats_interval must be positive")
    if not cfg.writer.kernel_timeout > 0:
        raise ConfigError("writer.kernel_timeout must be positive")
    if cfg.writer.max_batch < 1:
        raise ConfigError("writer.max_batch must be at least 1")
    if not cfg.api.writer_timeout > 0:
        raise ConfigError("api.writer_timeout must be positive")
    if cfg.writer.journal_max_bytes < 0:
        raise ConfigError("writer.journal_max_bytes must not be negative")
    if cfg.api.idle_timeout <= 0:
        raise ConfigError("api.idle_timeout must be positive")
    if cfg.api.max_connections < 1:
        raise ConfigError("api.max_connections must be at least 1")


def parse_listen(listen: str) -> tuple[str, int]:
    """GORB's ``-l`` (``":4672"``, ``"127.0.0.1:4672"``, ``"[::1]:4672"``) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"api.listen {listen!r} is not host:port")
    host = host.strip("[]")
    return host or "0.0.0.0", int(port)


def dump(cfg: Config) -> str:
    """The configuration as TOML (what ``gorb run`` hands to every process)."""
    return msgspec.toml.encode(cfg).decode()


def from_args(args: argparse.Namespace, overrides: Mapping[str, str] | None = None) -> Config:
    """The configuration of a program's parsed ``args``: ``--config``, GORB's flags, and
    ``overrides`` {flag's dest: section} (``{"state_file": "writer"}``: ``--state-file`` sets
    writer.state_file), all checked together."""
    return load(args.config, flags={k: getattr(args, k, None) for k in GORB_FLAGS},
                overrides={(section, name): getattr(args, name, None)
                           for name, section in (overrides or {}).items()})
