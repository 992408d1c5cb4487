"""``python -m gorb.services.launcher``: the same as the ``gorb`` console script."""

import sys

from gorb.services.launcher.main import main

sys.exit(main())
