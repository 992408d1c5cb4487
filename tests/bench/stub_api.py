"""The API's HTTP layer alone: gorb's routes (``gorb.services.api.app``) served exactly as
``gorb.services.api.main`` serves them (``gorb.services.api.server`` with the default settings, the same
logging), with a writer client that answers every request at once without a bus. What one
request costs the API process before any ZeroMQ work: the floor under ``api`` in
``bench_api.py``.

    python -m tests.bench.stub_api PORT
"""

from __future__ import annotations

import sys

from gevent import monkey

monkey.patch_all()

from gorb.common import config, logs  # noqa: E402
from gorb.services.api.app import build  # noqa: E402
from gorb.services.api.server import Server  # noqa: E402

OK = {"ok": True, "errno": "ok", "reason": "", "data": None}


class InstantWriter:
    """Answers like a writer that accepts everything, with no bus."""

    stale_replies = bad_replies = 0

    def request(self, type_, body, timeout=None):
        return OK


def main() -> int:
    logs.setup("info")
    _, wsgi = build(InstantWriter(), lambda host: host)
    defaults = config.ApiSection()
    Server(("127.0.0.1", int(sys.argv[1])), wsgi, defaults.idle_timeout,
           defaults.max_connections).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
