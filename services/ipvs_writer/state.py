"""The writer's desired state and where it is kept: a snapshot plus an append-only journal.

The desired state is a map ``service id -> ServiceRecord``; records are immutable (a change makes a
new record), so a snapshot for rollback is a shallow copy of the map.

Files (``<file>`` is ``writer.state_file``, default ``/var/lib/gorb/state.json``):

- ``<file>``: the snapshot, JSON an operator can read::

      {"version": 1, "generation": 7,
       "services": {"web": {"options": ServiceOptions, "address": "10.0.0.1",
                            "backends": {"a": {"options": BackendOptions, "address": "10.1.0.1",
                                               "health": Health}}}}}

  A file without ``generation`` is a whole state with no journal (what gorb wrote before the
  journal, and what ``save`` writes): it loads as it is.
- ``<file>.journal``: the batches committed since the snapshot (format in ``journal``), headed
  by the generation it continues. A commit appends one record: one ``pwrite`` + ``fdatasync``,
  whatever the size of the table (``Store``).
- ``<file>.journal.next``: only while a compaction runs: the journal of the next generation,
  which takes the commits while the snapshot of that generation is written in the background.
- ``<file>.prev``: a whole state, read without any journal: after a clean stop (and after a
  snapshot written because an append failed), the state before the last commit, as it always
  was with the whole-file save (which hard-links the former file there); after a compaction,
  the snapshot it replaced (a hard link: a compaction writes one snapshot, not two), which is
  the state at the compaction before. It is what ``--restore-previous`` starts from.

Loading (``read_state``): the snapshot of generation g, then each journal file whose header says
g (``.journal``, then ``.journal.next``; ``.journal.next`` may also say g + 1: a compaction had
started and its snapshot was not yet in place). A journal of a lower generation is contained in
the snapshot and skipped; one of a higher generation, or a journal without a snapshot, is an
inconsistency (``StateFileError``). A torn last record is dropped with a log line; damage
anywhere else is a ``StateFileError``. A missing state is a clean start (empty state). A state
that cannot be used raises ``StateFileError`` naming the file and the error and saying whether a
previous good copy exists; the writer then refuses to start unless told ``--restore-previous``,
which keeps the unusable file as ``<name>.corrupt-<unix time>`` (and a journal whose
snapshot is unusable, or a snapshot whose journal is, as ``<name>.unused-<unix time>`` when it
holds anything), loads ``<file>.prev`` and writes it as a new snapshot over them. It never
starts empty silently: until that snapshot is in place the unusable files stay where they were.

Crash safety: every file is written whole under a ``.tmp`` name, fsynced, renamed into place,
and the directory fsynced before the next step depends on it; an append is made durable before
``Store.__call__`` returns, so before the engine touches the kernel (write-ahead). Each step,
and what a crash right after it leaves (every state loads the last committed state):

- append a record: a torn record at the end, dropped at load (its batch was never answered);
- start a compaction (at the commit whose record takes the journal past its limit, after that
  record is durable): ``.journal.next`` of generation g + 1 created: g + journal g + next g + 1;
- (background) write the snapshot of g + 1 (the state as the journal of g ends), link the
  snapshot of g as ``<file>.prev``, rename the new one into place: g + 1, journal g skipped as
  contained, next g + 1 replayed;
- (background) rename ``.journal.next`` over ``.journal``: g + 1 + journal g + 1.
- ``write_pair`` (first start, a restart after a crash or with an old file, a failed append,
  a clean stop): empty journal of generation h (higher than any on disk), ``<file>.prev``,
  snapshot h, then the journal renamed into place, ``.journal.next`` removed: after the snapshot
  rename every journal left is of a lower generation, contained in it.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from dataclasses import dataclass
from itertools import compress
from operator import is_not
from pathlib import Path
from typing import TypeVar

import msgspec

from gorb.common.model import BackendOptions, ServiceOptions
from gorb.services.ipvs_writer import journal
from gorb.services.ipvs_writer.weights import Health

log = logging.getLogger(__name__)

COMPACT_SYNC = 4 << 20  # bytes a compaction writes between two syncs

STATE_VERSION = 1


class BackendRecord(msgspec.Struct, frozen=True):
    options: BackendOptions
    address: str  # canonical IP literal of options.host
    health: Health = Health()  # pulse's verdict; kept so that a restart does not flap weights


class ServiceRecord(msgspec.Struct, frozen=True, dict=True):
    """``dict=True`` gives each record a private, never-serialised cache (see ``endpoints``)."""

    options: ServiceOptions
    address: str  # canonical VIP; "" for a fwmark service without host
    backends: dict[str, BackendRecord] = {}


def endpoints(record: ServiceRecord) -> frozenset[tuple[str, int]]:
    """The (address, port) of every backend of ``record``, computed once per record."""
    cached = record.__dict__.get("_endpoints")
    if cached is None:
        cached = frozenset((b.address, b.options.port) for b in record.backends.values())
        record.__dict__["_endpoints"] = cached
    return cached


class StateDocument(msgspec.Struct, omit_defaults=True):
    version: int
    services: dict[str, ServiceRecord]
    generation: int | None = None  # None: a whole state, no journal belongs to it


class _RawSnapshot(msgspec.Struct):
    version: int
    services: dict[str, msgspec.Raw]
    generation: int | None = None


Services = dict[str, ServiceRecord]
_Doc = TypeVar("_Doc", StateDocument, _RawSnapshot)


class StateFileError(Exception):
    """The state file (or its journal: ``path``) exists but cannot be used."""

    def __init__(self, path: Path, reason: str, state_file: Path | None = None):
        self.path = path
        prev = previous_path(state_file or path)
        self.previous = prev if prev.exists() else None
        hint = (f"; a previous good copy is at {self.previous}: start with --restore-previous to "
                "use it" if self.previous else "; no previous copy exists: fix or move the file")
        super().__init__(f"state file {path} is unusable: {reason}{hint}")


def previous_path(path: Path) -> Path:
    return path.with_name(path.name + ".prev")


def journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".journal")


def next_journal_path(path: Path) -> Path:
    return path.with_name(path.name + ".journal.next")


def _document(path: Path, type_: type[_Doc]) -> _Doc:
    try:
        doc = msgspec.json.decode(path.read_bytes(), type=type_)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise StateFileError(path, str(exc)) from None
    if doc.version != STATE_VERSION:
        raise StateFileError(path, f"unknown version {doc.version} "
                                   f"(this gorb reads {STATE_VERSION})")
    return doc


def _decode(path: Path) -> Services:
    """A whole state (``.prev``, or a file written by ``save``), its journal not read."""
    return _document(path, StateDocument).services


@dataclass
class Loaded:
    """What ``read_state`` found: the state, and whether the writer may go on appending to the
    journal as it is (``regular``: the snapshot and its own journal, nothing else) or must first
    write a new pair (``generation`` + 1 is then above every generation on disk)."""

    services: Services
    generation: int = 0
    regular: bool = False
    journal_end: int = 0  # where the next record of ``.journal`` goes (when regular)


def _snapshot(path: Path) -> _RawSnapshot:
    """A snapshot with each service's JSON left undecoded (``_records`` decodes them)."""
    return _document(path, _RawSnapshot)


