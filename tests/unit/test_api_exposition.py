"""The fast ``/metrics`` path: the writer's ``metrics.rows`` (``metric_rows``) written as text by
``gorb.services.api.exposition``, checked byte for byte against prometheus_client: once against
the former path (``state.dump`` -> ``metrics.families`` -> ``generate_latest``) on an engine in
every state a backend can be in, once against the library's renderer for arbitrary label strings
and values (hypothesis); and ``metrics.Scrapes``, the cache in front of it."""

from __future__ import annotations

import gevent
import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from gorb.common.messages import BackendColumns, MetricLabels, MetricRows
from gorb.services.api import exposition
from gorb.services.api.metrics import Scrapes, families
from gorb.services.ipvs_writer.engine import Engine
from gorb.services.ipvs_writer.table import SKey
from tests.service.fake_kernel import FakeKernel

pytestmark = pytest.mark.timeout(60)

NOW = 1_700_000_000.0


def library_text(fams) -> bytes:
    reg = CollectorRegistry(auto_describe=False)

    class Fixed:
        def collect(self):
            return fams

    reg.register(Fixed())
    return generate_latest(reg)


def fast_text(rows: MetricRows, layout: exposition.Layout | None = None) -> bytes:
    layout = layout or exposition.Layout(rows.generation, rows.labels)
    return b"".join(exposition.render(layout, exposition.values(rows, layout.sizes, NOW)))


def rows_of(engine: Engine, known: int = -1) -> MetricRows:
    reply = engine.read("metrics.rows", {"generation": known})
    assert reply["ok"], reply
    # as the API receives it: through the bus's encoding (the kernel's columns come encoded)
    data = msgspec.msgpack.decode(msgspec.msgpack.encode(reply["data"]))
    return msgspec.convert(data, MetricRows)


def dump_of(engine: Engine) -> dict:
    return engine.read("state.dump", {"stats": True})["data"]["services"]


def svc(vs, host, port=80, **opts):
    return ("service.create", {"service": vs, "options": {"host": host, "port": port, **opts}})


def be(vs, rs, host, weight=100, **opts):
    return ("backend.create", {"service": vs, "backend": rs,
                               "options": {"host": host, "port": 8080, "weight": weight, **opts}})


STATS = {"conns": 4, "inpkts": 5, "outpkts": 6, "inbytes": 123456789012, "outbytes": 8,
         "activeconns": 2, "inactconns": 1, "persistconns": 0}


def busy_engine() -> Engine:
    """Every case /metrics distinguishes: services without backends or without a kernel entry,
    backends never checked, up (with an uptime), down, held in by fail-open, drained, with and
    without kernel entries and counters, shares that are not 0 or 1, insertion order != names."""
    kernel = FakeKernel()
    engine = Engine({}, kernel, lambda services: None, clock=lambda: NOW - 100)
    reqs = [svc("web", "10.0.0.1", fail_open=0.9), svc("empty", "10.0.0.2", 53, protocol="udp"),
            svc("alpha", "10.0.0.3", pulse={"type": "none"})]
    reqs += [be("web", rs, f"10.1.0.{i + 1}", weight=0 if rs == "d" else 100)
             for i, rs in enumerate(["z", "b", "a", "d", "c"])]
    reqs += [be("alpha", f"n{i}", f"10.2.0.{i + 1}", weight=10 + i) for i in range(3)]
    for reply, _ in engine.handle_batch(reqs):
        assert reply["ok"], reply
    groups = engine.targets()
    key = {m: k for k, g in groups.items() for m in g.members}
    results = [
        {"key": key[("web", "a")], "ok": True, "status": "up", "at": NOW - 5, "latency": 0.25,
         "passes": 3, "failures": 0, "health": 0.7},
        {"key": key[("web", "b")], "ok": False, "status": "down", "at": NOW - 2, "latency": 0.0,
         "passes": 0, "failures": 4, "health": 0.1},
        {"key": key[("web", "c")], "ok": False, "status": "down", "at": NOW - 1, "latency": 1.5,
         "passes": 0, "failures": 1, "health": 0.3},
    ]
    engine.handle_health([{"worker": 0, "results": results}])
    live = kernel.dump()
    web_key: SKey = next(k for k, s in live.items() if s.addr == "10.0.0.1")
    live[web_key].stats = {"conns": 10, "inpkts": 20, "outpkts": 30, "inbytes": 40,
                           "outbytes": 50, "cps": 1}
    dests = live[web_key].dests
    for i, d in enumerate(dests.values()):
        d.stats = {k: v + i for k, v in STATS.items()}
    del dests[("10.1.0.5", 8080)]  # c: no kernel entry, its configured weight is shown
    next(iter(dests.values())).weight = 7  # the kernel's weight wins over the wanted one
    kernel.dump = lambda: live  # both reads see the same kernel table
    return engine


