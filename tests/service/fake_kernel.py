"""A hand-written stand-in for the writer's kernel edge (``gorb.services.ipvs_writer.netlink.Kernel``).

It keeps an IPVS table as ``{SKey: KService}`` and answers ops the way the kernel does:

    add_service  on an existing key            -> EEXIST
    add_service  / set_service, unknown sched  -> ENOENT   (the kernel cannot find the module)
    set_service  / del_service, missing        -> ESRCH
    add_dest / set_dest / del_dest, no service -> ESRCH
    add_dest     on an existing dest           -> EEXIST
    set_dest / del_dest, missing dest          -> ENOENT

``set_*`` replace the entry (a service keeps its dests). Every value handed in or out is a copy,
as with netlink, so nobody can change the table by holding on to an object. ``calls`` records the
order of ``apply``/``dump``/``service``/``flush``; ``applied`` keeps every ``apply`` batch.
"""

from __future__ import annotations

import copy
import errno
import os
import threading

from gorb.services.ipvs_writer.table import KDest, KService, Op, SKey

SCHEDULERS = frozenset({"rr", "wrr", "lc", "wlc", "sh", "mh", "dh"})


class FakeKernelError(Exception):
    """Like ``netlink.KernelError``: ``errno`` is the kernel's, ``op`` what was asked."""

    def __init__(self, err: int, op: Op | None):
        self.errno = err
        self.op = op
        super().__init__(f"{op}: {os.strerror(err)} ({errno.errorcode[err]})")


def _svc_copy(svc: KService, dests: dict | None = None) -> KService:
    out = svc.without_dests()
    out.dests = {k: copy.copy(d) for k, d in (dests or {}).items()}
    return out


class FakeKernel:
    def __init__(self, schedulers=SCHEDULERS, table: dict[SKey, KService] | None = None):
        self.schedulers = set(schedulers)
        self.table: dict[SKey, KService] = {}
        for svc in (table or {}).values():
            self.put(svc)
        self.calls: list[str] = []
        self.applied: list[list[Op]] = []
        # The writer loop runs in its own thread in service tests; keep each call atomic.
        self._lock = threading.Lock()

    # test helpers -------------------------------------------------------------------------------

    def put(self, svc: KService) -> None:
        """Install ``svc`` (with its dests) directly, as a hand edit would."""
        self.table[svc.key] = _svc_copy(svc, svc.dests)

    def edit(self, change) -> None:
        """Run ``change(table)`` atomically with respect to the writer's calls (a hand edit)."""
        with self._lock:
            change(self.table)

    def snapshot(self) -> dict[SKey, KService]:
        with self._lock:
            return {k: _svc_copy(s, s.dests) for k, s in self.table.items()}

    # the KernelPort -----------------------------------------------------------------------------

    def apply(self, ops: list[Op]) -> list[Exception | None]:
        ops = list(ops)
        with self._lock:
            self.calls.append("apply")
            self.applied.append(ops)
            return [self._one(op) for op in ops]

    def dump(self) -> dict[SKey, KService]:
        with self._lock:
            self.calls.append("dump")
            return {k: _svc_copy(s, s.dests) for k, s in self.table.items()}

    def service(self, svc: KService) -> KService | None:
        with self._lock:
            self.calls.append("service")
            have = self.table.get(svc.key)
            return None if have is None else _svc_copy(have, have.dests)

    def flush(self) -> None:
        with self._lock:
            self.calls.append("flush")
            self.table.clear()

    def close(self) -> None:
        """The real adapter closes its netlink sockets; nothing to close here."""

    # one op -------------------------------------------------------------------------------------

    def _one(self, op: Op) -> Exception | None:
        key = op.service.key
        have = self.table.get(key)
        verb = op.verb
        if verb == "add_service":
            if have is not None:
                return FakeKernelError(errno.EEXIST, op)
            if op.service.sched not in self.schedulers:
                return FakeKernelError(errno.ENOENT, op)
            self.table[key] = _svc_copy(op.service)
            return None
        if have is None:
            return FakeKernelError(errno.ESRCH, op)
        if verb == "set_service":
            if op.service.sched not in self.schedulers:
                return FakeKernelError(errno.ENOENT, op)
            self.table[key] = _svc_copy(op.service, have.dests)
            return None
        if verb == "del_service":
            del self.table[key]
            return None
        dest: KDest = op.dest
        present = dest.key in have.dests
        if verb == "add_dest":
            if present:
                return FakeKernelError(errno.EEXIST, op)
            have.dests[dest.key] = copy.copy(dest)
            return None
        if not present:
            return FakeKernelError(errno.ENOENT, op)
        if verb == "set_dest":
            have.dests[dest.key] = copy.copy(dest)
        else:  # del_dest
            del have.dests[dest.key]
        return None
