"""Logging for every gorb process: one line per record on stderr (supervisord keeps it), in one
format, ``<time> <logger> <LEVEL> <message>``.

The record fields gorb's format does not print are not collected: the process and thread ids
and the caller's file and line (the logging HOWTO's "Optimization"). Each would be a system call
or a stack walk per record, and the API writes two records per change it serves.
"""

from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


def setup(level: str | int) -> None:
    logging.logProcesses = False
    logging.logThreads = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # no findCaller: the format has no %(pathname)s / %(lineno)d
    logging.basicConfig(level=level.upper() if isinstance(level, str) else level, format=FORMAT)
