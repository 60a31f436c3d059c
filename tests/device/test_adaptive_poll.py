"""Adaptive polling in the queue workers: after serving requests a worker
looks at its rings for a while before sleeping, so a driver that answers
quickly is served without a wake-up; an idle device still uses no CPU."""
import resource
import time

import pytest

from vhostuser.blk import BlkDevice, RamBackend
from vhostuser.frontend import BlkRequest

MIB = 1 << 20
REQUESTS = 200


def run_qd1(blk) -> None:
    for i in range(REQUESTS):
        (r,) = blk.execute([BlkRequest.read(i * 8, 4096)])
        assert r.ok


def cpu_seconds() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


@pytest.mark.parametrize("window_us", [0, 100_000])
def test_requests_arriving_within_the_window_need_no_wake_up(blk_client, window_us):
    dev = BlkDevice(RamBackend(MIB))
    # A window (100 ms) far longer than this Python driver takes to send its
    # next request even on a loaded machine, so catches are certain; 0 turns
    # polling off.
    dev.adaptive_poll_us = window_us
    with blk_client(dev) as (srv, blk):
        run_qd1(blk)
        (stats,) = dev.session.dataplane.worker_stats()
    if window_us:
        # Some requests are caught while polling and some need no wake-up at
        # all. How many varies with the machine's load (CI saw 16 of 200
        # caught once), so only "some" is asserted.
        assert stats["spin_catches"] > 0
        assert stats["wakeups"] < REQUESTS
    else:
        assert stats["spin_catches"] == 0
        assert stats["wakeups"] >= REQUESTS // 2


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
