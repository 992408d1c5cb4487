"""``python -m services.ipvs_writer``: the same as the ``gorb-ipvs-writer`` console script."""

import sys

from services.ipvs_writer.main import main

sys.exit(main())
