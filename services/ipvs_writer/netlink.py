"""The kernel adapter: the only module of gorb that imports pyroute2, and the only one that talks
to the kernel's IPVS.

pyroute2 resolves the generic-netlink family "IPVS" (``IPVSSocket``); requests and dumps then go
over one raw ``NETLINK_GENERIC`` socket, encoded by ``codec`` (see there why not by pyroute2).
Ops are sent in batches: up to ``BATCH`` requests concatenated into one ``send()``, then their
acks are read, so a thousand ops cost a handful of round trips instead of a thousand. Each op
still gets its own ack, so one failure (an unknown scheduler, an unroutable address) is reported
against that op while the others apply.

Kernel quirks handled (shared/reference/sandbox.md): every attribute is sent explicitly (the
kernel's and pyroute2's defaults are not gorb's), ``SET_*`` is used to change an entry (never
delete + add), the IPv6 netmask is a host-order prefix length, ``tun_port`` is big-endian, and
only one dump may run per socket at a time (EBUSY otherwise), so dumps are sequential.

Nothing here can hang the writer: every receive has a deadline (``timeout``, the config's
``writer.kernel_timeout``); a kernel that does not answer in time raises ``KernelStalled``, as does
a receive buffer that overflowed (ENOBUFS: acks were lost, so what applied is unknown) or a
datagram cut by a short buffer. The writer exits 70 on it and supervisord restarts it; the new
writer adopts whatever the kernel holds (the desired state was saved before the kernel was asked).
The receive buffer is checked at start: a batch's acks all queue at once, so it must hold ``batch``
of them (``RcvbufTooSmall``, exit 3, names the sysctl). A ``NLMSG_DONE`` that carries an error
fails its dump.
"""

from __future__ import annotations

import errno as errno_mod
import logging
import os
import socket
from collections.abc import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.ipvs import IPVSSocket

from gorb.services.ipvs_writer import codec
from gorb.services.ipvs_writer.table import KService, Op, SKey

NETLINK_GENERIC = 16
BATCH = 256  # requests per send(); their acks fit the receive buffer
BUFSIZE = 4 << 20
SO_RCVBUFFORCE = 33  # beyond net.core.rmem_max: needs CAP_NET_ADMIN, which the writer has
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSGERR_ATTR_MSG = 1
# What one queued ack costs the receive buffer: the kernel charges an skb's truesize (the
# buffer and its bookkeeping, ~0.7-1 KiB for an ack with the kernel's error text), not the
# payload; rounded up. A batch's acks all wait in the buffer before the first recv().
ACK_TRUESIZE = 1536
DEFAULT_TIMEOUT = 5.0

log = logging.getLogger(__name__)


class KernelError(Exception):
    """Netlink refused an op: ``errno`` is the kernel's, ``op`` what was asked."""

    def __init__(self, err: int, op: Op | None, detail: str = ""):
        self.errno = err
        self.op = op
        name = errno_mod.errorcode.get(err, str(err))
        what = f"{op}: " if op is not None else ""
        super().__init__(f"{what}{os.strerror(err)} ({name}){': ' + detail if detail else ''}")


class IpvsUnavailable(Exception):
    """The generic-netlink family "IPVS" is missing: the ip_vs module is not loaded."""


class RcvbufTooSmall(IpvsUnavailable):
    """The netlink socket's receive buffer cannot hold a batch's acks (exit 3, like no IPVS)."""


class KernelStalled(Exception):
    """The kernel did not answer in time, or answers were lost: what applied is unknown, so the
    writer must restart and adopt the kernel's table (exit 70)."""


def resolve_family() -> int:
    """The generic-netlink family id of IPVS in this network namespace."""
    try:
        sock = IPVSSocket()
    except NetlinkError as exc:
        if exc.code == errno_mod.ENOENT:
            raise IpvsUnavailable('the generic netlink family "IPVS" is missing: '
                                  "load the ip_vs module (modprobe ip_vs)") from None
        raise
    try:
        return sock.prid
    finally:
        sock.close()


