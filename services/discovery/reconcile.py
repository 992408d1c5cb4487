"""Pure core of the store sync: a three-way diff between the store, the writer and their last
agreed state, into writer commands and store write-backs, with the safety rule.

Each object (a service, or a backend of a service) is compared in normalised form: both sides go
through ``gorb.common.validation`` first (with the address the writer resolved), so a document without
``protocol`` or ``host``, or with ``"TCP"``, equals what the writer stores and never flaps
(GORB compared raw values and re-created such services on every round, §8.19). Then, per object,
with ``s`` the store's value, ``w`` the writer's and ``b`` the last value both had (``base``):

    s == w                          in sync; b := s
    no base yet, or s != b          the store changed: the writer is made to match (commands)
    s == b, w != b                  gorb changed (REST): written back to the store (Consul only;
                                    a read-only store has no base, so it always wins)

Commands are ordinary writer requests (``gorb.common.messages``)::

    service   missing in gorb           service.create, then backend.create for its backends
              missing in the store      service.delete (its backends go with it)
              key changed (host, port, protocol, fwmark, family): service.delete + service.create
              other options changed     service.update with the store's options
    backend   missing / extra           backend.create / backend.delete
              only weight changed       backend.update {"weight"} (0 = drained)
              anything else changed     backend.delete + backend.create

Write-backs carry the bytes they expect to replace, for compare-and-set (``store.put`` /
``store.delete``; deleting a service also deletes ``backends/<vs>/``).

The safety rule (PyBal's depool threshold applied to configuration; GORB removed everything when
the prefix was empty, §8.19): unless forced, a round that would delete from gorb
- anything at all while the store is empty (no service document and no ``format`` marker), or
- more than ``max_delete_share`` of gorb's services (or of its backends), when that is more than
  one object,
is refused as a whole and changes nothing.

Objects the store cannot describe (a bad document, a name that does not resolve) are left alone
on both sides and reported; nothing here does I/O (names resolve through the injected
``resolve``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from gorb.common.errors import GorbError
from gorb.common.model import BackendOptions, ServiceOptions
from gorb.common.store_messages import (
    STATUS_NEED_SYNC,
    STATUS_OK,
    STATUS_REFUSED,
    Change,
    DiffLists,
    ObjectError,
    WriteLists,
)
from gorb.common.validation import (
    canonical_ip,
    decode,
    ip_family,
    validate_backend,
    validate_service,
)
from gorb.common.model import KEY_FIELDS  # a change of one is a delete and a re-create
from gorb.services.discovery import documents as docs
from gorb.services.discovery.documents import StoreObjects

GORB, STORE = "gorb", "store"  # the side an action changes

ObjKey = tuple[str, ...]  # ("service", vs) | ("backend", vs, rs)
Norm = dict[str, Any]      # normalised options
Base = dict[ObjKey, Any]   # last agreed value per object; a missing key means absent on both


class _Conflict:
    """A base value that equals nothing: the object's last round failed, the store wins next."""

    def __eq__(self, other: object) -> bool:
        return False

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return "CONFLICT"


CONFLICT = _Conflict()
_NO_BASE = object()


def skey(vsid: str) -> ObjKey:
    return ("service", vsid)


def bkey(vsid: str, rsid: str) -> ObjKey:
    return ("backend", vsid, rsid)


@dataclass(frozen=True)
class Step:
    """One writer request (``op`` = its type, ``body``) or one store write (``store.put`` /
    ``store.delete`` of ``key``, relative to the prefix, expecting ``expect`` there now)."""

    op: str
    service: str
    backend: str | None = None
    body: dict[str, Any] | None = None
    key: str | None = None
    value: bytes | None = None
    expect: bytes | None = None
    tree: bool = False  # also delete backends/<vs>/ (a service removed, or re-created over REST)

    def change(self) -> Change:
        return Change(self.op, self.service, self.backend)


@dataclass
class Action:
    """Steps that bring one object into line; ``agreed`` becomes the base once all succeed."""

    side: str          # GORB: commands to the writer; STORE: write-backs
    verb: str          # create | update | delete
    service: str
    backend: str | None
    steps: list[Step]
    agreed: dict[ObjKey, Any] = field(default_factory=dict)  # None = absent

    @property
    def label(self) -> str:
        return self.service if self.backend is None else f"{self.service}/{self.backend}"


