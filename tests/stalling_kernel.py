"""``ipvs-writer`` whose kernel stops answering: the real writer (loop, engine, state file, bus,
``netlink.Kernel`` with its deadlines) over a netlink socket that goes silent once it is asked
to create a service on the poison port (``POISON_PORT``, 666).

    python -m tests.stalling_kernel scripted|real -- WRITER-ARGS...

- ``scripted`` (tests/service, no IPVS): the "kernel" is a thread at the other end of a unix
  datagram socket pair that acks every request and ends every dump empty, until the poison;
- ``real`` (tests/sandbox): the kernel's own IPVS over a real netlink socket, except that the
  poison request and everything after it is never sent, so the kernel has nothing to answer.

Either way the writer must give up after ``writer.kernel_timeout`` and exit 70.
"""

from __future__ import annotations

import socket
import struct
import sys
import threading
import time

from gorb.services.ipvs_writer import codec, main, netlink

POISON_PORT = 666
_POISON = codec.HOST.attr(codec.SVC_PORT, struct.pack(">H", POISON_PORT))
SCRIPTED_FAMILY = 0x30


def poisoned(data: bytes) -> bool:
    return _POISON in data


class SilencingSocket:
    """A netlink socket that stops sending at the poison (``real``)."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self.silent = False

    def sendall(self, data: bytes) -> None:
        self.silent = self.silent or poisoned(data)
        if not self.silent:
            self._sock.sendall(data)

    def __getattr__(self, name):  # setsockopt, getsockopt, settimeout, recvmsg, close
        return getattr(self._sock, name)


def scripted_kernel(peer: socket.socket) -> None:
    """Ack every request, end every dump with an empty NLMSG_DONE; nothing after the poison."""
    while True:
        data = peer.recv(1 << 20)
        if poisoned(data):
            return  # silent from now on: the writer's recv must time out
        replies = []
        for _mtype, flags, seq, _payload in codec.messages(data):
            kind = codec.NLMSG_DONE if flags & codec.NLM_F_DUMP == codec.NLM_F_DUMP \
                else codec.NLMSG_ERROR
            body = struct.pack("=i", 0) + (b"\0" * 16 if kind == codec.NLMSG_ERROR else b"")
            replies.append(struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body)
        peer.send(b"".join(replies))


def stall(client, proc, host: str, wait: float) -> tuple[int, float]:
    """Send the poison request (a service at ``host``:POISON_PORT) over the bus ``client`` and
    wait at most ``wait`` seconds for the writer ``proc`` to exit: (its status, seconds from the
    send)."""
    sent = time.monotonic()
    client.send("service.create", {"service": "poison", "options": {
        "host": host, "port": POISON_PORT, "method": "rr"}})
    rc = proc.wait(timeout=wait)
    return rc, time.monotonic() - sent


def kernel_factory(mode: str):
    def make(cfg):
        if mode == "real":
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, netlink.NETLINK_GENERIC)
            sock.bind((0, 0))
            return netlink.Kernel(timeout=cfg.writer.kernel_timeout, sock=SilencingSocket(sock))
        ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        threading.Thread(target=scripted_kernel, args=(peer,), daemon=True).start()
        return netlink.Kernel(timeout=cfg.writer.kernel_timeout, sock=ours,
                              family=SCRIPTED_FAMILY)
    return make


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode not in ("scripted", "real"):
        sys.exit("usage: python -m tests.stalling_kernel scripted|real -- WRITER-ARGS...")
    sys.exit(main.main(rest[1:] if rest[:1] == ["--"] else rest, kernel_factory(mode)))
