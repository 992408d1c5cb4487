"""pyroute2's own IPVS API as a contender of ``bench_writer`` (issue 10, item 2): the same dest ops
as the bare adapter, sent the ways pyroute2 0.9.7 offers, and its encoder beside ``codec``.

    python -m tests.bench.pyroute2_ipvs MODE SERVICES PER   # in a fresh netns: prints [add_s, set_s]
    python -m tests.bench.pyroute2_ipvs micro [N [PASSES]]  # encode-only µs/message, no kernel
    python -m tests.bench.pyroute2_ipvs errors              # in a fresh netns: one op refused

Modes (every one adds SERVICES x PER dests, then sets their weights; services are added untimed):

- ``api``: ``IPVS().dest("add"|"set", service=..., dest=IPVSDest(...))``, the documented API. It
  cannot batch: each call runs pyroute2's event loop until that request's ack is in, so this is
  one request per round trip.
- ``async``: ``AsyncIPVS.dest`` with up to ``netlink.BATCH`` calls in flight (``asyncio.gather``):
  the same API, pipelined (each request is its own ``send()``; acks are matched by sequence).
- ``batch``: ``ipvsmsg`` requests built from ``IPVSService.dump_key()`` / ``IPVSDest.dump_nla()``
  exactly as ``IPVS.dest`` builds them, sent ``netlink.BATCH`` per ``send()`` by the socket's
  ``nlm_request_batch``: pyroute2's own batching, its encoder and its ack parsing.
- ``adapter``: gorb's ``Kernel.apply`` (its batching, ``NETLINK_CAP_ACK``, its ack parsing) with
  ``codec.encode_op`` replaced by ``encode_op`` below: what the writer would be with pyroute2's
  encoder, the switch issue 10's rule 2 talks about.

Each pyroute2 row builds its ``IPVSDest`` from gorb's ``KDest`` inside the timing, as a writer on
pyroute2 would have to; the ``IPVSService`` objects are built once per service, untimed. Every
kernel value is passed explicitly (pyroute2's defaults are DR, wlc, weight 1; sandbox.md), and
after each run the kernel is dumped (untimed) to check every dest has the weight that was set.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import socket
import statistics
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pyroute2 import IPVS, AsyncIPVS, IPVSDest, IPVSService  # noqa: E402
from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST  # noqa: E402
from pyroute2.netlink.generic.ipvs import ipvsmsg  # noqa: E402

from gorb.common.model import OWNED_SERVICE_FLAGS  # noqa: E402
from gorb.services.ipvs_writer import codec, netlink  # noqa: E402
from gorb.services.ipvs_writer.table import KDest, KService, Op  # noqa: E402
from tests.bench.bench_writer import entries  # noqa: E402

# The flags pyroute2's API puts on each verb ("create" and "change" in NetlinkRequest.flags);
# IPVS ignores them, gorb sends REQUEST | ACK.
API_FLAGS = {"add": NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
             "set": NLM_F_REQUEST | NLM_F_ACK | NLM_F_REPLACE}


def _netmask(prefix: int, af: int) -> str:
    """pyroute2 types the netmask ``ip4addr``; for IPv6 the kernel wants a host-order u32 prefix
    length, spelled here as the dotted quad of those four bytes (sandbox.md)."""
    if af == socket.AF_INET:
        return socket.inet_ntoa(codec.netmask_bytes(prefix, af))
    return socket.inet_ntoa(struct.pack("=I", prefix))


def service_obj(s: KService) -> IPVSService:
    key = {"af": s.af, "fwmark": s.fwmark} if s.fwmark else {
        "af": s.af, "protocol": s.protocol, "addr": s.addr, "port": s.port}
    return IPVSService(**key, sched_name=s.sched, timeout=s.timeout,
                       flags={"flags": s.flags, "mask": OWNED_SERVICE_FLAGS},
                       netmask=_netmask(s.netmask, s.af))


def dest_obj(d: KDest) -> IPVSDest:
    # tun_port: pyroute2 declares it host-order uint16, the kernel's is __be16 (sandbox.md)
    return IPVSDest(addr=d.addr, port=d.port, fwd_method=d.fwd, weight=d.weight,
                    u_thresh=d.u_thresh, l_thresh=d.l_thresh, tun_type=d.tun_type,
                    tun_port=socket.htons(d.tun_port), tun_flags=d.tun_flags)


def request(op: Op, svc: IPVSService | None = None) -> ipvsmsg:
    """The request ``IPVS.service``/``IPVS.dest`` would build for ``op`` (header not set)."""
    svc = svc if svc is not None else service_obj(op.service)
    msg = ipvsmsg()
    msg["cmd"] = codec.CMD[op.verb]
    msg["version"] = codec.GENL_VERSION
    if op.dest is None:
        msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE",
                         svc.dump_key() if op.verb == "del_service" else svc.dump_nla())]
        return msg
    dest = dest_obj(op.dest)
    if op.verb == "del_dest":
        nest = dest.dump_nla(items=filter(lambda kv: kv[0] in ("addr", "port", "addr_family"),
                                          dest.items()))
    else:
        nest = dest.dump_nla()
    msg["attrs"] = [("IPVS_CMD_ATTR_SERVICE", svc.dump_key()), ("IPVS_CMD_ATTR_DEST", nest)]
    return msg


def encode_op(op: Op, family: int, seq: int, svc: IPVSService | None = None) -> bytes:
    """Drop-in for ``codec.encode_op``: the same message, encoded by pyroute2."""
    msg = request(op, svc)
    msg["header"]["type"] = family
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = seq
    msg["header"]["pid"] = 0
    msg.encode()
    return bytes(msg.data)


def decoded(data: bytes) -> tuple:
    """A message as pyroute2 decodes it: (type, flags, seq, cmd, {nest: {attr: value}})."""
    msg = ipvsmsg(data)
    msg.decode()
    h = msg["header"]
    nests = {name: {k: (v["flags"], v["mask"]) if k == "IPVS_SVC_ATTR_FLAGS" else v
                    for k, v in nla["attrs"]} for name, nla in msg["attrs"]}
    return h["type"], h["flags"], h["sequence_number"], msg["cmd"], nests


# --- the ops of the rate benchmark ----------------------------------------------------------------

def workload(services: int, per: int) -> tuple[list[Op], list[Op], list[Op]]:
    """The bare adapter's ops (bench_writer.adapter_run): services, dest adds, weight sets."""
    svcs, adds, sets = [], [], []
    for vip, dests in entries(services, per):
        s = KService(2, 6, vip, 80, sched="wrr")
        svcs.append(Op("add_service", s))
        adds += [Op("add_dest", s, KDest(d, 8080, 0, 100)) for d in dests]
        sets += [Op("set_dest", s, KDest(d, 8080, 0, 50)) for d in dests]
    return svcs, adds, sets


