"""Hooks for every test folder: the machine's pace (``tests/pace.py``) in the run's output, and
pytest-timeout's per-test deadlines (the ``timeout`` marks and the ini default) scaled by it."""

from __future__ import annotations

import pytest
from pytest_timeout import get_env_settings

from tests import pace


def pytest_report_header(config):
    return str(pace.speed())


def pytest_terminal_summary(terminalreporter):
    if not terminalreporter.showheader:  # -q: no header, so the figures go at the end
        terminalreporter.write_line(str(pace.speed()))


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    default = get_env_settings(config).timeout
    for item in items:
        mark = item.get_closest_marker("timeout")
        args, kwargs = (list(mark.args), dict(mark.kwargs)) if mark else ([], {})
        seconds = kwargs.pop("timeout", args.pop(0) if args else default)
        if seconds:  # 0 or None: no deadline
            item.add_marker(pytest.mark.timeout(pace.limit(float(seconds)), *args, **kwargs),
                            append=False)
