"""``python -m services.pulse_worker``: gevent patches first (here only), then the worker."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

from services.pulse_worker.main import main  # noqa: E402

sys.exit(main())