@dataclass
class Plan:
    actions: list[Action]
    agreed: dict[ObjKey, Any]       # objects already equal on both sides (None = absent on both)
    errors: dict[str, str]          # key -> why its object is left alone
    refused: str | None = None

    def diff(self) -> tuple[DiffLists, DiffLists, WriteLists]:
        services, backends, writes = DiffLists(), DiffLists(), WriteLists()
        for a in self.actions:
            if a.side == GORB:
                lists = services if a.backend is None else backends
                getattr(lists, a.verb).append(a.label)
            else:
                for step in a.steps:
                    (writes.put if step.op == "store.put" else writes.delete).append(step.key)
        return services, backends, writes

    def status(self) -> str:
        if self.refused:
            return STATUS_REFUSED
        return STATUS_NEED_SYNC if self.actions else STATUS_OK

    def error_list(self) -> list[ObjectError]:
        return [ObjectError(k, v) for k, v in sorted(self.errors.items())]


@dataclass
class _Obj:
    norm: Norm
    address: str  # what a create command carries ("" = the writer picks: host or default VIP)


@dataclass
class _Side:
    services: dict[str, _Obj] = field(default_factory=dict)
    backends: dict[str, dict[str, _Obj]] = field(default_factory=dict)
    family: dict[str, str] = field(default_factory=dict)
    bad: set[str] = field(default_factory=set)
    bad_backends: set[tuple[str, str]] = field(default_factory=set)


Resolver = Callable[[str], str]


def _is_ip(host: str) -> bool:
    try:
        ip_family(host)
    except GorbError:
        return False
    return True


def norm_service(opts: ServiceOptions, address: str) -> Norm:
    return msgspec.to_builtins(validate_service(opts, address))


def norm_backend(opts: BackendOptions, address: str, family: str, fwmark: bool) -> Norm:
    """Validated backend options; a weight of 0 stays 0 (drained), where create would make 100."""
    valid = validate_backend(opts, address, family, fwmark_service=fwmark)
    if opts.weight == 0:
        valid = msgspec.structs.replace(valid, weight=0)
    return msgspec.to_builtins(valid)


def _family(norm: Norm, address: str) -> str:
    if norm.get("family"):
        return norm["family"]
    return ip_family(address) if address else ""


def _writer_side(views: dict[str, dict[str, Any]], errors: dict[str, str]) -> _Side:
    side = _Side()
    for vsid, view in views.items():
        try:
            address = view.get("address") or ""
            norm = norm_service(decode(view["options"], ServiceOptions), address)
        except (GorbError, KeyError, TypeError) as exc:
            errors[f"gorb: service {vsid}"] = str(exc)
            side.bad.add(vsid)
            continue
        side.services[vsid] = _Obj(norm, address)
        side.family[vsid] = _family(norm, address)
        for rsid, bview in (view.get("backends") or {}).items():
            try:
                baddr = bview.get("address") or ""
                bnorm = norm_backend(decode(bview["options"], BackendOptions), baddr,
                                     side.family[vsid], bool(norm.get("fwmark")))
            except (GorbError, KeyError, TypeError) as exc:
                errors[f"gorb: backend {vsid}/{rsid}"] = str(exc)
                side.bad_backends.add((vsid, rsid))
                continue
            side.backends.setdefault(vsid, {})[rsid] = _Obj(bnorm, baddr)
    return side


def _address(host: str, known_host: str | None, known_address: str, resolve: Resolver) -> str:
    """The IP ``host`` stands for: itself, what the writer resolved it to, or a fresh lookup.
    GORB resolved once at creation and never again; so does gorb for an unchanged host."""
    if not host:
        return known_address if known_host == "" else ""
    if _is_ip(host):
        return canonical_ip(host)
    if known_host == host and known_address:
        return known_address
    return resolve(host)


def _store_side(store: StoreObjects, gorb: _Side, errors: dict[str, str],
                resolve: Resolver) -> _Side:
    side = _Side()
    for vsid, opts in store.services.items():
        mine = gorb.services.get(vsid)
        try:
            address = _address(opts.host, mine.norm["host"] if mine else None,
                               mine.address if mine else "", resolve)
            norm = norm_service(opts, address)
        except GorbError as err:
            errors[store.name(docs.service_key(vsid))] = err.reason
            side.bad.add(vsid)
            continue
        side.services[vsid] = _Obj(norm, address if opts.host else "")
        side.family[vsid] = _family(norm, address)
        for rsid, bopts in store.backends.get(vsid, {}).items():
            theirs = gorb.backends.get(vsid, {}).get(rsid)
            try:
                baddr = _address(bopts.host, theirs.norm["host"] if theirs else None,
                                 theirs.address if theirs else "", resolve)
                bnorm = norm_backend(bopts, baddr, side.family[vsid], bool(norm.get("fwmark")))
            except GorbError as err:
                errors[store.name(docs.backend_key(vsid, rsid))] = err.reason
                side.bad_backends.add((vsid, rsid))
                continue
            side.backends.setdefault(vsid, {})[rsid] = _Obj(bnorm, baddr)
    return side


