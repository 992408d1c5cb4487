"""The journal's byte format: framing, and reading back with torn-tail detection.

Pure (bytes in, bytes or values out: no files, no clock); ``state`` does the I/O.

A journal is a sequence of records, each starting on a ``BLOCK`` (4 KiB) boundary::

    offset 0 mod 4096:  b"GJr1"  uint32 length  uint32 crc32(payload)   (little-endian)
                        payload (length bytes: JSON)
                        zero bytes up to the next 4096 boundary

Record 0 is the header, ``{"journal": 1, "generation": g}``: the snapshot generation the
journal continues. Every other record is one committed batch: what it changed, as whole
service records (the same JSON as in the snapshot) and the ids of deleted services::

    {"put": {"web": ServiceRecord, ...}, "delete": ["old", ...]}

Why whole services: replay is a dict update (no per-field merge to get wrong), and replaying
records onto a state that already has them changes nothing. Why JSON and not msgpack: a
service's JSON is encoded once per (immutable) record and shared by the journal and the next
snapshot, and an operator can read a record with ``strings``.

Why 4 KiB blocks: a record never shares a block with an earlier one, so (1) an append always
needs new space: as with the whole-file save, a full file system refuses every commit (errno
``state``), not only those that happen not to fit in the slack of the last block, and a torn
write cannot touch an earlier record's block; (2) telling a torn last record from a damaged
one in the middle needs to look at block boundaries only. The cost: a commit of a small
service writes 4 KiB, which the file system would write as a whole block anyway.

Reading (``scan``): records are taken in order while they are whole (header, length within the
data, checksum). At the first one that is not: if a whole record follows it at a later block
boundary, the journal is damaged in the middle (``JournalCorrupt``, a typed error); otherwise it
is the torn tail of an append that a crash interrupted, and it is dropped (``Scan.torn`` says
why, for a log line): the batch it held was never answered, its kernel ops never sent.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import msgspec

BLOCK = 4096
MAGIC = b"GJr1"
JOURNAL_VERSION = 1
_HEAD = struct.Struct("<4sII")  # magic, payload length, crc32 of the payload


class JournalCorrupt(ValueError):
    """The journal cannot be replayed: a damaged record in the middle, or a bad payload."""

    def __init__(self, offset: int, reason: str):
        self.offset = offset
        super().__init__(f"{reason} (record at byte {offset})")


@dataclass(frozen=True)
class Scan:
    payloads: list[memoryview]  # the whole records' payloads, in order (the header's first)
    offsets: list[int]  # where each of them starts
    end: int  # the offset after the last whole record: where the next record goes
    torn: str | None = None  # why the bytes from ``end`` on were dropped; None: there were none


class Header(msgspec.Struct, frozen=True):
    journal: int
    generation: int


class Batch(msgspec.Struct, frozen=True):
    """A committed batch as read back: service JSON left undecoded until replay says which
    version of each service is the last one (at 100,000 backends, decoding every superseded
    version would make a restart slower than reading one whole file)."""

    put: dict[str, msgspec.Raw] = {}
    delete: list[str] = []


def _aligned(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def frame(payload: bytes) -> bytes:
    """One record: header, payload, zero padding to the next block."""
    head = _HEAD.pack(MAGIC, len(payload), zlib.crc32(payload))
    return head + payload + bytes(_aligned(_HEAD.size + len(payload)) - _HEAD.size - len(payload))


def _record_at(data: memoryview, offset: int) -> tuple[memoryview, int] | str:
    """The payload of the record at ``offset`` and the offset of the next one, or why there is
    no whole record there."""
    if len(data) - offset < _HEAD.size:
        return f"{len(data) - offset} byte(s), less than a record header"
    magic, length, crc = _HEAD.unpack_from(data, offset)
    if magic != MAGIC:
        return "no record mark"
    start = offset + _HEAD.size
    if start + length > len(data):
        return f"a record of {length} bytes of which {len(data) - start} were written"
    payload = data[start:start + length]
    if zlib.crc32(payload) != crc:
        return "a checksum mismatch"
    return payload, offset + _aligned(_HEAD.size + length)


def scan(data: bytes) -> Scan:
    """The whole records of ``data``; raises JournalCorrupt for a damaged one in the middle.
    The payloads are views into ``data`` (at 100,000 backends a full journal is 30 MB: copying
    it record by record was a tenth of a restart)."""
    data = memoryview(data)
    payloads: list[memoryview] = []
    offsets: list[int] = []
    offset = 0
    while offset < len(data):
        found = _record_at(data, offset)
        if isinstance(found, str):
            for later in range(offset + BLOCK, len(data), BLOCK):
                if not isinstance(_record_at(data, later), str):
                    raise JournalCorrupt(offset, f"{found}, yet a whole record follows at byte "
                                                 f"{later}")
            return Scan(payloads, offsets, offset, f"{found} at byte {offset}")
        offsets.append(offset)
        payload, offset = found
        payloads.append(payload)
    return Scan(payloads, offsets, offset)


def header(generation: int) -> bytes:
    return frame(msgspec.json.encode(Header(JOURNAL_VERSION, generation)))


def batch_payload(put: Iterable[tuple[str, bytes]], delete: Iterable[str]) -> bytes:
    """A batch record's payload from each changed service's id and (already encoded) JSON."""
    parts = [b'{"put":{']
    for i, (vsid, encoded) in enumerate(put):
        parts.append(b"%s%s:%s" % (b"," if i else b"", msgspec.json.encode(vsid), encoded))
    parts.append(b'},"delete":%s}' % msgspec.json.encode(list(delete)))
    return b"".join(parts)


def read(data: bytes) -> tuple[int, list[Batch], Scan]:
    """A journal's generation and batches; raises JournalCorrupt for anything but a torn tail
    (a journal is created whole, so even its header being torn is damage)."""
    found = scan(data)
    if not found.payloads:
        raise JournalCorrupt(0, f"no header ({found.torn})")
    try:
        head = msgspec.json.decode(found.payloads[0], type=Header)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise JournalCorrupt(0, f"bad header: {exc}") from None
    if head.journal != JOURNAL_VERSION:
        raise JournalCorrupt(0, f"unknown journal version {head.journal} (this gorb reads "
                                f"{JOURNAL_VERSION})")
    batches = []
    decoder = msgspec.json.Decoder(Batch)
    for i, payload in enumerate(found.payloads[1:], 1):
        try:
            batches.append(decoder.decode(payload))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise JournalCorrupt(found.offsets[i], f"record {i}: {exc}") from None
    return head.generation, batches, found