def _journal(path: Path,
             state_file: Path) -> tuple[int, list[journal.Batch], journal.Scan] | None:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        return journal.read(data)
    except journal.JournalCorrupt as exc:
        raise StateFileError(path, str(exc), state_file) from None


def read_state(path: Path) -> Loaded:
    """The desired state stored at ``path``: its snapshot and journals (see the module doc)."""
    journals = [(journal_path(path), 0), (next_journal_path(path), 1)]
    if not path.exists():
        for jpath, _ in journals:
            if jpath.exists():
                raise StateFileError(jpath, f"there is no snapshot {path} for this journal "
                                            "(move the journal away to start empty)", path)
        return Loaded({})
    doc = _snapshot(path)
    raw = {vsid: (r, path) for vsid, r in doc.services.items()}
    loaded = Loaded({}, doc.generation or 0, regular=doc.generation is not None)
    for jpath, ahead in journals:
        if doc.generation is None:
            if jpath.exists():
                log.warning("%s belongs to no snapshot (%s was written without one, by an "
                            "older gorb or state.save): not replayed", jpath, path)
            continue
        _replay(loaded, raw, jpath, ahead, doc.generation, path)
    loaded.services = _records(raw, path)
    return loaded


def _replay(loaded: Loaded, raw: dict[str, tuple[msgspec.Raw, Path]], jpath: Path, ahead: int,
            generation: int, path: Path) -> None:
    """Apply the journal at ``jpath`` (``ahead``: the ``.next`` one) to ``raw`` if it belongs to
    the snapshot of ``generation``; say in ``loaded`` whether the writer may append as it is."""
    found = _journal(jpath, path)
    if found is None:
        loaded.regular = loaded.regular and bool(ahead)  # .journal must be there, .next not
        return
    gen, batches, scan = found
    loaded.generation = max(loaded.generation, gen)
    if gen < generation:
        log.info("%s (generation %d) is contained in the snapshot: not replayed", jpath, gen)
        loaded.regular = False
        return
    if gen > generation + ahead:
        raise StateFileError(jpath, f"journal of generation {gen} after a snapshot of "
                                    f"generation {generation}", path)
    if scan.torn:
        log.warning("%s: dropped a torn last record (%s): a commit a crash interrupted, before "
                    "it was answered or applied", jpath, scan.torn)
    loaded.regular = loaded.regular and not ahead
    loaded.journal_end = scan.end
    for batch in batches:
        for vsid in batch.delete:
            raw.pop(vsid, None)
        raw.update((vsid, (r, jpath)) for vsid, r in batch.put.items())


