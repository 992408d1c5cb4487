"""A kernel exchange that stalls, on a real kernel: the writer over real IPVS whose netlink socket
stops sending at the poison request (``tests/stalling_kernel.py real``) exits 70 within
``writer.kernel_timeout``; the writer started again (as supervisord would) finds the table it
left intact and applies the request the kernel never saw (it was saved before it was sent)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import zmq

from gorb.common import runtime
from gorb.common.transport import RequestClient
from tests import installed
from tests.pace import limit, wait_until
from tests.sandbox.conftest import REPO, ipvsadm
from tests.stalling_kernel import POISON_PORT, stall

VIP = "10.77.0.100"


def create(client: RequestClient, name: str, port: int) -> dict:
    return client.request("service.create", {"service": name, "options": {
        "host": VIP, "port": port, "method": "rr"}}, timeout=limit(20.0))


def test_a_stalled_kernel_exchange_exits_70_and_the_restart_adopts_the_table(writer_factory):
    timeout = 2.0
    w = writer_factory(start=False)
    cmd = ["ip", "netns", "exec", w.ns, installed.python(), "-m", "tests.stalling_kernel", "real",
           "--", "--config", "/dev/null", "--runtime-dir", w.runtime_dir,
           "--state-file", str(w.state_file), "--reconcile-interval", "3600",
           "--kernel-timeout", str(timeout)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # tests/ from the tree, gorb from the install
    with open(w.log, "ab") as log:
        proc = subprocess.Popen(cmd, cwd="/", env=env, stdout=log, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    client = RequestClient(ctx, runtime.endpoint(w.runtime_dir, runtime.WRITER), "t",
                           timeout=limit(20.0))
    try:
        def bound() -> bool:
            assert proc.poll() is None, w.log.read_text()
            return Path(w.runtime_dir, f"{runtime.WRITER}.sock").exists()
        wait_until(bound, 60, lambda: f"the writer's socket:\n{w.log.read_text()}", every=0.1)
        assert create(client, "web", 80)["ok"]
        assert client.request("backend.create", {"service": "web", "backend": "a", "options": {
            "host": "10.77.1.2", "port": 8080, "weight": 7}}, timeout=limit(20.0))["ok"]
        before = ipvsadm(w.ns)
        assert before[f"TCP {VIP}:80"]["dests"] == {"10.77.1.2:8080": ("Masq", 7)}
        rc, took = stall(client, proc, VIP, limit(60, fixed=timeout))
    finally:
        client.close()
        ctx.destroy(linger=0)
        if proc.poll() is None:
            proc.kill()
    text = w.log.read_text()
    assert rc == 70, text
    assert f"did not answer 1 of 1 request(s) within {timeout:g} s" in text
    assert timeout <= took <= limit(2.0, fixed=timeout), took  # the deadline, then the exit
    assert ipvsadm(w.ns) == before  # nothing reached the kernel after the stall
    w.start()  # supervisord's restart: the plain writer on the same state file
    after = ipvsadm(w.ns)
    assert after[f"TCP {VIP}:80"] == before[f"TCP {VIP}:80"]  # adopted as it was
    assert f"TCP {VIP}:{POISON_PORT}" in after  # saved before sending: applied now
    listed = w.must("service.list", {})["data"]["services"]
    assert sorted(listed) == ["poison", "web"]
