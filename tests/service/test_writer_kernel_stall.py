"""The netlink edge cannot hang the writer: ``netlink.Kernel`` against a scripted kernel at the
other end of a unix datagram socket pair (answers as the kernel would, or never), and the writer
process over a kernel that goes silent (``tests/stalling_kernel.py``): it exits 70 within
``writer.kernel_timeout``, saying what it was waiting for. The same on a real kernel, with the
restarted writer adopting the table: tests/sandbox/test_kernel_stall.py."""

from __future__ import annotations

import errno
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zmq

from gorb.common import runtime
from gorb.common.transport import RequestClient
from gorb.services.ipvs_writer import codec, netlink
from gorb.services.ipvs_writer.table import KDest, KService, Op
from tests.pace import limit, wait_until
from tests.stalling_kernel import stall

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]
WEB = KService(socket.AF_INET, 6, "10.0.0.1", 80)
OP = Op("add_dest", WEB, KDest("10.1.0.1", 8080, weight=1))


def reply(kind: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


class Peer:
    """The kernel's end: ``answer(requests) -> bytes | None`` for each datagram received."""

    def __init__(self, answer):
        self.ours, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.answer = answer
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                data = self.peer.recv(1 << 20)
            except OSError:
                return
            out = self.answer(list(codec.messages(data)))
            if out:
                self.peer.send(out)

    def kernel(self, timeout: float = 0.3) -> netlink.Kernel:
        return netlink.Kernel(timeout=timeout, sock=self.ours, family=0x30)


def test_a_kernel_that_never_answers_stalls_within_the_deadline():
    kernel = Peer(lambda msgs: None).kernel(timeout=0.3)
    started = time.monotonic()
    with pytest.raises(netlink.KernelStalled, match=r"did not answer 1 of 1 request\(s\) "
                                                    r"within 0.3 s"):
        kernel.apply([OP])
    assert 0.3 <= time.monotonic() - started < limit(5, fixed=0.3)  # the deadline, not a hang
    with pytest.raises(netlink.KernelStalled, match="did not answer a dump"):
        kernel.dump()


def test_a_dump_whose_done_carries_an_error_fails():
    def answer(msgs):
        ((_, _, seq, _),) = msgs
        return reply(codec.NLMSG_DONE, seq, struct.pack("=i", -errno.EPERM))

    with pytest.raises(netlink.KernelError) as err:
        Peer(answer).kernel().dump()
    assert err.value.errno == errno.EPERM


def test_acks_are_read_per_request_with_the_kernels_text():
    def answer(msgs):
        ((_, _, seq, _),) = msgs
        text = codec.HOST.attr(netlink.NLMSGERR_ATTR_MSG, b"no such scheduler\0")
        return reply(codec.NLMSG_ERROR, seq, struct.pack("=i", -errno.ENOENT) + bytes(16) + text)

    (result,) = Peer(answer).kernel().apply([OP])
    assert result.errno == errno.ENOENT and "no such scheduler" in str(result)


def test_an_unreadable_answer_is_a_codec_error_not_a_crash():
    def answer(msgs):
        return b"\x40\x00\x00\x00garbage"  # a length past the datagram

    with pytest.raises(codec.CodecError, match="truncated netlink message"):
        Peer(answer).kernel().apply([OP])


class FakeSock:
    """recvmsg's outcomes a socket pair cannot produce."""

    def __init__(self, outcome):
        self.outcome = outcome

    def setsockopt(self, *a):
        pass

    def getsockopt(self, *a):
        return netlink.BUFSIZE

    def settimeout(self, t):
        pass

    def sendall(self, data):
        pass

    def recvmsg(self, n):
        if isinstance(self.outcome, OSError):
            raise self.outcome
        return self.outcome

    def close(self):
        pass


@pytest.mark.parametrize("outcome, message", [
    (OSError(errno.ENOBUFS, "No buffer space"), "overflowed during 1 of 1 request"),
    ((b"", [], socket.MSG_TRUNC, None), "was cut at"),
])
def test_lost_or_cut_answers_stall(outcome, message):
    kernel = netlink.Kernel(sock=FakeSock(outcome), family=0x30)
    with pytest.raises(netlink.KernelStalled, match=message):
        kernel.apply([OP])


def test_a_receive_buffer_too_small_for_a_batch_is_refused_with_the_sysctl():
    class Small(FakeSock):
        def setsockopt(self, level, opt, value):
            if opt == netlink.SO_RCVBUFFORCE:
                raise PermissionError(errno.EPERM, "not permitted")

        def getsockopt(self, *a):
            return 200_000

    with pytest.raises(netlink.RcvbufTooSmall, match=r"sysctl -w net.core.rmem_max=393216"):
        netlink.Kernel(batch=256, sock=Small(None), family=0x30)
    assert netlink.Kernel(batch=100, sock=Small(None), family=0x30)  # 153,600: fits


def test_missing_ack_options_are_a_warning_not_a_crash(caplog):
    class Old(FakeSock):
        def setsockopt(self, level, opt, value):
            if level == netlink.SOL_NETLINK:
                raise OSError(errno.ENOPROTOOPT, "Protocol not available")

    netlink.Kernel(sock=Old(None), family=0x30)
    assert "NETLINK_EXT_ACK unavailable" in caplog.text


# --- the writer process ---------------------------------------------------------------------------

@pytest.fixture
def workdir():
    d = Path(tempfile.mkdtemp(prefix="gorb-st-", dir="/tmp"))  # short: unix socket paths
    yield d
    shutil.rmtree(d, ignore_errors=True)


def put(client: RequestClient, port: int) -> dict:
    return client.request("service.create", {"service": f"s{port}", "options": {
        "host": "10.0.0.1", "port": port}}, timeout=limit(10.0))


def test_the_writer_exits_70_when_the_kernel_stops_answering(workdir):
    timeout = 1.0
    cmd = [sys.executable, "-m", "tests.stalling_kernel", "scripted", "--",
           "--config", "/dev/null", "--runtime-dir", str(workdir / "run"),
           "--state-file", str(workdir / "state.json"), "--kernel-timeout", str(timeout)]
    log = workdir / "writer.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    client = RequestClient(ctx, runtime.endpoint(str(workdir / "run"), runtime.WRITER), "t",
                           timeout=limit(10.0))
    try:
        wait_until((workdir / "run").exists, 30, "the writer's runtime dir")
        first = put(client, 80)
        assert first["ok"], first  # the kernel answers: applied
        rc, took = stall(client, proc, "10.0.0.1", limit(30, fixed=timeout))
    finally:
        client.close()
        ctx.destroy(linger=0)
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert rc == 70, text
    assert "did not answer 1 of 1 request(s) within 1 s" in text and "restart" in text
    assert "Traceback" not in text
    assert timeout <= took <= limit(0.5, fixed=timeout), took  # the deadline, then the exit
    # write-ahead: the desired state kept the request the kernel never answered
    assert '"poison"' in (workdir / "state.json").read_text()