def _records(raw: dict[str, tuple[msgspec.Raw, Path]], path: Path) -> Services:
    """Decode the last version of each service. The collector is paused meanwhile: decoding
    builds only long-lived objects, and its passes over them were a third of a restart at
    100,000 backends."""
    decoder = msgspec.json.Decoder(ServiceRecord)
    paused = gc.isenabled()
    gc.disable()
    try:
        services = {}
        for vsid, (r, source) in raw.items():
            try:
                services[vsid] = decoder.decode(r)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise StateFileError(source, f"service {vsid!r}: {exc}", path) from None
        return services
    finally:
        if paused:
            gc.enable()


def load(path: Path, restore_previous: bool = False) -> Services:
    """The desired state stored at ``path`` ({} if there is none)."""
    return open_state(path, restore_previous).services


def open_state(path: Path, restore_previous: bool = False) -> Loaded:
    """``read_state``, or with ``restore_previous`` and an unusable state: the previous good
    copy, the unusable files set aside and the copy written as the new state."""
    try:
        return read_state(path)
    except StateFileError as err:
        if not restore_previous or err.previous is None:
            raise
        services = _decode(err.previous)
        generation = _highest_generation(path)
        stamp = int(time.time())
        # Copies (hard links) are set aside; the files themselves stay until the new pair
        # replaces them, so that a crash meanwhile leaves the same unusable state, never none.
        for p in (next_journal_path(path), journal_path(path), path):
            if p == err.path:
                _link(p, p.with_name(f"{p.name}.corrupt-{stamp}"))
            elif p.exists() and (p == path or _holds_records(p)):
                _link(p, p.with_name(f"{p.name}.unused-{stamp}"))
        write_pair(path, services, generation + 1)
        return Loaded(services, generation + 1, regular=True, journal_end=journal.BLOCK)


def _highest_generation(path: Path) -> int:
    """The highest generation named by any state file at ``path`` that can still be read."""
    found = 0
    for p in (journal_path(path), next_journal_path(path)):
        try:
            found = max(found, journal.read(p.read_bytes())[0])
        except (OSError, journal.JournalCorrupt):
            pass
    try:
        found = max(found, _snapshot(path).generation or 0)
    except (OSError, StateFileError):
        pass
    return found


def _holds_records(jpath: Path) -> bool:
    try:
        return jpath.stat().st_size > journal.BLOCK
    except FileNotFoundError:
        return False


def _encoded(record: ServiceRecord) -> bytes:
    """A service record's JSON, encoded once per record: records are never changed once saved
    (a change makes a new record), so a save encodes only the services changed since the last
    one — at 10,000 backends encoding them all took 8 ms of every write, one service 0.1 ms.
    The journal's records and the snapshots share it."""
    cached = record.__dict__.get("_json")
    if cached is None:
        cached = record.__dict__["_json"] = msgspec.json.encode(record)
    return cached


