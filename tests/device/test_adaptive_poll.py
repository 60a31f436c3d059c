"""Adaptive polling in the queue workers: after serving requests a worker
looks at its rings for a while before sleeping, so a driver that answers
quickly is served without a wake-up and without kicking; an idle device
still uses no CPU."""
import contextlib
import os
import resource
import time

import pytest

from vhostuser.blk import BlkDevice, RamBackend
from vhostuser.frontend import BlkRequest

MIB = 1 << 20
REQUESTS = 200


def run_qd1(blk) -> int:
    """REQUESTS reads one after the other, as a guest at queue depth 1
    issues them; returns how many of them the driver had to kick."""
    vq = blk.queues[0]
    kicks = 0
    for i in range(REQUESTS):
        with blk.mem.scratch():
            req = BlkRequest.read(i * 8, 4096)
            vq.add(blk.build_chain(req), req, indirect=blk.indirect)
            kicks += vq.notify()
            (done,) = blk.reap(1)
            assert done.ok
    return kicks


def cpu_seconds() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


@contextlib.contextmanager
def on_one_cpu(pin: bool):
    """With pin, this thread and every thread it starts from here on (the
    server's loop, hence the queue workers) share one CPU."""
    before = os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.parametrize("cpus", ["any", "one"])
@pytest.mark.parametrize("window_us", [0, 100_000])
def test_requests_arriving_within_the_window_need_no_wake_up_and_no_kick(blk_client, window_us,
                                                                         cpus):
    dev = BlkDevice(RamBackend(MIB))
    # A window (100 ms) far longer than this Python driver takes to send its
    # next request, even preempted on a loaded machine; 0 turns polling off.
    dev.adaptive_poll_us = window_us
    with on_one_cpu(cpus == "one"), blk_client(dev) as (srv, blk):
        kicks = run_qd1(blk)
        (stats,) = dev.session.dataplane.worker_stats()
    # What polling is for: a request that comes while the worker looks needs
    # neither a wake-up of the worker nor a kick from the driver.
    # spin_catches counts handler runs that found work, not requests: when
    # the driver shares the worker's CPU (cpus="one"; on a busy CI machine,
    # some runs) it runs between the worker's notification and the
    # handler's re-check for more, and one run serves up to 16 requests in a
    # row (BLK_ROUNDS): ~13 "catches" for 200 requests that all went without
    # a wake-up. Counting catches is what made this test look flaky.
    if window_us:
        assert stats["spin_catches"] > 0
        assert stats["wakeups"] <= REQUESTS // 10, (stats, kicks)
        assert kicks <= REQUESTS // 10, (stats, kicks)
    else:
        assert stats["spin_catches"] == 0
        assert stats["wakeups"] >= REQUESTS // 2, (stats, kicks)
        assert kicks >= REQUESTS // 2, (stats, kicks)


def test_a_window_that_catches_nothing_shrinks_and_idle_costs_no_cpu(blk_client):
    dev = BlkDevice(RamBackend(MIB))
    dev.adaptive_poll_us = 1000
    with blk_client(dev) as (srv, blk):
        # Requests 20 ms apart: each window of looking finds nothing.
        for i in range(8):
            blk.read(i * 8, 4096)
            time.sleep(0.02)
        (stats,) = dev.session.dataplane.worker_stats()
        assert stats["adaptive_poll_us"] < 1000
        before = cpu_seconds()
        time.sleep(1.0)
        assert cpu_seconds() - before < 0.1      # nobody spins while nothing happens


@pytest.mark.parametrize("event_idx", [False, True])
def test_a_polling_worker_tells_the_driver_not_to_kick_and_asks_again_before_sleeping(
        blk_client, event_idx):
    """While the worker polls a ring, kicks would only cost the driver a
    syscall each: the device keeps them suppressed. When it stops polling
    it asks for them again, and a request after that is served."""
    poll_s = 0.3
    dev = BlkDevice(RamBackend(MIB), poll_us=int(poll_s * 1e6))
    dev.adaptive_poll_us = 0
    with blk_client(dev, event_idx=event_idx) as (srv, blk):
        vq = blk.queues[0]

        def one_request() -> bool:
            req = BlkRequest.read(0, 4096)
            vq.add(blk.build_chain(req), req, indirect=blk.indirect)
            kicked = vq.notify()
            (done,) = blk.reap(1)
            assert done.ok
            return kicked

        time.sleep(poll_s * 3)                # it polls from the start: let it sleep
        assert one_request()                  # asleep: notifications were on
        kicks = sum(one_request() for _ in range(50))
        # The first request or two may race the worker's first poll.
        assert kicks <= 2, f"{kicks} of 50 requests kicked a polling worker"
        time.sleep(poll_s * 3)                # the worker gives up and sleeps
        assert one_request()                  # ...having asked for kicks again
