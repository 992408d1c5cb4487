"""``python -m gorb.services.ipvs_writer``: the same as the ``gorb-ipvs-writer`` console script."""

import sys

from gorb.services.ipvs_writer.main import main

sys.exit(main())
