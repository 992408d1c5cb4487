"""The control socket: a ROUTER at ``ipc://<runtime_dir>/discovery/discovery.sock`` answering the store
family of ``gorb.common.store_messages`` (``store.sync``, ``store.status``) for the API.

Requests are handed to the sync loop, which runs them one at a time between its own rounds, so a
``store.sync`` never overlaps another round. With no store configured every request is answered
``not_found`` (the API's 404, as qk4l's routes without a store). A request that is not an
envelope is dropped and counted by the transport; an unknown type or a bad body is ``invalid``.
"""

from __future__ import annotations

import logging

from gorb.common import errors, messages, store_messages
from gorb.common.errors import GorbError
from gorb.common.transport import RouterServer

log = logging.getLogger("discovery")
SRC = "discovery"


class ControlServer:
    def __init__(self, router: RouterServer, syncer=None):
        self.router = router
        self.syncer = syncer
        self.served = 0

    def handle(self, type_: str, body: dict) -> dict:
        try:
            req = store_messages.decode_request(type_, body)
        except GorbError as err:
            return messages.fail(err)
        if self.syncer is None:
            return messages.fail(GorbError(errors.NOT_FOUND))
        return self.syncer.request(req)

    def loop(self) -> None:
        while True:
            got = self.router.recv(timeout=None)
            if got is None:
                continue
            identity, env = got
            reply = self.handle(env.type, env.body)
            self.router.reply(identity, env, reply, SRC)
            self.served += 1
