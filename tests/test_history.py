"""
The dashboard's memory: the ring buffers and the sampling of lbws/ops/history.py
on a Clock, and the event log of lbws/telemetry/events.py. The same seen from the
dashboard's HTTP endpoints and in a browser is in test_dashboard.
"""

import math
import tracemalloc
from collections import Counter

from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from lbws.config import parseConfig
from lbws.telemetry.events import Events
from lbws.ops.history import SAMPLES, History, HistorySampler
from lbws.telemetry.metrics import Counters
from lbws.backends.pool import Pool
from tests.support import configText, setActive

TWO = [("a", "ws://h:1"), ("b", "ws://h:2")]


def world(backends=TWO, size=SAMPLES, interval=2.0):
    clock = Clock()
    clock.advance(1000)
    pool = Pool(parseConfig(configText(backends), "t.ini"), clock)
    counters = Counters()
    sampler = HistorySampler(clock, pool, counters, interval=interval, size=size)
    return clock, pool, counters, sampler


def traffic(member, active, total, messagesIn, messagesOut, bytesIn, bytesOut, failed):
    """
    Give C{member} these counts the way the relay does: connections opened,
    accepted and closed, messages relayed, connects failed.
    """
    for n in range(total):
        connection = member.opened()
        connection.established()
        if n >= active:
            connection.close()
        else:
            held.append(connection)
    for _ in range(messagesIn):
        member.traffic.message(True, bytesIn // messagesIn)
    for _ in range(messagesOut):
        member.traffic.message(False, bytesOut // messagesOut)
    for _ in range(failed):
        member.traffic.failure()


# Connections the tests keep open.
held = []


def test_samples_every_interval_on_the_clock_and_stops():
    clock, pool, counters, sampler = world()
    sampler.startService()
    assert sampler.history.count == 1  # the first at once
    clock.advance(2)
    clock.advance(2)
    assert sampler.history.count == 3
    assert list(sampler.history.times[:3]) == [1000.0, 1002.0, 1004.0]
    sampler.stopService()
    clock.advance(10)
    assert sampler.history.count == 3
    assert not clock.getDelayedCalls()


def test_rates_come_from_the_counters_between_samples():
    clock, pool, counters, sampler = world()
    a, b = pool["a"], pool["b"]
    sampler.startService()
    traffic(a, active=3, total=10, messagesIn=40, messagesOut=20, bytesIn=4000, bytesOut=2000, failed=1)
    counters.handshakes.update(ok=10, no_backend=2, backend_refused=1)
    clock.advance(2)
    view = sampler.view(3600)
    assert view["times"] == [1000.0, 1002.0]
    series = {entry["name"]: entry for entry in view["backends"]}
    # The first sample has no rate: nothing to take a difference from.
    assert series["a"]["connections"] == [None, 5.0]
    assert series["a"]["messages_in"] == [None, 20.0]
    assert series["a"]["messages_out"] == [None, 10.0]
    assert series["a"]["bytes_in"] == [None, 2000.0]
    assert series["a"]["bytes_out"] == [None, 1000.0]
    assert series["a"]["failures"] == [None, 0.5]
    assert series["a"]["active"] == [0, 3]
    assert series["b"]["connections"] == [None, 0.0]
    total = view["total"]
    assert total["active"] == [0, 3]
    assert total["connections"] == [None, 5.0]
    assert total["messages_in"] == [None, 20.0]
    assert total["failures"] == [None, 1.5]  # client handshakes that were not ok
    assert total["up"] == [2, 2]
    # A late tick (the reactor was busy) divides by the time really passed.
    for _ in range(8):
        connection = a.opened()
        connection.established()
        connection.close()
    clock.advance(4)
    assert sampler.view(3600)["backends"][0]["connections"][-1] == 2.0


def test_workers_counts_are_in_the_sums():
    clock, pool, counters, sampler = world()
    sampler.startService()
    # What lbws.workers keeps of two workers' reports.
    pool["a"].traffic.report(1, {"active": 2, "total": 4})
    pool["a"].traffic.report(2, {"active": 1, "total": 6})
    counters.fromWorker(1, {"handshakes": {"ok": 10}, "closes": [], "protocolErrors": []})
    clock.advance(2)
    view = sampler.view(60)
    assert view["backends"][0]["active"][-1] == 3
    assert view["backends"][0]["connections"][-1] == 5.0
    assert view["total"]["connections"][-1] == 5.0
    # A worker that ends takes its counts along: a rate of 0, not negative.
    pool.forgetWorker(2)
    clock.advance(2)
    assert sampler.view(60)["backends"][0]["connections"][-1] == 0.0


def test_state_and_check_rtt():
    clock, pool, counters, sampler = world()
    a = pool["a"]
    sampler.startService()
    a.recordCheck(True, clock.seconds(), 2, 2, rtt=0.0015)
    clock.advance(2)
    a.recordCheck(False, clock.seconds(), 2, 1, "connection refused")
    clock.advance(2)
    a.admin.drain()
    clock.advance(2)
    entry = sampler.view(3600)["backends"][0]
    assert entry["state"] == ["up", "up", "down", "draining"]
    # The round trip shows while the last check passed, not a stale one.
    assert entry["rtt"] == [None, 0.0015, None, None]


def test_the_ring_wraps_around_and_ranges_select_by_time():
    clock, pool, counters, sampler = world(size=5)
    sampler.startService()
    for n in range(11):
        setActive(pool["a"], n + 1)
        clock.advance(2)
    history = sampler.history
    assert history.count == 5
    assert history.next == 2  # 12 samples in 5 slots
    view = sampler.view(3600)
    assert view["times"] == [1014.0, 1016.0, 1018.0, 1020.0, 1022.0]
    assert view["backends"][0]["active"] == [7, 8, 9, 10, 11]
    # The last 5 seconds before 1022: the samples at 1018, 1020 and 1022.
    assert sampler.view(5)["times"] == [1018.0, 1020.0, 1022.0]
    assert sampler.view(5)["range"] == 5
    # Bounded to an hour.
    assert sampler.view(10**9)["range"] == 3600


def test_a_backend_that_left_has_gaps_then_is_forgotten():
    clock, pool, counters, sampler = world(size=4)
    sampler.startService()
    pool.update(parseConfig(configText(TWO[:1]), "t.ini"))  # b removed, idle: gone
    clock.advance(2)
    entry = sampler.view(3600)["backends"][1]
    assert entry["name"] == "b"
    assert entry["state"] == ["up", None]
    assert entry["active"] == [0, None]
    for _ in range(3):
        clock.advance(2)
    assert [e["name"] for e in sampler.view(3600)["backends"]] == ["a"]


def test_memory_stays_the_same_however_long_it_runs():
    clock, pool, counters, sampler = world(size=SAMPLES)
    sampler.startService()
    for _ in range(SAMPLES):
        clock.advance(2)
    size = sampler.history.nbytes()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n in range(3 * SAMPLES):
            connection = pool["a"].opened()
            connection.established()
            connection.close()
            pool["b"].traffic.message(True, n)
            clock.advance(2)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert sampler.history.nbytes() == size
    # Nothing accumulates: what is left is a few small objects of the last
    # sample (its counters and rates), not a byte per sample.
    assert grown < 4096, grown


def test_one_backend_costs_a_fixed_amount():
    _, _, _, one = world(backends=TWO[:1])
    _, _, _, two = world(backends=TWO)
    one.sample()
    two.sample()
    perBackend = two.history.nbytes() - one.history.nbytes()
    # 8 series of 4-byte floats and one byte of state per sample.
    assert perBackend == SAMPLES * (8 * 4 + 1) == 59400


def test_a_failing_sample_is_logged_and_the_loop_goes_on():
    clock, pool, counters, sampler = world()
    sampler.counters = None  # counters.merged() raises
    with capturedLogs() as logged:
        sampler.startService()
        clock.advance(2)
    failures = [e for e in logged if e.get("log_failure") is not None]
    assert len(failures) == 2
    assert sampler._loop.running
    sampler.counters = counters
    clock.advance(2)
    assert sampler.history.count == 1


def test_history_of_an_empty_pool():
    history = History(size=3)
    history.sample(5.0, [], Counters())
    view = history.view(5.0, 60)
    assert view["times"] == [5.0]
    assert view["backends"] == []
    assert view["total"]["up"] == [0]
    assert math.isnan(history.total.series["connections"][0])


# Events


def test_events_are_kept_with_their_time_and_logged_with_their_fields():
    clock = Clock()
    clock.advance(50)
    events = Events(clock)
    with capturedLogs() as logged:
        events.record(
            "backend_down", "backend {backend} is down: {error}", LogLevel.warn,
            backend="a", error="connection refused",
        )
    [log] = logged
    assert log["log_level"] == LogLevel.warn
    assert (log["event"], log["backend"], log["error"]) == ("backend_down", "a", "connection refused")
    assert events.recent() == [
        {
            "seq": 1,
            "time": 50.0,
            "kind": "backend_down",
            "level": "warn",
            "text": "backend a is down: connection refused",
            "backend": "a",
            "error": "connection refused",
        }
    ]


def test_only_the_last_events_are_kept():
    clock = Clock()
    events = Events(clock, size=500)
    for n in range(1234):
        clock.advance(1)
        events.record("reload", "reload {n}", accepted=True, n=n)
    kept = events.recent()
    assert len(kept) == len(events) == 500
    assert [e["n"] for e in kept] == list(range(734, 1234))
    assert [e["n"] for e in events.recent(since=1230)] == [1229, 1230, 1231, 1232, 1233]


def test_a_backend_going_down_and_up_is_an_event_with_its_error():
    clock, pool, counters, sampler = world()
    a = pool["a"]
    for ok in (False, False, False, True, True):
        clock.advance(1)
        a.recordCheck(ok, clock.seconds(), 2, 2, "" if ok else "connection refused")
    assert [(e["kind"], e["time"], e["text"]) for e in pool.events.recent()] == [
        ("backend_down", 1002.0, "backend a is down: connection refused"),
        ("backend_up", 1005.0, "backend a is up"),
    ]


def test_a_reload_records_what_joined_and_what_drains():
    clock, pool, counters, sampler = world()
    setActive(pool["b"], 1)
    pool.update(parseConfig(configText([TWO[0], ("c", "ws://h:3")]), "t.ini"))
    got = Counter((e["kind"], e["source"], e["backend"]) for e in pool.events.recent())
    assert got == {("enable", "reload", "c"): 1, ("drain", "reload", "b"): 1}
