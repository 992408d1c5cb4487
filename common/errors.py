"""The one errno table of gorb.

Every reply on the bus carries one of these symbolic errnos; the API maps them to HTTP statuses
(GORB-compatible: 400 invalid input, 404 unknown object, 409 duplicate, 500 kernel failure).
The texts in ``MESSAGES`` are GORB's own where GORB had one, so clients matching on them keep working.
"""

from __future__ import annotations

OK = "ok"
INVALID = "invalid"          # bad input: validation failed
NOT_FOUND = "not_found"      # unknown service or backend
EXISTS = "exists"            # duplicate id or duplicate kernel key
KERNEL = "kernel"            # netlink refused the operation
UNAVAILABLE = "unavailable"  # a peer (the writer) did not answer in time
STATE = "state"              # the writer could not save its state file: nothing was changed
INTERNAL = "internal"        # a bug: logged with a traceback on the side that hit it

HTTP_STATUS = {
    OK: 200,
    INVALID: 400,
    NOT_FOUND: 404,
    EXISTS: 409,
    KERNEL: 500,
    UNAVAILABLE: 503,
    STATE: 500,
    INTERNAL: 500,
}

# GORB's error texts (gorb-spec §2.9), verbatim.
MSG_ENDPOINT_MISSING = "endpoint information is missing"
MSG_UNKNOWN_FORWARD = "specified forwarding method is unknown"
MSG_UNKNOWN_PROTOCOL = "specified protocol is unknown"
MSG_UNKNOWN_FLAG = "specified flag is unknown"
MSG_AF_MISMATCH = "incompatible address families"
MSG_UNKNOWN_PULSE = "specified pulse type is unknown"
MSG_PULSE_INTERVAL = "pulse interval must be positive"
MSG_INTERVAL_FORMAT = "invalid interval format"
MSG_EXISTS = "specified object already exists"
MSG_NOT_FOUND = "unable to locate specified object"
MSG_IPVS = "error while calling into IPVS"

MESSAGES = {
    NOT_FOUND: MSG_NOT_FOUND,
    EXISTS: MSG_EXISTS,
    KERNEL: MSG_IPVS,
}


class GorbError(Exception):
    """An error that becomes an error reply: ``errno`` from this table, ``reason`` for humans."""

    def __init__(self, errno: str, reason: str | None = None):
        if errno not in HTTP_STATUS or errno == OK:
            raise ValueError(f"not an error errno: {errno!r}")
        self.errno = errno
        self.reason = reason or MESSAGES.get(errno, errno)
        super().__init__(self.reason)


def invalid(reason: str) -> GorbError:
    return GorbError(INVALID, reason)
