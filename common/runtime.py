"""The runtime directory holding gorb's ipc:// sockets, and the endpoint names inside it.

Access to the bus is access to the kernel's IPVS table, so the directory's mode is the bus's only
access control: the owner and the group, never "other". Started as root, ``gorb run`` makes it
``root:<gorb.user>`` 0750: the unprivileged programs (api, pulse-worker, discovery, in that group)
may connect to the writer's sockets but create nothing there, and no other account may even look
in. Each socket file is chmodded 0770 when bound (connecting to a unix socket needs write
permission on it; the writer runs with group ``<gorb.user>``, so its sockets are ``root:gorb``).

Sockets in the directory::

    writer.sock              ROUTER bound by ipvs-writer: requests, one reply per request
    events.sock              PUB bound by ipvs-writer: state-change events
    health.sock              PULL bound by ipvs-writer: batched health results from pulse-worker
    discovery/discovery.sock ROUTER bound by discovery (``gorb.common.store_messages``), in a
                             directory of discovery's own account (0700): the only socket an
                             unprivileged program binds
"""

from __future__ import annotations

import os
from pathlib import Path

WRITER = "writer"
EVENTS = "events"
HEALTH = "health"
DISCOVERY_DIR = "discovery"  # the subdirectory holding discovery's socket

# sockaddr_un.sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_IPC_PATH = 107


class RuntimeDirError(Exception):
    """The runtime directory cannot be used safely (a symlink, not a directory, not ours)."""


def ensure_runtime_dir(path: str | os.PathLike[str], mode: int | None = None,
                       owner: tuple[int, int] | None = None) -> Path:
    """Create ``path`` (and its parents) if missing and set its mode to exactly ``mode``.

    ``mode`` may grant the owner and group bits only (e.g. 0o700, 0o750, 0o770); anything for
    "other", or setuid/setgid/sticky, is a ValueError. ``mode=None`` (what the programs pass: the
    launcher chose the mode) gives a new directory 0o770 and keeps an existing one's, minus any
    bit for "other". ``owner`` is ``(uid, gid)`` to chown it to (-1 keeps one). An existing symlink
    or non-directory is refused with ``RuntimeDirError`` rather than followed or replaced.
    """
    if mode is not None and mode & ~0o770:
        raise ValueError(f"runtime dir mode {mode:#o} grants more than owner and group (max 0o770)")
    p = Path(path)
    if mode is None and not p.exists():
        mode = 0o770  # new: the programs' default (gorb run makes the directory beforehand)
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
        if owner is not None:
            os.fchown(fd, *owner)
        if mode is None:
            current = os.fstat(fd).st_mode & 0o7777
            mode = current & 0o770 if current & 0o007 or current & ~0o770 else current
        os.fchmod(fd, mode)
    except OSError as exc:
        raise RuntimeDirError(f"cannot set the mode ({mode:#o}) or owner of {p}: {exc}") from exc
    finally:
        os.close(fd)
    return p


def endpoint(runtime_dir: str | os.PathLike[str], name: str, subdir: str = "") -> str:
    """``ipc://<runtime_dir>/[<subdir>/]<name>.sock`` with the directory made absolute.

    Raises ValueError if the socket path would not fit in a unix socket address, which ZeroMQ
    would otherwise only report at bind/connect time as a bare ENAMETOOLONG.
    """
    if not name or "/" in name or "/" in subdir:
        raise ValueError(f"bad endpoint name {name!r}")
    path = os.path.join(os.path.abspath(runtime_dir), subdir, f"{name}.sock")
    if len(os.fsencode(path)) > MAX_IPC_PATH:
        raise ValueError(
            f"ipc socket path is {len(os.fsencode(path))} bytes, over the {MAX_IPC_PATH}-byte "
            f"unix socket limit: {path} (use a shorter runtime dir)"
        )
    return f"ipc://{path}"