def initial_base(store: StoreObjects, writable: bool) -> Base | None:
    """The base of a first round: a writable store that is empty is seeded from gorb (every gorb
    object counts as a change made in gorb); otherwise none, and the store is authoritative."""
    return {} if writable and store.empty else None


def plan(store: StoreObjects, gorb_views: dict[str, dict[str, Any]], base: Base | None, *,
         writable: bool, force: bool = False, max_delete_share: float = 0.5,
         resolve: Resolver = canonical_ip) -> Plan:
    """The round that brings ``gorb_views`` (``state.dump``'s services) and ``store`` together."""
    errors = dict(store.errors)
    gorb = _writer_side(gorb_views, errors)
    st = _store_side(store, gorb, errors, resolve)
    r = _Round(store, st, gorb, base, writable)
    vsids = set(st.services) | set(gorb.services) | set(store.bad_services) | gorb.bad
    if base:
        vsids |= {k[1] for k in base}
    for vsid in sorted(vsids - r.skip):
        r.service(vsid)
    actions = r.deletes + r.actions
    if writable and not store.marker and any(a.side == STORE for a in actions):
        actions.insert(0, Action(STORE, "create", "", None, [Step(
            "store.put", "", key=docs.MARKER, value=docs.render_marker())]))
    refused = None if force else _refusal(store, r.counts, len(gorb.services) + len(gorb.bad),
                                          sum(map(len, gorb.backends.values())),
                                          max_delete_share)
    return Plan(actions, r.agreed, errors, refused)


class _Round:
    """One ``plan``'s decisions, object by object (``service`` then its backends)."""

    def __init__(self, store: StoreObjects, st, gorb, base: Base | None, writable: bool):
        self.store, self.st, self.gorb, self.base, self.writable = store, st, gorb, base, writable
        self.skip = set(store.bad_services) | st.bad | gorb.bad
        self.skip_b = set(store.bad_backends) | st.bad_backends | gorb.bad_backends
        self.agreed: dict[ObjKey, Any] = {}
        self.deletes: list[Action] = []
        self.actions: list[Action] = []
        self.counts = {"services": 0, "backends": 0}

    def decide(self, key: ObjKey, s: Norm | None, w: Norm | None) -> str | None:
        """Which side changes (None: they agree): the store's when only it moved since the
        last agreed value (and it may be written), else gorb's."""
        if s == w:
            return None
        b = _NO_BASE if self.base is None else self.base.get(key)
        if b is _NO_BASE or s != b or not self.writable:
            return GORB
        return STORE

    def backend_ids(self, vsid: str) -> set[str]:
        ids = set(self.st.backends.get(vsid, {})) | set(self.gorb.backends.get(vsid, {}))
        if self.base:
            ids |= {k[2] for k in self.base if k[0] == "backend" and k[1] == vsid}
        return ids

    def create_backends(self, vsid: str) -> None:
        for rsid, obj in sorted(self.st.backends.get(vsid, {}).items()):
            if (vsid, rsid) not in self.skip_b:
                self.actions.append(_backend_create(vsid, rsid, obj))

    def sync_backends(self, vsid: str) -> None:
        for rsid in sorted(self.backend_ids(vsid)):
            if (vsid, rsid) not in self.skip_b:
                self.backend(vsid, rsid)

    def backend(self, vsid: str, rsid: str) -> None:
        key = bkey(vsid, rsid)
        s = self.st.backends.get(vsid, {}).get(rsid)
        w = self.gorb.backends.get(vsid, {}).get(rsid)
        sn, wn = (s.norm if s else None), (w.norm if w else None)
        side = self.decide(key, sn, wn)
        if side is None:
            self.agreed[key] = sn
        elif side == GORB and s is None:
            self.counts["backends"] += 1
            self.actions.append(Action(GORB, "delete", vsid, rsid, [Step(
                "backend.delete", vsid, rsid, {"service": vsid, "backend": rsid})],
                {key: None}))
        elif side == GORB and w is None:
            self.actions.append(_backend_create(vsid, rsid, s))
        elif side == GORB:
            self.actions.append(_backend_change(vsid, rsid, s, wn))
        else:
            rel = docs.backend_key(vsid, rsid)
            expect = self.store.raw.get(rel)
            step = (Step("store.delete", vsid, rsid, key=rel, expect=expect) if w is None else
                    Step("store.put", vsid, rsid, key=rel, value=docs.render_backend(wn),
                         expect=expect))
            verb = "delete" if w is None else ("create" if s is None else "update")
            self.actions.append(Action(STORE, verb, vsid, rsid, [step], {key: wn}))

    def service(self, vsid: str) -> None:
        key = skey(vsid)
        s, w = self.st.services.get(vsid), self.gorb.services.get(vsid)
        sn, wn = (s.norm if s else None), (w.norm if w else None)
        side = self.decide(key, sn, wn)
        gone = {bkey(vsid, rs): None for rs in self.backend_ids(vsid)}
        if side is None:
            self.agreed[key] = sn
            self.sync_backends(vsid)
        elif side == GORB and s is None:
            self.counts["services"] += 1
            self.deletes.append(Action(GORB, "delete", vsid, None, [Step(
                "service.delete", vsid, body={"service": vsid})], {key: None, **gone}))
        elif side == GORB and w is None:
            self.actions.append(Action(GORB, "create", vsid, None, [_service_create(vsid, s)],
                                       {**gone, key: sn}))
            self.create_backends(vsid)
        elif side == GORB and any(sn.get(f) != wn.get(f) for f in KEY_FIELDS):
            self.actions.append(Action(GORB, "update", vsid, None, [
                Step("service.delete", vsid, body={"service": vsid}), _service_create(vsid, s)],
                {**gone, key: sn}))
            self.create_backends(vsid)
        elif side == GORB:
            self.actions.append(Action(GORB, "update", vsid, None, [Step(
                "service.update", vsid, body={"service": vsid, "options": sn})], {key: sn}))
            self.sync_backends(vsid)
        else:
            self.store_side(vsid, key, s, w, wn, gone)

    def store_side(self, vsid: str, key: ObjKey, s, w, wn: Norm | None, gone: dict) -> None:
        """The store takes gorb's version of service ``vsid`` (or loses it)."""
        rel = docs.service_key(vsid)
        if w is None:
            self.actions.append(Action(STORE, "delete", vsid, None, [Step(
                "store.delete", vsid, key=rel, expect=self.store.raw.get(rel), tree=True)],
                {key: None, **gone}))
            return
        # A service new to the store first clears backend keys left under it.
        self.actions.append(Action(STORE, "create" if s is None else "update", vsid, None, [Step(
            "store.put", vsid, key=rel, value=docs.render_service(wn),
            expect=self.store.raw.get(rel), tree=s is None)], {key: wn}))
        self.sync_backends(vsid)


