"""The writer's state file on a real kernel: corrupt file, ``--restore-previous``, restart.

``state.save`` hard-links the current file to ``state.json.prev`` before each write, so ``.prev``
exists from the second mutation on and always holds the state before the last one. A state file
that does not parse stops the writer with exit code 2 before it touches the kernel (even with
``--flush``); ``--restore-previous`` sets the bad file aside as ``state.json.corrupt-<unix time>``
and starts from ``.prev``.
"""

from __future__ import annotations

import json
import re

from tests.pace import limit, wait_until
from tests.sandbox.conftest import sh
from tests.sandbox.test_kinds import create, last_start, listing, services

GARBAGE = b'{"version": 1, "services": {"web": \x00\xff truncated'
FOREIGN = {"TCP 10.77.0.200:80": ("lc", {"10.77.1.50:80": ("Route", 2)})}
MAKE_FOREIGN = ("ipvsadm -A -t 10.77.0.200:80 -s lc && "
                "ipvsadm -a -t 10.77.0.200:80 -r 10.77.1.50:80 -g -w 2")


def failed_start(writer, *args: str) -> str:
    """Start ``writer`` expecting exit code 2; return what it logged in this run."""
    offset = writer.log.stat().st_size if writer.log.exists() else 0
    writer.start(*args, wait=False)
    assert writer.proc.wait(timeout=limit(60)) == 2, writer.log.read_text()
    return writer.log.read_text()[offset:]


def test_corrupt_state_file_is_refused_then_restored_from_prev(writer_factory):
    w = writer_factory(reconcile=60.0)
    create(w, "web", {"host": "10.77.0.1", "port": 80},
           {"a": {"host": "10.77.1.1", "port": 8080, "weight": 5},
            "b": {"host": "10.77.1.2", "port": 8080, "method": "dr"}})
    # The last write: .prev now holds web with a and b, and not this service.
    create(w, "extra", {"host": "10.77.0.2", "port": 80}, {})
    web = w.must("service.get", {"service": "web"})["data"]
    w.stop()
    prev = w.state_file.with_name("state.json.prev")
    assert set(json.loads(prev.read_bytes())["services"]) == {"web"}
    kernel = services(w.ns)
    assert set(kernel) == {"TCP 10.77.0.1:80", "TCP 10.77.0.2:80"}

    w.state_file.write_bytes(GARBAGE)
    log = failed_start(w)
    assert str(w.state_file) in log, log
    assert "--restore-previous" in log and str(prev) in log, log
    assert services(w.ns) == kernel  # a refused start changes nothing in the kernel

    # Empty the kernel, so that everything served next must come from .prev.
    sh("ipvsadm -C", ns=w.ns)
    w.start("--restore-previous")
    assert last_start(w) == (1, 3, 0)
    assert w.must("service.list", {})["data"] == {"services": ["web"]}
    assert w.must("service.get", {"service": "web"})["data"] == web
    assert services(w.ns) == {"TCP 10.77.0.1:80": ("wrr", {"10.77.1.1:8080": ("Masq", 5),
                                                           "10.77.1.2:8080": ("Route", 100)})}
    corrupt = [p for p in w.state_file.parent.iterdir() if "corrupt" in p.name]
    assert len(corrupt) == 1 and re.fullmatch(r"state\.json\.corrupt-\d+", corrupt[0].name), corrupt
    assert corrupt[0].read_bytes() == GARBAGE
    assert set(json.loads(w.state_file.read_bytes())["services"]) == {"web"}


def test_corrupt_state_file_without_prev_refuses_and_leaves_the_kernel_alone(writer_factory):
    w = writer_factory(start=False)
    sh(MAKE_FOREIGN, ns=w.ns)
    w.state_file.parent.mkdir(parents=True)
    w.state_file.write_bytes(GARBAGE)

    # Even --flush is not carried out: the state file is read before the kernel is opened.
    log = failed_start(w, "--flush")
    assert str(w.state_file) in log, log
    assert "no previous copy exists" in log, log
    assert services(w.ns) == FOREIGN
    # --restore-previous has nothing to restore from: refused too, and the file is left alone.
    log = failed_start(w, "--restore-previous")
    assert "no previous copy exists" in log, log
    assert services(w.ns) == FOREIGN
    assert sorted(p.name for p in w.state_file.parent.iterdir()) == ["state.json"]
    assert w.state_file.read_bytes() == GARBAGE


def test_state_survives_sigkill(writer_factory):
    w = writer_factory(reconcile=60.0)
    create(w, "web", {"host": "10.77.0.1", "port": 80, "method": "rr"},
           {"a": {"host": "10.77.1.1", "port": 8080, "weight": 5},
            "b": {"host": "10.77.1.2", "port": 80, "method": "dr", "upper_threshold": 9}})
    create(w, "dns", {"host": "10.77.0.1", "port": 53, "protocol": "udp", "method": "sh",
                      "flags": "sh-port", "persistent": True, "timeout": 60, "netmask": 24},
           {"gue": {"host": "10.77.1.3", "port": 53, "method": "tunnel", "tunnel_type": "gue",
                    "tunnel_port": 6080, "tunnel_flags": "csum"}})
    create(w, "mark6", {"fwmark": 8, "family": "ipv6", "method": "lc"},
           {"a": {"host": "2001:db8:1::8", "port": 80, "method": "dr", "weight": 9}})
    w.must("backend.update", {"service": "web", "backend": "a", "weight": 0})
    names = w.must("service.list", {})["data"]
    views = {v: w.must("service.get", {"service": v})["data"] for v in names["services"]}
    kernel = [listing(w.ns, *opts) for opts in ((), ("--thresholds",), ("--tun-info",))]
    assert len(kernel[0]) == 3
    assert kernel[0]["TCP 10.77.0.1:80"]["dests"]["10.77.1.1:8080"][:2] == ["Masq", "0"]  # drained

    assert w.kill() == -9
    w.stop()  # drop the bus client of the dead process
    w.start()
    assert last_start(w) == (3, 0, 0)  # the saved state matches the kernel entry for entry
    assert w.must("service.list", {})["data"] == names
    assert {v: w.must("service.get", {"service": v})["data"] for v in names["services"]} == views
    assert [listing(w.ns, *opts) for opts in ((), ("--thresholds",), ("--tun-info",))] == kernel


