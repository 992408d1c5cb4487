"""Helpers (no tests) for the API's service tests: a real ``WriterLoop`` over ipc:// in a thread on
a fake kernel, the API as a real ``python -m gorb.services.api`` process, and a tiny HTTP client.

The writer thread restarts like the real process does: the kernel (``FakeKernel``) outlives it,
and a new engine loads the state file the old one wrote.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


from gorb.common import runtime
from tests.pace import limit, wait_until
from tests.service.fake_kernel import FakeKernel
from tests.service.writer_thread import WriterThread as SharedWriterThread

ROOT = Path(__file__).resolve().parents[2]
DEVICE_ADDRESS = "10.0.0.100"  # the writer's "-i device" address for services without host


class StatsKernel(FakeKernel):
    """A FakeKernel whose entries carry statistics, as the real kernel's dump does: ``stats`` maps
    a service key to its counters, ``dest_stats`` a (service key, dest key) to a dest's."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stats: dict = {}
        self.dest_stats: dict = {}

    def _with_stats(self, svc):
        if svc is not None:
            svc.stats = self.stats.get(svc.key)
            for dkey, d in svc.dests.items():
                d.stats = self.dest_stats.get((svc.key, dkey))
        return svc

    def dump(self):
        return {k: self._with_stats(s) for k, s in super().dump().items()}

    def service(self, svc):
        return self._with_stats(super().service(svc))


class AnyScheduler(frozenset):
    """Every scheduler name is loadable (for the fuzz: the kernel's ENOENT is not the API's bug)."""

    def __contains__(self, item):
        return True


class WriterThread(SharedWriterThread):
    """The shared writer scaffold with the API tests' defaults: a kernel that reports counters
    and the -i device's address."""

    def __init__(self, rundir: str, state_file: Path | None = None,
                 kernel: FakeKernel | None = None, default_address: str = DEVICE_ADDRESS):
        super().__init__(rundir, state_file, kernel if kernel is not None else StatsKernel(),
                         default_address)


@contextlib.contextmanager
def short_rundir():
    """A runtime dir under /tmp: pytest's tmp_path can exceed the 107-byte ipc path limit."""
    d = tempfile.mkdtemp(prefix="gorb-api-", dir="/tmp")
    try:
        yield str(runtime.ensure_runtime_dir(os.path.join(d, "run"), 0o700))
    finally:
        shutil.rmtree(d, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hashed_resolve(host: str) -> str:
    """A resolver without DNS: an IP literal as is, any other well-formed host name to a fixed
    address derived from it (10.200.x.y), names containing "nosuch" to Go's "no such host"."""
    from gorb.common.errors import invalid
    from gorb.common.resolver import resolve_host

    def getaddrinfo(name, port, family, kind):
        if "nosuch" in name or not name or len(name) > 253 or " " in name:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        digest = hashlib.sha256(name.encode("utf-8", "replace")).digest()
        return [(socket.AF_INET, kind, 6, "", (f"10.200.{digest[0]}.{digest[1]}", 0))]

    try:
        return resolve_host(host, getaddrinfo=getaddrinfo)
    except UnicodeError:
        raise invalid(f"lookup {host}: no such host") from None


class ApiProcess:
    """``python -m gorb.services.api --config <file>`` on a free loopback port; with ``resolver``
    (e.g. ``"tests.service.test_api_support:hashed_resolve"``) the same ``main`` is started with
    that resolver instead of DNS. ``tls`` is the client context for an API serving HTTPS and
    ``headers`` go with the start-up probe (a token)."""

    def __init__(self, rundir: str, workdir: Path, writer_timeout: float = 1.0,
                 resolver: str | None = None, log_level: str = "warning",
                 tls: ssl.SSLContext | None = None, headers: dict[str, str] | None = None,
                 **api: object):
        self.tls = tls
        self.port = free_port()
        self.config = workdir / "gorb.toml"
        extra = "".join(f"{k} = {v}\n" for k, v in api.items())  # more [api] keys
        self.config.write_text(
            f'[gorb]\nruntime_dir = "{rundir}"\nlog_level = "{log_level}"\n\n'
            f'[api]\nlisten = "127.0.0.1:{self.port}"\nwriter_timeout = {writer_timeout}\n'
            + extra)
        self.log_path = workdir / "api.log"
        self.log = open(self.log_path, "wb")
        env = {k: v for k, v in os.environ.items() if not k.startswith("GORB_")}
        argv = ["-m", "gorb.services.api"]
        if resolver is not None:
            module, name = resolver.split(":")
            argv = ["-c", "from gevent import monkey; monkey.patch_all(); import sys; "
                          f"from gorb.services.api.main import main; from {module} import {name}; "
                          f"sys.exit(main(sys.argv[1:], {name}))"]
        self.proc = subprocess.Popen(
            [sys.executable, *argv, "--config", str(self.config)],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.base = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        wait_up(self.proc, self.port, self.output, tls=tls, headers=headers)

    def output(self) -> str:
        """What the process logged so far."""
        return self.log_path.read_bytes().decode(errors="replace")

    def stop(self) -> int:
        """SIGTERM and the exit code (killed after a limit of 10 s)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(limit(10))
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def wait_up(proc: subprocess.Popen, port: int, output: Callable[[], str], **kw) -> None:
    """Until the API on ``port`` answers ``GET /openapi.json`` (``kw``: ``request``'s ``tls``,
    ``headers``); failing at once when ``proc`` exits, with ``output()``."""
    def up() -> bool:
        assert proc.poll() is None, f"the API exited: {output()}"
        try:
            return request("GET", port, "/openapi.json", timeout=1, **kw)[0] == 200
        except OSError:
            return False
    wait_until(up, 15, lambda: f"the API to come up: {output()}")


def request(method: str, port: int, path: str, body: object = None, timeout: float = 10.0,
            conn: http.client.HTTPConnection | None = None, tls: ssl.SSLContext | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP request (HTTPS with the client context ``tls``);
    ``body`` is JSON-encoded unless bytes; ``timeout`` is a limit (scaled by the pace)."""
    own = conn is None
    if conn is None:
        t = limit(timeout)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=t) if tls is None \
            else http.client.HTTPSConnection("127.0.0.1", port, timeout=t, context=tls)
    try:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        if own:
            conn.close()
