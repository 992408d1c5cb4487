"""Host names in request bodies -> IP literals, through gevent's resolver (never blocking the hub).

GORB resolved ``host`` once, at creation, with ``net.ResolveIPAddr("ip", host)``: an IP literal as
is, a name to its first address, IPv4 preferred. A failure is a 400 whose text is Go's
(``lookup <name>: no such host``), which GORB clients may match on.
"""

from __future__ import annotations

import socket
from collections.abc import Callable

import gevent.socket

from gorb.common.errors import invalid
from gorb.common.validation import canonical_ip, ip_family

# getaddrinfo's "this name has no address" answers; anything else (EAI_AGAIN, ...) is reported
# with its own text.
_NO_SUCH_HOST = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_ADDRFAMILY")
                 if hasattr(socket, name)}

Resolver = Callable[[str], str]


def is_ip(host: str) -> bool:
    try:
        ip_family(host)
    except Exception:
        return False
    return True


def resolve_host(host: str, getaddrinfo=gevent.socket.getaddrinfo) -> str:
    """The IP literal for ``host`` (an IP literal itself, or a name); GorbError(INVALID) if none."""
    if is_ip(host):
        return canonical_ip(host)
    try:
        infos = getaddrinfo(host, None, 0, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in _NO_SUCH_HOST:
            raise invalid(f"lookup {host}: no such host") from None
        raise invalid(f"lookup {host}: {exc.strerror or exc}") from None
    except (UnicodeError, ValueError) as exc:  # e.g. a label longer than 63 characters
        raise invalid(f"lookup {host}: {exc}") from None
    addresses = [info[4][0] for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if not addresses:
        raise invalid(f"lookup {host}: no such host")
    ipv4 = [a for a in addresses if ":" not in a]
    # A scoped IPv6 answer ("fe80::1%eth0") is not a usable VIP or backend address.
    return canonical_ip((ipv4 or addresses)[0].split("%")[0])
