"""One error for a peer that does not answer, one for a peer that refuses: every bus client
raises ``PeerUnavailable`` (or a subclass naming the peer) and reads replies with
``messages.data_of``."""

from __future__ import annotations

import pytest

from gorb.common import messages
from gorb.common.transport import PeerUnavailable, TransportError, TransportTimeout
from gorb.services.api.discovery_client import DiscoveryUnavailable
from gorb.services.api.writer_client import WriterUnavailable
from gorb.services.discovery.syncer import Unavailable


@pytest.mark.parametrize("cls", [TransportTimeout, WriterUnavailable, DiscoveryUnavailable,
                                 Unavailable])
def test_every_peer_that_does_not_answer_is_a_peer_unavailable(cls):
    assert issubclass(cls, PeerUnavailable) and issubclass(cls, TransportError)


def test_data_of_a_reply():
    assert messages.data_of("service.list", messages.ok({"services": []})) == {"services": []}
    with pytest.raises(messages.Refused) as err:
        messages.data_of("service.get", {"ok": False, "errno": "not_found",
                                         "reason": "unable to locate specified object",
                                         "data": None})
    assert (err.value.errno, err.value.reason) == ("not_found",
                                                   "unable to locate specified object")
    assert "service.get refused" in str(err.value)


@pytest.mark.parametrize("junk", [None, [], {"data": 1}, {"ok": "yes"}])
def test_what_is_not_a_reply_is_refused_as_invalid(junk):
    with pytest.raises(messages.Refused) as err:
        messages.data_of("state.dump", junk)
    assert err.value.errno == "invalid"
