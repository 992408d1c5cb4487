"""The statistics collector on a real kernel (``services/ipvs_writer/collector.py``): a child of
the writer with its credentials, niced, dumping IPVS for the writer's reads; killed, it is started
again and reads go on; the writer killed, it goes too."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from gorb.services.ipvs_writer.collector import NICENESS
from tests.pace import wait_until

VIP = "10.78.0.100"


def children(pid: int) -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(p.name))
    return out


def collector_of(writer_pid: int) -> int | None:
    found = [c for c in children(writer_pid)
             if b"gorb.services.ipvs_writer.collector" in Path(f"/proc/{c}/cmdline").read_bytes()]
    assert len(found) <= 1, found
    return found[0] if found else None


def caps(pid: int) -> dict[str, str]:
    return {k: v for k, v in (line.split(":\t", 1) for line in
                              Path(f"/proc/{pid}/status").read_text().splitlines())
            if k in ("Uid", "Gid", "CapPrm", "CapEff", "CapBnd", "NoNewPrivs")}


def nice_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[16])


def backend_kernel(w) -> dict | None:
    return w.must("backend.get", {"service": "web", "backend": "a"})["data"]["kernel"]


def test_the_collector_serves_reads_and_is_restarted_when_it_dies(writer):
    writer.must("service.create", {"service": "web", "options": {"host": VIP, "port": 80}})
    writer.must("backend.create", {"service": "web", "backend": "a", "options": {
        "host": "10.78.1.2", "port": 8080, "weight": 7}})
    assert backend_kernel(writer)["weight"] == 7  # from the collector's dump of IPVS
    writer_pid = writer.proc.pid  # `ip netns exec` execs the writer: this is its pid
    first = collector_of(writer_pid)
    assert first is not None
    assert caps(first) == caps(writer_pid)  # the writer's uid, gid and capabilities, no more
    assert nice_of(first) == nice_of(writer_pid) + NICENESS
    writer.must("backend.update", {"service": "web", "backend": "a", "weight": 3})
    assert backend_kernel(writer)["weight"] == 3  # a read after a write sees it in the kernel

    os.kill(first, signal.SIGKILL)
    second = wait_until(lambda: collector_of(writer_pid), 30, "a new collector",
                        until=lambda c: c not in (None, first))
    writer.must("backend.update", {"service": "web", "backend": "a", "weight": 5})
    assert backend_kernel(writer)["weight"] == 5
    assert "the collector exited" in writer.log.read_text()

    writer.kill(signal.SIGKILL)
    wait_until(lambda: not running(second), 30, "the collector ends with the writer")


def running(pid: int) -> bool:
    """Alive and not a zombie waiting for whoever inherited it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