def test_the_rows_render_exactly_what_the_state_dump_rendered():
    engine = busy_engine()
    want = library_text(families(dump_of(engine), NOW))
    assert fast_text(rows_of(engine)) == want
    assert b"gorb_service_backend_held_in{" in want and b"e+11" in want  # the cases are there


def test_a_writer_without_services_renders_the_empty_families():
    engine = Engine({}, FakeKernel(), lambda services: None)
    assert fast_text(rows_of(engine)) == library_text(families({}, NOW))


def test_labels_travel_only_when_they_changed():
    engine = busy_engine()
    first = rows_of(engine)
    assert rows_of(engine, known=first.generation).labels is None
    reply, _ = engine.handle_batch([("backend.update",
                                     {"service": "alpha", "backend": "n0", "weight": 1})])[0]
    same = rows_of(engine, known=first.generation)
    assert (same.generation, same.labels) == (first.generation, None)  # a weight: same rows
    assert same.backends.weight != first.backends.weight
    engine.handle_batch([be("alpha", "n9", "10.2.0.9")])
    grown = rows_of(engine, known=first.generation)
    assert grown.generation != first.generation and grown.labels is not None
    assert grown.labels.sizes[-1] == 4


def test_a_kept_layout_renders_new_values_and_reuses_unchanged_families():
    engine = busy_engine()
    rows = rows_of(engine)
    layout = exposition.Layout(rows.generation, rows.labels)
    fast_text(rows, layout)
    texts = dict(layout.texts)
    engine.handle_batch([("backend.update", {"service": "web", "backend": "c", "weight": 3})])
    again = rows_of(engine, known=rows.generation)
    again = msgspec.structs.replace(again, labels=rows.labels)
    assert fast_text(again, layout) == library_text(families(dump_of(engine), NOW))
    assert b"name=\"c\",port=\"8080\",service_name=\"web\"} 3.0" in fast_text(again, layout)
    weight = "gorb_service_backend_weight"
    assert layout.texts[weight][1] != texts[weight][1]
    assert layout.texts["gorb_service_backends"][1] is texts["gorb_service_backends"][1]


# --- arbitrary labels and values against the library's renderer ---------------------------------

label = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=8) | \
    st.sampled_from(['"', "\\", "\n", 'a"b\\c\nd', "\\n", ""])
number = st.integers(0, 2**63) | st.floats(allow_nan=False).filter(
    lambda f: not (f == 0 and str(f).startswith("-")))  # a negative zero prints as 0.0
maybe = st.none() | number


@st.composite
def arbitrary_rows(draw):
    n_services = draw(st.integers(0, 3))
    sizes = [draw(st.integers(0, 3)) for _ in range(n_services)]
    n = sum(sizes)
    services = [[draw(label) for _ in range(4)] for _ in range(n_services)]
    backends = [[services[i][0], draw(label), draw(label), draw(label)]
                for i, size in enumerate(sizes) for _ in range(size)]

    def col(strategy):
        return [draw(strategy) for _ in range(n)]

    checked = col(st.booleans())
    return MetricRows(1, 1, MetricLabels(services, sizes, backends),
                      {k: [draw(maybe) for _ in range(n_services)]
                       for k, _, _ in exposition.COUNTERS},
                      BackendColumns(
                          weight=col(st.integers(0, 256)),
                          kernel_weight=col(st.none() | st.integers(0, 256)),
                          status=col(st.sampled_from(["up", "down", "unknown", "odd"])),
                          since=col(st.floats(0, NOW)),
                          held_in=col(st.booleans()),
                          check_at=[draw(number) if c else None for c in checked],
                          check_ok=[draw(st.booleans()) if c else None for c in checked],
                          check_latency=[draw(number) if c else None for c in checked],
                          check_health=[draw(st.floats(0, 1)) if c else None for c in checked],
                          check_passes=[draw(st.integers(0, 99)) if c else None for c in checked],
                          check_failures=[draw(st.integers(0, 99)) if c else None
                                          for c in checked],
                          stats={k: col(maybe) for k in ("conns", "inpkts", "outpkts", "inbytes",
                                                         "outbytes", "activeconns", "inactconns",
                                                         "persistconns")}))


@settings(max_examples=300, deadline=None)
@given(arbitrary_rows())
def test_the_text_is_the_librarys_byte_for_byte(rows):
    layout = exposition.Layout(rows.generation, rows.labels)
    columns = exposition.values(rows, layout.sizes, NOW)
    want = library_text(exposition.library_families(layout, rows.labels, columns))
    assert b"".join(exposition.render(layout, columns)) == want


def test_label_values_are_escaped_as_the_library_does():
    assert exposition.escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'


# --- the cache in front ---------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


class Renderer:
    """Counts renders; each render yields ``parts`` strings, pausing ``pause`` between them."""

    def __init__(self, parts=2, pause=0.0):
        self.count, self.parts, self.pause = 0, parts, pause

    def __call__(self):
        self.count += 1
        n = self.count
        for i in range(self.parts):
            if self.pause:
                gevent.sleep(self.pause)
            yield f"render {n} part {i}\n"