def _parts(services: Services, generation: int | None = None) -> list[bytes]:
    """A snapshot's content in pieces: each record's JSON as it is cached, not copied."""
    gen = b"" if generation is None else b'"generation":%d,' % generation
    parts = [b'{"version":%d,%s"services":{' % (STATE_VERSION, gen)]
    for i, (vsid, record) in enumerate(services.items()):
        parts.append(b"%s%s:" % (b"," if i else b"", msgspec.json.encode(vsid)))
        parts.append(_encoded(record))
    parts.append(b"}}")
    return parts


def encode(services: Services, generation: int | None = None) -> bytes:
    """A snapshot's content: ``StateDocument(STATE_VERSION, services, generation)`` as JSON."""
    return b"".join(_parts(services, generation))


def _write_file(path: Path, data: bytes | list[bytes], sync_every: int = 0) -> None:
    """Write ``data`` (or its pieces, with ``writev``: a compaction then never holds the GIL
    for a copy of the whole snapshot) as ``path``, created or truncated, and fsync it; a parent
    directory that is missing is created. ``sync_every``: also sync after each that many bytes
    (see ``Store._compact``)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, flags, 0o644)
    try:
        if isinstance(data, list):
            _write_parts(fd, data, sync_every)
        else:
            _write_all(fd, memoryview(data))
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_parts(fd: int, parts: list[bytes], sync_every: int) -> None:
    chunk: list[bytes] = []
    size = unsynced = 0
    for i, part in enumerate(parts):
        chunk.append(part)
        size += len(part)
        if size < 1 << 20 and len(chunk) < 512 and i < len(parts) - 1:
            continue
        done = os.writev(fd, chunk)
        if done < size:  # short (rare on a file): the rest by write
            _write_all(fd, memoryview(b"".join(chunk))[done:])
        unsynced += size
        if sync_every and unsynced >= sync_every:
            os.fdatasync(fd)
            unsynced = 0
        chunk, size = [], 0


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _sync_dir(path: Path) -> None:
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def save(path: Path, services: Services) -> None:
    """Atomically replace the state file with the whole state (no journal), keeping the former
    one as ``<file>.prev``: what the writer did at every commit before the journal (kept for the
    benchmark that compares the two, and for tools that write a state file).

    The records in ``services`` must not change after this (the engine saves a batch's state
    once every request of it is staged)."""
    tmp = _tmp(path)
    _write_file(tmp, encode(services))
    prev_tmp = path.with_name(path.name + ".prev.tmp")
    try:
        _link(path, prev_tmp)
        os.replace(prev_tmp, previous_path(path))
    except FileNotFoundError:
        pass  # the first save: nothing to keep
    os.replace(tmp, path)
    _sync_dir(path)


def _link(src: Path, dst: Path) -> None:
    """Hard-link ``src`` as ``dst``, replacing a ``dst`` left by a crash."""
    try:
        os.link(src, dst)
    except FileExistsError:
        dst.unlink()
        os.link(src, dst)


def _write_previous(path: Path, previous: Services) -> None:
    prev = previous_path(path)
    _write_file(_tmp(prev), _parts(previous))
    os.replace(_tmp(prev), prev)


def write_pair(path: Path, services: Services, generation: int,
               previous: Services | None = None) -> None:
    """Make ``services`` the snapshot of ``generation`` (above every generation on disk) with an
    empty journal, and ``previous`` (if given) the ``.prev`` state. Each step leaves a loadable
    state (see the module doc): the snapshot is renamed into place before its journal."""
    jtmp = _tmp(journal_path(path))
    try:
        _write_file(jtmp, journal.header(generation))
        _write_file(_tmp(path), _parts(services, generation))
        if previous is not None:
            _write_previous(path, previous)
        os.replace(_tmp(path), path)
        _sync_dir(path)  # the snapshot is in place before any journal of its generation
        os.replace(jtmp, journal_path(path))
        next_journal_path(path).unlink(missing_ok=True)
        _sync_dir(path)
    except OSError:
        for p in (jtmp, _tmp(path)):
            p.unlink(missing_ok=True)  # on a full file system, give the space back
        raise


def changes(old: Services, new: Services) -> tuple[list[tuple[str, ServiceRecord]], list[str]]:
    """The services of ``new`` that are not those of ``old`` (records are immutable: identity
    says it), and those ``old`` has and ``new`` has not. Compared in C (``map``/``compress``):
    at 1,000 services a Python loop was a tenth of a commit's CPU."""
    put = [(vsid, new[vsid]) for vsid in compress(new, map(is_not, new.values(),
                                                           map(old.get, new)))]
    added = sum(vsid not in old for vsid, _ in put)
    if len(old) + added == len(new):
        return put, []  # nothing deleted (nearly every commit): no set difference to build
    return put, list(old.keys() - new.keys())


