"""``ipvs-writer`` over ``tests.service.fake_kernel.FakeKernel``: the real process (loop, engine,
state file, bus) with the kernel's table kept in memory, for benchmarks on a host without IPVS
(``tests/bench/bench_api.py --host``). Same arguments as ``python -m gorb.services.ipvs_writer``."""

from __future__ import annotations

import sys

from gorb.services.ipvs_writer.main import main
from tests.service.fake_kernel import FakeKernel


if __name__ == "__main__":
    kernel = FakeKernel()
    sys.exit(main(kernel_factory=lambda cfg: kernel, reader_kernel=lambda cfg, k: k))
