"""Schemathesis against the live API (``python -m gorb.services.api``) from its own ``/openapi.json``,
with a real WriterLoop (up the whole time) on a fake kernel that loads any scheduler: bounded and
seeded, so it is deterministic.

Every check runs but ``positive_data_acceptance``: GORB's contract has rules a JSON Schema cannot
state (a host must resolve; ``timeout``/``netmask`` only with ``persistent``; a backend's
address family must be its service's; ``rise`` between 1 and 100 ...), so schema-valid bodies can
rightly get GORB's 400s. What must hold: no 5xx at all (the writer is up, so not even the
documented 503), no dropped connection, every status and body as documented, schema-invalid input
refused, deleted objects gone, and no traceback in the API's log. Host names resolve without DNS
(``hashed_resolve``), so the run neither needs nor waits for a network.
"""

from __future__ import annotations

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.pace import limit
from tests.service.test_api_support import (
    AnyScheduler,
    ApiProcess,
    StatsKernel,
    WriterThread,
    short_rundir,
)

pytestmark = pytest.mark.timeout(180)

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


def test_schemathesis_finds_no_server_error_and_no_dropped_connection(tmp_path):
    report = tmp_path / "junit.xml"
    with short_rundir() as rundir:
        kernel = StatsKernel()
        kernel.schedulers = AnyScheduler()  # an unknown scheduler is the kernel's 500, by design
        writer = WriterThread(rundir, kernel=kernel)
        # host names resolve without DNS: the fuzz must not depend on (or wait for) a network
        api = ApiProcess(rundir, tmp_path, writer_timeout=limit(5.0),
                         resolver="tests.service.test_api_support:hashed_resolve")
        try:
            proc = subprocess.run(
                [str(SCHEMATHESIS), "run", f"{api.base}/openapi.json",
                 "--checks", "all", "--exclude-checks", "positive_data_acceptance",
                 "--max-examples", "30", "--seed", "1", "--workers", "1",
                 "--request-timeout", f"{limit(10):.1f}", "--report", "junit",
                 "--report-junit-path", str(report)],
                cwd=tmp_path, capture_output=True, timeout=limit(150))
            writer_alive = writer.thread.is_alive()
        finally:
            code = api.stop()
            writer.stop()
    out = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    assert writer_alive
    assert proc.returncode == 0, out[-6000:]
    cases = ET.parse(report).getroot().iter("testcase")
    names = [c.get("name") for c in cases]
    assert len(names) >= 11, names  # every operation was exercised
    log = api.output()
    assert "Traceback" not in log and "internal error" not in log, log[-4000:]
    assert code == 0
