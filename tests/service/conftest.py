"""Fixtures shared by the service tests of discovery and the /store routes."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from tests.consul_double import ConsulDouble


@pytest.fixture
def base():
    """A short directory under /tmp (ipc:// paths must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="gorb-d-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def consul():
    """The Consul double on a free port, without blocking-query jitter (exact wait times)."""
    with ConsulDouble(jitter=False) as double:
        yield double
