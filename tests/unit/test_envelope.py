"""The bus envelope: msgpack round trip and loud rejection of anything that is not a v1 envelope."""

import msgpack
import pytest

from gorb.common.envelope import (
    PROTOCOL_VERSION,
    Envelope,
    EnvelopeError,
    decode,
    encode,
    new_id,
)

pytestmark = pytest.mark.timeout(5)


def _raw(**overrides):
    obj = {"v": 1, "type": "service.create", "id": "a-1", "src": "api", "body": {"x": 1}}
    obj.update(overrides)
    return obj


def _pack(obj):
    return msgpack.packb(obj, use_bin_type=True)


def test_round_trip():
    env = Envelope(PROTOCOL_VERSION, "service.create", "a-1", "api",
                   {"name": "web", "port": 80, "blob": b"\x00\xff", "n": [1, 2], 443: "https"})
    assert decode(encode(env)) == env


def test_bytes_are_a_plain_msgpack_map():
    env = Envelope.new("backend.delete", {"id": "b1"}, "api")
    obj = msgpack.unpackb(encode(env), raw=False)
    assert obj == {"v": 1, "type": "backend.delete", "id": env.id, "src": "api",
                   "body": {"id": "b1"}}


def test_new_ids_are_unique_short_strings():
    ids = {new_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(isinstance(i, str) and len(i) <= 24 for i in ids)


@pytest.mark.parametrize("data, reason", [
    (b"\xc1", "not msgpack"),                       # 0xc1 is never used in msgpack
    (b"\x92\x01", "not msgpack"),                   # truncated array
    (_pack(_raw()) + b"\x00", "not msgpack"),       # trailing bytes
    (_pack([1, "service.create", "a-1", "api", {}]), "not a map"),
    (_pack("hello"), "not a map"),
    (_pack({k: v for k, v in _raw().items() if k != "id"}), "missing keys"),
    (_pack({}), "missing keys"),
    (_pack(_raw(extra=1)), "unexpected keys"),
    (_pack(_raw(v=2)), "unknown protocol version"),
    (_pack(_raw(v=0)), "unknown protocol version"),
    (_pack(_raw(v="1")), "v must be an int"),
    (_pack(_raw(v=True)), "v must be an int"),
    (_pack(_raw(type=b"service.create")), "type must be"),
    (_pack(_raw(type="")), "type must be"),
    (_pack(_raw(id=7)), "id must be"),
    (_pack(_raw(src=None)), "src must be"),
    (_pack(_raw(body=[1])), "body must be a map"),
])
def test_rejects(data, reason):
    with pytest.raises(EnvelopeError, match=reason):
        decode(data)


def test_envelope_error_is_a_value_error():
    assert issubclass(EnvelopeError, ValueError)


def test_known_types_rejects_unlisted_type():
    data = _pack(_raw(type="service.explode"))
    with pytest.raises(EnvelopeError, match="unknown message type 'service.explode'"):
        decode(data, known_types={"service.create"})
    assert decode(data).type == "service.explode"
    assert decode(_pack(_raw()), known_types=frozenset({"service.create"})).type == "service.create"
