"""The API's HTTP layer alone: gorb's routes (``services.api.app``) served exactly as
``services.api.main`` serves them (gevent's WSGIServer, the same handler and logging), with a
writer client that answers every request at once without a bus. What one request costs the API
process before any ZeroMQ work: the floor under ``api`` in ``bench_api.py``.

    python -m tests.bench.stub_api PORT
"""

from __future__ import annotations

import sys

from gevent import monkey

monkey.patch_all()

from gevent.pool import Pool  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

from common import logs  # noqa: E402
from services.api.app import build  # noqa: E402
from services.api.main import Handler, log  # noqa: E402

OK = {"ok": True, "errno": "ok", "reason": "", "data": None}


class InstantWriter:
    """Answers like a writer that accepts everything, with no bus."""

    stale_replies = bad_replies = 0

    def request(self, type_, body, timeout=None):
        return OK


def main() -> int:
    logs.setup("info")
    _, wsgi = build(InstantWriter(), lambda host: host)
    WSGIServer(("127.0.0.1", int(sys.argv[1])), wsgi, log=None, error_log=log, spawn=Pool(),
               handler_class=Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
