"""``python -m services.api``: the ``gorb-api`` program, gevent-patched before anything else."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402  (after patching, on purpose)

from services.api.main import main  # noqa: E402

sys.exit(main())
