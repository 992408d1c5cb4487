"""Running a gevent process's named loops: the one place where a crashed loop ends the process.

Each long-lived loop is a named greenlet. ``run(loops, log, who)`` starts them, stops them all on
SIGTERM/SIGINT (exit 0), and when any loop ends with an exception logs it and returns 70, so
supervisord restarts the process (STYLE: a crashed loop exits the process).
"""

from __future__ import annotations

import logging
import signal

import gevent


def run(loops: list[gevent.Greenlet], log: logging.Logger, who: str) -> int:
    for g in loops:
        g.start()
    gevent.signal_handler(signal.SIGTERM, gevent.killall, loops)
    gevent.signal_handler(signal.SIGINT, gevent.killall, loops)
    gevent.joinall(loops, raise_error=False, count=1)
    crashed = [g for g in loops if g.dead and not g.successful()]
    for g in crashed:
        log.error("loop %s crashed: %r; exiting for supervisord to restart %s",
                  g.name, g.exception, who)
    gevent.killall(loops)
    return 70 if crashed else 0
