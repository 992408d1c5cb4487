"""The writer's state file: round trip, ``.prev``, atomic saves, corrupt files and
``--restore-previous``."""

from __future__ import annotations

import json
import os
import re

import msgspec
import pytest

from gorb.common.model import BackendOptions, PulseOptions, ServiceOptions
from gorb.services.ipvs_writer import state
from gorb.services.ipvs_writer.state import (
    BackendRecord,
    ServiceRecord,
    StateFileError,
    load,
    previous_path,
    save,
)

pytestmark = pytest.mark.timeout(10)


def web(*backends: str, method: str = "wrr") -> dict:
    return {"web": ServiceRecord(
        ServiceOptions(host="10.0.0.1", port=80, method=method, family="ipv4"), "10.0.0.1",
        {b: BackendRecord(BackendOptions(host=f"10.1.0.{i + 1}", port=8080, weight=100,
                                         pulse=PulseOptions()), f"10.1.0.{i + 1}")
         for i, b in enumerate(backends)})}


ONE = web("a")
TWO = web("a", "b", method="rr")
MANY = {
    **web("a", "b"),
    "v6": ServiceRecord(ServiceOptions(host="2001:db8::1", port=443, family="ipv6",
                                       persistent=True, timeout=60, netmask=64), "2001:db8::1"),
    "fw": ServiceRecord(ServiceOptions(fwmark=7, family="ipv4"), ""),
}


@pytest.mark.parametrize("services", [{}, ONE, TWO, MANY])
def test_round_trip(tmp_path, services):
    path = tmp_path / "state.json"
    save(path, services)
    assert load(path) == services
    doc = json.loads(path.read_bytes())  # plain JSON an operator can read
    assert doc["version"] == state.STATE_VERSION
    assert set(doc["services"]) == set(services)


def test_save_creates_missing_parent_dirs(tmp_path):
    path = tmp_path / "var" / "lib" / "gorb" / "state.json"
    save(path, ONE)
    assert load(path) == ONE


@pytest.mark.parametrize("restore_previous", [False, True])
def test_missing_file_is_a_clean_start(tmp_path, restore_previous):
    assert load(tmp_path / "state.json", restore_previous=restore_previous) == {}


def test_prev_holds_the_state_before_the_last_save(tmp_path):
    path = tmp_path / "state.json"
    prev = previous_path(path)
    assert prev == tmp_path / "state.json.prev"
    save(path, ONE)
    assert not prev.exists()  # nothing came before the first save
    save(path, TWO)
    assert (load(path), load(prev)) == (TWO, ONE)
    save(path, MANY)
    assert (load(path), load(prev)) == (MANY, TWO)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.prev"]