def test_a_body_is_served_for_the_ttl_then_rendered_again():
    clock, render = Clock(), Renderer()
    scrapes = Scrapes(render, ttl=1.0, clock=clock)
    first = scrapes.get()
    assert b"".join(first.parts) == b"render 1 part 0\nrender 1 part 1\n"
    clock.now += 0.5
    assert scrapes.get() is first and render.count == 1
    clock.now += 0.6  # past the ttl: a scrape waits for a new render
    assert b"render 2" in scrapes.get().parts[0]


def test_a_change_through_the_api_drops_the_body():
    clock, render = Clock(), Renderer()
    scrapes = Scrapes(render, ttl=60.0, clock=clock)
    scrapes.get()
    scrapes.invalidate()
    assert b"render 2" in scrapes.get().parts[0]


def test_a_render_begun_before_a_change_is_not_served_after_it():
    render = Renderer(parts=3, pause=0.01)
    scrapes = Scrapes(render, ttl=60.0)
    early = gevent.spawn(scrapes.get)
    gevent.sleep(0.015)  # the first render is under way
    scrapes.invalidate()
    late = gevent.spawn(scrapes.get)
    gevent.joinall([early, late], raise_error=True)
    # the early one too: what a scrape returns was begun after every change made before it ends
    assert b"render 2" in early.value.parts[0] and b"render 2" in late.value.parts[0]
    assert render.count == 2


def test_scrapes_that_arrive_together_share_one_render_and_others_run_meanwhile():
    render = Renderer(parts=5, pause=0.001)
    scrapes = Scrapes(render, ttl=0.0)
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.001)) for _ in range(1000)])
    got = [gevent.spawn(scrapes.get) for _ in range(4)]
    gevent.joinall(got, raise_error=True)
    ticker.kill()
    assert render.count == 1 and len({id(g.value) for g in got}) == 1
    assert ticks  # the render yielded: other greenlets ran while it went on


def test_the_next_render_starts_before_the_body_expires():
    clock, render = Clock(), Renderer()
    scrapes = Scrapes(render, ttl=1.0, clock=clock)
    scrapes.get()
    scrapes._took = 0.2
    clock.now += 0.7  # within 2 x the last render's duration of the expiry
    body = scrapes.get()
    assert b"render 1" in body.parts[0]  # still served at once
    while scrapes._running is not None:  # the background render
        gevent.sleep(0)
    assert render.count == 2
    assert b"render 2" in scrapes.get().parts[0]


def test_a_failed_render_is_an_error_for_its_scrapes_and_not_kept():
    calls = []

    def render():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("bug")
        yield "fine\n"

    scrapes = Scrapes(render, ttl=60.0)
    with pytest.raises(RuntimeError):
        scrapes.get()
    assert scrapes.get().parts == [b"fine\n"]


def test_once_gzip_is_asked_for_each_render_is_compressed_too():
    import gzip

    clock, render = Clock(), Renderer(parts=3)
    scrapes = Scrapes(render, ttl=1.0, clock=clock)
    assert scrapes.get().gzip is None
    assert scrapes.get(gzip=True).gzip is None  # this body was rendered without
    clock.now += 2
    body = scrapes.get(gzip=True)
    assert gzip.decompress(b"".join(body.gzip)) == b"".join(body.parts)
    assert body.length(gzip=True) == len(b"".join(body.gzip))


def test_the_writer_rebuilds_columns_when_a_check_or_the_kernel_moved():
    engine = busy_engine()
    before = rows_of(engine)
    assert rows_of(engine).backends is not None  # served again: the same columns
    key = next(k for k, g in engine.targets().items() if ("web", "z") in g.members)
    engine.handle_health([{"worker": 0, "results": [
        {"key": key, "ok": True, "status": "up", "at": NOW - 1, "latency": 0.5}]}])
    after = rows_of(engine)
    assert after.backends.check_at != before.backends.check_at
    live = engine.kernel.dump()
    web = next(s for s in live.values() if s.addr == "10.0.0.1")  # the kernel's order is not ours
    next(iter(web.dests.values())).weight = 99
    replaced = dict(live)  # a new snapshot: a new table, the moved service's entry replaced
    for k, s in replaced.items():
        replaced[k] = type(s)(**{**s.__dict__})
    engine.kernel.dump = lambda: replaced
    assert 99 in rows_of(engine).backends.kernel_weight
    assert fast_text(rows_of(engine)) == library_text(families(dump_of(engine), NOW))


@pytest.mark.parametrize("vs", ["web", "empty", "alpha"])
def test_the_service_summary_answers_get_service_as_the_full_view_does(vs):
    from gorb.services.api import views

    engine = busy_engine()
    full = engine.read("service.get", {"service": vs})["data"]
    summary = engine.read("service.get", {"service": vs, "summary": True})["data"]
    assert views.service_info(summary, NOW) == views.service_info(full, NOW)
    assert len(msgspec.msgpack.encode(summary)) <= len(msgspec.msgpack.encode(full))
