"""The state as a snapshot plus a journal (``state.Store``): appends, torn tails, damage, the
files a crash can leave at every step of a commit, a compaction and a snapshot write (each
must load as the last committed state), ``.prev``/``--restore-previous``, old files, and the
engine over a real state directory."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil

import msgspec
import pytest

from gorb.common.model import BackendOptions, PulseOptions, ServiceOptions
from gorb.services.ipvs_writer import journal, state
from gorb.services.ipvs_writer.engine import Engine
from gorb.services.ipvs_writer.state import (
    BackendRecord,
    ServiceRecord,
    StateFileError,
    Store,
    journal_path,
    load,
    next_journal_path,
    previous_path,
    save,
)
from tests.service.fake_kernel import FakeKernel

pytestmark = pytest.mark.timeout(30)


def service(n_backends: int, vip: int = 1, weight: int = 100) -> ServiceRecord:
    return ServiceRecord(
        ServiceOptions(host=f"10.0.0.{vip}", port=80, family="ipv4"), f"10.0.0.{vip}",
        {f"b{i}": BackendRecord(BackendOptions(host=f"10.1.0.{i + 1}", port=8080, weight=weight,
                                               pulse=PulseOptions()), f"10.1.0.{i + 1}")
         for i in range(n_backends)})


def states() -> list[dict[str, ServiceRecord]]:
    """A run of states, each one commit after the other: creates, changes, a delete."""
    out = [{}]
    for step in range(8):
        s = dict(out[-1])
        s[f"s{step % 3}"] = service(step + 1, vip=step % 3 + 1, weight=step)
        if step == 5:
            del s["s1"]
        out.append(s)
    return out


def files(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


def commit_all(store: Store, seq) -> None:
    for s in seq:
        store(s)


# --- appends ------------------------------------------------------------------------------------

def test_each_commit_appends_one_record_and_leaves_the_snapshot_alone(tmp_path):
    path = tmp_path / "state.json"
    store = Store(path)
    assert store.open() == {}
    assert files(tmp_path) == ["state.json", "state.json.journal"]
    snapshot = path.read_bytes()
    assert json.loads(snapshot) == {"version": 1, "generation": 1, "services": {}}
    seq = states()[1:]
    for i, s in enumerate(seq, 1):
        size = journal_path(path).stat().st_size
        store(s)
        grown = journal_path(path).stat().st_size - size
        assert grown % journal.BLOCK == 0 and grown > 0
        assert load(path) == s
        assert len(journal.read(journal_path(path).read_bytes())[1]) == i
    assert path.read_bytes() == snapshot
    # A record holds only what its commit changed: whole services, and deletions.
    _, batches, _ = journal.read(journal_path(path).read_bytes())
    assert [sorted(b.put) for b in batches[4:7]] == [["s1"], ["s2"], ["s0"]]
    assert batches[5].delete == ["s1"]
    store.close()


def test_a_new_store_goes_on_appending_to_the_journal_it_finds(tmp_path):
    path = tmp_path / "state.json"
    seq = states()
    store = Store(path)
    store.open()
    commit_all(store, seq[1:4])
    again = Store(path)  # a restart after a crash: no close
    assert again.open() == seq[3]
    commit_all(again, seq[4:])
    assert load(path) == seq[-1]
    assert len(journal.read(journal_path(path).read_bytes())[1]) == len(seq) - 1
    assert state.read_state(path).generation == 1


def test_a_torn_last_record_is_dropped_with_a_log_line_and_cut_off_at_open(tmp_path, caplog):
    path = tmp_path / "state.json"
    seq = states()
    store = Store(path)
    store.open()
    commit_all(store, seq[1:5])
    jpath = journal_path(path)
    end = jpath.stat().st_size
    store(seq[5])
    with open(jpath, "r+b") as f:  # the last append cut short by a crash
        f.truncate(end + 100)
    with caplog.at_level(logging.WARNING):
        assert load(path) == seq[4]
    assert "dropped a torn last record" in caplog.text
    again = Store(path)
    assert again.open() == seq[4]
    assert jpath.stat().st_size == end  # cut back to the last whole record
    again(seq[6])
    assert load(path) == seq[6]


def test_a_damaged_record_in_the_middle_refuses_naming_the_journal_and_prev(tmp_path):
    path = tmp_path / "state.json"
    seq = states()
    store = Store(path)
    store.open()
    commit_all(store, seq[1:6])
    store.close()  # a snapshot: .prev is the state before the last commit
    store = Store(path)
    store.open()
    commit_all(store, seq[6:9])
    jpath = journal_path(path)
    data = bytearray(jpath.read_bytes())
    data[journal.BLOCK + 40] ^= 0x55  # inside the first batch, more follow
    jpath.write_bytes(bytes(data))
    with pytest.raises(StateFileError) as exc:
        load(path)
    assert exc.value.path == jpath and exc.value.previous == previous_path(path)
    assert str(exc.value).startswith(f"state file {jpath} is unusable: a checksum mismatch")
    assert f"a previous good copy is at {previous_path(path)}" in str(exc.value)
    assert load(path, restore_previous=True) == seq[4]
    names = files(tmp_path)
    assert [n for n in names if "corrupt" in n] == [n for n in names
                                                   if n.startswith("state.json.journal.corrupt-")]
    assert len([n for n in names if "corrupt" in n]) == 1
    assert len([n for n in names if n.startswith("state.json.unused-")]) == 1  # the snapshot
    assert load(path) == seq[4]


# --- old files, odd files -----------------------------------------------------------------------

def test_a_state_file_of_the_whole_file_save_loads_unchanged_and_becomes_a_snapshot(tmp_path):
    path = tmp_path / "state.json"
    seq = states()
    save(path, seq[3])
    save(path, seq[4])  # what gorb wrote before the journal: the file and .prev
    old = path.read_bytes()
    assert load(path) == seq[4]
    assert path.read_bytes() == old  # loading writes nothing
    store = Store(path)
    assert store.open() == seq[4]
    assert json.loads(path.read_bytes())["generation"] == 1
    assert load(previous_path(path)) == seq[3]  # .prev kept
    store(seq[5])
    assert load(path) == seq[5]


def test_a_journal_next_to_a_file_without_generation_is_not_replayed(tmp_path, caplog):
    path = tmp_path / "state.json"
    seq = states()
    store = Store(path)
    store.open()
    commit_all(store, seq[1:4])
    save(path, seq[6])  # e.g. an older gorb ran meanwhile
    with caplog.at_level(logging.WARNING):
        assert load(path) == seq[6]
    assert "belongs to no snapshot" in caplog.text
    store = Store(path)
    assert store.open() == seq[6]
    store(seq[7])
    assert load(path) == seq[7]


def test_a_journal_without_its_snapshot_refuses(tmp_path):
    path = tmp_path / "state.json"
    store = Store(path)
    store.open()
    store(states()[1])
    path.unlink()
    with pytest.raises(StateFileError) as exc:
        load(path)
    assert "there is no snapshot" in str(exc.value) and "move the journal away" in str(exc.value)


def test_a_journal_of_a_later_generation_than_its_snapshot_refuses(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(state.encode({}, 3))
    journal_path(path).write_bytes(journal.header(4))
    with pytest.raises(StateFileError) as exc:
        load(path)
    assert "journal of generation 4 after a snapshot of generation 3" in str(exc.value)


# --- compaction ---------------------------------------------------------------------------------

def test_compaction_writes_a_new_snapshot_and_an_empty_journal(tmp_path):
    path = tmp_path / "state.json"
    seq = states()
    store = Store(path, journal_max_bytes=0, background=False)  # past half the snapshot
    store.open()
    for s in seq[1:]:
        store(s)
        assert load(path) == s
        assert not next_journal_path(path).exists()  # done in the call: nothing in flight
    assert state.read_state(path).generation > 3
    # The last compaction's snapshot is a whole state, .prev the snapshot it replaced.
    doc = msgspec.json.decode(path.read_bytes(), type=state.StateDocument)
    assert doc.services in seq and doc.generation == state.read_state(path).generation
    prev = msgspec.json.decode(previous_path(path).read_bytes(), type=state.StateDocument)
    assert prev.generation == doc.generation - 1
    assert seq.index(prev.services) < seq.index(doc.services)


def test_background_compaction_keeps_every_commit(tmp_path):
    path = tmp_path / "state.json"
    store = Store(path, journal_max_bytes=0)
    store.open()
    last = {}
    for i in range(200):
        last = {**last, f"s{i % 7}": service(i % 5, vip=i % 7 + 1, weight=i)}
        store(last)
    store._wait()
    assert load(path) == last
    assert state.read_state(path).generation > 5
    store.close()
    assert load(path) == last
    assert files(tmp_path) == ["state.json", "state.json.journal", "state.json.prev"]


def test_close_leaves_the_whole_state_and_prev_the_state_before_the_last_commit(tmp_path):
    path = tmp_path / "state.json"
    seq = states()
    store = Store(path)
    store.open()
    commit_all(store, seq[1:])
    store.close()
    assert files(tmp_path) == ["state.json", "state.json.journal", "state.json.prev"]
    assert journal_path(path).stat().st_size == journal.BLOCK  # the header alone
    assert msgspec.json.decode(path.read_bytes(), type=state.StateDocument).services == seq[-1]
    assert load(previous_path(path)) == seq[-2]
    assert "generation" not in json.loads(previous_path(path).read_bytes())


def test_restore_previous_after_a_clean_stop_loses_only_the_last_commit(tmp_path):
    path = tmp_path / "state.json"
    seq = states()
    store = Store(path)
    store.open()
    commit_all(store, seq[1:])
    store.close()
    path.write_bytes(b'{"version": 1, "serv\x00')
    with pytest.raises(StateFileError) as exc:
        load(path)
    assert exc.value.previous == previous_path(path)
    store = Store(path)
    assert store.open(restore_previous=True) == seq[-2]
    assert len([n for n in files(tmp_path) if "corrupt" in n]) == 1
    store(seq[-1])
    assert load(path) == seq[-1]


# --- a crash at every step ----------------------------------------------------------------------

class Recorder:
    """Stands in for ``os`` inside ``state``: before every call, records the directory's files
    (what a crash at that instant would leave, had every write reached the disk)."""

    def __init__(self, directory):
        self.directory = directory
        self.seen: list[dict[str, bytes]] = []

    def __getattr__(self, name):
        real = getattr(os, name)
        if not callable(real):
            return real

        def call(*args, **kwargs):
            self.record()
            if name in ("write", "pwrite", "writev"):  # and torn: part of it on disk
                data = b"".join(args[1]) if name == "writev" else bytes(args[1])
                for part in (1, 13, len(data) // 2):
                    if name == "pwrite":
                        os.pwrite(args[0], data[:part], args[2])
                    else:
                        os.write(args[0], data[:part])
                        os.lseek(args[0], -part, os.SEEK_CUR)
                    self.record()
            return real(*args, **kwargs)
        return call

    def record(self):
        self.seen.append({p.name: p.read_bytes() for p in self.directory.iterdir()})


def crash_states(tmp_path, monkeypatch, action):
    recorder = Recorder(tmp_path)
    monkeypatch.setattr(state, "os", recorder)
    action()
    monkeypatch.undo()
    recorder.seen.append({p.name: p.read_bytes() for p in tmp_path.iterdir()})
    return recorder.seen


def loads_after(files_now: dict[str, bytes], where, restore: bool) -> dict:
    """load() of the files a crash left, in a directory of their own; then a restarted Store
    must take a commit on them."""
    shutil.rmtree(where, ignore_errors=True)
    where.mkdir()
    for name, data in files_now.items():
        (where / name).write_bytes(data)
    path = where / "state.json"
    services = load(path, restore_previous=restore)
    store = Store(path, background=False)
    assert store.open() == services
    store({**services, "after": service(1, vip=99)})
    assert load(path) == {**services, "after": service(1, vip=99)}
    return services


@pytest.mark.parametrize("step", ["append", "compaction", "close", "open an old file",
                                  "restore-previous"])
def test_a_crash_at_any_step_loads_the_last_committed_state(tmp_path, monkeypatch, step):
    work = tmp_path / "work"
    work.mkdir()
    path = work / "state.json"
    seq = states()
    store = Store(path, journal_max_bytes=1 << 30, background=False)
    if step == "open an old file":
        save(path, seq[4])
        before, after = seq[4], seq[4]
        action = store.open
    elif step == "restore-previous":
        save(path, seq[3])
        save(path, seq[4])
        path.write_bytes(b"garbage")
        before, after = seq[3], seq[3]
        action = lambda: store.open(restore_previous=True)  # noqa: E731
    else:
        store.open()
        commit_all(store, seq[1:5])
        before, after = seq[4], seq[5]
        if step == "compaction":
            store.journal_max_bytes = 0
        action = {"append": lambda: store(seq[5]), "compaction": lambda: store(seq[5]),
                  "close": store.close}[step]
        if step == "close":
            after = before
    seen = crash_states(work, monkeypatch, action)
    assert len(seen) >= 6
    results = [loads_after(files_now, tmp_path / "crashed", step == "restore-previous")
               for files_now in seen]
    assert all(r in (before, after) for r in results)
    assert results[-1] == after
    if step == "compaction":  # it ran: the files went through its intermediate states
        names = {frozenset(f) for f in seen}
        assert any("state.json.journal.next" in n for n in names)


def test_a_crash_mid_compaction_leaves_states_that_load_and_recover(tmp_path):
    """The three intermediate states of a compaction, built by hand."""
    path = tmp_path / "state.json"
    seq = states()
    g1 = {**seq[3]}
    path.write_bytes(state.encode(seq[2], 1))

    def journal_of(generation, *batches):
        return journal.header(generation) + b"".join(journal.frame(journal.batch_payload(
            ((v, state._encoded(r)) for v, r in new.items() if old.get(v) is not r),
            [v for v in old if v not in new])) for old, new in batches)

    # 1. the next journal opened, the new snapshot not yet in place
    journal_path(path).write_bytes(journal_of(1, (seq[2], seq[3])))
    next_journal_path(path).write_bytes(journal_of(2, (seq[3], seq[4]), (seq[4], seq[5])))
    assert load(path) == seq[5]
    # 2. the snapshot of generation 2 (the state as journal 1 ends) renamed into place
    path.write_bytes(state.encode(g1, 2))
    assert load(path) == seq[5]
    # 3. the next journal renamed over the journal
    os.replace(next_journal_path(path), journal_path(path))
    assert load(path) == seq[5]
    # and a crash between the snapshot and the journal renames of write_pair (generation 3):
    path.write_bytes(state.encode(seq[5], 3))
    assert load(path) == seq[5]  # journal 2 is contained in snapshot 3


# --- failures -----------------------------------------------------------------------------------

class FullDisk:
    """``os`` for ``state`` whose writes fail with ENOSPC while ``full``."""

    full = False

    def __getattr__(self, name):
        real = getattr(os, name)
        if name not in ("write", "pwrite", "fdatasync"):
            return real

        def call(*args, **kwargs):
            if self.full:
                if name == "pwrite":  # half of it reaches the file before the error
                    fd, data, offset = args
                    real(fd, bytes(data[:len(data) // 2]), offset)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args, **kwargs)
        return call


def test_a_failed_append_is_cut_back_raised_and_followed_by_a_whole_snapshot(tmp_path,
                                                                             monkeypatch):
    path = tmp_path / "state.json"
    seq = states()
    store = Store(path)
    store.open()
    commit_all(store, seq[1:4])
    size = journal_path(path).stat().st_size
    disk = FullDisk()
    monkeypatch.setattr(state, "os", disk)
    disk.full = True
    with pytest.raises(OSError):
        store(seq[4])
    assert journal_path(path).stat().st_size == size  # the half record was cut off
    assert load(path) == seq[3]
    with pytest.raises(OSError):  # still full: the whole snapshot fails too
        store(seq[4])
    assert load(path) == seq[3]
    assert files(tmp_path) == ["state.json", "state.json.journal"]  # no .tmp left behind
    disk.full = False
    store(seq[5])
    assert load(path) == seq[5]
    assert msgspec.json.decode(path.read_bytes(), type=state.StateDocument).services == seq[5]
    store(seq[6])
    assert load(path) == seq[6]


def test_the_engine_over_a_real_state_directory(tmp_path, monkeypatch):
    """Write-ahead and refusal as with the whole-file save; a restart has every commit."""
    path = tmp_path / "state.json"
    kernel = FakeKernel()
    store = Store(path)
    engine = Engine(store.open(), kernel, store)
    [(reply, _)] = engine.handle_batch([("service.create", {
        "service": "web", "options": {"host": "10.0.0.1", "port": 80}})])
    assert reply["ok"]
    replies = engine.handle_batch([("backend.create", {
        "service": "web", "backend": f"b{i}", "options": {"host": f"10.1.0.{i + 1}",
                                                           "port": 8080}}) for i in range(5)])
    assert all(r["ok"] for r, _ in replies)
    disk = FullDisk()
    monkeypatch.setattr(state, "os", disk)
    disk.full = True
    table, applied = kernel.snapshot(), len(kernel.applied)
    [(reply, _)] = engine.handle_batch([("backend.update", {
        "service": "web", "backend": "b0", "weight": 7})])
    assert (reply["ok"], reply["errno"]) == (False, "state")
    assert "No space left on device" in reply["reason"]
    assert kernel.snapshot() == table and len(kernel.applied) == applied
    disk.full = False
    [(reply, _)] = engine.handle_batch([("backend.update", {
        "service": "web", "backend": "b1", "weight": 9})])
    assert reply["ok"]
    assert load(path) == engine.services  # a crash now: everything answered is there
    store.close()
    again = Store(path)
    assert again.open() == engine.services
    assert engine.services["web"].backends["b1"].options.weight == 9
    assert engine.services["web"].backends["b0"].options.weight == 100


@pytest.mark.parametrize("new_keys", [["a", "b", "c"], ["a", "c"], ["a", "b", "c", "d"],
                                      ["d"], [], ["b", "d", "e"]])
def test_changes_are_the_services_replaced_added_and_deleted(new_keys):
    old = {k: service(1, vip=i + 1) for i, k in enumerate("abc")}
    new = {k: old[k] if k in old and k != "b" else service(2, vip=9) for k in new_keys}
    put, delete = state.changes(old, new)
    assert sorted(v for v, _ in put) == sorted(k for k in new_keys if k not in old or k == "b")
    assert all(new[v] is r for v, r in put)
    assert sorted(delete) == sorted(set(old) - set(new_keys))
