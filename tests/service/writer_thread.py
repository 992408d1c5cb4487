"""A writer's objects (engine over a hand-written fake kernel, WriterLoop) with the loop in a
thread: the one scaffold every service-level test uses to stand in for the ipvs-writer process."""

from __future__ import annotations

import threading
from pathlib import Path

import zmq

from gorb.common import runtime
from gorb.common.envelope import Envelope, encode
from gorb.services.ipvs_writer import state
from gorb.services.ipvs_writer.engine import Engine
from gorb.services.ipvs_writer.loop import WriterLoop
from tests.pace import limit
from tests.service.fake_kernel import FakeKernel


class WriterThread:
    """``start`` builds a new engine from the state file over the same kernel (so ``restart`` is a
    writer restart); ``stop`` fails the test if the loop crashed or did not stop."""

    def __init__(self, rundir: str, state_file: Path | None = None,
                 kernel: FakeKernel | None = None, default_address: str = "",
                 reconcile_interval: float = 3600.0):
        self.rundir = rundir
        self.state_file = state_file
        self.kernel = kernel if kernel is not None else FakeKernel()
        self.default_address = default_address
        self.reconcile_interval = reconcile_interval
        self.endpoint = runtime.endpoint(rundir, runtime.WRITER)
        self.start()

    def start(self) -> None:
        self.ctx = zmq.Context()
        path = self.state_file
        self.store = state.Store(path) if path is not None else None
        services = self.store.open() if self.store is not None else {}
        persist = self.store if self.store is not None else (lambda s: None)
        self.engine = Engine(services, self.kernel, persist, lambda: self.default_address)
        self.engine.start()  # the first ``applied`` batch: the kernel as the state file has it
        self.loop = WriterLoop(self.engine, self.ctx, self.rundir, self.reconcile_interval)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="writer-loop", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run()
        except BaseException as exc:  # surfaced by stop(): a crashed loop fails the test
            self.error = exc

    def stop(self) -> None:
        self.loop.running = False
        # The loop acts on the flag when its poll returns (within 0.5 s); a request wakes it now.
        with self.ctx.socket(zmq.DEALER) as waker:
            waker.setsockopt(zmq.LINGER, 0)
            waker.connect(self.endpoint)
            waker.send(encode(Envelope.new("service.list", {}, "test-stop")))
            self.thread.join(limit(5))
        assert not self.thread.is_alive(), "the writer loop did not stop"
        self.loop.close()
        self.ctx.destroy(linger=0)
        if self.store is not None:
            self.store.close()
        assert self.error is None, self.error

    def restart(self) -> None:
        self.stop()
        self.start()