def _chunks(ops: list, n: int = netlink.BATCH):
    for i in range(0, len(ops), n):
        yield ops[i:i + n]


def _with_services(svcs: list[Op]) -> tuple[IPVS, dict[int, object]]:
    """An ``IPVS`` socket with the services of ``svcs`` added, and their pyroute2 objects by
    the id of gorb's ``KService``."""
    ipvs = IPVS()
    objs = {id(op.service): service_obj(op.service) for op in svcs}
    for op in svcs:
        ipvs.service("add", service=objs[id(op.service)])
    return ipvs, objs


def run_api(svcs: list[Op], adds: list[Op], sets: list[Op]) -> tuple[float, float]:
    ipvs, objs = _with_services(svcs)

    def run(ops, verb):
        t = time.perf_counter()
        for op in ops:
            ipvs.dest(verb, service=objs[id(op.service)], dest=dest_obj(op.dest))
        return time.perf_counter() - t

    out = run(adds, "add"), run(sets, "set")
    ipvs.close()
    return out


def run_async(svcs: list[Op], adds: list[Op], sets: list[Op]) -> tuple[float, float]:
    async def main():
        async with AsyncIPVS() as ipvs:
            await ipvs.setup_endpoint()  # __aenter__ does not: "protocol id is not obtained yet"
            objs = {id(op.service): service_obj(op.service) for op in svcs}
            for op in svcs:
                await ipvs.service("add", service=objs[id(op.service)])

            async def run(ops, verb):
                t = time.perf_counter()
                for chunk in _chunks(ops):
                    await asyncio.gather(*(ipvs.dest(verb, service=objs[id(op.service)],
                                                     dest=dest_obj(op.dest)) for op in chunk))
                return time.perf_counter() - t

            return await run(adds, "add"), await run(sets, "set")

    return asyncio.run(main())


