"""Who an exec check runs as, and the capabilities it must not inherit.

An exec check runs an operator's program named in a REST call, so it never runs with the worker's
privileges: as user ``nobody`` (its uid and gid, no supplementary groups) whenever the worker can
switch users, i.e. when it runs as root or holds CAP_SETUID and CAP_SETGID (``gorb run`` started
as root gives an unprivileged worker exactly those two, as ambient capabilities, for this). A
user switch between two non-root uids keeps the capability sets, ambient ones included, so the
child also clears them all and sets no_new_privs before exec (``drop_in_child``): the check
program starts with empty effective, permitted, inheritable and ambient sets and cannot gain any
through a setuid binary. Linux only (``/proc/self/status``, prctl, capset through libc).
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable

CAP_SETGID = 6
CAP_SETUID = 7
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def effective_capabilities(status: str | None = None) -> int:
    """The CapEff mask of this process (``status``: the text of /proc/self/status, for tests)."""
    if status is None:
        with open("/proc/self/status") as f:
            status = f.read()
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def can_switch_user(euid: int, cap_eff: int) -> bool:
    """True if this process may run a child as another user (root, or CAP_SETUID+CAP_SETGID)."""
    need = (1 << CAP_SETUID) | (1 << CAP_SETGID)
    return euid == 0 or cap_eff & need == need


@functools.cache
def switch_user_now() -> bool:
    """Asked once per process: a worker's uid and capabilities do not change while it runs."""
    return can_switch_user(os.geteuid(), effective_capabilities())


def become(uid: int, gid: int) -> Callable[[], None]:
    """The ``preexec_fn`` of an exec check run as ``uid``/``gid``: in the child, before exec,
    drop every supplementary group, switch gid then uid (real, effective and saved), then empty
    every capability set and set no_new_privs. It does the switch itself rather than through
    Popen's user/group/extra_groups, whose order and handling of an empty group list differ
    between the stdlib's and gevent's subprocess (gevent kept the worker's groups). A failure
    is fatal to the child (Popen raises it in the worker), never ignored."""
    def preexec() -> None:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        drop_in_child()
    return preexec


def drop_in_child() -> None:
    """Empty every capability set and forbid gaining privileges on exec (in the child)."""
    if _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    header = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()  # two 32-bit halves, all zero
    if _libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    if _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
