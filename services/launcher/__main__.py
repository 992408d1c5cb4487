"""``python -m services.launcher``: the same as the ``gorb`` console script."""

import sys

from services.launcher.main import main

sys.exit(main())
