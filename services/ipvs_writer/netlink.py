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
"""

from __future__ import annotations

import errno as errno_mod
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
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSGERR_ATTR_MSG = 1


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
    """IPVS of the current network namespace, spoken to in batches."""

    def __init__(self, batch: int = BATCH):
        self.batch = batch
        self.family = resolve_family()
        self._sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC)
        self._sock.bind((0, 0))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BUFSIZE)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BUFSIZE)
        # Acks carry only the request's header (not its body) plus the kernel's error text.
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        self._seq = 0

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
        self._sock.sendall(b"".join(data for _, data in requests))
        pending = {seq for seq, _ in requests}
        results: dict[int, tuple[int, str]] = {}
        while pending:
            buf = self._sock.recv(BUFSIZE)
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
        self._sock.sendall(data)
        found: list[memoryview] = []
        while True:
            buf = self._sock.recv(BUFSIZE)
            for mtype, flags, mseq, payload in codec.messages(buf):
                if mseq != seq:
                    continue
                if mtype == codec.NLMSG_DONE:
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
