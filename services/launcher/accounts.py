"""Who each supervised program runs as, and with which capabilities: least privilege.

Started as root with ``[gorb] user`` (default ``gorb``) an existing account, ``gorb run`` starts:

    ipvs-writer   root's uid, group <user>, capabilities {CAP_NET_ADMIN} only (effective,
                  permitted and bounding; none inheritable or ambient): netlink needs it, the
                  state file and the runtime dir are root's, and its sockets come out root:<user>
    api           <user>, no capabilities at all (bounding set empty)
    discovery     <user>, no capabilities at all
    pulse-worker  <user>, {CAP_SETUID, CAP_SETGID} only (ambient, so they survive exec): exec
                  checks run as ``nobody`` (``gorb.services.pulse_worker.privileges``)

every one with no_new_privs, through util-linux's ``setpriv`` in front of the program's command
(supervisord's own ``user=`` would leave the bounding set full and cannot keep one capability).
supervisord itself stays root: it must be, to start the writer; its control socket is root's
only (0700). Where the account does not exist (a developer's machine) everything runs as root, as
before, after one warning line; ``user = ""`` asks for that without the warning. Started as any
other user, every program runs as that user and nothing is dropped.

Pure: the decisions take the euid, a password-database lookup and ``stat`` as arguments.
"""

from __future__ import annotations

import os
import pwd
import stat as statmod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

# capability names as setpriv spells them
WRITER_CAPS = ("net_admin",)
PULSE_CAPS = ("setuid", "setgid")


@dataclass(frozen=True)
class Account:
    """The unprivileged account of api, pulse-worker and discovery."""

    name: str
    uid: int
    gid: int
    groups: tuple[int, ...] = ()  # its supplementary groups (for the reachability check)


def plan(user: str, euid: int,
         lookup: Callable[[str], pwd.struct_passwd] = pwd.getpwnam,
         group_ids: Callable[[str, int], Iterable[int]] = os.getgrouplist,
         ) -> tuple[Account | None, str | None]:
    """(the account to drop to or None, a warning to print or None)."""
    if euid != 0 or not user:
        return None, None
    try:
        pw = lookup(user)
    except KeyError:
        return None, (f"user {user!r} (gorb.user) does not exist: every program runs as root. "
                      f"Create it (the .deb does: adduser --system --group {user}) to run api, "
                      "pulse-worker and discovery unprivileged, or set gorb.user = \"\"")
    if pw.pw_uid == 0:
        return None, None  # "root" asked for explicitly: nothing to drop
    return Account(user, pw.pw_uid, pw.pw_gid,
                   tuple(sorted(set(group_ids(user, pw.pw_gid))))), None


def _caps(names: Iterable[str]) -> str:
    return ",".join(["-all", *(f"+{n}" for n in names)])


def setpriv_prefix(setpriv: str, account: Account, program: str) -> list[str]:
    """The setpriv words in front of ``program``'s command (see the module docstring)."""
    if program == "ipvs-writer":
        caps = _caps(WRITER_CAPS)
        # uid 0 keeps only what the bounding set allows across exec
        return [setpriv, f"--regid={account.gid}", "--clear-groups", "--inh-caps=-all",
                f"--bounding-set={caps}", "--no-new-privs", "--"]
    names = PULSE_CAPS if program == "pulse-worker" else ()
    caps = _caps(names)
    words = [setpriv, f"--reuid={account.uid}", f"--regid={account.gid}", "--init-groups",
             f"--inh-caps={caps}", f"--bounding-set={caps}"]
    if names:
        words.append(f"--ambient-caps={caps}")
    return [*words, "--no-new-privs", "--"]


def unreachable(path: str, account: Account,
                stat: Callable[[str], os.stat_result] = os.stat) -> str | None:
    """The first directory on the way to ``path`` (itself included) that ``account`` may not
    enter, or None. The programs that run as ``account`` must reach the runtime dir's sockets."""
    parts = os.path.abspath(path).split("/")[1:]
    current = "/"
    for part in ["", *parts]:
        current = os.path.join(current, part) if part else current
        st = stat(current)
        if st.st_uid == account.uid:
            bit = statmod.S_IXUSR
        elif st.st_gid == account.gid or st.st_gid in account.groups:
            bit = statmod.S_IXGRP
        else:
            bit = statmod.S_IXOTH
        if not st.st_mode & bit:
            return current
    return None