def run_batch(svcs: list[Op], adds: list[Op], sets: list[Op]) -> tuple[float, float]:
    ipvs, objs = _with_services(svcs)

    def run(ops, verb):
        t = time.perf_counter()
        for chunk in _chunks(ops):
            msgs = []
            for op in chunk:
                msg = request(op, objs[id(op.service)])
                msg["header"]["type"] = ipvs.prid
                msg["header"]["flags"] = API_FLAGS[verb]
                msgs.append(msg)
            ipvs.nlm_request_batch(msgs)  # raises NetlinkError on the first refused op
        return time.perf_counter() - t

    out = run(adds, "add"), run(sets, "set")
    ipvs.close()
    return out


def run_adapter(svcs: list[Op], adds: list[Op], sets: list[Op]) -> tuple[float, float]:
    objs = {id(op.service): service_obj(op.service) for op in svcs}
    codec_encode = codec.encode_op
    codec.encode_op = lambda op, family, seq: encode_op(op, family, seq, objs[id(op.service)])
    try:
        k = netlink.Kernel()
        assert not any(k.apply(svcs))
        t = time.perf_counter()
        r = k.apply(adds)
        a = time.perf_counter() - t
        t = time.perf_counter()
        r2 = k.apply(sets)
        b = time.perf_counter() - t
        assert not any(r) and not any(r2), [e for e in r + r2 if e][:3]
        k.close()
    finally:
        codec.encode_op = codec_encode
    return a, b


MODES = {"api": run_api, "async": run_async, "batch": run_batch, "adapter": run_adapter}


def check_kernel(sets: list[Op]) -> None:
    """Every dest is in the kernel as NAT with the weight that was set (gorb's own dump)."""
    with netlink.Kernel() as k:
        table = k.dump()
    got = {(s.addr, d.addr): (d.fwd, d.weight) for s in table.values() for d in s.dests.values()}
    want = {(op.service.addr, op.dest.addr): (op.dest.fwd, op.dest.weight) for op in sets}
    assert got == want, f"kernel differs: {len(got)} dests, {len(set(got.items()) - set(want.items()))} wrong"


# --- encode only -----------------------------------------------------------------------------------