def device_addresses(device: str) -> list[str]:
    """The addresses of ``device`` in the kernel's order (GORB: the first is the default VIP);
    [] if the device does not exist or has none."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=device)
        if not index:
            return []
        return [m.get_attr("IFA_ADDRESS") for m in ipr.get_addr(index=index[0])
                if m.get_attr("IFA_ADDRESS")]


class Kernel:
    """IPVS of the current network namespace, spoken to in batches.

    ``sock`` and ``family`` replace the netlink socket and the resolved family (tests: a socket
    that never answers)."""

    def __init__(self, batch: int = BATCH, timeout: float = DEFAULT_TIMEOUT,
                 sock: socket.socket | None = None, family: int | None = None):
        self.batch = batch
        self.timeout = timeout
        self.family = resolve_family() if family is None else family
        if sock is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
            sock.bind((0, 0))
        self._sock = sock
        try:
            self._set_buffers()
        except BaseException:
            sock.close()
            raise
        self._seq = 0

    def _set_buffers(self) -> None:
        sock = self._sock
        need = self.batch * ACK_TRUESIZE
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, BUFSIZE)
        except OSError:  # no CAP_NET_ADMIN (tests, benchmarks): capped by net.core.rmem_max
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFSIZE)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if got < need:
            raise RcvbufTooSmall(
                f"the netlink receive buffer is {got} bytes; the acks of a batch of {self.batch} "
                f"need {need}: raise net.core.rmem_max (sysctl -w net.core.rmem_max={need}) or "
                "run the writer with CAP_NET_ADMIN")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFSIZE)
        # Acks carry only the request's header (not its body) plus the kernel's error text.
        # Kernels before 4.12 lack them: acks are then bigger, errors come without the text.
        for opt, name in ((NETLINK_CAP_ACK, "NETLINK_CAP_ACK"),
                          (NETLINK_EXT_ACK, "NETLINK_EXT_ACK")):
            try:
                sock.setsockopt(SOL_NETLINK, opt, 1)
            except OSError as exc:
                log.warning("netlink option %s unavailable (%s): going on without it", name,
                            exc.strerror)

    def _send(self, data: bytes, what: str) -> None:
        self._sock.settimeout(self.timeout)
        try:
            self._sock.sendall(data)
        except TimeoutError:
            raise KernelStalled(f"the kernel did not take {what} within {self.timeout:g} s")

    def _recv(self, what: str) -> bytes:
        """One datagram from the kernel within ``timeout`` seconds; KernelStalled if not."""
        self._sock.settimeout(self.timeout)
        try:
            data, _, flags, _ = self._sock.recvmsg(BUFSIZE)
        except TimeoutError:
            raise KernelStalled(f"the kernel did not answer {what} within {self.timeout:g} s")
        except OSError as exc:
            if exc.errno == errno_mod.ENOBUFS:
                raise KernelStalled(f"the netlink receive buffer overflowed during {what}: "
                                    "answers were lost") from None
            raise
        if flags & socket.MSG_TRUNC:
            raise KernelStalled(f"a kernel answer to {what} was cut at {BUFSIZE} bytes")
        return data

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Kernel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF or 1
        return self._seq

    def _exchange(self, requests: list[tuple[int, bytes]]) -> dict[int, tuple[int, str]]:
        """Send pre-encoded acked requests in one write; return {seq: (errno, kernel text)}."""
        self._send(b"".join(data for _, data in requests), f"{len(requests)} request(s)")
        pending = {seq for seq, _ in requests}
        results: dict[int, tuple[int, str]] = {}
        while pending:
            buf = self._recv(f"{len(pending)} of {len(requests)} request(s)")
            for mtype, flags, seq, payload in codec.messages(buf):
                if mtype != codec.NLMSG_ERROR or seq not in pending:
                    continue
                err = codec.ack_error(payload)
                text = ""
                if err and len(payload) > 20:  # nlmsgerr (4 + 16) then extended-ack TLVs
                    tlv = codec.attrs(payload[20:]).get(NLMSGERR_ATTR_MSG)
                    text = bytes(tlv).rstrip(b"\0").decode(errors="replace") if tlv else ""
                results[seq] = (err, text)
                pending.discard(seq)
        return results

    def apply(self, ops: Iterable[Op]) -> list[KernelError | None]:
        """Execute ``ops`` in order, batched; one result per op (None = applied)."""
        ops = list(ops)
        out: list[KernelError | None] = []
        for start in range(0, len(ops), self.batch):
            chunk = ops[start:start + self.batch]
            reqs = []
            for op in chunk:
                seq = self._next_seq()
                reqs.append((seq, codec.encode_op(op, self.family, seq)))
            results = self._exchange(reqs)
            for op, (seq, _) in zip(chunk, reqs):
                err, text = results[seq]
                out.append(KernelError(err, op, text) if err else None)
        return out

    def _dump(self, data: bytes, seq: int, single: bool = False) -> list[memoryview]:
        """Run one dump (or, with ``single``, one get) request; return the genl payloads."""
        self._send(data, "a dump" if not single else "a get")
        found: list[memoryview] = []
        while True:
            buf = self._recv("a dump" if not single else "a get")
            for mtype, flags, mseq, payload in codec.messages(buf):
                if mseq != seq:
                    continue
                if mtype == codec.NLMSG_DONE:
                    err = codec.ack_error(payload) if len(payload) >= 4 else 0
                    if err:
                        raise KernelError(err, None, "dump (done)")
                    return found
                if mtype == codec.NLMSG_ERROR:
                    err = codec.ack_error(payload)
                    if err:
                        raise KernelError(err, None, "dump")
                    return found
                found.append(payload)
                if single:
                    return found

    def dump(self) -> dict[SKey, KService]:
        """Every service of this namespace with its dests and statistics."""
        seq = self._next_seq()
        req = codec.message(self.family, codec.CMD["get_service"],
                            codec.NLM_F_REQUEST | codec.NLM_F_DUMP, seq, [])
        table = {s.key: s for s in map(codec.decode_service, self._dump(req, seq))}
        for svc in list(table.values()):
            seq = self._next_seq()
            try:
                payloads = self._dump(codec.encode_dump_dests(svc, self.family, seq), seq)
            except KernelError as exc:
                if exc.errno == errno_mod.ESRCH:  # deleted between the two dumps
                    del table[svc.key]
                    continue
                raise
            svc.dests = {d.key: d for d in (codec.decode_dest(p, svc.af) for p in payloads)}
        return table

    def service(self, svc: KService) -> KService | None:
        """One service (by key) with its dests and statistics, or None if the kernel lacks it."""
        seq = self._next_seq()
        req = codec.message(self.family, codec.CMD["get_service"], codec.NLM_F_REQUEST, seq,
                            codec.service_key_attrs(svc))
        try:
            found = self._dump(req, seq, single=True)
        except KernelError as exc:
            if exc.errno in (errno_mod.ESRCH, errno_mod.ENOENT):
                return None
            raise
        if not found:
            return None
        live = codec.decode_service(found[0])
        seq = self._next_seq()
        try:
            payloads = self._dump(codec.encode_dump_dests(live, self.family, seq), seq)
        except KernelError as exc:
            if exc.errno == errno_mod.ESRCH:
                return None
            raise
        live.dests = {d.key: d for d in (codec.decode_dest(p, live.af) for p in payloads)}
        return live

    def flush(self) -> None:
        """Delete every IPVS service of this namespace (``--flush``; GORB's ``-f``)."""
        seq = self._next_seq()
        req = codec.message(self.family, codec.CMD["flush"],
                            codec.NLM_F_REQUEST | codec.NLM_F_ACK, seq, [])
        err, text = self._exchange([(seq, req)])[seq]
        if err:
            raise KernelError(err, None, text or "flush")