def test_a_full_file_system_refuses_changes_and_leaves_kernel_and_writer_alone(writer_factory):
    """The state file's file system fills up: every change is refused with errno ``state`` (the
    API's 500) before the kernel is touched, the writer keeps running and answering reads, and
    once there is room again the next change goes through and is saved."""
    w = writer_factory(reconcile=60.0, start=False)
    state_dir = w.state_file.parent
    state_dir.mkdir(parents=True)
    sh(f"mount -t tmpfs -o size=64k tmpfs {state_dir}")
    try:
        w.start()
        create(w, "web", {"host": "10.77.0.1", "port": 80}, {"a": {"host": "10.77.1.1",
                                                                     "port": 8080}})
        kernel = services(w.ns)
        sh(f"dd if=/dev/zero of={state_dir}/filler bs=4k 2>/dev/null", check=False)
        for type_, body in (
                ("service.create", {"service": "api", "options": {"host": "10.77.0.2",
                                                                   "port": 80}}),
                ("backend.update", {"service": "web", "backend": "a", "weight": 3}),
                ("backend.delete", {"service": "web", "backend": "a"})):
            reply = w.request(type_, body)
            assert reply["ok"] is False and reply["errno"] == "state", reply
            assert "No space left on device" in reply["reason"], reply
        assert services(w.ns) == kernel  # nothing reached the kernel
        assert w.proc.poll() is None, w.log.read_text()
        assert w.must("service.list", {})["data"] == {"services": ["web"]}
        assert "refused a batch of 1 request(s)" in w.log.read_text()

        (state_dir / "filler").unlink()
        w.must("backend.update", {"service": "web", "backend": "a", "weight": 3})
        assert services(w.ns)["TCP 10.77.0.1:80"][1]["10.77.1.1:8080"] == ("Masq", 3)
        saved = json.loads(w.state_file.read_bytes())["services"]
        assert saved["web"]["backends"]["a"]["options"]["weight"] == 3
    finally:
        w.stop()
        sh(f"umount {state_dir}", check=False)


def test_the_journal_survives_sigkill_a_torn_record_and_compactions(writer_factory):
    """With the journal limit at 0 (compaction whenever the journal outgrows the snapshot), a run
    of commits compacts in the background several times; a SIGKILL, then a torn record at the
    end of the journal (a crash mid-append): the restarted writer drops that record with a log
    line and has every answered commit, the kernel entry for entry."""
    w = writer_factory(reconcile=60.0, start=False)
    w.workdir.joinpath("gorb.toml").write_text("[writer]\njournal_max_bytes = 0\n")
    w.extra_args = ["--config", str(w.workdir / "gorb.toml")]
    w.start()
    create(w, "web", {"host": "10.77.0.1", "port": 80},
           {f"b{i}": {"host": f"10.77.1.{i + 1}", "port": 8080} for i in range(20)})
    for i in range(40):
        w.must("backend.update", {"service": "web", "backend": f"b{i % 20}", "weight": i + 1})
    view = w.must("service.get", {"service": "web"})["data"]
    kernel = services(w.ns)
    assert kernel["TCP 10.77.0.1:80"][1]["10.77.1.20:8080"] == ("Masq", 40)
    # (A compaction still running would have the commits in .journal.next: let it finish, so
    # that the torn record below lands in the journal the restart appends to.)
    following = w.state_file.with_name("state.json.journal.next")
    wait_until(lambda: not following.exists(), 10, "the compaction to finish")
    assert w.kill() == -9
    w.stop()
    assert json.loads(w.state_file.read_bytes())["generation"] > 2  # compactions ran
    journal = w.state_file.with_name("state.json.journal")
    with open(journal, "ab") as f:  # an append a crash cut short
        f.write(b"GJr1\x00\x10\x00\x00\x12\x34\x56\x78" + b'{"put":{"web":{"opt')
    w.start()
    assert last_start(w) == (1, 0, 0)
    assert "dropped a torn last record" in w.log.read_text()
    assert w.must("service.get", {"service": "web"})["data"] == view
    assert services(w.ns) == kernel
    w.must("backend.update", {"service": "web", "backend": "b0", "weight": 7})
    w.stop()  # a clean stop: the whole state in the snapshot, the journal empty
    saved = json.loads(w.state_file.read_bytes())["services"]
    assert saved["web"]["backends"]["b0"]["options"]["weight"] == 7
    assert journal.stat().st_size == 4096