def _refusal(store: StoreObjects, counts: dict[str, int], n_services: int, n_backends: int,
             share: float) -> str | None:
    if store.empty and (counts["services"] or counts["backends"]):
        return (f"the store is empty (no service document and no {docs.MARKER!r} marker): it "
                f"would delete {counts['services']} service(s) and {counts['backends']} "
                "backend(s); sync with force to apply")
    for what, n in (("services", n_services), ("backends", n_backends)):
        deleted = counts[what]
        if deleted > 1 and deleted > share * n:
            return (f"would delete {deleted} of {n} {what}, more than max_delete_share "
                    f"{share:g}; sync with force to apply")
    return None


def _service_create(vsid: str, obj: _Obj) -> Step:
    return Step("service.create", vsid,
                body={"service": vsid, "options": obj.norm, "address": obj.address})


def _backend_create(vsid: str, rsid: str, obj: _Obj) -> Action:
    steps = [Step("backend.create", vsid, rsid, {"service": vsid, "backend": rsid,
                                                 "options": obj.norm, "address": obj.address})]
    if obj.norm["weight"] == 0:  # create makes 0 into 100: drain it afterwards
        steps.append(_weight(vsid, rsid, 0))
    return Action(GORB, "create", vsid, rsid, steps, {bkey(vsid, rsid): obj.norm})


def _backend_change(vsid: str, rsid: str, obj: _Obj, current: Norm) -> Action:
    if {**obj.norm, "weight": 0} == {**current, "weight": 0}:
        steps = [_weight(vsid, rsid, obj.norm["weight"])]
    else:
        steps = [Step("backend.delete", vsid, rsid, {"service": vsid, "backend": rsid}),
                 *_backend_create(vsid, rsid, obj).steps]
    return Action(GORB, "update", vsid, rsid, steps, {bkey(vsid, rsid): obj.norm})


def _weight(vsid: str, rsid: str, weight: int) -> Step:
    return Step("backend.update", vsid, rsid,
                {"service": vsid, "backend": rsid, "weight": weight})


def next_base(base: Base | None, plan_: Plan, done: dict[int, bool]) -> Base:
    """The base after executing ``plan_``: ``done`` maps an action's index to whether all its
    steps succeeded. A failed action keeps its old base value, or gets CONFLICT on a first round
    (so the store still wins its next attempt)."""
    out: Base = dict(base or {})
    for key, value in plan_.agreed.items():
        _set(out, key, value)
    for i, action in enumerate(plan_.actions):
        if done.get(i):
            for key, value in action.agreed.items():
                _set(out, key, value)
        elif base is None:
            for key in action.agreed:
                out[key] = CONFLICT
    return out


def _set(base: Base, key: ObjKey, value: Any) -> None:
    if value is None:
        base.pop(key, None)
    else:
        base[key] = value