def micro(n: int = 2000, repeats: int = 5) -> dict:
    """µs per message to encode the rate benchmark's dest ops (add then set), no kernel:
    gorb's ``codec.encode_op``; pyroute2 from gorb's values (``IPVSDest`` + ``dump_key`` +
    ``dump_nla`` + ``ipvsmsg.encode``, what ``IPVS.dest`` does before sending); pyroute2's
    ``ipvsmsg.encode()`` alone on attribute lists dumped beforehand. Medians of ``repeats``
    passes, contenders in rotating order, and the median of each pass's ratio to gorb. First checks that both encoders produce the same
    message (pyroute2's decoding of the two byte strings compares equal)."""
    services = max(1, n // 200)
    svcs, adds, sets = workload(services, n // services)
    ops = adds + sets
    objs = {id(op.service): service_obj(op.service) for op in svcs}
    family = 42
    for op in ops[:5] + ops[-5:] + svcs[:1]:
        a = decoded(codec.encode_op(op, family, 7))
        b = decoded(encode_op(op, family, 7, objs[id(op.service)]))
        assert a == b, f"{op.verb}: codec {a} != pyroute2 {b}"
    dumped = [request(op, objs[id(op.service)])["attrs"] for op in ops]

    def gorb(_):
        for seq, op in enumerate(ops, 1):
            codec.encode_op(op, family, seq)

    def pyroute2_full(_):
        for seq, op in enumerate(ops, 1):
            encode_op(op, family, seq, objs[id(op.service)])

    def pyroute2_encode_only(fresh):
        for seq, (op, attrs) in enumerate(zip(ops, fresh), 1):
            msg = ipvsmsg()
            msg["cmd"] = codec.CMD[op.verb]
            msg["version"] = codec.GENL_VERSION
            msg["attrs"] = attrs
            msg["header"]["type"] = family
            msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
            msg["header"]["sequence_number"] = seq
            msg["header"]["pid"] = 0
            msg.encode()

    contenders = {"gorb": gorb, "pyroute2": pyroute2_full, "pyroute2_encode": pyroute2_encode_only}
    times: dict[str, list[float]] = {k: [] for k in contenders}
    names = list(contenders)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            # encode() turns the dumped {"attrs": ...} dicts into nla objects in place, and
            # re-encoding those is another (cheaper) path: each pass gets fresh copies, untimed
            fresh = copy.deepcopy(dumped) if name == "pyroute2_encode" else None
            gc.collect()
            gc.freeze()  # the collector must not walk the prepared objects in the timed pass
            t = time.perf_counter()
            contenders[name](fresh)
            times[name].append((time.perf_counter() - t) / len(ops) * 1e6)
            gc.unfreeze()
    # each pass's contenders ran back to back: their ratio is steadier than the medians' on a
    # shared machine
    ratios = {k: statistics.median(t / g for t, g in zip(times[k], times["gorb"]))
              for k in ("pyroute2", "pyroute2_encode")}
    return {"messages": len(ops), "repeats": repeats,
            "us_per_message": {k: statistics.median(v) for k, v in times.items()},
            "ratio_to_gorb": ratios, "all": times}


# --- what each way reports when one op of a batch is refused ------------------------------------

def errors() -> dict:
    """Three dest adds, the middle one to a service that does not exist (ESRCH): what comes back
    from each pyroute2 way, and from gorb's ``Kernel.apply``. Run in a fresh netns."""
    svcs, adds, _ = workload(1, 3)
    ghost = KService(2, 6, "10.78.9.9", 80, sched="wrr")
    ops = [adds[0], Op("add_dest", ghost, adds[1].dest), adds[2]]
    objs = {id(op.service): service_obj(op.service) for op in svcs + ops}
    out = {}
    with IPVS() as ipvs:
        ipvs.service("add", service=objs[id(svcs[0].service)])
        for noraise in (False, True):
            msgs = []
            for op in ops:
                msg = request(op, objs[id(op.service)])
                msg["header"]["type"] = ipvs.prid
                msg["header"]["flags"] = API_FLAGS["add"]
                msgs.append(msg)
            try:
                got = ipvs.nlm_request_batch(msgs, noraise=noraise)
                out[f"nlm_request_batch noraise={noraise}"] = f"returned {got!r}"
            except Exception as exc:  # noqa: BLE001 -- what it raises is the finding
                out[f"nlm_request_batch noraise={noraise}"] = f"raised {exc!r}"
            out[f"  dests in the kernel after noraise={noraise}"] = len(ipvs.dest("dump", service=objs[id(svcs[0].service)]))
            for op in (ops[0], ops[2]):
                try:
                    ipvs.dest("del", service=objs[id(op.service)], dest=dest_obj(op.dest))
                except Exception:  # noqa: BLE001 -- not added: nothing to undo
                    pass

    async def gather():
        async with AsyncIPVS() as aipvs:
            await aipvs.setup_endpoint()
            res = await asyncio.gather(*(aipvs.dest("add", service=objs[id(op.service)],
                                                    dest=dest_obj(op.dest)) for op in ops),
                                       return_exceptions=True)
            return [repr(r) if isinstance(r, Exception) else f"ok ({len(r)} messages)" for r in res]

    out["AsyncIPVS.dest x3, gather(return_exceptions=True)"] = asyncio.run(gather())
    with netlink.Kernel() as k:
        k.apply([Op("del_dest", op.service, op.dest) for op in (ops[0], ops[2])])
        out["gorb Kernel.apply"] = [str(e) if e else "ok" for e in k.apply(ops)]
    return out


def main(argv: list[str]) -> int:
    if argv[0] == "micro":
        print(json.dumps(micro(*map(int, argv[1:]))))
        return 0
    if argv[0] == "errors":
        print(json.dumps(errors(), indent=1))
        return 0
    mode, services, per = argv[0], int(argv[1]), int(argv[2])
    svcs, adds, sets = workload(services, per)
    add_s, set_s = MODES[mode](svcs, adds, sets)
    check_kernel(sets)
    print(json.dumps([add_s, set_s]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