class Store:
    """The engine's ``persist``: each call appends one journal record of what changed since the
    last call (one ``pwrite`` + ``fdatasync``), and once the journal is larger than
    ``max(journal_max_bytes, half the snapshot)`` it is compacted into a new snapshot by a thread
    (the maps it is given are immutable; a commit only opens the next journal).

    A failed append (or compaction) is cut back off the journal and raised: the engine refuses
    the batch; the next call writes a whole new pair instead of appending (on a full file system
    it fails the same way, as the whole-file save did). ``background=False`` compacts in the
    caller (tests)."""

    def __init__(self, path: Path, journal_max_bytes: int = 1 << 20, background: bool = True):
        self.path = path
        self.journal_max_bytes = journal_max_bytes
        self.background = background
        self._fd: int | None = None  # the journal appended to; None: write a pair next
        self._end = 0  # where its next record goes
        self._generation = 0
        self._snapshot_bytes = 0
        self._saved: Services = {}  # the state the files hold
        self._previous: Services | None = None  # the state before the last commit
        self._compactor: threading.Thread | None = None
        self._compact_error: BaseException | None = None
        self._retry_at = 0  # after a failed start of a compaction: journal size to try again

    def open(self, restore_previous: bool = False) -> Services:
        """Load the state and get ready to append (writing a new pair unless the files are just
        a snapshot and its journal, so that appends always go to a journal of the snapshot)."""
        loaded = open_state(self.path, restore_previous)
        self._saved, self._generation = loaded.services, loaded.generation
        try:
            if loaded.regular:
                self._open_journal(loaded.journal_end)
                self._snapshot_bytes = self.path.stat().st_size
            else:
                self._generation = max(loaded.generation, _highest_generation(self.path))
                self._write_pair(loaded.services, None)
        except OSError as exc:  # as with the whole-file save: changes are refused until it works
            log.error("cannot write to %s (%s): every change is refused until it can",
                      self.path.parent, exc)
            self._drop_journal()
        return loaded.services

    def __call__(self, services: Services) -> None:
        if self._compactor is not None and not self._compactor.is_alive():
            self._compacted()
        if self._fd is None:
            self._write_pair(services, self._saved)
        else:
            self._append(services)
        self._previous, self._saved = self._saved, services
        if self._compactor is None and self._fd is not None and self._end > self._limit():
            self._start_compaction()

    def close(self) -> None:
        """Wait for a compaction; then, if the journal holds commits, write the whole state as a
        new snapshot with ``.prev`` the state before the last commit: after a clean stop the
        files are what the whole-file save left (an older gorb reads them as its own)."""
        self._wait()
        try:
            if self._fd is None or self._end > journal.BLOCK:
                self._write_pair(self._saved, self._previous)
        except OSError as exc:
            log.error("cannot write the state as a snapshot at stop (%s): the journal keeps it",
                      exc)
        self._drop_journal()

    def _limit(self) -> int:
        """The journal size past which it is compacted: half the snapshot (a restart then reads
        at most half as much again as the snapshot, and at 100,000 backends stays as fast as
        one of the whole file: see tests/bench/README.md), at least ``journal_max_bytes`` (with
        a small table, compact less often than every few commits)."""
        return max(self.journal_max_bytes, self._snapshot_bytes // 2, self._retry_at)

    # --- appending ------------------------------------------------------------------------------

    def _open_journal(self, end: int, path: Path | None = None) -> None:
        fd = os.open(path or journal_path(self.path), os.O_WRONLY | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != end:  # a torn last record, or padding a crash cut short
                os.ftruncate(fd, end)
                os.fsync(fd)
        except OSError:
            os.close(fd)
            raise
        self._drop_journal()
        self._fd, self._end = fd, end

    def _drop_journal(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _append(self, services: Services) -> None:
        put, delete = changes(self._saved, services)
        data = journal.frame(journal.batch_payload(
            ((vsid, _encoded(r)) for vsid, r in put), delete))
        try:
            view, offset = memoryview(data), self._end
            while view:
                n = os.pwrite(self._fd, view, offset)
                view, offset = view[n:], offset + n
            os.fdatasync(self._fd)
        except OSError:
            self._abandon()
            raise
        self._end += len(data)

    def _abandon(self) -> None:
        """After a failed write or sync: cut what may have been written, and write a whole pair
        at the next commit (a failed fdatasync leaves the page cache's state unknown)."""
        try:
            os.ftruncate(self._fd, self._end)
        except OSError as exc:
            log.error("cannot cut a failed record off %s (%s): a new snapshot replaces it at "
                      "the next commit", journal_path(self.path), exc)
        self._drop_journal()

    def _write_pair(self, services: Services, previous: Services | None) -> None:
        self._wait()
        self._drop_journal()
        generation = self._generation + 1
        write_pair(self.path, services, generation, previous)
        self._generation = generation
        self._snapshot_bytes = self.path.stat().st_size
        self._retry_at = 0
        self._open_journal(journal.BLOCK)

    # --- compaction -----------------------------------------------------------------------------

    def _start_compaction(self) -> None:
        """Open the journal of the next generation (durably: a commit appended to it must not
        lose its file name), and write that generation's snapshot, the state now, elsewhere."""
        generation, nxt = self._generation + 1, next_journal_path(self.path)
        try:
            _write_file(_tmp(nxt), journal.header(generation))
            os.replace(_tmp(nxt), nxt)
            _sync_dir(self.path)
            self._open_journal(journal.BLOCK, nxt)
        except OSError as exc:
            log.error("cannot start a compaction of %s (%s): appending to it meanwhile",
                      journal_path(self.path), exc)
            self._retry_at = self._end + max(self.journal_max_bytes, self._snapshot_bytes) // 4
            return
        self._generation, self._retry_at = generation, 0
        args = (self._saved, generation)
        self._compact_error = None
        if not self.background:
            self._compact(*args)
            self._compacted()
            return
        self._compactor = threading.Thread(target=self._compact, args=args, daemon=True,
                                           name="state-compaction")
        self._compactor.start()

    def _compact(self, services: Services, generation: int) -> None:
        """The snapshot of ``generation``; the one it replaces becomes ``.prev`` (a link: a
        compaction writes one snapshot's worth, not two)."""
        try:
            # Synced as it goes: a commit's fdatasync can wait for the dirty data of other
            # files of the file system (ext4 commits its journal in order), so the snapshot
            # never has more than a few MB of it.
            _write_file(_tmp(self.path), _parts(services, generation), sync_every=COMPACT_SYNC)
            prev_tmp = _tmp(previous_path(self.path))
            _link(self.path, prev_tmp)
            os.replace(prev_tmp, previous_path(self.path))
            os.replace(_tmp(self.path), self.path)
            _sync_dir(self.path)
            os.replace(next_journal_path(self.path), journal_path(self.path))
            _sync_dir(self.path)
        except BaseException as exc:  # reported by the next commit, in the engine's thread
            self._compact_error = exc

    def _compacted(self) -> None:
        self._compactor = None
        if self._compact_error is not None:
            log.error("compaction of %s failed (%s): the next commit writes a new snapshot",
                      journal_path(self.path), self._compact_error)
            _tmp(self.path).unlink(missing_ok=True)
            self._drop_journal()
        else:
            self._snapshot_bytes = self.path.stat().st_size

    def _wait(self) -> None:
        if self._compactor is not None:
            self._compactor.join()
            self._compacted()
