"""The journal's byte format: framing, torn-tail detection, damage in the middle, and a fuzzed
reader (arbitrary trailing bytes give the records up to the last whole one, or a typed error)."""

from __future__ import annotations

import struct
import zlib

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gorb.services.ipvs_writer import journal
from gorb.services.ipvs_writer.journal import BLOCK, JournalCorrupt, frame, scan

pytestmark = pytest.mark.timeout(60)


def batch(put: dict[str, dict] | None = None, delete: tuple[str, ...] = ()) -> bytes:
    return journal.batch_payload(((v, msgspec.json.encode(r)) for v, r in (put or {}).items()),
                                 delete)


PAYLOADS = [batch({"web": {"a": 1}}), batch(delete=("web",)),
            batch({"big": {"x": "y" * (3 * BLOCK)}}), batch()]
GOOD = journal.header(7) + b"".join(frame(p) for p in PAYLOADS)
LAST = b'{"put":{},"delete":["x"]}'


def test_a_record_fills_whole_blocks_and_reads_back():
    for payload in [*PAYLOADS, b"", b"x" * BLOCK]:
        data = frame(payload)
        assert len(data) % BLOCK == 0 and len(data) >= 12 + len(payload)
        assert data[:4] == journal.MAGIC
        assert struct.unpack_from("<II", data, 4) == (len(payload), zlib.crc32(payload))
        assert scan(data) == journal.Scan([payload], [0], len(data))


def test_read_gives_generation_and_batches():
    generation, batches, found = journal.read(GOOD)
    assert generation == 7
    assert found.end == len(GOOD) and found.torn is None
    assert [msgspec.json.decode(r) for r in batches[0].put.values()] == [{"a": 1}]
    assert batches[1] == journal.Batch({}, ["web"])
    assert len(batches) == 4 and batches[3] == journal.Batch()


def test_batch_payload_is_json_of_whole_services():
    assert msgspec.json.decode(batch({"a": {"x": 1}, "b b": {}}, ("c",))) == {
        "put": {"a": {"x": 1}, "b b": {}}, "delete": ["c"]}


@pytest.mark.parametrize("cut", [1, 11, 12, 13, 12 + len(LAST) - 1])
def test_a_torn_last_record_is_dropped_and_said(cut):
    found = scan(GOOD + frame(LAST)[:cut])
    assert found.payloads == scan(GOOD).payloads
    assert found.end == len(GOOD)
    assert found.torn and f"at byte {len(GOOD)}" in found.torn


@pytest.mark.parametrize("cut", [12 + len(LAST), BLOCK - 1])
def test_a_last_record_whose_padding_was_cut_is_kept(cut):
    found = scan(GOOD + frame(LAST)[:cut])
    assert found.payloads[-1] == LAST and found.torn is None
    assert found.end == len(GOOD) + BLOCK  # the next record starts on its block boundary


@pytest.mark.parametrize("tail, why", [
    (bytes(BLOCK), "no record mark"),  # a crash after the size grew, before the data landed
    (frame(b'{"put":{}}')[:20] + bytes(BLOCK), "a checksum mismatch"),
    (journal.MAGIC + struct.pack("<II", 1 << 30, 0), "of which 0 were written"),
])
def test_a_tail_of_zeros_or_garbage_is_a_torn_record(tail, why):
    found = scan(GOOD + tail)
    assert found.end == len(GOOD) and why in found.torn


def test_a_damaged_record_in_the_middle_is_an_error_naming_it():
    records = [journal.header(1)] + [frame(p) for p in PAYLOADS]
    offset = len(records[0]) + len(records[1])
    data = bytearray(b"".join(records))
    data[offset + 20] ^= 0xFF  # inside the second batch's payload
    with pytest.raises(JournalCorrupt) as exc:
        scan(bytes(data))
    assert exc.value.offset == offset
    assert "a checksum mismatch, yet a whole record follows" in str(exc.value)


@pytest.mark.parametrize("data, why", [
    (b"", "no header"),
    (frame(b"[1]"), "bad header"),
    (frame(b'{"journal": 2, "generation": 1}'), "unknown journal version 2"),
    (journal.header(1) + frame(b'{"put": []}'), "record 1: Expected `object`"),
])
def test_read_refuses_what_is_not_a_journal(data, why):
    with pytest.raises(JournalCorrupt) as exc:
        journal.read(data)
    assert why in str(exc.value)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tail=st.one_of(
    st.binary(max_size=3 * BLOCK),
    st.builds(lambda p, cut, junk: frame(p)[:cut] + junk,
              st.binary(max_size=BLOCK), st.integers(0, 2 * BLOCK), st.binary(max_size=64)),
    st.builds(lambda n, junk: bytes(n) + junk, st.integers(0, 2 * BLOCK),
              st.binary(max_size=64))))
def test_fuzz_trailing_bytes_give_the_last_whole_record_or_a_typed_error(tail):
    good = journal.read(GOOD)
    try:
        generation, batches, found = journal.read(GOOD + tail)
    except JournalCorrupt as exc:
        assert exc.offset >= len(GOOD)  # only the added bytes can be damaged
        return
    assert generation == 7
    assert batches[:len(good[1])] == good[1]  # every record before the tail, unchanged
    assert found.end >= len(GOOD) and found.end % BLOCK == 0


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2 * BLOCK + 100), flips=st.lists(
    st.tuples(st.integers(0, len(GOOD) - 1), st.integers(1, 255)), max_size=4))
def test_fuzz_any_bytes_and_any_damage_give_a_result_or_a_typed_error(data, flips):
    damaged = bytearray(GOOD)
    for at, bits in flips:
        damaged[at] ^= bits
    for candidate in (data, bytes(damaged)):
        try:
            journal.read(candidate)
        except JournalCorrupt:
            pass
