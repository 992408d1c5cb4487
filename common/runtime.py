"""The runtime directory holding gorb's ipc:// sockets, and the endpoint names inside it.

Access to the bus is access to the kernel's IPVS table, so the directory's mode is the bus's only
access control: the owner (and optionally the group, for supervisord setups that run the services
as different users) and never "other". Each socket file is then chmodded 0660 when bound.

Sockets in the directory::

    writer.sock  ROUTER bound by ipvs-writer: requests, one reply per request
    events.sock  PUB bound by ipvs-writer: state-change events
    health.sock  PULL bound by ipvs-writer: batched health results from pulse-worker
"""

from __future__ import annotations

import os
from pathlib import Path

WRITER = "writer"
EVENTS = "events"
HEALTH = "health"

# sockaddr_un.sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_IPC_PATH = 107


class RuntimeDirError(Exception):
    """The runtime directory cannot be used safely (a symlink, not a directory, not ours)."""


def ensure_runtime_dir(path: str | os.PathLike[str], mode: int = 0o770) -> Path:
    """Create ``path`` (and its parents) if missing and set its mode to exactly ``mode``.

    ``mode`` may grant the owner and group bits only (e.g. 0o700, 0o770); anything for "other",
    or setuid/setgid/sticky, is a ValueError. An existing symlink or non-directory is refused with
    ``RuntimeDirError`` rather than followed or replaced.
    """
    if mode & ~0o770:
        raise ValueError(f"runtime dir mode {mode:#o} grants more than owner and group (max 0o770)")
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise RuntimeDirError(f"{p} exists and is not a directory") from exc
    try:
        # O_NOFOLLOW + fchmod: the mode lands on the directory we checked, never a symlink's target.
        fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        kind = "a symlink" if p.is_symlink() else "not a directory"
        raise RuntimeDirError(f"{p} is {kind}: {exc}") from exc
    try:
        os.fchmod(fd, mode)
    except OSError as exc:
        raise RuntimeDirError(f"cannot chmod {p} to {mode:#o}: {exc}") from exc
    finally:
        os.close(fd)
    return p


def endpoint(runtime_dir: str | os.PathLike[str], name: str) -> str:
    """``ipc://<runtime_dir>/<name>.sock`` with the directory made absolute.

    Raises ValueError if the socket path would not fit in a unix socket address, which ZeroMQ
    would otherwise only report at bind/connect time as a bare ENAMETOOLONG.
    """
    if not name or "/" in name:
        raise ValueError(f"bad endpoint name {name!r}")
    path = os.path.join(os.path.abspath(runtime_dir), f"{name}.sock")
    if len(os.fsencode(path)) > MAX_IPC_PATH:
        raise ValueError(
            f"ipc socket path is {len(os.fsencode(path))} bytes, over the {MAX_IPC_PATH}-byte "
            f"unix socket limit: {path} (use a shorter runtime dir)"
        )
    return f"ipc://{path}"
