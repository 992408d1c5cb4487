"""The writer on a real kernel: create, read back, bad input, drift (first checks)."""

from tests.sandbox.conftest import ipvsadm


def test_service_and_backend_reach_the_kernel(writer):
    writer.must("service.create", {"service": "web", "options": {"host": "10.77.0.100", "port": 80}})
    writer.must("backend.create", {"service": "web", "backend": "a",
                                   "options": {"host": "10.77.1.2", "port": 8080, "weight": 5}})
    table = ipvsadm(writer.ns)
    assert table == {"TCP 10.77.0.100:80": {"sched": "wrr", "flags": "",
                                            "dests": {"10.77.1.2:8080": ("Masq", 5)}}}
