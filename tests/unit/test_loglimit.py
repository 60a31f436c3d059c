"""vhostuser.loglimit: the first occurrence of a failure in full, then at
most one line per key and interval saying how many were held back, every
held-back line counted by source."""
import logging
import threading

import pytest

from vhostuser import loglimit
from vhostuser.loglimit import LogLimiter


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def limiter(caplog):
    caplog.set_level(logging.INFO, logger="test.loglimit")
    clock = Clock()
    lim = LogLimiter(logging.getLogger("test.loglimit"), interval=10.0, clock=clock)
    lim.clock = clock
    return lim


def lines(caplog):
    return [(r.levelno, r.getMessage(), r.exc_info is not None) for r in caplog.records]


def boom():
    try:
        raise ValueError("boom")
    except ValueError as exc:
        return exc


def test_first_in_full_then_one_summary_per_interval(limiter, caplog):
    exc = boom()
    assert limiter.log("k", logging.ERROR, "failed at %d", 0, exc_info=exc, source=0)
    for i in range(1, 50):
        limiter.clock.now += 0.1
        assert not limiter.log("k", logging.ERROR, "failed at %d", i, exc_info=exc, source=i % 2)
    assert lines(caplog) == [(logging.ERROR, "failed at 0", True)]
    assert "Traceback" in caplog.text and "ValueError: boom" in caplog.text
    assert limiter.suppressed == {0: 24, 1: 25}

    limiter.clock.now = 1010.0
    assert limiter.log("k", logging.ERROR, "failed at %d", 50, exc_info=exc, source=0)
    assert lines(caplog)[1] == (logging.ERROR,
                                "failed at 50 (and 49 like it not logged in the last 10s)",
                                False)
    # A new window starts with that line.
    limiter.clock.now += 5
    assert not limiter.log("k", logging.ERROR, "failed at %d", 51, source=0)
    assert len(caplog.records) == 2


def test_keys_are_limited_apart(limiter, caplog):
    assert limiter.log("a", logging.WARNING, "a")
    assert limiter.log("b", logging.WARNING, "b")
    assert not limiter.log("a", logging.WARNING, "a")
    assert [m for _, m, _ in lines(caplog)] == ["a", "b"]


def test_a_quiet_key_logs_again_as_one_line(limiter, caplog):
    limiter.log("k", logging.ERROR, "x", exc_info=boom())
    limiter.clock.now += 60
    assert limiter.log("k", logging.ERROR, "x", exc_info=boom())
    assert lines(caplog)[1] == (logging.ERROR, "x", False)


def test_flush_reports_what_is_held_back_once(limiter, caplog):
    limiter.log("k", logging.WARNING, "lost %s", "a")
    limiter.log("k", logging.WARNING, "lost %s", "b")
    limiter.log("k", logging.WARNING, "lost %s", "c")
    limiter.flush()
    limiter.flush()
    assert [m for _, m, _ in lines(caplog)] == ["lost a",
                                                "lost c (the last of 2 like it not logged)"]


def test_held_back_lines_reach_debug_when_it_is_on(limiter, caplog):
    caplog.set_level(logging.DEBUG, logger="test.loglimit")
    limiter.log("k", logging.WARNING, "io %d", 1)
    assert not limiter.log("k", logging.WARNING, "io %d", 2)
    assert lines(caplog) == [(logging.WARNING, "io 1", False),
                             (logging.DEBUG, "io 2 (rate-limited)", False)]
    assert limiter.suppressed == {None: 1}


def test_once_logs_a_key_a_single_time(limiter, caplog):
    assert limiter.once("m", logging.WARNING, "returned %r", 2)
    assert not limiter.once("m", logging.WARNING, "returned %r", 3)
    assert limiter.once("n", logging.WARNING, "other")
    assert [m for _, m, _ in lines(caplog)] == ["returned 2", "other"]


def test_many_kinds_share_one_key_beyond_the_limit(limiter, caplog, monkeypatch):
    monkeypatch.setattr(loglimit, "MAX_KEYS", 4)
    for i in range(4):
        assert limiter.log(i, logging.WARNING, "kind %d", i)
    assert limiter.log(4, logging.WARNING, "kind %d", 4)        # the shared key's first
    assert not limiter.log(5, logging.WARNING, "kind %d", 5)    # held back with it
    limiter.clock.now += 11                                     # quiet ones are forgotten
    assert limiter.log(6, logging.WARNING, "kind %d", 6)
    assert len(limiter._keys) <= 4


def test_counts_are_exact_from_many_threads(limiter, caplog):
    def hammer(source):
        for _ in range(2000):
            limiter.log("k", logging.WARNING, "x", source=source)
    threads = [threading.Thread(target=hammer, args=(i % 2,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(caplog.records) == 1
    assert sum(limiter.suppressed.values()) == 4 * 2000 - 1


@pytest.mark.parametrize("value, interval", [("2.5", 2.5), ("0", 0.0), ("", 10.0),
                                             ("soon", 10.0)])
def test_interval_from_the_environment(monkeypatch, value, interval):
    monkeypatch.setenv("VHOSTUSER_LOG_INTERVAL", value)
    assert LogLimiter(logging.getLogger("test.loglimit")).interval == interval


def test_interval_zero_logs_every_occurrence_the_first_in_full(caplog):
    caplog.set_level(logging.INFO, logger="test.loglimit")
    lim = LogLimiter(logging.getLogger("test.loglimit"), interval=0)
    for i in range(3):
        assert lim.log("k", logging.ERROR, "n %d", i, exc_info=boom())
    assert lines(caplog) == [(logging.ERROR, "n 0", True), (logging.ERROR, "n 1", False),
                             (logging.ERROR, "n 2", False)]
