"""What one health check is: the type, the target after port overrides, the args and the timeout.

Shared by the writer (which names targets by ``key`` and shards them) and the pulse worker
(which runs them, ``gorb.services.pulse_worker.checks``). Pure: no sockets.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gorb.common.model import DEFAULT_PULSE_TIMEOUT, DEFAULT_PULSE_TYPE, PulseOptions
from gorb.common.validation import parse_duration

DEFAULT_PORTS = {"http": 80, "https": 443, "dns": 53}
# Args that are folded into other fields of the key (port: the target port; timeout: qk4l's
# seconds, folded into ``timeout`` by ``from_pulse``).
_KEY_SKIP = ("port", "timeout")


def scheme_of(spec: "CheckSpec") -> str:
    """``https`` for type https; for type http, qk4l's ``scheme`` arg (default http)."""
    if spec.type == "https":
        return "https"
    return str(spec.args.get("scheme") or "http").lower()


@dataclass(frozen=True)
class CheckSpec:
    """One check of one target. ``args`` is copied at construction; treat it as read-only."""

    type: str
    address: str                  # an IP literal, v4 or v6
    port: int = 0                 # the backend's port
    args: Mapping[str, Any] = field(default_factory=dict, hash=False)
    timeout: float = 5.0          # seconds for the whole check

    def __post_init__(self) -> None:
        object.__setattr__(self, "args", dict(self.args or {}))

    @classmethod
    def from_pulse(cls, pulse: PulseOptions, address: str, port: int) -> CheckSpec:
        """The check of a resolved pulse (``gorb.common.validation.resolve_pulse``). qk4l's
        ``args.timeout`` (integer seconds), when given and non-zero, wins over ``pulse.timeout``:
        after resolving, ``pulse.timeout`` always holds a value, so only the arg is explicit."""
        args = dict(pulse.args or {})
        timeout = parse_duration(pulse.timeout or DEFAULT_PULSE_TIMEOUT, "pulse timeout")
        if args.get("timeout"):
            timeout = float(args["timeout"])
        return cls((pulse.type or DEFAULT_PULSE_TYPE).lower(), address, port, args, timeout)

    @property
    def target_port(self) -> int:
        """The port the check talks to: ``args.port``, else the backend's, else the default."""
        return (self.args.get("port") or self.port
                or DEFAULT_PORTS.get(scheme_of(self) if self.type == "http" else self.type, 0))

    @property
    def key(self) -> str:
        """Equal for two backends whose checks are the same (same target after port overrides,
        same canonical address, same args and timeout), so the worker runs it once."""
        try:
            address = ipaddress.ip_address(self.address).compressed
        except ValueError:
            address = self.address
        args = {k: v for k, v in self.args.items() if k not in _KEY_SKIP}
        try:
            canon = msgspec.json.encode(args, order="sorted").decode()
        except (TypeError, msgspec.EncodeError):
            canon = repr(sorted(args.items(), key=lambda kv: kv[0]))
        return f"{self.type}|{address}|{self.target_port}|{canon}|t{float(self.timeout):g}"
