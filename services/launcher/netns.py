"""The private link between the host and a user-mode-linux guest, and entering its namespace.

Nothing is added to the host's root network namespace: the tap lives in a namespace of its own,
``gorb-<pid of gorb run>``, and the kernel of the guest runs there (``ip netns exec``)::

    host, root netns             netns gorb-<pid>               guest (UML)
    127.0.0.1:<api port> --+
                           +-> 10.77.255.253/30 tap gt0 ===== vec0 10.77.255.254/30
    <runtime>/supervisor.sock      (relay threads enter           :<api port>  api
                                    the netns with setns)         :9001  supervisord (ctl)

Both ends also route 10.77.0.0/16 to ``unreachable``, so nothing in gorb's test range can leave
through a default route; IPv6 is off on the link and forwarding stays off. The namespace name
carries the pid of its ``gorb run``: one whose process is gone was left by a killed run and is
removed (with any guest still in it) by the next.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import subprocess
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")

PREFIX = "gorb-"
TAP = "gt0"
HOST_ADDR = "10.77.255.253"
GUEST_ADDR = "10.77.255.254"
LINK_PREFIXLEN = 30
GUARD = "10.77.0.0/16"
CTL_PORT = 9001  # supervisord's inet_http_server inside the guest
CLONE_NEWNET = 0x40000000

assert ipaddress.ip_interface(f"{HOST_ADDR}/{LINK_PREFIXLEN}").network == \
    ipaddress.ip_interface(f"{GUEST_ADDR}/{LINK_PREFIXLEN}").network


class NetnsError(Exception):
    """The link could not be set up; the message names the failing command."""


def name_for(pid: int) -> str:
    return f"{PREFIX}{pid}"


def setup_commands(ns: str) -> list[list[str]]:
    """The ``ip`` commands that create namespace ``ns`` with the host's end of the link."""
    return [
        ["ip", "netns", "add", ns],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
        ["ip", "-n", ns, "tuntap", "add", "dev", TAP, "mode", "tap"],
        ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"net.ipv6.conf.{TAP}.disable_ipv6=1"],
        ["ip", "-n", ns, "addr", "add", f"{HOST_ADDR}/{LINK_PREFIXLEN}", "dev", TAP],
        ["ip", "-n", ns, "link", "set", TAP, "up"],
        ["ip", "-n", ns, "route", "add", "unreachable", GUARD],
    ]


def guest_link_script() -> str:
    """Shell lines for the guest's end of the link (run as root inside the guest)."""
    return "\n".join([
        "ip link set vec0 up",
        f"ip addr add {GUEST_ADDR}/{LINK_PREFIXLEN} dev vec0",
        f"ip route add unreachable {GUARD}",
        "echo 1 >/proc/sys/net/ipv6/conf/vec0/disable_ipv6 2>/dev/null || true",
    ])


def kernel_args() -> list[str]:
    """The guest kernel's parameters that attach its vec0 to our tap."""
    return [f"vec0:transport=tap,ifname={TAP}"]


def stale(names: Iterable[str], alive) -> list[str]:
    """The gorb namespaces among ``names`` whose ``gorb run`` (``alive(pid)`` False) is gone."""
    found = []
    for name in names:
        pid = name[len(PREFIX):]
        if name.startswith(PREFIX) and pid.isdigit() and not alive(int(pid)):
            found.append(name)
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ip(cmd: list[str], check: bool = True) -> str:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if check and proc.returncode:
        raise NetnsError(f"{' '.join(cmd)}: {proc.stderr.strip() or f'exit {proc.returncode}'}")
    return proc.stdout


def existing() -> list[str]:
    return [line.split()[0] for line in _ip(["ip", "netns", "list"], check=False).splitlines()
            if line.strip()]


def create(ns: str) -> None:
    for cmd in setup_commands(ns):
        _ip(cmd)


def delete(ns: str) -> None:
    """Kill whatever still runs in ``ns`` (a guest left by a killed run), then delete it; the
    tap goes with it."""
    for pid in _ip(["ip", "netns", "pids", ns], check=False).split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    _ip(["ip", "netns", "del", ns], check=False)


def remove_stale() -> list[str]:
    names = stale(existing(), pid_alive)
    for ns in names:
        delete(ns)
    return names


_libc = ctypes.CDLL(None, use_errno=True)


def enter(fd: int) -> None:
    """Move the calling THREAD into the network namespace open as ``fd`` (setns(2)).

    Sockets belong to the namespace of the thread that creates them, so a relay thread enters the
    guest's link namespace and connects from there while the rest of the process stays put.
    """
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def call_in(fd: int, fn: Callable[[], T]) -> T:
    """``fn()`` on a short-lived thread that entered the namespace open as ``fd``: the sockets
    it makes live there, and the caller's namespace never changes. Returns what ``fn`` returns,
    raises what it (or entering) raises."""
    out: dict = {}

    def work() -> None:
        try:
            enter(fd)
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            out["error"] = exc

    t = threading.Thread(target=work, name="netns-call", daemon=True)
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def open_ns(ns: str) -> int:
    return os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