def test_a_leftover_tmp_from_a_crash_is_ignored_and_replaced(tmp_path):
    path = tmp_path / "state.json"
    save(path, ONE)
    (tmp_path / "state.json.tmp").write_bytes(b'{"version": 1, "serv')  # crashed mid-write
    (tmp_path / "state.json.prev.tmp").write_bytes(b"junk")
    assert load(path) == ONE
    save(path, TWO)
    assert (load(path), load(previous_path(path))) == (TWO, ONE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.prev"]


class CheckingOs:
    """Stands in for ``os`` inside ``state``: around every call it checks that the state file
    (and ``.prev``, once there) is a complete document holding either the old or the new state."""

    def __init__(self, path, old, new):
        self.path = path
        self.docs = {path: [old, new], previous_path(path): [old]}
        self.calls: list[str] = []

    def check(self):
        for p, allowed in self.docs.items():
            if p == previous_path(self.path) and not p.exists():
                continue
            assert load(p) in allowed, p

    def _checked(self, name, real):
        def call(*args, **kwargs):
            self.check()
            out = real(*args, **kwargs)
            self.check()  # e.g. open(<file>, "wb") would have truncated it here
            self.calls.append(name)
            return out
        return call

    def __getattr__(self, name):
        real = getattr(os, name)
        return self._checked(name, real) if callable(real) else real

    def builtin_open(self, *args, **kwargs):
        return self._checked("builtin open", open)(*args, **kwargs)


@pytest.mark.parametrize("old, new", [(ONE, TWO), (TWO, {}), ({}, MANY)])
def test_state_file_is_complete_at_every_step_of_a_save(tmp_path, monkeypatch, old, new):
    path = tmp_path / "state.json"
    save(path, old)
    spy = CheckingOs(path, old, new)
    monkeypatch.setattr(state, "os", spy)
    monkeypatch.setattr(state, "open", spy.builtin_open, raising=False)  # shadows the builtin
    save(path, new)
    monkeypatch.undo()
    # The steps that could expose a partial file all ran under the check.
    assert {"open", "write", "fsync", "link", "replace"} <= set(spy.calls)
    assert (load(path), load(previous_path(path))) == (new, old)
    assert not (tmp_path / "state.json.tmp").exists()


CORRUPT = [
    ("garbage", b"\x00\xffnot json"),
    ("empty", b""),
    ("truncated", msgspec.json.encode({"version": 1, "services": {}})[:-3]),
    ("wrong shape", b'{"version": 1, "services": []}'),
    ("no version", b'{"services": {}}'),
    ("bad option type", b'{"version": 1, "services": {"web": {"options": {"port": "80"},'
                        b' "address": "10.0.0.1"}}}'),
]


@pytest.mark.parametrize("content", [c for _, c in CORRUPT], ids=[n for n, _ in CORRUPT])
def test_corrupt_with_prev_names_file_prev_and_flag(tmp_path, content):
    path = tmp_path / "state.json"
    save(path, ONE)
    save(path, TWO)
    path.write_bytes(content)
    with pytest.raises(StateFileError) as exc:
        load(path)
    msg = str(exc.value)
    assert msg.startswith(f"state file {path} is unusable: ")
    assert f"a previous good copy is at {previous_path(path)}" in msg
    assert "--restore-previous" in msg
    assert exc.value.path == path
    assert exc.value.previous == previous_path(path)
    assert path.read_bytes() == content  # refusing leaves everything as it was


@pytest.mark.parametrize("restore_previous", [False, True])
def test_corrupt_without_prev_says_there_is_no_copy(tmp_path, restore_previous):
    path = tmp_path / "state.json"
    path.write_bytes(b"{")
    with pytest.raises(StateFileError) as exc:
        load(path, restore_previous=restore_previous)
    msg = str(exc.value)
    assert str(path) in msg
    assert "no previous copy exists" in msg
    assert "--restore-previous" not in msg
    assert exc.value.previous is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_unknown_version_is_refused(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b'{"version": 2, "services": {}}')
    with pytest.raises(StateFileError) as exc:
        load(path)
    assert "unknown version 2 (this gorb reads 1)" in str(exc.value)
    assert str(path) in str(exc.value)


def test_restore_previous_loads_prev_and_sets_the_corrupt_file_aside(tmp_path):
    path = tmp_path / "state.json"
    save(path, ONE)
    save(path, TWO)
    path.write_bytes(b"\x00corrupt")
    assert load(path, restore_previous=True) == ONE
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("state.json.corrupt-")]
    assert len(aside) == 1
    assert re.fullmatch(r"state\.json\.corrupt-\d+", aside[0].name)
    assert aside[0].read_bytes() == b"\x00corrupt"  # kept for a post-mortem
    assert load(path) == ONE  # the state file was rewritten: a plain start works again
    assert load(previous_path(path)) == ONE
    assert not (tmp_path / "state.json.tmp").exists()


def test_restore_previous_with_a_good_file_changes_nothing(tmp_path):
    path = tmp_path / "state.json"
    save(path, ONE)
    save(path, TWO)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert load(path, restore_previous=True) == TWO
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_restore_previous_with_a_corrupt_prev_refuses_and_moves_nothing(tmp_path):
    path = tmp_path / "state.json"
    save(path, ONE)
    save(path, TWO)
    path.write_bytes(b"{")
    previous_path(path).write_bytes(b"[")
    with pytest.raises(StateFileError) as exc:
        load(path, restore_previous=True)
    assert str(previous_path(path)) in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.json.prev"]
    assert path.read_bytes() == b"{"
