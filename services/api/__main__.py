"""``python -m gorb.services.api``: the ``gorb-api`` program, gevent-patched before anything else."""

import sys


def run() -> int:
    """The console script: gevent patches first (here only), then the program."""
    from gevent import monkey

    monkey.patch_all()
    from gorb.services.api.main import main

    return main()


if __name__ == "__main__":
    sys.exit(run())
